"""Shared infrastructure: the config loader, atomic writes, the one-line CLI error."""
