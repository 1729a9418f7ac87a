"""A real Prometheus for TorchServe's metrics: install it, check monitoring/, run it.

    python -m scripts.prometheus install   # Debian's prometheus package (as root), no system service started
    python -m scripts.prometheus check     # promtool check config + rules (make monitoring-check)
    python -m scripts.prometheus run       # Prometheus on :9090 for the local TorchServe (make monitoring)

The `Prometheus` class is what tests/test_monitoring.py uses: our own prometheus binary on a free
loopback port with its own storage directory, so it never meets a system service on :9090.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import yaml

from scripts.serve import CONFIG_PROPERTIES, free_port, read_properties

ROOT = Path(__file__).resolve().parent.parent
MONITORING = ROOT / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus.yml"
ALERTS_YML = MONITORING / "alerts.yml"
POLICY_RC = Path("/usr/sbin/policy-rc.d")


class PrometheusError(RuntimeError):
    """Prometheus is missing, its configuration is invalid, or it did not start; the message says why."""


def binaries() -> tuple[str, str] | None:
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    return (prometheus, promtool) if prometheus and promtool else None


def install() -> tuple[str, str]:
    """Install Debian's prometheus package if missing; return (prometheus, promtool).

    A policy-rc.d that exits 101 keeps dpkg from starting the packaged service (Debian's documented
    way); where systemd runs and the service started anyway, it is stopped and disabled.
    """
    if found := binaries():
        return found
    if os.geteuid() != 0:
        raise PrometheusError("prometheus is not installed and installing it needs root: apt-get install prometheus")
    if not shutil.which("apt-get"):
        raise PrometheusError("prometheus is not installed and there is no apt-get: install Prometheus 2.x yourself")
    own_policy = not POLICY_RC.exists()
    if own_policy:
        POLICY_RC.write_text("#!/bin/sh\nexit 101\n")
        POLICY_RC.chmod(0o755)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for cmd in (
            ["apt-get", "update", "-qq"],
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "prometheus"],
        ):
            run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            if run.returncode != 0:
                tail = (run.stderr or run.stdout).strip().splitlines()[-1:]
                raise PrometheusError(f"`{' '.join(cmd)}` failed: {tail}")
    finally:
        if own_policy:
            POLICY_RC.unlink(missing_ok=True)
    if shutil.which("systemctl") and Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "disable", "--now", "prometheus"], capture_output=True, timeout=60)
    if found := binaries():
        return found
    raise PrometheusError("apt-get installed prometheus but no prometheus/promtool is on PATH")


def promtool(*args: str) -> str:
    """Run promtool; raise with its output when it refuses."""
    found = binaries()
    if not found:
        raise PrometheusError("promtool not found: run `python -m scripts.prometheus install`")
    run = subprocess.run([found[1], *args], capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        raise PrometheusError(f"promtool {' '.join(args)}: {(run.stdout + run.stderr).strip()}")
    return run.stdout + run.stderr


def metrics_target(properties: Path = CONFIG_PROPERTIES) -> str:
    """host:port of TorchServe's metrics address in config.properties."""
    address = urlparse(read_properties(properties)["metrics_address"])
    return f"{address.hostname}:{address.port}"


def derived_config(workdir: Path, target: str, interval: str | None = None, rule_for: str | None = None) -> Path:
    """monitoring/prometheus.yml (and its rule files) rewritten into `workdir` for another target.

    `interval` sets scrape and evaluation intervals; `rule_for` replaces every alert's `for:` (tests: "0s").
    """
    workdir.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    if interval:
        config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            static["targets"] = [target]
    rule_files = []
    for name in config.get("rule_files", []):
        rules = yaml.safe_load((PROMETHEUS_YML.parent / name).read_text())
        if rule_for is not None:
            for group in rules["groups"]:
                for rule in group["rules"]:
                    if "alert" in rule:
                        rule["for"] = rule_for
        (workdir / Path(name).name).write_text(yaml.safe_dump(rules, sort_keys=False))
        rule_files.append(Path(name).name)
    config["rule_files"] = rule_files
    path = workdir / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class Prometheus:
    """Our own Prometheus on a free loopback port, storage in `workdir`; always stop() it."""

    def __init__(self, config: Path, workdir: Path, port: int | None = None) -> None:
        self.config, self.workdir = Path(config), Path(workdir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "Prometheus":
        found = binaries()
        if not found:
            raise PrometheusError("prometheus not found: run `python -m scripts.prometheus install`")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [
            found[0],
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
        ]
        log = open(self.workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise PrometheusError(f"prometheus exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PrometheusError(f"prometheus not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 15) -> str:
        path = self.workdir / "prometheus.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def api(self, path: str, **params: str) -> dict | list:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise PrometheusError(f"{path}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["install", "check", "run"])
    parser.add_argument("--port", type=int, default=9090, help="run: Prometheus' own port (default 9090)")
    parser.add_argument("--config", default=str(CONFIG_PROPERTIES), help="run: TorchServe config.properties to scrape")
    args = parser.parse_args(argv)
    try:
        if args.command == "install":
            prometheus, tool = install()
            print(f"prometheus: {prometheus}\npromtool:   {tool}")
        elif args.command == "check":
            print(promtool("check", "config", str(PROMETHEUS_YML)).strip())
            print(promtool("check", "rules", str(ALERTS_YML)).strip())
        else:
            workdir = ROOT / "logs" / "prometheus"
            config = derived_config(workdir, metrics_target(Path(args.config)))
            with Prometheus(config, workdir, args.port) as prom:
                print(f"Prometheus on {prom.url} scraping {metrics_target(Path(args.config))} (data in {workdir})")
                print("Ctrl-C stops it.", flush=True)
                prom.proc.wait()
    except KeyboardInterrupt:
        print("\nstopped.")
    except PrometheusError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
