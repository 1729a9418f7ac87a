"""The benchmark (`make bench`): the models and archive variants (models.py), the servers compared
(servers.py), the measurements (measure.py), the report (report.py), the tuning sweep (sweep.py) and
the run that ties them together (run.py)."""
