"""Our own Prometheus process: a free loopback port (or a given one), storage in its own folder.

It never meets a system service on :9090. The config it reads comes from monitoring/prometheus_config.py.
"""

import json
import shutil
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from servers.process import Process, ServerError, free_port


class Prometheus(Process):
    """`prometheus` with `config`, data and log in `workdir`; start() returns once it is ready."""

    name = "Prometheus"

    def __init__(self, config: Path | str, workdir: Path | str, port: int | None = None, timeout: float = 60) -> None:
        self.config, self.workdir, self.timeout = Path(config), Path(workdir), timeout
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        binary = shutil.which("prometheus") or "prometheus"
        cmd = [
            binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
        ]
        super().__init__(cmd, self.workdir / "prometheus.log")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def start(self) -> "Prometheus":
        if not shutil.which(self.cmd[0]):
            raise ServerError("prometheus not found: run `python -m scripts.prometheus install`")
        super().start()
        try:
            self.wait_until(self.ready, self.timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def api(self, path: str, **params: str) -> dict | list:
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise ServerError(f"Prometheus {path}: {body.get('error', body)}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def alerts(self) -> list[dict]:
        return self.api("alerts")["alerts"]

    def targets(self) -> list[dict]:
        return self.api("targets")["activeTargets"]
