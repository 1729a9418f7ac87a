"""Benchmark the serving stack on this machine and write reports/benchmark/ (README.md, results.json, PNG plots).

    python -m scripts.bench                  # make bench: both models, 1/8/32/64 users, 3 repeats (~20 min)
    python -m scripts.bench --quick          # 1 and 32 users, one repeat (~6 min)
    python -m scripts.bench --models digits --users 32 --repeats 2
    python -m scripts.bench --sweep          # tuning candidates on the digits model at 32 users (tuning.md)

For each model, from the same archive: the in-process limit (serving core: decode, TorchScript
forward, answer JSON; no HTTP) at batch sizes 1/8/32; TorchServe with stock settings (its defaults:
one worker per core, batch size 1, torch's default threads, default logging and metrics; only the
loopback addresses and the model store set); TorchServe as shipped (config.properties + `serve:`);
the shipped settings with batch size 1; a plain single-process FastAPI app over the same serving
core. Load: one headless Locust process on this machine, identical for every server: raw PNG
test-set images, closed loop without waits, all users spawned at once, statistics reset once they
are. Each point is the median over the repeats, which run interleaved (repeat 1 of every server,
then repeat 2, ...). The models: the default config's model_store/<name>.mar (`make pipeline`) and
ResNet-18 (bench.heavy in configs/loadtest.yaml; trained once for one epoch into logs/bench/, its
archive rebuilt from the current handlers and `serve:` section on every run).
"""

import argparse
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from scripts.loadtest import ROOT, LoadTestError, encode, load_config, run_locust, side_by_side
from scripts.serve import CONFIG_PROPERTIES, ServeError, TorchServe, free_port, read_properties
from training.io import atomic_path, write_json

HEAVY = "resnet18"
STOCK_PROPERTIES = ("inference_address", "management_address", "metrics_address")
PERFORMANCE_PROPERTIES = (
    "default_workers_per_model", "job_queue_size", "async_logging", "metrics_mode", "disable_system_metrics",
    "number_of_netty_threads", "netty_client_threads", "vmargs",
)  # fmt: skip
# Candidates for --sweep: (label, model-config.yaml changes, config.properties changes) over the shipped settings.
SWEEP: list[tuple[str, dict, dict]] = [
    ("shipped", {}, {}),
    ("batch 1", {"batchSize": 1}, {}),
    ("batch 4", {"batchSize": 4}, {}),
    ("batch 8", {"batchSize": 8}, {}),
    ("batch 16", {"batchSize": 16}, {}),
    ("batch 32", {"batchSize": 32}, {}),
    ("delay 1 ms", {"maxBatchDelay": 1}, {}),
    ("delay 10 ms", {"maxBatchDelay": 10}, {}),
    ("2 workers", {"minWorkers": 2, "maxWorkers": 2}, {}),
    ("torch threads 2", {"handler": {"threads": 2}}, {}),
    ("synchronous logging", {}, {"async_logging": "false"}),
    ("netty threads 1+1", {}, {"number_of_netty_threads": "1", "netty_client_threads": "1"}),
    ("netty threads: default", {}, {"number_of_netty_threads": "0", "netty_client_threads": "0"}),
    ("system metrics off", {}, {"disable_system_metrics": "true"}),
    ("system metrics on", {}, {"disable_system_metrics": "false"}),
    ("JVM serial GC", {}, {"vmargs": "-XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError"}),
    ("quiet frontend logging", {}, {"vmargs": "-Dlog4j.configurationFile=file://{workdir}/log4j2-quiet.xml"}),
]
# TorchServe's own log4j2.xml minus the per-request lines: no access log, no DEBUG/INFO from the frontend.
QUIET_LOG4J = """<?xml version="1.0" encoding="UTF-8"?>
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT"><PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/></Console>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off"/>
    <Logger name="MODEL_LOG" level="warn"/>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="org.pytorch.serve" level="warn"/>
    <Root level="warn"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""


class BenchError(RuntimeError):
    """The benchmark cannot run; the message says what to do."""


@dataclass
class Model:
    key: str
    cfg: object
    mar: Path
    unpacked: Path = field(init=False)

    @property
    def name(self) -> str:
        return str(self.cfg.name)


@dataclass
class Server:
    """One way of serving a model: a TorchServe archive + properties, or the FastAPI app."""

    label: str
    users: list[int]
    store: Path | None = None
    properties: Path | None = None
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Running:
    host: str
    token: str
    ready_s: float
    stop: object
    pid: int  # the server's root process: its tree's CPU time is the server's cost


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live descendants (TorchServe: Java frontend + workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- models and archives


def prepare_heavy(cfg, retrain: bool) -> Path:
    """Train ResNet-18 once (the checkpoint is cached in its artifacts dir), then export and archive it
    with the current code, handlers and `serve:` settings."""
    overrides = [str(o) for o in cfg.bench.heavy]
    trained = (Path(cfg.paths.artifacts) / "model.ckpt").is_file() and not retrain
    for module in [*([] if trained else ["training.train"]), "training.export", "scripts.archive"]:
        log(f"{module} {' '.join(overrides)}")
        run = subprocess.run([sys.executable, "-m", module, *overrides], cwd=ROOT, capture_output=True, text=True)
        if run.returncode != 0:
            tail = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
            raise BenchError(f"{module} failed for the heavy model: {tail[0]}")
    return Path(cfg.paths.model_store) / f"{cfg.name}.mar"


def read_model_config(mar: Path) -> dict:
    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read("model-config.yaml"))


def rewrite_mar(src: Path, dst: Path, model_config: dict) -> Path:
    """The same archive (model, handler, labels, manifest) with another model-config.yaml."""
    with atomic_path(dst) as tmp, zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            if item.filename != "model-config.yaml":
                zout.writestr(item, zin.read(item.filename))
        zout.writestr("model-config.yaml", yaml.safe_dump(model_config, sort_keys=False))
    return dst


def merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def stock_model_config(shipped: dict, default_threads: int) -> dict:
    """TorchServe's defaults: no workers, batch or delay settings; torch's default thread count."""
    return {"handler": {**shipped.get("handler", {}), "threads": default_threads}}


def variant(model: Model, workdir: Path, label: str, model_config: dict) -> Path:
    """A store holding the model's archive with `model_config`; returns the store."""
    store = workdir / "stores" / label.replace(" ", "_").replace(":", "").replace("=", "_")
    rewrite_mar(model.mar, store / model.mar.name, model_config)
    return store


def write_stock_properties(path: Path) -> Path:
    """Only what a server needs to be reachable and safe here: loopback addresses. The rest is TorchServe's default."""
    shipped = read_properties(CONFIG_PROPERTIES)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{k}={shipped[k]}\n" for k in STOCK_PROPERTIES))
    return path


# ---------------------------------------------------------------- servers


def start_torchserve(model: Model, server: Server, workdir: Path) -> Running:
    for attempt in range(3):  # a free port can be taken by another process before TorchServe binds it
        shutil.rmtree(workdir, ignore_errors=True)
        extra = {**side_by_side(), **server.extra}
        ts = TorchServe(server.store, {model.name: model.mar.name}, workdir, server.properties, {}, extra)
        start = time.monotonic()
        ts.start()
        try:
            ts.wait_ready(300)
        except ServeError as err:
            ts.stop()
            if attempt < 2 and "in use" in str(err):
                continue
            raise
        return Running(ts.url("inference"), ts.key() or "", time.monotonic() - start, ts.stop, ts.proc.pid)
    raise AssertionError("unreachable")


def start_fastapi(model: Model, workdir: Path) -> Running:
    port, token = free_port(), os.urandom(8).hex()
    shipped = read_model_config(model.mar)
    env = dict(
        os.environ,
        BENCH_MODEL_DIR=str(model.unpacked),
        BENCH_TOKEN=token,
        BENCH_HANDLER=json.dumps(shipped.get("handler", {})),
    )
    workdir.mkdir(parents=True, exist_ok=True)
    logfile = open(workdir / "uvicorn.log", "wb")
    cmd = [sys.executable, "-m", "uvicorn", "scripts.bench:fastapi_app", "--factory", "--host", "127.0.0.1"]
    start = time.monotonic()
    proc = subprocess.Popen([*cmd, "--port", str(port)], cwd=ROOT, env=env, stdout=logfile, stderr=subprocess.STDOUT)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logfile.close()

    host = f"http://127.0.0.1:{port}"
    request = urllib.request.Request(f"{host}/ping", headers={"Authorization": f"Bearer {token}"})
    while True:
        if proc.poll() is not None:
            stop()
            tail = (workdir / "uvicorn.log").read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
            raise ServeError(f"the FastAPI app exited with code {proc.returncode}: {tail[0]}")
        if time.monotonic() - start > 120:
            stop()
            raise ServeError("the FastAPI app did not answer /ping within 120 s")
        try:
            with urllib.request.urlopen(request, timeout=2):
                break
        except (OSError, urllib.error.URLError):
            time.sleep(0.1)
    return Running(host, token, time.monotonic() - start, stop, proc.pid)


def load_serving(model_dir: Path):
    """The serving core packed in this archive (handlers/serving.py as archived, with its sibling modules)."""
    spec = importlib.util.spec_from_file_location(f"serving_{abs(hash(str(model_dir)))}", model_dir / "serving.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(model_dir))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(model_dir))
    return module


def fastapi_app():
    """A plain single-process FastAPI app over the archive's serving core (uvicorn --factory)."""
    from fastapi import FastAPI, Request, Response

    model_dir = Path(os.environ["BENCH_MODEL_DIR"])
    serving = load_serving(model_dir)
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())["model"]
    settings = serving.Settings.from_dict(json.loads(os.environ.get("BENCH_HANDLER", "{}")))
    classifier = serving.ImageClassifier.from_dir(
        model_dir, manifest["serializedFile"], settings, manifest["modelName"], manifest.get("modelVersion", "")
    )
    classifier.warm_up()
    expected = f"Bearer {os.environ['BENCH_TOKEN']}"
    app = FastAPI()

    def error(status: int, message: str) -> Response:
        body = json.dumps({"error": message, "status": status})
        return Response(body, status_code=status, media_type="application/json")

    @app.get("/ping")
    async def ping(request: Request) -> Response:
        if request.headers.get("authorization") != expected:
            return error(400, "missing or wrong token")
        return Response(json.dumps({"status": "Healthy"}), media_type="application/json")

    @app.post("/predictions/{name}")
    async def predict(name: str, request: Request) -> Response:
        if request.headers.get("authorization") != expected:
            return error(400, "missing or wrong token")
        if name != manifest["modelName"]:
            return error(404, f"no model {name}")
        result = classifier.handle([await request.body()])[0]
        return Response(json.dumps(result.body), status_code=result.status, media_type="application/json")

    return app


# ---------------------------------------------------------------- measurements


def measure_inprocess(model: Model, images: list[bytes], batch: int, seconds: float) -> dict:
    """The serving core alone: `batch` requests of raw PNG bytes per call, answers serialised to JSON."""
    import random

    import numpy as np

    serving = load_serving(model.unpacked)
    handler = read_model_config(model.mar).get("handler", {})
    classifier = serving.ImageClassifier.from_dir(model.unpacked, "model.pt", serving.Settings.from_dict(handler))
    rng = random.Random(batch)
    calls: list[float] = []
    deadline = time.perf_counter() + seconds + 0.5
    while time.perf_counter() < deadline:
        payloads = rng.choices(images, k=batch)
        start = time.perf_counter()
        answers = [json.dumps(r.body) for r in classifier.handle(payloads)]
        elapsed = time.perf_counter() - start
        if deadline - time.perf_counter() < seconds:  # the first 0.5 s warm the graph up
            calls.append(elapsed)
        if not all('"label"' in a for a in answers):
            raise BenchError(f"the serving core did not answer a test image: {answers[:1]}")
    ms = np.array(calls) * 1e3
    p50, p99 = np.percentile(ms, [50, 99])
    threads = int(getattr(classifier.settings, "threads", 1))
    return {"images_per_s": batch * len(calls) / ms.sum() * 1e3, "p50_ms": p50, "p99_ms": p99, "threads": threads}


def test_images(cfg) -> list[bytes]:
    import numpy as np

    with np.load(Path(cfg.paths.data) / "test.npz") as f:
        return [encode(image) for image in f["images"]]


def drain(model: Model, running: Running, image: bytes, timeout: float = 300) -> None:
    """Wait until the server has answered what an ended Locust run left queued: TorchServe still works
    through requests whose clients are gone, and the next measurement must not queue behind them."""
    headers = {"Content-Type": "image/png", "Authorization": f"Bearer {running.token}"}
    request = urllib.request.Request(f"{running.host}/predictions/{model.name}", data=image, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()


def locust(model: Model, running: Running, users: int, seconds: float) -> dict:
    options = {"model": model.name, "data": model.cfg.paths.data, "mix": "raw=1", "malformed_share": 0}
    options.update(wait_min=0, wait_max=0)
    return run_locust(running.host, users, users, seconds, None, running.token, options, reset_stats=True)


def bench_model(model: Model, servers: list[Server], bench, workdir: Path, results: dict) -> None:
    for batch in bench.batch_sizes:
        for repeat in range(bench.repeats):
            r = measure_inprocess(model, results["_images"][model.key], batch, bench.inprocess_s)
            results["inprocess"].append({"model": model.key, "batch": batch, "repeat": repeat, **r})
            log(f"{model.key} in-process batch {batch}: {r['images_per_s']:.0f} images/s, p99 {r['p99_ms']:.1f} ms")
    for repeat in range(bench.repeats):
        for server in servers:
            where = workdir / model.key / "run" / server.label.replace(" ", "_")
            try:
                running = (
                    start_fastapi(model, where) if server.store is None else start_torchserve(model, server, where)
                )
            except ServeError as err:
                results["errors"].append(f"{model.key} {server.label}: {str(err).splitlines()[0]}")
                log(f"error: {results['errors'][-1]}")
                continue
            results["ready"].append(
                {"model": model.key, "server": server.label, "repeat": repeat, "s": running.ready_s}
            )
            log(f"{model.key} {server.label} (repeat {repeat + 1}): ready after {running.ready_s:.1f} s")
            try:
                image = results["_images"][model.key][0]
                locust(model, running, max(server.users), bench.warmup_s)
                drain(model, running, image)
                for users in server.users:
                    load, cpu = os.getloadavg()[0], cpu_seconds(running.pid)
                    summary = locust(model, running, users, bench.run_time_s)
                    cpu_ms = (cpu_seconds(running.pid) - cpu) * 1e3 / max(1, summary.get("sent", 0))
                    s = summary["wellformed"]
                    row = {"model": model.key, "server": server.label, "users": users, "repeat": repeat, "load1": load}
                    row.update({k: s[k] for k in ("count", "failures", "rps", "p50_ms", "p95_ms", "p99_ms")})
                    row["cpu_ms"] = cpu_ms
                    drain(model, running, image)
                    results["runs"].append(row)
                    log(
                        f"  {users:>3} users: {s['rps']:7.0f} req/s  p50 {s['p50_ms']:6.1f}  p99 {s['p99_ms']:6.1f} ms"
                        f"  failures {s['failures']}  server CPU {cpu_ms:.2f} ms/req  (load {load:.1f})"
                    )
            except (LoadTestError, OSError) as err:
                results["errors"].append(f"{model.key} {server.label}: {err}")
                log(f"error: {results['errors'][-1]}")
            finally:
                running.stop()


# ---------------------------------------------------------------- report


def median_rows(results: dict, model: str) -> dict[tuple[str, int], dict]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in results["runs"]:
        if row["model"] == model:
            groups.setdefault((row["server"], row["users"]), []).append(row)
    out = {}
    for key, rows in groups.items():
        keys = ("rps", "p50_ms", "p95_ms", "p99_ms", "cpu_ms")
        out[key] = {k: statistics.median(r[k] for r in rows) for k in keys}
        out[key].update(failures=sum(r["failures"] for r in rows), n=len(rows))
    return out


def inprocess_medians(results: dict, model: str) -> dict[int, dict]:
    groups: dict[int, list[dict]] = {}
    for row in results["inprocess"]:
        if row["model"] == model:
            groups.setdefault(row["batch"], []).append(row)
    return {
        b: {k: statistics.median(r[k] for r in rows) for k in ("images_per_s", "p50_ms", "p99_ms")}
        for b, rows in sorted(groups.items())
    }


def plot(results: dict, model: str, servers: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians = median_rows(results, model)
    limit = max((m["images_per_s"] for m in inprocess_medians(results, model).values()), default=None)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server in servers:
        points = sorted((u, m) for (s, u), m in medians.items() if s == server)
        if points:
            users = [u for u, _ in points]
            left.plot(users, [m["rps"] for _, m in points], marker="o", label=server)
            right.plot(users, [m["p99_ms"] for _, m in points], marker="o", label=server)
    if limit:
        left.axhline(limit, color="gray", linestyle="--", label="in-process limit (best batch)")
    for ax, title, unit in ((left, "throughput", "requests/s"), (right, "p99 latency", "ms")):
        ax.set(xscale="log", yscale="log", xlabel="Locust users (closed loop)", ylabel=unit, title=f"{model}: {title}")
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def goal(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def report(results: dict, models: list[str], servers: list[str], heavy: str | None) -> str:
    meta = results["meta"]
    lines = [
        "# Benchmark",
        "",
        f"Written by `python -m scripts.bench{(' ' + meta['args']) if meta['args'] else ''}` on {meta['date']}, "
        f"{meta['minutes']:.1f} minutes. Machine: {meta['machine']}. torch {meta['torch']}, "
        f"TorchServe {meta['torchserve']}, Locust {meta['locust']}.",
        "",
        f"Load average (1 min) at start {meta['load_start']:.1f}, at end {meta['load_end']:.1f}, median over the "
        f"measurements {meta['load_median']:.1f}. {meta['note']}",
        "",
        "**Load generator, identical for every server:** one headless Locust process (FastHttpUser) on the same "
        "2 cores as the server, closed loop (no wait), raw PNG bytes of the test-set images, all users spawned "
        f"at once, statistics reset when they are, then {meta['run_time_s']} s measured; {meta['repeats']} "
        "repeats interleaved across servers, each number the median of the repeats (failures: the sum). "
        "Latency is measured by the client, so it includes Locust's own queueing on the shared CPU.",
        "",
        "**Servers:** *in-process* = the archive's serving core (decode, TorchScript forward with preprocessing, "
        "top-k, JSON) in one Python process, no HTTP, one call per batch; *stock* = TorchServe defaults "
        f"({meta['stock']}); *tuned* = what ships (`config.properties` + `serve:`: {meta['tuned']}); "
        "*tuned, batch 1* = the same with batchSize 1; *FastAPI* = a plain single-process FastAPI app (uvicorn "
        "defaults) over the same serving core, one request per forward pass.",
        "",
    ]
    for model in models:
        medians = median_rows(results, model)
        inproc = inprocess_medians(results, model)
        best = max((m["images_per_s"] for m in inproc.values()), default=0.0)
        users = sorted({u for (_, u) in medians})
        lines += [f"## {model}", ""]
        if inproc:
            lines += ["In-process limit (serving core, no HTTP):", ""]
            lines += ["| batch | images/s | p50 ms per call | p99 ms per call |", "| ---: | ---: | ---: | ---: |"]
            for b, m in inproc.items():
                lines.append(f"| {b} | {m['images_per_s']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} |")
            lines.append("")
        header = (
            "| users | "
            + " | ".join(f"{s} req/s | {s} p99 ms" for s in servers)
            + " | tuned/stock | tuned/in-process |"
        )
        lines += [header, "|" + " ---: |" * (1 + 2 * len(servers) + 2)]
        for u in users:
            cells = []
            for s in servers:
                m = medians.get((s, u))
                fail = f" ({m['failures']} failed)" if m and m["failures"] else ""
                cells += [f"{m['rps']:.0f}{fail}", f"{m['p99_ms']:.1f}"] if m else ["", ""]
            tuned, stock = medians.get(("tuned", u)), medians.get(("stock", u))
            ratio = f"{tuned['rps'] / stock['rps']:.1f}×" if tuned and stock and stock["rps"] else ""
            share = f"{tuned['rps'] / best:.0%}" if tuned and best else ""
            lines.append(f"| {u} | " + " | ".join(cells) + f" | {ratio} | {share} |")
        lines += ["", "p50 / p95 latency (ms) · server CPU time per request (ms, all its processes), medians:", ""]
        lines += ["| users | " + " | ".join(servers) + " |", "|" + " ---: |" * (1 + len(servers))]
        for u in users:
            cells = [
                f"{m['p50_ms']:.1f} / {m['p95_ms']:.1f} · {m['cpu_ms']:.2f}" if (m := medians.get((s, u))) else ""
                for s in servers
            ]
            lines.append(f"| {u} | " + " | ".join(cells) + " |")
        ready = {}
        for row in results["ready"]:
            if row["model"] == model:
                ready.setdefault(row["server"], []).append(row["s"])
        if ready:
            lines += ["", "Time from start to every worker READY (FastAPI: to answering /ping), seconds:", ""]
            lines += ["| server | median | min | max | starts |", "| --- | ---: | ---: | ---: | ---: |"]
            for s, values in ready.items():
                lines.append(
                    f"| {s} | {statistics.median(values):.1f} | {min(values):.1f} | {max(values):.1f} | {len(values)} |"
                )
        lines += ["", f"![{model}]({model}.png)", ""]
    lines += goals(results, models, heavy)
    if results["errors"]:
        lines += ["", "## Errors", "", *[f"- {e}" for e in results["errors"]]]
    return "\n".join(lines) + "\n"


def goals(results: dict, models: list[str], heavy: str | None) -> list[str]:
    def at(model: str, server: str, users: int) -> dict | None:
        return median_rows(results, model).get((server, users))

    first = models[0] if models else None
    tuned, stock, fast = (at(first, s, 32) if first else None for s in ("tuned", "stock", "FastAPI"))
    rows = ["## Goals", "", "| goal | measured | |", "| --- | --- | --- |"]
    if tuned and stock:
        ratio = tuned["rps"] / stock["rps"] if stock["rps"] else float("inf")
        rows.append(f"| tuned ≥ 10× stock at 32 users ({first}) | {ratio:.1f}× | {goal(ratio >= 10)} |")
    if tuned and fast:
        ok = tuned["rps"] >= fast["rps"]
        rows.append(
            f"| tuned TorchServe ahead of FastAPI at 32 users ({first}) | {tuned['rps']:.0f} vs {fast['rps']:.0f} "
            f"req/s | {goal(ok)} |"
        )
    if tuned:
        ok = tuned["p99_ms"] <= 50 and tuned["failures"] == 0
        rows.append(
            f"| tuned p99 ≤ 50 ms at 32 users, no failures ({first}) | {tuned['p99_ms']:.1f} ms, "
            f"{tuned['failures']} failures | {goal(ok)} |"
        )
    if heavy in models:
        batched, single = at(heavy, "tuned", 32), at(heavy, "tuned, batch 1", 32)
        if batched and single:
            gain = batched["rps"] / single["rps"] if single["rps"] else float("inf")
            rows.append(
                f"| {heavy}: batching beats batch size 1 at 32 users | {batched['rps']:.0f} vs {single['rps']:.0f} "
                f"req/s ({gain:.2f}×) | {goal(gain > 1)} |"
            )
    ready = [r["s"] for r in results["ready"] if r["server"] == "tuned"]
    if ready:
        rows.append(f"| time to READY measured (tuned, all models) | median {statistics.median(ready):.1f} s | met |")
    return rows


def sweep_report(results: dict, model: str, users: int) -> str:
    medians = median_rows(results, model)
    ready: dict[str, list[float]] = {}
    for row in results["ready"]:
        ready.setdefault(row["server"], []).append(row["s"])
    base = medians.get(("shipped", users))
    lines = [
        "# Tuning sweep",
        "",
        f"`python -m scripts.bench --sweep` on {results['meta']['date']}: {model}, {users} Locust users, "
        f"{results['meta']['repeats']} interleaved repeats (medians), the same load generator settings as the "
        f"benchmark. Each row changes one setting of the shipped configuration ({results['meta']['tuned']}). "
        f"Load average (1 min) median {results['meta']['load_median']:.1f}. {results['meta']['note']}",
        "",
        "| variant | req/s | vs shipped | p50 ms | p99 ms | server CPU ms/request | failures | READY s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, _, _ in SWEEP:
        m = medians.get((label, users))
        if m:
            rel = f"{m['rps'] / base['rps']:.2f}×" if base and base["rps"] else ""
            r = f"{statistics.median(ready[label]):.1f}" if label in ready else ""
            lines.append(
                f"| {label} | {m['rps']:.0f} | {rel} | {m['p50_ms']:.1f} | {m['p99_ms']:.1f} | {m['cpu_ms']:.2f} "
                f"| {m['failures']} | {r} |"
            )
    if results["errors"]:
        lines += ["", "Errors:", "", *[f"- {e}" for e in results["errors"]]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main


def describe(model_config: dict, props: dict[str, str]) -> str:
    keys = ("minWorkers", "batchSize", "maxBatchDelay")
    parts = [f"{k} {model_config[k]}" for k in keys if k in model_config]
    parts.append(f"torch threads {model_config.get('handler', {}).get('threads', '?')}")
    parts += [f"{k}={v}" for k, v in props.items() if k in PERFORMANCE_PROPERTIES]
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. bench.repeats=5")
    parser.add_argument("--quick", action="store_true", help="short run: bench.quick settings")
    parser.add_argument("--sweep", action="store_true", help="tuning candidates on the first model, writes tuning.md")
    parser.add_argument("--variants", nargs="+", help="with --sweep: only these candidates (labels of SWEEP)")
    parser.add_argument("--models", nargs="+", choices=["digits", HEAVY], default=["digits", HEAVY])
    parser.add_argument("--users", nargs="+", type=int, help="Locust user counts (default bench.users)")
    parser.add_argument("--repeats", type=int, help="measurements per point (default bench.repeats)")
    parser.add_argument("--no-fastapi", action="store_true", help="leave out the FastAPI comparison")
    parser.add_argument("--retrain", action="store_true", help="train the heavy model again")
    parser.add_argument("--out", help="report directory (default bench.out)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    try:
        cfg = load_config(args.overrides)
    except Exception as err:  # Hydra's errors name the bad override
        raise SystemExit(f"error: config: {err}") from None
    bench = cfg.bench
    settings = dict(bench.quick) if args.quick else {}
    users = args.users or list(settings.get("users", bench.users))
    bench = argparse.Namespace(
        users=users,
        repeats=args.repeats or settings.get("repeats", bench.repeats),
        run_time_s=settings.get("run_time_s", bench.run_time_s),
        warmup_s=settings.get("warmup_s", bench.warmup_s),
        inprocess_s=settings.get("inprocess_s", bench.inprocess_s),
        batch_sizes=[] if args.sweep else list(bench.batch_sizes),
    )
    out, workdir = Path(args.out or cfg.bench.out), ROOT / cfg.bench.workdir
    models = args.models[:1] if args.sweep else args.models
    try:
        import torch

        default_threads = torch.get_num_threads()  # before any ImageClassifier sets it
        prepared = []
        for key in models:
            if key == HEAVY:
                heavy = load_config([*args.overrides, *map(str, cfg.bench.heavy)])
                prepared.append(Model(str(heavy.name), heavy, prepare_heavy(heavy, args.retrain)))
            else:
                mar = Path(cfg.paths.model_store) / f"{cfg.name}.mar"
                if not mar.is_file():
                    raise BenchError(f"no archive {mar}: run `make pipeline` first")
                prepared.append(Model(str(cfg.name), cfg, mar))
    except BenchError as err:
        raise SystemExit(f"error: {err}") from None

    tuned_props = read_properties(CONFIG_PROPERTIES)
    results = {"runs": [], "ready": [], "inprocess": [], "errors": [], "_images": {}}
    results["_images"] = {m.key: test_images(m.cfg) for m in prepared}
    load_start = os.getloadavg()[0]
    log(f"load average {load_start:.1f}; models {', '.join(m.name for m in prepared)}; users {users}")
    stock_props = write_stock_properties(workdir / "stock.properties")
    tuned_config = {}
    for model in prepared:
        model.unpacked = workdir / model.key / "unpacked"
        shutil.rmtree(model.unpacked, ignore_errors=True)
        with zipfile.ZipFile(model.mar) as z:
            z.extractall(model.unpacked)
        shipped = read_model_config(model.mar)
        tuned_config = tuned_config or shipped
        mwork = workdir / model.key
        if args.sweep:
            (workdir / "log4j2-quiet.xml").write_text(QUIET_LOG4J)
            chosen = [c for c in SWEEP if not args.variants or c[0] in args.variants]
            if not chosen:
                raise SystemExit(f"error: no sweep variant among {args.variants}: use {[c[0] for c in SWEEP]}")
            servers = [
                Server(label, [users[0]] if len(users) == 1 else [32], variant(model, mwork, label, merge(shipped, mc)),
                       CONFIG_PROPERTIES, {k: v.format(workdir=workdir) for k, v in props.items()})
                for label, mc, props in chosen
            ]  # fmt: skip
        else:
            servers = [
                Server("stock", users, variant(model, mwork, "stock", stock_model_config(shipped, default_threads)),
                       stock_props),
                Server("tuned", users, model.mar.parent, CONFIG_PROPERTIES),
                Server("tuned, batch 1", [u for u in users if u >= 32] or users[-1:],
                       variant(model, mwork, "tuned_b1", {**shipped, "batchSize": 1}), CONFIG_PROPERTIES),
            ]  # fmt: skip
            if not args.no_fastapi:
                servers.append(Server("FastAPI", users))
        bench_model(model, servers, bench, workdir, results)

    loads = [r["load1"] for r in results["runs"]] or [load_start]
    load_end = os.getloadavg()[0]
    results.pop("_images")
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "args": " ".join(argv if argv is not None else sys.argv[1:]),
        "minutes": (time.monotonic() - started) / 60,
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}",
        "torch": torch.__version__,
        "torchserve": _version("torchserve"),
        "locust": _version("locust"),
        "load_start": load_start,
        "load_end": load_end,
        "load_median": statistics.median(loads),
        "note": (
            "Other processes shared the CPU during the run (load above 2 on 2 cores): absolute numbers are low "
            "and noisy; compare servers within this run."
            if statistics.median(loads) > 2.5
            else ""
        ),
        "run_time_s": bench.run_time_s,
        "repeats": bench.repeats,
        "users": users,
        "stock": f"one worker per core ({os.cpu_count()}), batchSize 1, maxBatchDelay 100, torch threads "
        f"{default_threads}, log metrics, system metrics, synchronous logging",
        "tuned": describe(tuned_config, tuned_props),
    }
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        write_json(out / "tuning.json", results)
        with atomic_path(out / "tuning.md") as tmp:
            tmp.write_text(sweep_report(results, prepared[0].key, servers[0].users[0]))
        log(f"wrote {out / 'tuning.md'}")
    else:
        labels = [s.label for s in servers]
        for model in prepared:
            plot(results, model.key, labels, out / f"{model.key}.png")
        write_json(out / "results.json", results)
        with atomic_path(out / "README.md") as tmp:
            heavy_key = next((m.key for m in prepared if m.cfg.model.name == HEAVY), None)
            tmp.write_text(report(results, [m.key for m in prepared], labels, heavy_key))
        log(f"wrote {out / 'README.md'} ({(time.monotonic() - started) / 60:.1f} min)")
    if results["errors"]:
        raise SystemExit(f"error: {len(results['errors'])} measurements failed, first: {results['errors'][0]}")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


if __name__ == "__main__":
    main()
