"""The serving profile: the serving core on real archived payloads at several batch sizes with torch.profiler
(top operators, Chrome traces), and a live TorchServe worker under Locust load sampled with py-spy (flame graph,
top functions). Training is profiled by `trainer.profiler` (training/profiler.py).
"""

import functools
import logging
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil
import torch
from omegaconf import DictConfig

from common.cli import BundleError
from common.images import encode
from common.io import write_json, write_text
from handlers.archive import mar_file, unpack
from handlers.classifier import ImageClassifier
from loadtest.locust_process import run_locust
from servers.drain import counters
from servers.fastapi import load_classifier
from servers.torchserve import TorchServe
from training.splits import read_split

log = logging.getLogger(__name__)

STAGES = ("decode", "predict", "track", "answer", "encode")  # ImageClassifier.run's steps, in order
WORKER = "model_service_worker"  # TorchServe's Python worker process
ARRIVED = "ts_inference_requests_total"  # TorchServe's counter of prediction requests


class ProfileError(BundleError):
    """A profile could not be taken; the message says why."""


def payloads(data_dir: Path | str) -> list[bytes]:
    """The test split as PNG bodies: what clients send."""
    images, _ = read_split(data_dir, "test")
    return [encode(image) for image in images]


def labelled(classifier: ImageClassifier) -> None:
    """Name each step of `run` in the profile (record_function around the instance's own methods)."""
    for name in STAGES:
        method = getattr(classifier, name)

        @functools.wraps(method)
        def step(*args, _method=method, _name=name, **kwargs):
            with torch.profiler.record_function(_name):
                return _method(*args, **kwargs)

        setattr(classifier, name, step)


def core(classifier: ImageClassifier, bodies: list[bytes], out: Path, batches: list[int], calls: int) -> list[dict]:
    """torch.profiler over `calls` batches of each size: timings, the top operators, a Chrome trace each."""
    labelled(classifier)
    rows = []
    rng = np.random.default_rng(0)
    for batch in batches:
        requests = [[bodies[i] for i in rng.integers(0, len(bodies), batch)] for _ in range(calls)]
        for payload in requests[:3]:  # warm-up
            classifier.run(payload)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            done = [classifier.run(payload) for payload in requests]
            seconds = time.perf_counter() - start
        trace = out / f"core_batch{batch}.trace.json"
        prof.export_chrome_trace(str(trace))
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
        write_text(out / f"core_batch{batch}_operators.txt", table)
        stages = {e.key: e.cpu_time_total / 1e3 / calls for e in prof.key_averages() if e.key in STAGES}
        ops = sorted(
            (e for e in prof.key_averages() if e.key not in STAGES), key=lambda e: e.self_cpu_time_total, reverse=True
        )
        rows.append(
            {
                "batch": batch,
                "ms_per_call": seconds * 1e3 / calls,
                "images_per_s": batch * calls / seconds,
                "stage_ms": stages,  # per call, under the profiler
                "batch_ms": {k: float(np.mean([getattr(b, k) for b in done])) for k in ("decode_ms", "inference_ms")},
                "top_ops": [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3 / calls} for e in ops[:5]],
                "trace": trace.name,
            }
        )
        log.info("batch %d: %.2f ms per call, %s", batch, rows[-1]["ms_per_call"], stages)
    return rows


def worker_pid(server_pid: int, timeout: float = 30) -> int:
    """The pid of TorchServe's Python worker, a descendant of the frontend."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in psutil.Process(server_pid).children(recursive=True):
            try:
                if any(WORKER in part for part in proc.cmdline()):
                    return proc.pid
            except psutil.Error:
                continue
        time.sleep(0.5)
    raise ProfileError(f"no TorchServe worker ({WORKER}) under pid {server_pid}")


def wait_for_load(metrics_url: str, load: dict, timeout: float = 60) -> None:
    """Block until Locust's requests reach the server, then one second more: it spawns all its users within a
    second (spawn rate = users). `load` is the load's result so far: an "error" there ends the wait."""
    deadline = time.monotonic() + timeout
    while not (counters(metrics_url, (ARRIVED,)) or {}).get(ARRIVED):
        if "error" in load:
            raise ProfileError(f"Locust stopped before any request reached the server: {load['error']}")
        if time.monotonic() > deadline:
            raise ProfileError(f"no request from Locust reached the server within {timeout:.0f} s")
        time.sleep(0.2)
    time.sleep(1)


def py_spy(pid: int, seconds: float, output: Path, fmt: str) -> Path:
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if not exe:
        raise ProfileError("py-spy not found: pip install -r requirements.txt")
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(round(seconds)), "--rate", "100", "--function"]
    cmd += ["--format", fmt, "--output", str(output)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0 or not output.is_file():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ProfileError(f"py-spy failed (code {done.returncode}): {last} (it needs ptrace: root or CAP_SYS_PTRACE)")
    return output


def top_frames(collapsed: Path, limit: int = 12) -> dict:
    """From py-spy's collapsed stacks: the functions with the most samples on top (self) and anywhere (total)."""
    own, total, samples = Counter(), Counter(), 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames, n = stack.split(";"), int(count)
        samples += n
        own[frames[-1]] += n
        for frame in set(frames):
            total[frame] += n
    share = lambda c: [{"frame": f, "share": n / max(1, samples)} for f, n in c.most_common(limit)]  # noqa: E731
    return {"samples": samples, "self": share(own), "total": share(total)}


def live(mar: Path, cfg: DictConfig, out: Path, seconds: float, users: int) -> dict:
    """A real TorchServe serving `mar` under Locust (raw PNG, closed loop); py-spy samples its worker twice:
    a flame graph, then collapsed stacks for the numbers."""
    with (
        tempfile.TemporaryDirectory(prefix="profile-") as tmp,
        TorchServe(mar.parent, {cfg.name: mar.name}, Path(tmp) / "torchserve", ports={}) as server,
    ):
        server.wait_ready(180)
        pid = worker_pid(server.pid)
        options = {"model": cfg.name, "data": cfg.paths.data, "mix": "raw=1", "malformed_share": 0}
        options.update(wait_min=0, wait_max=0)
        result: dict = {}

        def load() -> None:
            try:
                result["locust"] = run_locust(
                    server.url("inference"), users, users, 2 * seconds + 12, None, server.key() or "", options
                )
            except BundleError as err:
                result["error"] = str(err)

        thread = threading.Thread(target=load)
        thread.start()
        wait_for_load(f"{server.url('metrics')}/metrics", result)
        svg = py_spy(pid, seconds, out / "worker_flame.svg", "flamegraph")
        raw = py_spy(pid, seconds, out / "worker_stacks.txt", "raw")
        thread.join()
    if "error" in result:
        raise ProfileError(f"the load did not run: {result['error']}")
    summary = result["locust"]["wellformed"]
    return {
        "users": users,
        "rps": summary["rps"],
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "flame_graph": svg.name,
        **top_frames(raw),
    }


def report(name: str, rows: list[dict], worker: dict | None) -> str:
    lines = [f"# Serving profile: {name}", "", "## Serving core (in process, torch.profiler, one thread)", ""]
    lines += ["| batch | ms per call | images/s | " + " | ".join(f"{s} ms" for s in STAGES) + " | top operators |"]
    lines += ["| ---: | ---: | ---: | " + " | ".join("---:" for _ in STAGES) + " | --- |"]
    for row in rows:
        stages = " | ".join(f"{row['stage_ms'].get(s, 0):.3f}" for s in STAGES)
        ops = ", ".join(f"{o['op']} {o['self_ms']:.3f}" for o in row["top_ops"][:3])
        lines.append(f"| {row['batch']} | {row['ms_per_call']:.2f} | {row['images_per_s']:.0f} | {stages} | {ops} |")
    lines += ["", "Stage times include the profiler's own overhead; operator tables: core_batch<N>_operators.txt,"]
    lines += ["Chrome traces (ui.perfetto.dev, chrome://tracing): core_batch<N>.trace.json.", ""]
    if worker:
        lines += [f"## Live TorchServe worker (py-spy, {worker['users']} Locust users, raw PNG)", ""]
        lines += [f"{worker['rps']:.0f} req/s, p50 {worker['p50_ms']:.0f} ms, p99 {worker['p99_ms']:.0f} ms under the"]
        lines += [f"sampler; {worker['samples']} samples. Flame graph: {worker['flame_graph']}.", ""]
        lines += ["| on CPU (self) | share | anywhere on the stack (total) | share |", "| --- | ---: | --- | ---: |"]
        for own, total in zip(worker["self"], worker["total"], strict=False):
            lines.append(f"| `{own['frame']}` | {own['share']:.1%} | `{total['frame']}` | {total['share']:.1%} |")
    return "\n".join(lines) + "\n"


def profile(cfg: DictConfig, out: Path, batches: list[int], calls: int, seconds: float, users: int) -> Path:
    """Both serving profiles of the archived model; `seconds=0` skips the live server. Returns the report."""
    mar = Path(cfg.paths.model_store) / mar_file(cfg.name)
    if not mar.is_file():
        raise ProfileError(f"no archive {mar}: run `make pipeline` first")
    out.mkdir(parents=True, exist_ok=True)
    bodies = payloads(cfg.paths.data)
    previous = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="profile-") as tmp:
        classifier = load_classifier(mar, unpack(mar, tmp))
        torch.set_num_threads(classifier.settings.threads)  # as the worker does
        try:
            rows = core(classifier, bodies, out, batches, calls)
        finally:
            torch.set_num_threads(previous)
    worker = live(mar, cfg, out, seconds, users) if seconds > 0 else None
    write_json(out / "profile.json", {"core": rows, "worker": worker})
    path = out / "profile.md"
    write_text(path, report(cfg.name, rows, worker))
    return path
