"""Servers the bundle starts and stops: TorchServe, Prometheus, the container, the FastAPI and LitServe peers."""
