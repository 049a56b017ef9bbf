"""Edge runtime: model backends, camera sources, analysis, alerts, MQTT and the live loop (no torch)."""
