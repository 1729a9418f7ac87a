"""The benchmark's load generator (bench/wrk.py): a real wrk against the session's real TorchServe."""

import pytest

from bench import wrk
from tests.client import png

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def bodies(test_split) -> list[bytes]:
    return [png(image) for image in test_split[0][:16]]


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
