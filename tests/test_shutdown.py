"""Graceful shutdown (servers/drain.py): SIGTERM under load, to `make serve` (scripts/serve.py) and to the
container's entrypoint run on this host; every request sent before the signal gets an HTTP answer, none a 5xx."""

import json
import os
import signal
import sys
import time

import pytest

from common.config import ROOT
from servers.process import Process
from servers.torchserve import TorchServe
from tests.client import Answer, container_on_host, streaming

pytestmark = pytest.mark.server
CLIENTS = 8


def sigterm_under_load(proc: Process, url: str, headers: dict, images: list[bytes]) -> tuple[list[Answer], float]:
    """CLIENTS keep-alive clients stream images; SIGTERM goes to the server's own process (not its group) while they
    do, and they stop sending at the signal (Cloud Run stops routing to an instance before it signals it).
    Returns what every request got and the time of the signal."""
    with streaming(url, headers, images, CLIENTS) as answers:
        proc.wait_until(lambda: len(answers) >= 100, 60, "answering under load")
        signalled = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
    proc.proc.wait(timeout=60)
    print(f"\nSIGTERM to exit: {time.monotonic() - signalled:.1f} s, {len(answers)} requests")
    return answers, signalled


def check(answers: list[Answer], signalled: float) -> None:
    before = [a for a in answers if a.sent < signalled]
    in_flight = [a for a in before if a.done > signalled]
    lost = [a for a in before if not isinstance(a.status, int) or a.status >= 500]
    assert in_flight, "no request was in flight at the signal: the test proved nothing"
    assert lost == [], f"{len(lost)} of {len(before)} requests sent before SIGTERM lost: {lost[:3]}"
    assert {a.status for a in before} == {200}


def test_make_serve_answers_every_accepted_request_on_sigterm(cfg, mar, pngs, tmp_path):
    """scripts/serve.py (what `make serve` runs) on free ports, SIGTERMed under load by 8 clients."""
    props = TorchServe(mar.parent, {cfg.name: mar.name}, tmp_path / "probe", ports={}).props  # every port free
    (tmp_path / "config.properties").write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    workdir = tmp_path / "serve"
    cmd = [sys.executable, "-m", "scripts.serve", f"paths.model_store={mar.parent}", f"paths.data={cfg.paths.data}"]
    cmd += ["--config", str(tmp_path / "config.properties"), "--workdir", str(workdir)]
    with Process(cmd, tmp_path / "serve.log", cwd=ROOT) as proc:
        proc.wait_until(lambda: "is READY" in proc.log.read_text(), 180, "READY")
        key = json.loads((workdir / "key_file.json").read_text())["inference"]["key"]
        url = f"{props['inference_address']}/predictions/{cfg.name}"
        answers, signalled = sigterm_under_load(proc, url, {"Authorization": f"Bearer {key}"}, pngs)
    assert proc.proc.returncode == 0, proc.log_tail()
    check(answers, signalled)


def test_container_entrypoint_answers_every_accepted_request_on_sigterm(cfg, mar, pngs, tmp_path):
    """docker/entrypoint.sh run on this host as the image runs it (its files in TS_DIR, loopback, free ports):
    drain.py is PID 1's stand-in and Java its child; SIGTERMed under load by 8 clients."""
    ts_dir, env, ports = container_on_host(tmp_path, cfg.name)
    env["MODEL_STORE"] = str(mar.parent)
    with Process(["sh", str(ts_dir / "entrypoint.sh")], tmp_path / "container.log", tmp_path, env) as proc:
        ts = TorchServe(mar.parent, {cfg.name: mar.name}, tmp_path / "unused")
        ts.props.update(disable_token_authorization="true")
        ts.props["management_address"] = f"http://127.0.0.1:{ports['MANAGEMENT_PORT']}"
        proc.wait_until(ts.ready, 180, "READY")
        url = f"http://127.0.0.1:{ports['PORT']}/predictions/{cfg.name}"
        answers, signalled = sigterm_under_load(proc, url, {}, pngs)
        log = proc.log.read_text()
    assert proc.proc.returncode == 143, log[-2000:]  # the JVM's exit code after SIGTERM, passed on
    assert "drain: drained after" in log, log[-2000:]
    check(answers, signalled)
