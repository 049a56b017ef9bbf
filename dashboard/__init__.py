"""Web dashboard for site supervisors, fed by the edge runtime's MQTT topics."""
