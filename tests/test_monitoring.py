"""monitoring/ with a real Prometheus scraping a real TorchServe serving the session's archive.

Prometheus is Debian's package (common/apt.py installs it when missing: root or sudo), run as our
own process (servers/prometheus.py) on a free port with its own storage, 1 s scrape/evaluation
intervals and every alert's `for:` set to 0s (a config derived from monitoring/prometheus.yml).
Always stopped.
"""

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch
import yaml

from common import apt
from common.cli import BundleError
from common.config import load_config
from monitoring.prometheus_config import (
    ALERTS_YML,
    PROMETHEUS_YML,
    PrometheusError,
    derived_config,
    install,
    metrics_target,
    promtool,
)
from monitoring.shifts import shift
from servers.process import ServerError
from servers.prometheus import Prometheus
from servers.torchserve import TorchServe
from tests.client import png
from training.export import as_rgb

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
COMPARISON = re.compile(r"\s*(>|<|==)\s*([0-9.]+)\s*$")


def rules() -> dict[str, dict]:
    return {
        r.get("alert") or r["record"]: r for g in yaml.safe_load(ALERTS_YML.read_text())["groups"] for r in g["rules"]
    }


def threshold(expr: str) -> float:
    return float(COMPARISON.search(expr).group(2))


def dashboard_queries() -> dict[str, list[str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return {p["title"]: [t["expr"].replace("$__rate_interval", "1m") for t in p["targets"]] for p in panels}


def wait_for(check: Callable[[], object], what: str, timeout: float = 90) -> object:
    """Poll `check` until it returns something truthy; fail with `what` and the last value."""
    deadline, value = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} not seen within {timeout:.0f} s (last: {value!r})")


def send_pngs(post, images: torch.Tensor, workers: int = 8) -> list[int]:
    """One image/png request per image, several in flight so that TorchServe batches them."""
    with ThreadPoolExecutor(workers) as pool:
        return [status for status, _ in pool.map(lambda image: post(png(image), "image/png"), images)]


def send_instances(post, images: torch.Tensor, per_request: int = 50) -> list[int]:
    statuses = []
    for start in range(0, len(images), per_request):
        items = [{"b64": base64.b64encode(png(i)).decode()} for i in images[start : start + per_request]]
        statuses.append(post(json.dumps({"instances": items}).encode(), "application/json")[0])
    return statuses


def firing(prom: Prometheus, alertname: str) -> list[dict]:
    return [a for a in prom.alerts() if a["labels"]["alertname"] == alertname and a["state"] == "firing"]


@pytest.fixture(scope="module")
def binaries() -> tuple[str, str]:
    try:
        return install()
    except BundleError as err:
        pytest.skip(f"Prometheus cannot be installed here: {err}")


@pytest.fixture(scope="module")
def server(cfg, mar, tmp_path_factory):
    """This module's own TorchServe, in place of the session's (conftest's `server`, which `post` then uses too):
    these tests kill its worker and fill its drift window with shifted traffic, which would change the session's
    server under the tests after them."""
    with TorchServe(mar.parent, {cfg.name: mar.name}, tmp_path_factory.mktemp("torchserve"), ports={}) as ts:
        ts.wait_ready(timeout=180)
        yield ts


@pytest.fixture(scope="module")
def prom(binaries, server, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prometheus")
    config = derived_config(workdir, urlparse(server.url("metrics")).netloc, interval="1s", rule_for="0s")
    with Prometheus(config, workdir) as prometheus:
        yield prometheus


@pytest.mark.slow  # installs Prometheus where it is missing
def test_promtool_accepts_the_config_and_rules_and_refuses_a_broken_rule(binaries, tmp_path):
    assert "SUCCESS" in promtool("check", "config", str(PROMETHEUS_YML))
    assert f"SUCCESS: {len(rules())} rules found" in promtool("check", "rules", str(ALERTS_YML))
    derived = derived_config(tmp_path / "derived", "127.0.0.1:1", interval="1s", rule_for="0s")
    assert "SUCCESS" in promtool("check", "config", str(derived))
    broken = tmp_path / "broken.yml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [{"alert": "A", "expr": "DriftScore >"}]}]}))
    with pytest.raises(PrometheusError, match="broken.yml"):
        promtool("check", "rules", str(broken))


def test_thresholds_and_target_have_one_source():
    cfg = load_config([], "loadtest")
    alerts = rules()
    drift = cfg.serve.handler.drift.threshold
    assert threshold(alerts["DriftDetected"]["expr"]) == drift
    drift_panel = next(p for p in json.loads(DASHBOARD.read_text())["panels"] if "DriftScore" in str(p["targets"]))
    assert drift_panel["fieldConfig"]["defaults"]["thresholds"]["steps"][-1]["value"] == drift
    assert threshold(alerts["HighInferenceLatency"]["expr"]) == cfg.loadtest.slo.p99_ms
    assert threshold(alerts["SlowBatchInference"]["expr"]) == cfg.loadtest.slo.p99_ms
    assert threshold(alerts["HighQueueLatency"]["expr"]) == cfg.loadtest.slo.p95_ms
    targets = yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [metrics_target()]


@pytest.mark.slow  # installs Prometheus where it is missing
def test_a_prometheus_that_cannot_start_says_why(binaries, tmp_path):
    broken = tmp_path / "prometheus.yml"
    broken.write_text("global: {scrape_interval: not-a-duration}\n")
    prometheus = Prometheus(broken, tmp_path / "run", timeout=30)
    with pytest.raises(ServerError, match=r"^Prometheus exited with code [1-9]") as err:
        prometheus.start()
    assert "not-a-duration" in str(err.value)  # the log's tail
    assert not prometheus.running()


@pytest.mark.slow  # installs Prometheus where it is missing
def test_command_line_help_check_and_one_line_errors(binaries, tmp_path):
    cmd = [sys.executable, "-m", "scripts.prometheus"]
    run = subprocess.run([*cmd, "check"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.count("SUCCESS") >= 2, run.stderr
    missing = tmp_path / "missing.properties"
    run = subprocess.run([*cmd, "run", "--config", str(missing)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1
    assert run.stderr.strip() == f"error: no TorchServe config {missing}: pass the config.properties to scrape"


def test_apt_finds_what_is_there_and_says_what_it_cannot_install(monkeypatch, tmp_path):
    assert apt.ensure({"sh": "dash"}) == {"sh": shutil.which("sh")}
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get on this PATH
    with pytest.raises(apt.AptError, match="^no-such-package missing and there is no apt-get here: install"):
        apt.ensure({"no-such-tool": "no-such-package"})


def test_prometheus_scrapes_torchserve(prom, server, post, test_split):
    assert set(send_pngs(post, as_rgb(test_split[0][:20]))) == {200}
    target = wait_for(lambda: [t for t in prom.targets() if t["health"] == "up"], "an up scrape target")
    assert target[0]["scrapeUrl"] == f"{server.url('metrics')}/metrics"
    answered = wait_for(lambda: prom.query("sum(Predictions)"), "Predictions in Prometheus")
    assert float(answered[0]["value"][1]) >= 20
    assert prom.query("ts_inference_requests_total")[0]["metric"]["model_name"] == next(iter(server.models))


def test_client_errors_fire_the_error_rate_alert(prom, post, test_split):
    bad = png(as_rgb(test_split[0][:1])[0])
    # A counter's first scraped value is not a rate: let Prometheus see Requests4XX before the burst.
    assert post(bad, "image/png", {"Authorization": "Bearer wrong"})[0] == 400
    wait_for(lambda: prom.query("Requests4XX"), "Requests4XX scraped")
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda _: post(bad, "image/png", {"Authorization": "Bearer wrong"})[0], range(300)))
    assert set(statuses) == {400}
    alert = wait_for(lambda: firing(prom, "HighClientErrorRate"), "HighClientErrorRate firing")
    assert float(alert[0]["value"]) > threshold(rules()["HighClientErrorRate"]["expr"])


def test_shifted_traffic_fires_the_drift_alert(prom, server, post, cfg, test_split):
    drift = cfg.serve.handler.drift
    model = next(iter(server.models))
    clean = as_rgb(test_split[0]).repeat(2 + drift.window // len(test_split[0]), 1, 1, 1)[: drift.window]
    assert set(send_instances(post, clean)) == {200}  # the worker's whole window is in-distribution now

    def low_scores() -> dict[str, float] | None:
        found = {r["metric"]["Feature"]: float(r["value"][1]) for r in prom.query(f'DriftScore{{ModelName="{model}"}}')}
        return found if found and max(found.values()) < drift.threshold else None

    low = wait_for(low_scores, "every DriftScore under the threshold")
    assert set(low) == {"brightness", "contrast", "sharpness", "width", "height", "confidence", "classes"}
    wait_for(lambda: not firing(prom, "DriftDetected"), "DriftDetected resolved on in-distribution traffic", 30)

    images = as_rgb(test_split[0])
    inverted = shift(images, "inversion", 1.0, torch.Generator())
    brightened = shift(images, "brightness", 0.3, torch.Generator())
    shifted = torch.cat([inverted, brightened])[: int(drift.window * 0.8)]  # 80% of the window
    assert set(send_pngs(post, shifted)) == {200}
    alerts = wait_for(lambda: firing(prom, "DriftDetected"), "DriftDetected firing")
    features = {a["labels"]["Feature"] for a in alerts if a["labels"]["ModelName"] == model}
    assert "brightness" in features
    assert "width" not in features and "height" not in features  # same image sizes: no drift there
    assert all(float(a["value"]) > drift.threshold for a in alerts)


def test_every_alert_and_dashboard_query_is_valid_and_has_data(prom, post, cfg, test_split):
    """Every metric an alert or a panel reads exists with these labels, after traffic this test sends itself:
    answers (more than the drift window's minimum, so DriftScore exists) and refused tokens (Requests4XX)."""
    images = as_rgb(test_split[0]).repeat(2, 1, 1, 1)[: cfg.serve.handler.drift.min_samples + 20]
    bad = png(images[0])
    assert post(bad, "image/png", {"Authorization": "Bearer wrong"})[0] == 400
    assert set(send_pngs(post, images)) == {200}
    assert post(bad, "image/png", {"Authorization": "Bearer wrong"})[0] == 400
    wait_for(lambda: prom.query("DriftScore") and prom.query("Requests4XX"), "DriftScore and Requests4XX scraped")
    time.sleep(3)  # two scrapes after the last requests, so rates have samples
    for name, rule in rules().items():
        expr = COMPARISON.sub("", rule["expr"])
        assert prom.query(expr), f"{name}: `{expr}` has no data from a real TorchServe"
    for title, queries in dashboard_queries().items():
        results = [prom.query(q) for q in queries]  # raises on invalid PromQL
        assert any(results), f"panel {title!r}: no query returns data"
    log = (prom.workdir / "prometheus.log").read_text()
    assert "Evaluating rule failed" not in log, log[-2000:]


def test_a_killed_worker_fires_the_restart_alert(prom, server):
    """The worker's drift window starts empty after this; the server is READY again afterwards."""
    model = next(iter(server.models))
    pid = int(server.workers(model)[0]["pid"])
    assert not firing(prom, "WorkerRestarted")
    try:
        os.kill(pid, signal.SIGKILL)
        alert = wait_for(lambda: firing(prom, "WorkerRestarted"), "WorkerRestarted firing", 120)
        assert model in alert[0]["labels"]["WorkerName"]
    finally:
        server.wait_ready(timeout=180)
    assert pid not in {int(w["pid"]) for w in server.workers(model)}
