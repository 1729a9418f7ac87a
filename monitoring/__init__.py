"""Watching the model: how it holds up under shifted inputs, and what served traffic looks like.

shifts.py: realistic input shifts (Kornia, Pillow) on uint8 RGB images; robustness.py: accuracy per
shift and severity (a DVC stage); drift_report.py: a folder of images scored against the training
reference with the serving core; prometheus.py: the Prometheus config for TorchServe's metrics
(prometheus.yml, alerts.yml and grafana-dashboard.json beside it).
"""
