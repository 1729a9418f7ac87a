"""The measurements: the serving core in this process (no HTTP), and Locust against a running server
with the server's CPU time per request; `measure` runs them, repeats interleaved across servers."""

import json
import os
import random
import time
import urllib.request

import numpy as np
import psutil
import torch

from bench.models import BenchError, Model, log
from bench.servers import Running, Server, start
from loadtest.runner import LoadTestError, run_locust
from servers.fastapi import load_classifier
from servers.process import ServerError


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its live descendants (TorchServe: Java frontend + workers)."""
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


def in_process(model: Model, batch: int, seconds: float) -> dict:
    """The serving core alone: `batch` requests of raw PNG bytes per call, answers serialised to JSON,
    with the torch threads of the archive's handler settings (as a TorchServe worker sets them)."""
    classifier = load_classifier(model.mar, model.unpacked)
    previous = torch.get_num_threads()
    torch.set_num_threads(classifier.settings.threads)
    rng = random.Random(batch)
    calls: list[float] = []
    deadline = time.perf_counter() + seconds + 0.5
    try:
        while time.perf_counter() < deadline:
            payloads = rng.choices(model.images, k=batch)
            begin = time.perf_counter()
            answers = [json.dumps(r.body) for r in classifier.handle(payloads)]
            elapsed = time.perf_counter() - begin
            if deadline - time.perf_counter() < seconds:  # the first 0.5 s warm the graph up
                calls.append(elapsed)
            if not all('"label"' in a for a in answers):
                raise BenchError(f"the serving core did not answer a test image: {answers[:1]}")
    finally:
        torch.set_num_threads(previous)
    ms = np.array(calls) * 1e3
    p50, p99 = np.percentile(ms, [50, 99])
    per_s = batch * len(calls) / ms.sum() * 1e3
    return {"images_per_s": per_s, "p50_ms": p50, "p99_ms": p99, "threads": classifier.settings.threads}


def drain(model: Model, running: Running, timeout: float = 300) -> None:
    """Wait until the server has answered what an ended Locust run left queued: TorchServe still works
    through requests whose clients are gone, and the next measurement must not queue behind them."""
    headers = {"Content-Type": "image/png", "Authorization": f"Bearer {running.token}"}
    url = f"{running.host}/predictions/{model.name}"
    request = urllib.request.Request(url, data=model.images[0], headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()


def locust(model: Model, running: Running, users: int, seconds: float) -> dict:
    """Closed loop: raw PNG requests without waits, every user spawned at once, statistics reset then."""
    options = {"model": model.name, "data": model.cfg.paths.data, "mix": "raw=1", "malformed_share": 0}
    options.update(wait_min=0, wait_max=0)
    return run_locust(running.host, users, users, seconds, None, running.token, options, reset_stats=True)


def under_load(model: Model, running: Running, users: int, seconds: float) -> dict:
    """One Locust measurement: throughput, latency, and the server's CPU time per request sent."""
    load, cpu = os.getloadavg()[0], cpu_seconds(running.process.pid)
    summary = locust(model, running, users, seconds)
    cpu_ms = (cpu_seconds(running.process.pid) - cpu) * 1e3 / max(1, summary.get("sent", 0))
    s = summary["wellformed"]
    row = {"users": users, "load1": load, **{k: s[k] for k in ("count", "failures", "rps", "p50_ms", "p95_ms")}}
    row.update(p99_ms=s["p99_ms"], cpu_ms=cpu_ms)
    drain(model, running)
    log(
        f"  {users:>3} users: {s['rps']:7.0f} req/s  p50 {s['p50_ms']:6.1f}  p99 {s['p99_ms']:6.1f} ms"
        f"  failures {s['failures']}  server CPU {cpu_ms:.2f} ms/req  (load {load:.1f})"
    )
    return row


def measure(model: Model, servers: list[Server], plan, workdir, results: dict) -> None:
    """The in-process limit at each batch size, then every server once per repeat (repeats interleaved);
    rows and errors are added to `results`."""
    for batch in plan.batch_sizes:
        for repeat in range(plan.repeats):
            r = in_process(model, batch, plan.inprocess_s)
            results["inprocess"].append({"model": model.key, "batch": batch, "repeat": repeat, **r})
            log(f"{model.key} in-process batch {batch}: {r['images_per_s']:.0f} images/s, p99 {r['p99_ms']:.1f} ms")
    for repeat in range(plan.repeats):
        for server in servers:
            where = workdir / model.key / "run" / server.label.replace(" ", "_")
            try:
                running = start(model, server, where)
            except ServerError as err:
                results["errors"].append(f"{model.key} {server.label}: {str(err).splitlines()[0]}")
                log(f"error: {results['errors'][-1]}")
                continue
            ready = {"model": model.key, "server": server.label, "repeat": repeat, "s": running.ready_s}
            results["ready"].append(ready)
            log(f"{model.key} {server.label} (repeat {repeat + 1}): ready after {running.ready_s:.1f} s")
            try:
                locust(model, running, max(server.users), plan.warmup_s)
                drain(model, running)
                for users in server.users:
                    row = under_load(model, running, users, plan.run_time_s)
                    results["runs"].append({"model": model.key, "server": server.label, "repeat": repeat, **row})
            except (LoadTestError, OSError) as err:
                results["errors"].append(f"{model.key} {server.label}: {err}")
                log(f"error: {results['errors'][-1]}")
            finally:
                running.process.stop()
