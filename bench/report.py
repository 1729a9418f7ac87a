"""The benchmark's report: medians over the repeats, the README.md tables, the plots, the goals table."""

import statistics
from pathlib import Path

from bench.servers import FASTAPI, PEERS
from common.io import atomic_path


def median_rows(results: dict, model: str) -> dict[tuple[str, int], dict]:
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in results["runs"]:
        if row["model"] == model:
            groups.setdefault((row["server"], row["connections"]), []).append(row)
    out = {}
    for key, rows in groups.items():
        keys = ("rps", "p50_ms", "p90_ms", "p99_ms", "cpu_ms", "worker_cpu_ms", "client_cpu")
        out[key] = {k: statistics.median(r[k] for r in rows) for k in keys}
        out[key].update(failures=sum(r["failures"] for r in rows), n=len(rows))
        for k in ("ts_latency_ms", "ts_queue_ms"):  # TorchServe's own clock, where it was read
            if values := [r[k] for r in rows if k in r]:
                out[key][k] = statistics.median(values)
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
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in results.get("open", []):
        if row["model"] == model:
            groups.setdefault((row["server"], row["rate"]), []).append(row)
    return {
        key: {k: statistics.median(r[k] for r in rows) for k in ("rps", "p50_ms", "p99_ms", "cpu_ms", "failures")}
        for key, rows in groups.items()
    }


def locust_medians(results: dict, model: str) -> dict[int, dict]:
    """Locust's runs (bench/locust.py) per connection count: medians over the repeats (errors: the sum), each
    with wrk's numbers of the same repeats under "wrk"."""
    groups: dict[int, list[dict]] = {}
    for row in results.get("locust", []):
        if row["model"] == model:
            groups.setdefault(row["connections"], []).append(row)
    keys = ("rps", "p50_ms", "p99_ms", "client_cpu")

    def medians(rows: list[dict]) -> dict:
        out = {k: statistics.median(r[k] for r in rows) for k in keys}
        return {**out, "failures": sum(r["failures"] for r in rows)}

    return {c: {**medians(rows), "wrk": medians([r["wrk"] for r in rows])} for c, rows in sorted(groups.items())}


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
    one, fast = medians.get(("tuned", 1)), medians.get((FASTAPI, 1))
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
    meta = results["meta"]
    lines = [
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
        f"{meta['tuned']}); *tuned, batch 1* = the same with batchSize 1; *FastAPI* = a plain FastAPI app "
        f"(servers/fastapi.py) over the same serving core under uvicorn, one worker process per core "
        f"({meta['cores']}), one request per forward pass; *LitServe* = LitServe (servers/litserve.py) over the same "
        "serving core, batching as the archive says (batchSize and maxBatchDelay as *tuned*), one inference worker "
        "process per core behind as many uvicorn processes.",
        "",
    ]
    for model in models:
        medians = median_rows(results, model)
        inproc = inprocess_medians(results, model)
        best = max((m["images_per_s"] for m in inproc.values()), default=0.0)
        counts = sorted({c for (_, c) in medians})
        lines += [f"## {model}", ""]
        if inproc:
            lines += ["In-process limit (serving core, no HTTP):", ""]
            lines += ["| batch | images/s | p50 ms per call | p99 ms per call |", "| ---: | ---: | ---: | ---: |"]
            for b, m in inproc.items():
                lines.append(f"| {b} | {m['images_per_s']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} |")
            lines.append("")
        lines += ["Closed loop, requests/s · p50 / p99 ms (errors, if any):", ""]
        peers = [s for s in servers if s in PEERS]
        lines += ["| connections | " + " | ".join([*servers, *(f"tuned/{p}" for p in peers)]) + " | tuned/in-process |"]
        lines += ["|" + " ---: |" * (2 + len(servers) + len(peers))]
        for c in counts:
            cells = []
            for s in servers:
                m = medians.get((s, c))
                fail = f" ({m['failures']} errors)" if m and m["failures"] else ""
                cells.append(f"{m['rps']:.0f} · {m['p50_ms']:.1f} / {m['p99_ms']:.1f}{fail}" if m else "")
            tuned = medians.get(("tuned", c))
            cells += [times(tuned, medians.get((p, c))) for p in peers]
            share = f"{tuned['rps'] / best:.0%}" if tuned and best else ""
            lines.append(f"| {c} | " + " | ".join(cells) + f" | {share} |")
        lines += ["", "Server CPU ms per request (worker alone) · wrk's CPU share:", ""]
        lines += ["| connections | " + " | ".join(servers) + " |", "|" + " ---: |" * (1 + len(servers))]
        for c in counts:
            cells = [
                f"{m['cpu_ms']:.2f} ({m['worker_cpu_ms']:.2f}) · {m['client_cpu']:.2f}"
                if (m := medians.get((s, c)))
                else ""
                for s in servers
            ]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        opened = open_medians(results, model)
        if opened:
            rates = sorted({r for (_, r) in opened})
            lines += ["", "Open loop (paced arrivals), achieved req/s · p50 / p99 ms:", ""]
            lines += ["| target req/s | " + " | ".join(servers) + " |", "|" + " ---: |" * (1 + len(servers))]
            for r in rates:
                cells = []
                for s in servers:
                    m = opened.get((s, r))
                    fail = f" ({m['failures']:.0f} errors)" if m and m["failures"] else ""
                    cells.append(f"{m['rps']:.0f} · {m['p50_ms']:.1f} / {m['p99_ms']:.1f}{fail}" if m else "")
                lines.append(f"| {r:.0f} | " + " | ".join(cells) + " |")
        lines += floor_table(medians, inproc, meta.get("delay_ms", "?"))
        lines += locust_table(results, model, meta["cores"])
        ready = {}
        for row in results["ready"]:
            if row["model"] == model:
                ready.setdefault(row["server"], []).append(row["s"])
        if ready:
            lines += ["", "Time from start to every worker READY (FastAPI, LitServe: to answering /ping), seconds:", ""]
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
    """bench.goals of configs/loadtest.yaml (as the run recorded them), met or missed."""
    target = results["meta"]["goals"]
    conns = target["connections"]
    first = models[0] if models else None
    medians = median_rows(results, first) if first else {}
    tuned, stock, fast = (medians.get((s, conns)) for s in ("tuned", "stock", FASTAPI))
    rows = ["## Goals", "", "| goal | measured | |", "| --- | --- | --- |"]

    def ratio(a: dict | None, b: dict | None) -> float | None:
        return a["rps"] / b["rps"] if a and b and b["rps"] else None

    for name, other, times in (("stock", stock, target["tuned_vs_stock"]), (FASTAPI, fast, target["tuned_vs_fastapi"])):
        if (r := ratio(tuned, other)) is not None:
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
    if one := medians.get(("tuned", 1)):
        ok = one["p50_ms"] <= target["p50_ms_at_1"]
        rows.append(f"| tuned p50 ≤ {target['p50_ms_at_1']} ms at 1 connection | {one['p50_ms']:.2f} ms | {goal(ok)} |")
    if four := medians.get(("tuned", 4)):
        ok = four["rps"] >= target["rps_at_4"]
        rows.append(f"| tuned ≥ {target['rps_at_4']} req/s at 4 connections | {four['rps']:.0f} | {goal(ok)} |")
    best = max((m["images_per_s"] for m in inprocess_medians(results, first).values()), default=0.0) if first else 0
    if tuned and best:
        share = tuned["rps"] / best
        rows.append(
            f"| tuned ≥ {target['inprocess_share']:.0%} of the in-process limit at {conns} connections | "
            f"{tuned['rps']:.0f} of {best:.0f}: {share:.0%} | {goal(share >= target['inprocess_share'])} |"
        )
    if heavy in models:
        heavy_medians = median_rows(results, heavy)
        batched, single = heavy_medians.get(("tuned", conns)), heavy_medians.get(("tuned, batch 1", conns))
        if (gain := ratio(batched, single)) is not None:
            rows.append(
                f"| {heavy}: batching beats batch size 1 at {conns} connections | {batched['rps']:.0f} vs "
                f"{single['rps']:.0f} req/s ({gain:.2f}×) | {goal(gain > 1)} |"
            )
    return rows
