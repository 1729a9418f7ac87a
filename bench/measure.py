"""The measurements: the serving core in this process (no HTTP), and wrk against a running server (closed loop
at each connection count, then paced at fixed arrival rates) with the server's CPU time per request, then, for
the shipped server, Locust at some of the same connection counts (bench/locust.py); `measure` runs them,
repeats interleaved across servers."""

import json
import os
import random
import time
import urllib.error
import urllib.request

import numpy as np
import psutil
import torch

from bench import locust, wrk
from bench.models import BenchError, Model, log
from bench.servers import Running, Server, start
from servers.drain import counters
from servers.fastapi import load_classifier
from servers.process import ServerError

BODIES = 256  # distinct test-set images wrk sends in turn
# TorchServe's own clock, summed in microseconds: from the parsed request to its answer, and the part before a
# worker took it (the batch delay included: the frontend stamps a batch's jobs after gathering it)
LATENCY, QUEUE = "ts_inference_latency_microseconds", "ts_queue_latency_microseconds"


def cpu_seconds(pid: int, recursive: bool = True) -> float:
    """User + system CPU time of a process and its live descendants (TorchServe: Java frontend + workers)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)] if recursive else [root]
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


def worker_cpu_seconds(pid: int) -> float:
    """CPU time of the processes that run the handler: TorchServe's Python workers, else the whole tree."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0.0
    workers = [p for p in procs if "model_service_worker" in " ".join(cmdline(p))]
    return sum(cpu_seconds(p.pid, recursive=False) for p in workers) if workers else cpu_seconds(pid)


def cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def drain(model: Model, running: Running, timeout: float = 300) -> None:
    """Wait until the server has answered what an ended run left queued: TorchServe still works through
    requests whose clients are gone, and the next measurement must not queue behind them."""
    headers = {"Content-Type": "image/png", "Authorization": f"Bearer {running.token}"}
    url = f"{running.host}/predictions/{model.name}"
    deadline = time.monotonic() + timeout
    while True:  # a full queue answers 503 until it has room again
        request = urllib.request.Request(url, data=model.images[0], headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read()
                return
        except urllib.error.HTTPError as err:
            if err.code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def load(model: Model, running: Running, connections: int, seconds: float, rate: float = 0) -> dict:
    """wrk: raw PNG requests on `connections` keep-alive connections, closed loop, or paced at `rate` req/s."""
    url = f"{running.host}/predictions/{model.name}"
    headers = {"Authorization": f"Bearer {running.token}"} if running.token else {}
    try:
        return wrk.run(url, headers, model.images[:BODIES], connections, seconds, rate)
    except RuntimeError as err:
        raise BenchError(str(err)) from None


def under_load(model: Model, running: Running, connections: int, seconds: float, rate: float = 0) -> dict:
    """One wrk measurement: throughput, latency, errors, the client's CPU share, and the server's CPU time per
    request (all its processes, and the handler's processes alone)."""
    pid = running.process.pid
    clock = counters(running.metrics, (LATENCY, QUEUE)) if running.metrics else None
    load1, cpu, worker = os.getloadavg()[0], cpu_seconds(pid), worker_cpu_seconds(pid)
    r = load(model, running, connections, seconds, rate)
    answered = max(1, r["requests"])
    cpu_ms = (cpu_seconds(pid) - cpu) * 1e3 / answered
    worker_ms = (worker_cpu_seconds(pid) - worker) * 1e3 / answered
    row = {"connections": connections, "rate": rate, "load1": load1, "count": r["requests"], "failures": r["errors"]}
    row.update({k: r[k] for k in ("rps", "p50_ms", "p90_ms", "p99_ms", "client_cpu")}, cpu_ms=cpu_ms)
    row["worker_cpu_ms"] = worker_ms
    after = counters(running.metrics, (LATENCY, QUEUE)) if clock else None
    if clock and after:  # mean ms per answered request on TorchServe's clock (refusals never reach it)
        inferred = max(1, r["requests"] - r["errors"])
        row.update(
            {f"ts_{k}_ms": (after[n] - clock[n]) / 1e3 / inferred for k, n in (("latency", LATENCY), ("queue", QUEUE))}
        )
    drain(model, running)
    what = f"{rate:5.0f}/s paced" if rate else f"{connections:>3} connections"
    log(
        f"  {what}: {r['rps']:7.0f} req/s  p50 {r['p50_ms']:6.2f}  p99 {r['p99_ms']:6.2f} ms  errors {r['errors']}"
        f"  server CPU {cpu_ms:.2f} (worker {worker_ms:.2f}) ms/req  wrk CPU {r['client_cpu']:.0%}  (load {load1:.1f})"
    )
    return row


def beside_wrk(model: Model, running: Running, label: str, repeat: int, plan, results: dict) -> None:
    """Locust at each of `plan.locust_connections` that wrk measured on this server in this repeat: rows in
    results["locust"], each with wrk's numbers at the same connection count beside it (under "wrk")."""
    measured = {
        r["connections"]: r
        for r in results["runs"]
        if (r["model"], r["server"], r["repeat"]) == (model.key, label, repeat) and not r["rate"]
    }
    for users in plan.locust_connections:
        if users not in measured:
            log(f"  Locust at {users} users left out: wrk did not measure {users} connections")
            continue
        row = locust.run(model, running, users, plan.run_time_s)
        drain(model, running)
        row["wrk"] = {k: measured[users][k] for k in locust.COMPARED}
        results.setdefault("locust", []).append({"model": model.key, "server": label, "repeat": repeat, **row})
        failed = f" (first: {row['first_error']})" if row["failures"] else ""
        log(
            f"  Locust {users:>3} users: {row['rps']:7.0f} req/s  p50 {row['p50_ms']:6.2f}  p99 {row['p99_ms']:6.2f} ms"
            f"  errors {row['failures']}{failed}  Locust CPU {row['client_cpu']:.0%}"
            f"  (wrk: {row['wrk']['rps']:.0f} req/s, CPU {row['wrk']['client_cpu']:.0%})"
        )


def measure(model: Model, servers: list[Server], plan, workdir, results: dict) -> None:
    """The in-process limit at each batch size, then every server once per repeat (repeats interleaved), the
    shipped one with Locust too; rows and errors are added to `results`."""
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
                load(model, running, max(server.connections), plan.warmup_s)
                drain(model, running)
                for connections in server.connections:
                    row = under_load(model, running, connections, plan.run_time_s)
                    results["runs"].append({"model": model.key, "server": server.label, "repeat": repeat, **row})
                for rate in server.rates:
                    row = under_load(model, running, plan.paced_connections, plan.run_time_s, rate)
                    results["open"].append({"model": model.key, "server": server.label, "repeat": repeat, **row})
                if server.label == locust.SERVER:
                    beside_wrk(model, running, server.label, repeat, plan, results)
            except (BenchError, OSError) as err:
                results["errors"].append(f"{model.key} {server.label}: {err}")
                log(f"error: {results['errors'][-1]}")
            finally:
                running.process.stop()
