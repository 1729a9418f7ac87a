"""The benchmark's report: medians over the repeats, the README.md tables, the plots, the goals table."""

import statistics
from pathlib import Path

from bench.servers import FASTAPI, PEERS, PLAIN, STOCK, TUNED, TUNED_BATCH_1, TUNED_ONE_WORKER
from common.io import atomic_path

RUN_KEYS = ("rps", "p50_ms", "p90_ms", "p99_ms", "cpu_ms", "worker_cpu_ms", "client_cpu")
CLOCK_KEYS = ("ts_latency_ms", "ts_queue_ms")  # TorchServe's own clock, where it was read
OPEN_KEYS = ("rps", "p50_ms", "p99_ms", "cpu_ms", "failures")
LOCUST_KEYS = ("rps", "p50_ms", "p99_ms", "client_cpu")


def summarize(rows: list[dict], keys: tuple[str, ...], summed: tuple[str, ...] = ()) -> dict:
    """The median of each of `keys` over the rows that have it, the sum of each of `summed`."""
    out = {k: statistics.median(values) for k in keys if (values := [r[k] for r in rows if k in r])}
    return out | {k: sum(r[k] for r in rows) for k in summed}


def median_by(rows: list[dict], model: str, by: tuple[str, ...], keys: tuple[str, ...], summed=()) -> dict:
    """`model`'s rows grouped by the fields `by` (one field: its value is the key, else a tuple), in key order,
    each group summarized (median of `keys`, sum of `summed`) with its row count `n`."""
    groups: dict = {}
    for row in rows:
        if row["model"] == model:
            key = tuple(row[f] for f in by)
            groups.setdefault(key if len(by) > 1 else key[0], []).append(row)
    return {key: {**summarize(rows, keys, summed), "n": len(rows)} for key, rows in sorted(groups.items())}


def median_rows(results: dict, model: str) -> dict[tuple[str, int], dict]:
    return median_by(results["runs"], model, ("server", "connections"), RUN_KEYS + CLOCK_KEYS, ("failures",))


def inprocess_medians(results: dict, model: str) -> dict[int, dict]:
    return median_by(results["inprocess"], model, ("batch",), ("images_per_s", "p50_ms", "p99_ms"))


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
            connections = [u for u, _ in points]
            left.plot(connections, [m["rps"] for _, m in points], marker="o", label=server)
            right.plot(connections, [m["p99_ms"] for _, m in points], marker="o", label=server)
    if limit:
        left.axhline(limit, color="gray", linestyle="--", label="in-process limit (best batch)")
    for ax, title, unit in ((left, "throughput", "requests/s"), (right, "p99 latency", "ms")):
        ax.set(xscale="log", yscale="log", xlabel="wrk connections (closed loop)", ylabel=unit)
        ax.set_title(f"{model}: {title}")
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def times(a: dict | None, b: dict | None) -> str:
    return f"{a['rps'] / b['rps']:.2f}×" if a and b and b["rps"] else ""


def goal(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "**missed**")


def open_medians(results: dict, model: str) -> dict[tuple[str, float], dict]:
    return median_by(results.get("open", []), model, ("server", "rate"), OPEN_KEYS)


def locust_medians(results: dict, model: str) -> dict[int, dict]:
    """Locust's runs (bench/locust.py) per connection count: medians over the repeats (errors: the sum), each
    with wrk's numbers of the same repeats under "wrk"."""
    groups = median_by(results.get("locust", []), model, ("connections",), LOCUST_KEYS, ("failures",))
    for c, m in groups.items():
        wrk_rows = [r["wrk"] for r in results["locust"] if r["model"] == model and r["connections"] == c]
        m["wrk"] = summarize(wrk_rows, LOCUST_KEYS, ("failures",))
    return groups


def locust_table(results: dict, model: str, cores: int) -> list[str]:
    """The "Locust vs wrk" table of one model, and a sentence on its highest connection count; [] without runs."""
    rows = locust_medians(results, model)
    if not rows:
        return []
    lines = [
        "",
        "Locust vs wrk (tuned TorchServe): the same server and cores, raw PNG bodies, no wait between requests "
        "(Locust also checks every answer, as in `make loadtest`). Requests/s answered without error · p50 / p99 ms; "
        f"client CPU is the load generator's own CPU share (1.0 = one of the {cores} cores; Locust's over its "
        "measured window, without its start-up):",
        "",
        "| connections | wrk | Locust | Locust/wrk req/s | errors wrk · Locust | client CPU wrk · Locust |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def cell(m: dict) -> str:
        return f"{m['rps']:.0f} · {m['p50_ms']:.1f} / {m['p99_ms']:.1f}"

    for c, m in rows.items():
        w = m["wrk"]
        lines.append(
            f"| {c} | {cell(w)} | {cell(m)} | {times(m, w)} | {w['failures']} · {m['failures']} | "
            f"{w['client_cpu']:.2f} · {m['client_cpu']:.2f} |"
        )
    c, m = max(rows.items())
    w = m["wrk"]
    if w["rps"]:
        lines += [
            "",
            f"At {c} connection{'s' if c != 1 else ''} Locust used {m['client_cpu']:.2f} of a core and wrk "
            f"{w['client_cpu']:.2f}; Locust measured {m['rps']:.0f} req/s, {times(m, w)} what wrk "
            f"measured ({w['rps']:.0f}), p99 {m['p99_ms']:.1f} ms against wrk's {w['p99_ms']:.1f} ms.",
        ]
    return lines


def floor_table(medians: dict[tuple[str, int], dict], inproc: dict[int, dict], delay_ms: object) -> list[str]:
    """Where a lone request's time goes on the shipped server: wrk's mean at 1 connection split by TorchServe's
    own latency counters and the CPU the worker spent, beside the serving core alone and FastAPI (`medians` and
    `inproc`: one model's median_rows and inprocess_medians)."""
    one, fast = medians.get((TUNED, 1)), medians.get((FASTAPI, 1))
    core = inproc.get(1)
    if not one or "ts_latency_ms" not in one or not one["rps"]:
        return []
    mean, latency, queue = 1e3 / one["rps"], one["ts_latency_ms"], one["ts_queue_ms"]
    rows = [
        ("the whole round trip, as wrk sees it (mean = 1 / req/s: one connection, no wait)", mean),
        ("outside TorchServe's clock: wrk, loopback TCP, the frontend's HTTP parsing and writing", mean - latency),
        (f"queued in the frontend, with the batch delay (maxBatchDelay {delay_ms} ms)", queue),
        ("frontend → worker socket → worker → frontend, handler included", latency - queue),
        ("... of it, the Python worker's CPU (TorchServe's protocol and metrics, the handler)", one["worker_cpu_ms"]),
        ("... of that, the serving core alone (in-process, batch 1, p50 per call)", core["p50_ms"] if core else None),
        ("the Java frontend's CPU per request, all its threads", one["cpu_ms"] - one["worker_cpu_ms"]),
    ]
    if (single := medians.get((TUNED_BATCH_1, 1))) and single["rps"]:
        rows.append(
            ("the same server with batch size 1, which waits for no batch: its whole round trip", 1e3 / single["rps"])
        )
    if fast and fast["rps"]:
        rows.append(("FastAPI's whole round trip at 1 connection, for comparison (mean)", 1e3 / fast["rps"]))
    lines = [
        "",
        "Where a lone request's time goes (tuned, 1 connection; ms per request, medians over the repeats):",
        "",
    ]
    lines += ["| part | ms |", "| --- | ---: |"]
    lines += [f"| {name} | {value:.2f} |" for name, value in rows if value is not None]
    return lines


def report(results: dict, models: list[str], servers: list[str], heavy: str | None) -> str:
    lines = header(results["meta"])
    for model in models:
        lines += model_section(results, model, servers)
    lines += goals(results, models, heavy)
    if results["errors"]:
        lines += ["", "## Errors", "", *[f"- {e}" for e in results["errors"]]]
    return "\n".join(lines) + "\n"


def header(meta: dict) -> list[str]:
    """The run, the machine, the load generator and the servers."""
    return [
        "# Benchmark",
        "",
        f"Written by `python -m scripts.bench{(' ' + meta['args']) if meta['args'] else ''}` on {meta['date']}, "
        f"{meta['minutes']:.1f} minutes. Machine: {meta['machine']}. torch {meta['torch']}, "
        f"TorchServe {meta['torchserve']}, wrk {meta['wrk']}"
        + (f", Locust {meta['locust']}." if meta.get("locust") else "."),
        "",
        f"Load average (1 min) at start {meta['load_start']:.1f}, at end {meta['load_end']:.1f}, median over the "
        f"measurements {meta['load_median']:.1f}. {meta['note']}",
        "",
        "**Load generator, identical for every server:** `wrk` (C, one thread) on the same cores as the server, "
        "raw PNG bytes of the test-set images on keep-alive connections. Closed loop: each connection sends its "
        f"next request when the answer arrives, {meta['run_time_s']} s per point after a discarded warm-up run; "
        f"wrk's own CPU share is in the table (1.0 = a core). Open loop: {meta['paced_connections']} connections, "
        "each waiting an exponential gap before its next request, Poisson arrivals at the stated rate in all (a slow "
        "answer delays its own connection only; the achieved rate is reported). "
        f"{meta['repeats']} repeat(s) interleaved across servers, each number the median (errors: the sum). "
        "Server CPU is the user + system time of all its processes per answered request; *worker* is the handler's "
        "processes alone (TorchServe's Python workers).",
        "",
        "**Servers:** *in-process* = the serving core (handlers/classifier.py, as the archive packs it: decode, "
        "TorchScript forward with preprocessing, top-k, JSON) in one Python process, no HTTP, one call per batch; "
        f"*stock* = TorchServe defaults ({meta['stock']}); *tuned* = what ships (`config.properties` + `serve:`: "
        f"{meta['tuned']}); *{TUNED_BATCH_1}* = the same with batchSize 1; *{TUNED_ONE_WORKER}* = the same with "
        "one worker (where more ship); *FastAPI* = a FastAPI app "
        f"(servers/fastapi.py) over the same serving core under uvicorn, one worker process per core "
        f"({meta['cores']}), one request per forward pass; *{PLAIN}* = what a user might write instead "
        "(servers/plain.py): FastAPI under uvicorn, one worker process per core and one torch thread each, Pillow "
        "decoding the body, the archive's own model file (torch.jit.load), one forward pass per request, the top-k "
        "classes as JSON, and none of the serving core's work (no input checks beyond Pillow's, no drift tracking, "
        "no token); *LitServe* = LitServe (servers/litserve.py) over the same serving core, batching as the archive "
        "says (batchSize and maxBatchDelay as *tuned*), one inference worker process per core behind as many uvicorn "
        "processes.",
        "",
    ]


def model_section(results: dict, model: str, servers: list[str]) -> list[str]:
    medians, inproc = median_rows(results, model), inprocess_medians(results, model)
    lines = [f"## {model}", "", *inprocess_table(inproc)]
    lines += closed_table(medians, inproc, servers)
    lines += cpu_table(medians, servers)
    lines += core_cost(medians, results["meta"]["goals"]["connections"])
    lines += open_table(open_medians(results, model), servers)
    lines += floor_table(medians, inproc, results["meta"].get("delay_ms", "?"))
    lines += locust_table(results, model, results["meta"]["cores"])
    lines += ready_table(results, model)
    return [*lines, "", f"![{model}]({model}.png)", ""]


def inprocess_table(inproc: dict[int, dict]) -> list[str]:
    if not inproc:
        return []
    lines = ["In-process limit (serving core, no HTTP):", ""]
    lines += ["| batch | images/s | p50 ms per call | p99 ms per call |", "| ---: | ---: | ---: | ---: |"]
    for b, m in inproc.items():
        lines.append(f"| {b} | {m['images_per_s']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} |")
    return [*lines, ""]


def cell(m: dict | None, failures: str = "") -> str:
    """req/s · p50 / p99 ms (errors, if any); empty where nothing was measured."""
    if not m:
        return ""
    fail = f" ({m['failures']:{failures}} errors)" if m["failures"] else ""
    return f"{m['rps']:.0f} · {m['p50_ms']:.1f} / {m['p99_ms']:.1f}{fail}"


def closed_table(medians: dict, inproc: dict[int, dict], servers: list[str]) -> list[str]:
    """Closed loop, every server at every connection count, with tuned's ratio to each peer and to the
    in-process limit."""
    best = max((m["images_per_s"] for m in inproc.values()), default=0.0)
    peers = [s for s in servers if s in PEERS]
    lines = ["Closed loop, requests/s · p50 / p99 ms (errors, if any):", ""]
    lines += ["| connections | " + " | ".join([*servers, *(f"{TUNED}/{p}" for p in peers)]) + " | tuned/in-process |"]
    lines += ["|" + " ---: |" * (2 + len(servers) + len(peers))]
    for c in sorted({c for (_, c) in medians}):
        tuned = medians.get((TUNED, c))
        cells = [cell(medians.get((s, c))) for s in servers]
        cells += [times(tuned, medians.get((p, c))) for p in peers]
        share = f"{tuned['rps'] / best:.0%}" if tuned and best else ""
        lines.append(f"| {c} | " + " | ".join(cells) + f" | {share} |")
    return lines


def cpu_table(medians: dict, servers: list[str]) -> list[str]:
    lines = ["", "Server CPU ms per request (worker alone) · wrk's CPU share:", ""]
    lines += ["| connections | " + " | ".join(servers) + " |", "|" + " ---: |" * (1 + len(servers))]
    for c in sorted({c for (_, c) in medians}):
        cells = [
            f"{m['cpu_ms']:.2f} ({m['worker_cpu_ms']:.2f}) · {m['client_cpu']:.2f}"
            if (m := medians.get((s, c)))
            else ""
            for s in servers
        ]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def core_cost(medians: dict, conns: int) -> list[str]:
    """What the serving core's work costs per request beyond the plain app's: the two FastAPI apps' server CPU
    per request at `conns` connections, subtracted; [] where either was not measured there."""
    core, plain = medians.get((FASTAPI, conns)), medians.get((PLAIN, conns))
    if not core or not plain:
        return []
    extra = core["cpu_ms"] - plain["cpu_ms"]
    return [
        "",
        f"What the serving core's work costs (input checks, drift tracking, the token, its JSON) beyond the plain "
        f"app's at {conns} connections: *{FASTAPI}* {core['cpu_ms']:.2f} − *{PLAIN}* {plain['cpu_ms']:.2f} = "
        f"**{extra:.2f} server CPU ms per request**.",
    ]


def open_table(opened: dict[tuple[str, float], dict], servers: list[str]) -> list[str]:
    if not opened:
        return []
    lines = ["", "Open loop (paced arrivals), achieved req/s · p50 / p99 ms:", ""]
    lines += ["| target req/s | " + " | ".join(servers) + " |", "|" + " ---: |" * (1 + len(servers))]
    for r in sorted({r for (_, r) in opened}):
        lines.append(f"| {r:.0f} | " + " | ".join(cell(opened.get((s, r)), ".0f") for s in servers) + " |")
    return lines


def ready_table(results: dict, model: str) -> list[str]:
    ready: dict[str, list[float]] = {}
    for row in results["ready"]:
        if row["model"] == model:
            ready.setdefault(row["server"], []).append(row["s"])
    if not ready:
        return []
    lines = ["", "Time from start to every worker READY (the peers: to answering /ping), seconds:", ""]
    lines += ["| server | median | min | max | starts |", "| --- | ---: | ---: | ---: | ---: |"]
    for s, v in ready.items():
        lines.append(f"| {s} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} | {len(v)} |")
    return lines


def goals(results: dict, models: list[str], heavy: str | None) -> list[str]:
    """bench.goals of configs/loadtest.yaml (as the run recorded them), met or missed."""
    target = results["meta"]["goals"]
    conns = target["connections"]
    first = models[0] if models else None
    medians = median_rows(results, first) if first else {}
    tuned = medians.get((TUNED, conns))
    rows = ["## Goals", "", "| goal | measured | |", "| --- | --- | --- |"]

    def ratio(a: dict | None, b: dict | None) -> float | None:
        return a["rps"] / b["rps"] if a and b and b["rps"] else None

    against = {STOCK: "tuned_vs_stock", FASTAPI: "tuned_vs_fastapi", PLAIN: "tuned_vs_plain"}
    for name, key in against.items():  # a goal older results.json files lack is left out
        other, times = medians.get((name, conns)), target.get(key)
        if times is not None and (r := ratio(tuned, other)) is not None:
            rows.append(
                f"| tuned ≥ {times}× {name} at {conns} connections ({first}) | {tuned['rps']:.0f} vs "
                f"{other['rps']:.0f} req/s: {r:.2f}× | {goal(r >= times)} |"
            )
    if tuned:
        ok = tuned["p99_ms"] <= target["p99_ms"] and tuned["failures"] == 0
        rows.append(
            f"| tuned p99 ≤ {target['p99_ms']} ms at {conns} connections, no errors | {tuned['p99_ms']:.1f} ms, "
            f"{tuned['failures']} errors | {goal(ok)} |"
        )
    if one := medians.get((TUNED, 1)):
        ok = one["p50_ms"] <= target["p50_ms_at_1"]
        rows.append(f"| tuned p50 ≤ {target['p50_ms_at_1']} ms at 1 connection | {one['p50_ms']:.2f} ms | {goal(ok)} |")
    if four := medians.get((TUNED, 4)):
        ok = four["rps"] >= target["rps_at_4"]
        rows.append(f"| tuned ≥ {target['rps_at_4']} req/s at 4 connections | {four['rps']:.0f} | {goal(ok)} |")
    for c in target.get("no_regression_at", []):  # against the one worker that shipped before workers: auto
        now, before = medians.get((TUNED, c)), medians.get((TUNED_ONE_WORKER, c))
        if (r := ratio(now, before)) is not None:
            rows.append(
                f"| tuned ≥ {TUNED_ONE_WORKER} at {c} connections | {now['rps']:.0f} vs {before['rps']:.0f} req/s: "
                f"{r:.2f}× | {goal(r >= 1)} |"
            )
    best = max((m["images_per_s"] for m in inprocess_medians(results, first).values()), default=0.0) if first else 0
    if tuned and best:
        share = tuned["rps"] / best
        rows.append(
            f"| tuned ≥ {target['inprocess_share']:.0%} of the in-process limit at {conns} connections | "
            f"{tuned['rps']:.0f} of {best:.0f}: {share:.0%} | {goal(share >= target['inprocess_share'])} |"
        )
    if heavy in models:
        heavy_medians = median_rows(results, heavy)
        batched, single = heavy_medians.get((TUNED, conns)), heavy_medians.get((TUNED_BATCH_1, conns))
        if (gain := ratio(batched, single)) is not None:
            rows.append(
                f"| {heavy}: batching beats batch size 1 at {conns} connections | {batched['rps']:.0f} vs "
                f"{single['rps']:.0f} req/s ({gain:.2f}×) | {goal(gain > 1)} |"
            )
    return rows
