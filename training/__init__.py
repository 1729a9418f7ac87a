"""Data -> train -> export: the training half of the bundle."""
