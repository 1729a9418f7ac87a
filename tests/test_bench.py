"""The benchmark's load generators (bench/wrk.py, bench/locust.py): a real wrk against the session's real
TorchServe; wrk then Locust against the shipped settings over the session's archive, as `make bench` runs them."""

import os

import pytest
from omegaconf import OmegaConf

from bench import wrk
from bench.measure import measure
from bench.models import Model
from bench.report import closed_table, core_cost, goals, median_rows, report
from bench.run import Plan
from bench.servers import FASTAPI, PLAIN, TUNED, Server
from common.config import load_config
from servers.torchserve import CONFIG_PROPERTIES


@pytest.fixture(scope="module")
def bodies(pngs) -> list[bytes]:
    return pngs[:16]


def test_wrk_closed_loop_counts_answers_latency_and_its_own_cpu(server, cfg, bodies):
    url = f"{server.url('inference')}/predictions/{cfg.name}"
    r = wrk.run(url, server.headers(), bodies, connections=2, seconds=2)
    assert r["requests"] > 0 and r["errors"] == 0, r
    assert 0 < r["p50_ms"] <= r["p99_ms"] <= r["max_ms"]
    assert r["rps"] > 0 and 0 <= r["client_cpu"] < 2


def test_wrk_counts_refused_requests_as_errors(server, cfg, bodies):
    """A wrong token: every answer is a 4xx, and wrk's summary says so (the benchmark's error column)."""
    url = f"{server.url('inference')}/predictions/{cfg.name}"
    r = wrk.run(url, {"Authorization": "Bearer wrong"}, bodies, connections=1, seconds=1)
    assert r["requests"] > 0 and r["errors"] == r["requests"], r


def test_wrk_paced_run_sends_and_answers(server, cfg, bodies):
    """Open loop: 8 connections, Poisson arrivals at 40 req/s in all; every request answered."""
    url = f"{server.url('inference')}/predictions/{cfg.name}"
    r = wrk.run(url, server.headers(), bodies, connections=8, seconds=2, rate=40)
    assert r["requests"] > 0 and r["errors"] == 0 and r["rate"] == 40, r


@pytest.mark.server
def test_bench_runs_locust_beside_wrk_on_the_shipped_server_and_reports_both(cfg, mar, bodies, tmp_path):
    """`make bench --quick` in small, the shipped ("tuned") server alone on the session's archive: wrk at 1 and 2
    connections, then Locust at 2 users beside it (3 is left out: wrk did not measure it); the report's
    "Locust vs wrk" table, and the split of a lone request's time from TorchServe's own latency counters.
    No timing asserts: only that both clients answered and measured their own CPU, and the clock's parts add up."""
    bench = load_config(config_name="loadtest").bench
    plan = Plan.of(bench, quick=True, connections=[1, 2], repeats=1, sweep=False)
    plan.run_time_s, plan.warmup_s, plan.batch_sizes, plan.rates = 2, 1, [], []
    plan.locust_connections = [2, 3]
    model = Model(str(cfg.name), cfg, mar, bodies)
    results = {"runs": [], "open": [], "ready": [], "inprocess": [], "locust": [], "errors": []}
    measure(model, [Server("tuned", [1, 2], [], mar.parent, CONFIG_PROPERTIES)], plan, tmp_path, results)
    assert results["errors"] == []
    for run in results["runs"]:  # TorchServe's clock: the queue is part of the server's time, both inside wrk's
        assert 0 < run["ts_queue_ms"] < run["ts_latency_ms"] < run["connections"] / run["rps"] * 1e3, run
    cores = os.cpu_count() or 1
    (row,) = results["locust"]
    assert row["server"] == "tuned" and row["connections"] == 2, row
    assert row["count"] > 0 and row["failures"] == 0 and row["rps"] > 0, row
    assert 0 < row["p50_ms"] <= row["p99_ms"] and 0 < row["client_cpu"] < cores, row
    assert row["wrk"]["rps"] > 0 and row["wrk"]["failures"] == 0 and 0 <= row["wrk"]["client_cpu"] < cores, row
    meta = dict.fromkeys(("date", "args", "machine", "torch", "torchserve", "wrk", "locust", "note"), "")
    meta |= dict.fromkeys(("minutes", "load_start", "load_end", "load_median"), 0.0)
    meta |= {"run_time_s": 2, "repeats": 1, "paced_connections": 2, "cores": cores, "stock": "", "tuned": ""}
    meta["delay_ms"] = 1
    meta["goals"] = OmegaConf.to_container(bench.goals, resolve=True)
    text = report({**results, "meta": meta}, [model.key], ["tuned"], None)
    table = text[text.index("Locust vs wrk (tuned TorchServe)") :]
    assert "| 2 | " in table and "| 3 | " not in table and "At 2 connections Locust used" in table, table
    split = text[text.index("Where a lone request's time goes") : text.index("Locust vs wrk")]
    assert "| the whole round trip, as wrk sees it" in split and "maxBatchDelay 1 ms" in split, split


def test_bench_plan_takes_locust_counts_from_the_config_unless_left_out():
    bench = load_config(config_name="loadtest").bench
    assert Plan.of(bench, False, None, None, False).locust_connections == list(bench.locust_connections)
    assert Plan.of(bench, True, None, None, False).locust_connections == list(bench.quick.locust_connections)
    assert Plan.of(bench, False, None, None, False, with_locust=False).locust_connections == []
    assert Plan.of(bench, False, None, None, True).locust_connections == []  # --sweep: candidates only


def test_the_report_sets_tuned_against_the_plain_peer_and_prices_the_serving_core():
    """The plain peer's column and goal, and the serving core's cost: the same-work FastAPI peer's server CPU per
    request minus the plain one's, at the goals' connection count (made-up medians)."""
    target = OmegaConf.to_container(load_config(config_name="loadtest").bench.goals, resolve=True)
    conns = target["connections"]

    def run(server: str, rps: float, cpu_ms: float) -> dict:
        timing = {"p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0, "client_cpu": 0.5, "failures": 0}
        return {"model": "m", "server": server, "connections": conns, "rps": rps, "cpu_ms": cpu_ms, **timing}

    runs = [run(TUNED, 1400, 1.0), run(FASTAPI, 500, 3.5), run(PLAIN, 1000, 2.25)]
    results = {"runs": [{**r, "worker_cpu_ms": r["cpu_ms"]} for r in runs], "inprocess": [], "meta": {"goals": target}}
    medians = median_rows(results, "m")
    table = closed_table(medians, {}, [TUNED, FASTAPI, PLAIN])
    assert f"| {TUNED}/{FASTAPI} | {TUNED}/{PLAIN} |" in table[2] and table[-1].endswith("| 2.80× | 1.40× |  |")
    assert core_cost(medians, conns)[-1].endswith(
        f"{conns} connections: *{FASTAPI}* 3.50 − *{PLAIN}* 2.25 = **1.25 server CPU ms per request**."
    )
    row = (
        f"| tuned ≥ {target['tuned_vs_plain']}× {PLAIN} at {conns} connections (m) | 1400 vs 1000 req/s: 1.40× | met |"
    )
    assert row in goals(results, ["m"], None)
    del target["tuned_vs_plain"]  # a results.json from before the plain peer: no such goal, no row
    assert not [line for line in goals(results, ["m"], None) if PLAIN in line]
    assert core_cost(median_rows({"runs": results["runs"][:2]}, "m"), conns) == []  # --no-plain


def test_the_fastapi_peer_sets_tcp_nodelay_on_sockets_uvicorn_workers_bind(monkeypatch):
    """uvicorn --workers binds with protocol 0, which asyncio skips when it sets TCP_NODELAY (a 40 ms
    delayed-ACK stall per answer): the peer's patch sets it on such a socket too."""
    import asyncio.base_events
    import socket

    from servers.fastapi import tcp_nodelay_everywhere

    monkeypatch.setattr(asyncio.base_events, "_set_nodelay", asyncio.base_events._set_nodelay)  # restored after
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # protocol 0, as uvicorn's bind_socket
        asyncio.base_events._set_nodelay(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0  # asyncio alone leaves it off
        tcp_nodelay_everywhere()
        asyncio.base_events._set_nodelay(sock)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
