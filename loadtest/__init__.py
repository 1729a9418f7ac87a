"""The load test: Locust users (locustfile.py) that send real test-set images and check every answer,
a headless Locust run (runner.py), its summary and SLO check (summary.py), and the whole `make loadtest`
(run.py: pick or start the server, run, check configs/loadtest.yaml's SLOs)."""
