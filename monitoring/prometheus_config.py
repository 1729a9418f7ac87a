"""Prometheus for TorchServe's metrics, the config side: install it, check monitoring/, derive configs.

monitoring/prometheus.yml scrapes the metrics address of config.properties with the rules of
alerts.yml; `derived_config` rewrites it for another target (a test's server) and shorter intervals.
The process itself is servers/prometheus.py.
"""

import subprocess
from pathlib import Path
from urllib.parse import urlparse

import yaml

from common import apt
from common.cli import BundleError
from servers.torchserve import CONFIG_PROPERTIES, read_properties

MONITORING = Path(__file__).resolve().parent
PROMETHEUS_YML = MONITORING / "prometheus.yml"
ALERTS_YML = MONITORING / "alerts.yml"
PACKAGES = {"prometheus": "prometheus", "promtool": "prometheus"}  # command -> Debian package


class PrometheusError(BundleError):
    """Prometheus is missing or its configuration is invalid; the message says why."""


def install() -> tuple[str, str]:
    """(prometheus, promtool), Debian's prometheus package installed if missing; its service never runs."""
    paths = apt.ensure(PACKAGES, services=("prometheus",))
    return paths["prometheus"], paths["promtool"]


def promtool(*args: str) -> str:
    """Run promtool; raise with its output when it refuses."""
    tool = apt.ensure(PACKAGES)["promtool"]
    run = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60)
    if run.returncode != 0:
        raise PrometheusError(f"promtool {' '.join(args)}: {(run.stdout + run.stderr).strip()}")
    return run.stdout + run.stderr


def metrics_target(properties: Path | str = CONFIG_PROPERTIES) -> str:
    """host:port of TorchServe's metrics address in config.properties."""
    if not Path(properties).is_file():
        raise PrometheusError(f"no TorchServe config {properties}: pass the config.properties to scrape")
    address = read_properties(properties).get("metrics_address")
    if not address:
        raise PrometheusError(f"{properties} sets no metrics_address: nothing to scrape")
    address = urlparse(address)
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
