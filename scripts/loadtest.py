"""Load-test TorchServe with Locust (locustfile.py), headless, and check the SLOs of configs/loadtest.yaml.

    python -m scripts.loadtest                               # make loadtest
    python -m scripts.loadtest --users 32 --run-time 60      # heavier, longer
    python -m scripts.loadtest --host http://127.0.0.1:8080  # a server you started (token: --key-file/--token)
    python -m scripts.loadtest model=resnet18 loadtest.slo.p99_ms=200   # Hydra overrides

Without --host it targets the server on config.properties' inference port if one is running there
(`make serve`, whose key file it reads), else starts TorchServe with model_store/<name>.mar on free
ports and stops it afterwards. Writes Locust's CSV and HTML report and summary.json (exact
latencies) under loadtest.out, prints the result, and exits non-zero with a one-line reason when
an objective is missed: unexpected failures, p95, p99, minimum throughput.
"""

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import numpy as np

from scripts.serve import free_port

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "locustfile.py"
FORMS = ("raw", "multipart", "json", "instances")
MALFORMED_PREFIX = "malformed:"


class LoadTestError(RuntimeError):
    """The load test could not run; the message says why."""


def load_config(overrides: list[str] | None = None):
    """configs/loadtest.yaml: the root config plus `loadtest:` and `bench:`, with Hydra overrides."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="loadtest", overrides=overrides or [])


def side_by_side() -> dict[str, str]:
    """Extra TorchServe properties for a server beside others (with TorchServe(ports={})): the first
    worker's port also names its socket, /tmp/.ts.sock.<port> (9000 by default, whatever TMPDIR
    says), and two servers on one socket name talk to each other's workers."""
    return {"initial_worker_port": str(free_port())}


def parse_mix(text: str) -> dict[str, float]:
    """'raw=7,json=1' -> {'raw': 7.0, 'json': 1.0}; only the handler's request forms."""
    mix = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, _, weight = part.partition("=")
        if name.strip() not in FORMS:
            raise ValueError(f"unknown request form {name.strip()!r} in mix {text!r}: use {', '.join(FORMS)}")
        mix[name.strip()] = float(weight or 1)
    mix = {k: v for k, v in mix.items() if v > 0}
    if not mix:
        raise ValueError(f"mix {text!r} has no form with a positive weight")
    return mix


def read_token(path: Path) -> str:
    """The inference token in TorchServe's key_file.json, or '' when there is no such file."""
    try:
        return json.loads(Path(path).read_text())["inference"]["key"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return ""


def encode(image: np.ndarray) -> bytes:
    """uint8 [C, H, W] -> PNG bytes."""
    from PIL import Image

    pil = Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def check_answer(status: int, text: str | None, form: str, model: str, classes: set[str], instances: int = 1) -> str:
    """Why this answer to a well-formed request is wrong, or "" when it is right."""
    if status != 200:
        return f"status {status}: {(text or '')[:200]}"
    try:
        body = json.loads(text or "")
    except json.JSONDecodeError:
        return f"not JSON: {(text or '')[:200]}"
    if not isinstance(body, dict) or body.get("model") != model or "version" not in body:
        return f"no model/version for {model}: {str(body)[:200]}"
    answers = body.get("predictions") if form == "instances" else [body]
    if not isinstance(answers, list) or len(answers) != (instances if form == "instances" else 1):
        return f"expected {instances} predictions: {str(body)[:200]}"
    for answer in answers:
        top = answer.get("top_k") if isinstance(answer, dict) else None
        if not top or not isinstance(top, list) or not all(isinstance(t, dict) for t in top):
            return f"no top_k list: {str(answer)[:200]}"
        if answer.get("label") not in classes or any(t.get("label") not in classes for t in top):
            return f"label not among the dataset's classes: {str(answer)[:200]}"
        probability = answer.get("probability")
        if not isinstance(probability, float | int) or not 0 <= probability <= 1 or top[0]["label"] != answer["label"]:
            return f"bad probability or top_k order: {str(answer)[:200]}"
    return ""


def latency_stats(ms: np.ndarray) -> dict[str, float]:
    if ms.size == 0:
        return {"p50_ms": 0.0, "p95_ms": 0.0, "p99_ms": 0.0, "mean_ms": 0.0, "max_ms": 0.0}
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return {"p50_ms": p50, "p95_ms": p95, "p99_ms": p99, "mean_ms": ms.mean(), "max_ms": ms.max()}


def summarize(
    rows: Mapping[str, list[tuple[float, bool]]], seconds: float, errors: Mapping[str, int] | None = None
) -> dict:
    """Per-request-name (latency ms, ok) lists -> counts, throughput and percentiles, well-formed apart."""
    seconds = max(seconds, 1e-9)

    def block(names: list[str]) -> dict:
        pairs = [p for n in names for p in rows[n]]
        ms = np.array([p[0] for p in pairs], dtype=float)
        stats = {k: round(float(v), 3) for k, v in latency_stats(ms).items()}
        failures = sum(not ok for _, ok in pairs)
        return {"count": len(pairs), "failures": failures, "rps": round(len(pairs) / seconds, 2), **stats}

    wellformed = [n for n in rows if not n.startswith(MALFORMED_PREFIX)]
    malformed = [n for n in rows if n.startswith(MALFORMED_PREFIX)]
    return {
        "seconds": round(seconds, 3),
        "wellformed": block(wellformed),
        "malformed": block(malformed),
        "by_name": {n: block([n]) for n in sorted(rows)},
        "errors": dict(sorted((errors or {}).items(), key=lambda e: -e[1])[:10]),
    }


def check_slo(summary: dict, slo: Mapping) -> list[str]:
    """Every objective the run missed, as short sentences; empty when all were met."""
    good, bad = summary["wellformed"], summary["malformed"]
    missed = []
    if good["count"] == 0:
        missed.append("no well-formed request was sent")
    failures = good["failures"] + bad["failures"]
    if failures > slo["max_failures"]:
        first = next(iter(summary.get("errors") or {}), "")
        missed.append(
            f"{failures} unexpected failures > {slo['max_failures']}" + (f" (first: {first})" if first else "")
        )
    for p in ("p95", "p99"):
        if good[f"{p}_ms"] > slo[f"{p}_ms"]:
            missed.append(f"{p} {good[f'{p}_ms']:.1f} ms > {slo[f'{p}_ms']} ms")
    if good["rps"] < slo["min_rps"]:
        missed.append(f"throughput {good['rps']:.1f} req/s < {slo['min_rps']} req/s")
    return missed


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
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            output, _ = proc.communicate(timeout=run_time_s + 90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise LoadTestError(f"Locust did not finish within {run_time_s + 90:.0f} s") from None
        text = output.decode(errors="replace")
        if proc.returncode != 0 or not summary_path.is_file():
            last = [line for line in text.splitlines() if line.strip()][-1:] or ["no output"]
            raise LoadTestError(f"Locust exited with code {proc.returncode}: {last[0]}")
        summary = json.loads(summary_path.read_text())
        for path in sorted(Path(tmp).iterdir()) if out is not None else []:
            os.replace(path, out / path.name)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"{'request':<26}{'count':>8}{'fail':>6}{'req/s':>9}{'p50':>8}{'p95':>8}{'p99':>8}  (ms)"]
    for name, s in [*summary["by_name"].items(), ("well-formed", summary["wellformed"])]:
        lines.append(
            f"{name:<26}{s['count']:>8}{s['failures']:>6}{s['rps']:>9.1f}"
            f"{s['p50_ms']:>8.1f}{s['p95_ms']:>8.1f}{s['p99_ms']:>8.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=resnet18 loadtest.slo.p99_ms=200")
    parser.add_argument("--host", help="target this server (e.g. http://127.0.0.1:8080) instead of starting one")
    parser.add_argument("--users", type=int, help="Locust users (default loadtest.users)")
    parser.add_argument("--spawn-rate", type=float, help="users started per second (default loadtest.spawn_rate)")
    parser.add_argument("--run-time", type=float, help="seconds (default loadtest.run_time_s)")
    parser.add_argument("--out", help="report directory (default loadtest.out)")
    parser.add_argument("--key-file", help="key_file.json of the target server (default loadtest.key_file)")
    parser.add_argument("--token", default=os.environ.get("LOCUST_TOKEN", ""), help="inference token (LOCUST_TOKEN)")
    args = parser.parse_args(argv)

    from scripts.serve import CONFIG_PROPERTIES, ServeError, TorchServe, port_free, read_properties

    try:
        cfg = load_config(args.overrides)
    except Exception as err:  # Hydra's errors name the bad override
        raise SystemExit(f"error: config: {err}") from None
    lt = cfg.loadtest
    users, run_time = args.users or lt.users, args.run_time or lt.run_time_s
    out = Path(args.out or lt.out)
    options = {
        "model": lt.model, "data": lt.data, "mix": lt.mix, "instances": lt.instances,
        "malformed_share": lt.malformed_share, "wait_min": lt.wait_s[0], "wait_max": lt.wait_s[1],
    }  # fmt: skip
    try:
        parse_mix(lt.mix)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None

    server = None
    host = args.host
    token = args.token or read_token(Path(args.key_file or lt.key_file))
    if host is None:
        default = read_properties(CONFIG_PROPERTIES)["inference_address"]
        address = urlparse(default)
        if not port_free(address.hostname, address.port):
            host = default
            print(f"targeting the server already running at {host}", flush=True)
        else:
            workdir = ROOT / "logs" / "loadtest" / "torchserve"
            model = {cfg.name: f"{cfg.name}.mar"}
            server = TorchServe(cfg.paths.model_store, model, workdir, ports={}, extra=side_by_side())
    if urlparse(host or "http://127.0.0.1").hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"error: --host {host} is not a loopback address: load tests stay on this machine")
    try:
        if server is not None:
            print(f"starting TorchServe for {cfg.name} on {server.url('inference')} ...", flush=True)
            server.start()
            print(f"READY after {server.wait_ready(180):.1f} s", flush=True)
            host, token = server.url("inference"), server.key() or ""
        print(f"Locust: {users} users, {run_time:.0f} s, mix {lt.mix}, malformed {lt.malformed_share:.0%}", flush=True)
        summary = run_locust(host, users, args.spawn_rate or lt.spawn_rate, run_time, out, token, options)
    except (ServeError, LoadTestError) as err:
        raise SystemExit(f"error: {err}") from None
    finally:
        if server is not None:
            server.stop()
    print(format_summary(summary))
    print(f"reports: {out}/locust.html, {out}/locust_stats.csv, {out}/summary.json")
    missed = check_slo(summary, lt.slo)
    if missed:
        raise SystemExit("SLO missed: " + "; ".join(missed))
    good = summary["wellformed"]
    print(f"SLOs met: p95 {good['p95_ms']:.1f} ms, p99 {good['p99_ms']:.1f} ms, {good['rps']:.0f} req/s, no failures")


if __name__ == "__main__":
    main()
