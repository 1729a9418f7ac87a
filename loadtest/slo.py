"""`make loadtest`: pick the target server (or start one), run Locust headless, print and check the SLOs."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig

from common.config import ROOT
from handlers.archive import mar_file
from loadtest.checks import parse_mix, read_token
from loadtest.locust_process import LoadTestError, run_locust
from loadtest.summary import check_slo, format_summary
from servers.process import port_free
from servers.torchserve import CONFIG_PROPERTIES, TorchServe, read_properties

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@contextmanager
def target(cfg: DictConfig, host: str | None, token: str) -> Iterator[tuple[str, str]]:
    """(host, token) of the server to load: `host`, else the one on config.properties' inference port
    (`make serve`), else a TorchServe started here on free ports, stopped afterwards."""
    if host is None:
        default = read_properties(CONFIG_PROPERTIES)["inference_address"]
        address = urlparse(default)
        if not port_free(address.hostname, address.port):
            print(f"targeting the server already running at {default}", flush=True)
            host = default
    if host is not None:
        if urlparse(host).hostname not in LOOPBACK:
            raise LoadTestError(f"--host {host} is not a loopback address: load tests stay on this machine")
        yield host, token
        return
    workdir = ROOT / "logs" / "loadtest" / "torchserve"
    server = TorchServe(cfg.paths.model_store, {cfg.name: mar_file(cfg.name)}, workdir, ports={})
    print(f"starting TorchServe for {cfg.name} on {server.url('inference')} ...", flush=True)
    with server:
        print(f"READY after {server.wait_ready(180):.1f} s", flush=True)
        yield server.url("inference"), server.key() or ""


def load_test(
    cfg: DictConfig,
    host: str | None = None,
    token: str = "",
    key_file: str | None = None,
    users: int | None = None,
    spawn_rate: float | None = None,
    run_time: float | None = None,
    out: str | None = None,
) -> list[str]:
    """Run the load test of `cfg.loadtest` (each argument overrides its setting); print the summary;
    return the objectives missed, empty when every SLO was met."""
    lt = cfg.loadtest
    users, run_time, out = users or lt.users, run_time or lt.run_time_s, Path(out or lt.out)
    try:
        parse_mix(lt.mix)
    except ValueError as err:
        raise LoadTestError(str(err)) from None
    options = {
        "model": lt.model, "data": lt.data, "mix": lt.mix, "instances": lt.instances,
        "malformed_share": lt.malformed_share, "wait_min": lt.wait_s[0], "wait_max": lt.wait_s[1],
    }  # fmt: skip
    with target(cfg, host, token or read_token(key_file or lt.key_file)) as (host, token):
        print(f"Locust: {users} users, {run_time:.0f} s, mix {lt.mix}, malformed {lt.malformed_share:.0%}", flush=True)
        summary = run_locust(host, users, spawn_rate or lt.spawn_rate, run_time, out, token, options)
    print(format_summary(summary))
    print(f"reports: {out}/locust.html, {out}/locust_stats.csv, {out}/summary.json")
    missed = check_slo(summary, lt.slo)
    if not missed:
        good = summary["wellformed"]
        met = f"p95 {good['p95_ms']:.1f} ms, p99 {good['p99_ms']:.1f} ms, {good['rps']:.0f} req/s, no failures"
        print(f"SLOs met: {met}")
    return missed
