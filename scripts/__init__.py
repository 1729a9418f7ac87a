"""Command-line entry points: archive and serve."""
