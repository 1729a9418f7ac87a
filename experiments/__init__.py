"""Experiments: tracking and lineage of training runs, the hyperparameter search, profiling."""
