"""Locust beside wrk: the load test's generator (loadtest/locustfile.py, Python and gevent) against the shipped
TorchServe at some of wrk's connection counts, so the report shows what each client measures on the same cores.

Like wrk here: raw PNG test-set images, one keep-alive connection per user, no wait between requests, nothing
malformed. Unlike wrk, Locust also checks every answer (status, schema, label), as in `make loadtest`. Its CPU
share is its own process's CPU seconds over the wall seconds of the measured window (`--client-cpu`: from the
test start to the last answer, so its start-up, importing and encoding the test set, is left out; 1.0 = a core).
"""

from bench.models import BenchError, Model
from bench.servers import TUNED, Running
from loadtest.locust_process import LoadTestError, run_locust

SERVER = TUNED  # the only server Locust loads: the one that ships
COMPARED = ("rps", "p50_ms", "p99_ms", "failures", "client_cpu")  # what the report sets side by side


def options(model: Model) -> dict[str, object]:
    """The locustfile's options for requests like wrk's: raw PNG bodies only, no wait, none malformed."""
    return {
        "model": model.name, "data": model.cfg.paths.data, "mix": "raw=1", "malformed_share": 0,
        "wait_min": 0, "wait_max": 0, "client_cpu": 1,
    }  # fmt: skip


def run(model: Model, running: Running, users: int, seconds: float) -> dict:
    """One headless Locust run of `users` users for `seconds` (all started at once): requests/s answered
    without failure, exact p50/p90/p99 of every answer, failures, Locust's CPU share."""
    try:
        summary = run_locust(running.host, users, users, seconds, token=running.token, options=options(model))
    except LoadTestError as err:
        raise BenchError(f"Locust at {users} users: {err}") from None
    good = summary["wellformed"]
    window = max(float(summary["seconds"]), 1e-9)
    return {
        "connections": users,
        "count": good["count"],
        "failures": good["failures"],
        "rps": (good["count"] - good["failures"]) / window,
        **{k: good[k] for k in ("p50_ms", "p95_ms", "p99_ms")},
        "client_cpu": float(summary["client_cpu"]),
        "seconds": window,
        "first_error": next(iter(summary.get("errors") or {}), ""),
    }
