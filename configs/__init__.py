"""Packaged configuration files (prompt vocabulary, training and edge configs)."""
