"""The servers the benchmark compares, and starting one: TorchServe with an archive variant and a
config.properties, a peer over the same serving core (FastAPI, LitServe with batching), or the plain FastAPI app
a user might write instead (servers/plain.py)."""

import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bench.models import Model, stock_model_config, variant
from common.io import write_text
from handlers.archive import ModelConfig
from servers.fastapi import FastAPIPeer
from servers.litserve import LitServePeer
from servers.peer import Peer
from servers.plain import PlainPeer
from servers.process import Process, ServerError
from servers.torchserve import CONFIG_PROPERTIES, TorchServe, read_properties

STOCK_PROPERTIES = ("inference_address", "management_address", "metrics_address")
PERFORMANCE_PROPERTIES = (
    "default_workers_per_model", "job_queue_size", "async_logging", "metrics_mode", "disable_system_metrics",
    "number_of_netty_threads", "netty_client_threads", "vmargs",
)  # fmt: skip
# the servers' labels, in the report and results.json: TorchServe's defaults, what ships, what ships with batch
# size 1, the peers over the same serving core, and the plain app without it (its own decoding, no checks, no drift)
STOCK, TUNED, TUNED_BATCH_1, TUNED_ONE_WORKER = "stock", "tuned", "tuned, batch 1", "tuned, 1 worker"
FASTAPI, LITSERVE, PLAIN = "FastAPI", "LitServe", "FastAPI, plain"
PEERS = {FASTAPI: FastAPIPeer, PLAIN: PlainPeer, LITSERVE: LitServePeer}


@dataclass
class Server:
    """One way of serving a model: a TorchServe model store + properties, or (no store) the peer of its label."""

    label: str
    connections: list[int]
    rates: list[float] = field(default_factory=list)  # paced runs after the closed-loop ones
    store: Path | None = None
    properties: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Running:
    host: str
    token: str
    ready_s: float
    process: Process  # its process tree's CPU time is the server's cost
    metrics: str = ""  # TorchServe's Prometheus endpoint: its own latency counters


def write_stock_properties(path: Path) -> Path:
    """Only what a server needs to be reachable and safe here: loopback addresses. The rest is TorchServe's default."""
    shipped = read_properties(CONFIG_PROPERTIES)
    write_text(path, "".join(f"{k}={shipped[k]}\n" for k in STOCK_PROPERTIES))
    return path


def describe(config: ModelConfig, props: dict[str, str]) -> str:
    cores = len(os.sched_getaffinity(0))
    parts = [f"minWorkers {config.workers}" if config.workers is not None else f"a worker per core ({cores})"]
    parts += [f"batchSize {config.batch_size}", f"maxBatchDelay {config.max_batch_delay_ms}"]
    parts.append(f"torch threads {config.handler.get('threads', '?')}")
    parts += [f"{k}={v}" for k, v in props.items() if k in PERFORMANCE_PROPERTIES]
    return ", ".join(parts)


def comparison(
    model: Model,
    shipped: ModelConfig,
    workdir: Path,
    plan,
    goal_connections: int,
    default_threads: int,
    peers: Iterable[str],
) -> list[Server]:
    """stock, tuned (what ships), tuned with batch size 1 (at the fewest connections and at the goal's: what the
    batch delay costs a lone request, and what batching gains under load), tuned with one worker where more ship
    (what `workers` gains), `peers`."""
    stock = variant(model, workdir, STOCK, stock_model_config(shipped, default_threads))
    single = variant(model, workdir, "tuned_b1", shipped.changed(batch_size=1))
    conns, rates = plan.connections, plan.rates
    servers = [
        Server(STOCK, conns, rates, stock, write_stock_properties(workdir / "stock.properties")),
        Server(TUNED, conns, rates, model.mar.parent, CONFIG_PROPERTIES),
        Server(TUNED_BATCH_1, sorted({*conns[:2], goal_connections} & set(conns)), [], single, CONFIG_PROPERTIES),
    ]
    if shipped.workers != 1:
        one = variant(model, workdir, "tuned_w1", shipped.changed(workers=1))
        servers.append(Server(TUNED_ONE_WORKER, conns, [], one, CONFIG_PROPERTIES))
    return [*servers, *(Server(peer, conns, rates) for peer in peers)]


def launch(process: Peer | TorchServe, timeout: float) -> float:
    """Start it and wait until it is ready (stopped again if it is not); the seconds that took."""
    begin = time.monotonic()
    process.start()
    try:
        process.wait_ready(timeout)
    except BaseException:
        process.stop()
        raise
    return time.monotonic() - begin


def start(model: Model, server: Server, workdir: Path) -> Running:
    """Start `server` in a fresh `workdir`, ready to answer; the caller stops running.process."""
    if server.store is None:
        shutil.rmtree(workdir, ignore_errors=True)
        peer = PEERS[server.label](model.mar, workdir, workers=os.cpu_count() or 1)
        return Running(peer.url(), peer.token, launch(peer, 120), peer)
    for attempt in range(3):  # a free port can be taken by another process before TorchServe binds it
        shutil.rmtree(workdir, ignore_errors=True)
        ts = TorchServe(server.store, {model.name: model.mar.name}, workdir, server.properties, {}, server.extra)
        try:
            seconds = launch(ts, 300)
        except ServerError as err:
            if attempt < 2 and "in use" in str(err):
                continue
            raise
        return Running(ts.url("inference"), ts.key() or "", seconds, ts, f"{ts.url('metrics')}/metrics")
    raise AssertionError("unreachable")
