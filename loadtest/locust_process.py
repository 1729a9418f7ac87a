"""One headless run of the real `locust` process over loadtest/locustfile.py; its summary.json back."""

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

from common.cli import BundleError
from common.config import ROOT
from servers.process import Process

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
GRACE_S = 90  # beyond the run time: start-up, spawning, the stop timeout, writing the reports


class LoadTestError(BundleError):
    """The load test could not run; the message says why."""


def run_locust(
    host: str,
    users: int,
    spawn_rate: float,
    run_time_s: float,
    out: Path | None = None,
    token: str = "",
    options: Mapping[str, object] | None = None,
    reset_stats: bool = False,
) -> dict:
    """One headless Locust run against `host`; returns its summary. With `out`, Locust's CSV and HTML
    and summary.json land there (each file replaced whole only when the run finished)."""
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".locust-", dir=out) as tmp:
        summary_path = Path(tmp) / "summary.json"
        cmd = [
            sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "--host", host, "-u", str(users), "-r", str(spawn_rate), "-t", f"{max(1, round(run_time_s))}s",
            "--stop-timeout", "5", "--only-summary", "--loglevel", "WARNING", "--exit-code-on-error", "0",
            "--summary-json", str(summary_path),
        ]  # fmt: skip
        if out is not None:
            cmd += ["--csv", f"{tmp}/locust", "--html", f"{tmp}/locust.html"]
        if reset_stats:
            cmd.append("--reset-stats")
        for key, value in (options or {}).items():
            cmd += [f"--{key.replace('_', '-')}", str(value)]
        env = dict(os.environ, LOCUST_TOKEN=token) if token else dict(os.environ)
        log = Path(tmp) / "output.log"
        locust = Process(cmd, log, cwd=ROOT, env=env)
        locust.name = "Locust"
        with locust:
            try:
                code = locust.proc.wait(timeout=run_time_s + GRACE_S)
            except subprocess.TimeoutExpired:
                raise LoadTestError(f"Locust did not finish within {run_time_s + GRACE_S:.0f} s") from None
        if code != 0 or not summary_path.is_file():
            last = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
            raise LoadTestError(f"Locust exited with code {code}: {(last or ['no output'])[0]}")
        summary = json.loads(summary_path.read_text())
        log.unlink()
        for path in sorted(Path(tmp).iterdir()) if out is not None else []:
            os.replace(path, out / path.name)
    return summary
