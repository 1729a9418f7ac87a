"""The benchmark's report: medians over the repeats, the README.md tables, the plots, the goals table."""

import statistics
from pathlib import Path

from bench.servers import FASTAPI
from common.io import atomic_path


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
        "**Servers:** *in-process* = the serving core (handlers/classifier.py, as the archive packs it: decode, "
        "TorchScript forward with preprocessing, "
        "top-k, JSON) in one Python process, no HTTP, one call per batch; *stock* = TorchServe defaults "
        f"({meta['stock']}); *tuned* = what ships (`config.properties` + `serve:`: {meta['tuned']}); "
        "*tuned, batch 1* = the same with batchSize 1; *FastAPI* = a plain single-process FastAPI app "
        "(servers/fastapi.py, uvicorn defaults) over the same serving core, one request per forward pass.",
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
    """bench.goals of configs/loadtest.yaml (as the run recorded them), met or missed."""
    target = results["meta"]["goals"]
    users, times, p99 = target["users"], target["tuned_vs_stock"], target["p99_ms"]

    def at(model: str, server: str) -> dict | None:
        return median_rows(results, model).get((server, users))

    first = models[0] if models else None
    tuned, stock, fast = (at(first, s) if first else None for s in ("tuned", "stock", FASTAPI))
    rows = ["## Goals", "", "| goal | measured | |", "| --- | --- | --- |"]
    if tuned and stock:
        ratio = tuned["rps"] / stock["rps"] if stock["rps"] else float("inf")
        rows.append(f"| tuned ≥ {times}× stock at {users} users ({first}) | {ratio:.1f}× | {goal(ratio >= times)} |")
    if tuned and fast:
        ok = tuned["rps"] >= fast["rps"]
        rows.append(
            f"| tuned TorchServe ahead of FastAPI at {users} users ({first}) | {tuned['rps']:.0f} vs "
            f"{fast['rps']:.0f} req/s | {goal(ok)} |"
        )
    if tuned:
        ok = tuned["p99_ms"] <= p99 and tuned["failures"] == 0
        rows.append(
            f"| tuned p99 ≤ {p99} ms at {users} users, no failures ({first}) | {tuned['p99_ms']:.1f} ms, "
            f"{tuned['failures']} failures | {goal(ok)} |"
        )
    if heavy in models:
        batched, single = at(heavy, "tuned"), at(heavy, "tuned, batch 1")
        if batched and single:
            gain = batched["rps"] / single["rps"] if single["rps"] else float("inf")
            rows.append(
                f"| {heavy}: batching beats batch size 1 at {users} users | {batched['rps']:.0f} vs "
                f"{single['rps']:.0f} req/s ({gain:.2f}×) | {goal(gain > 1)} |"
            )
    ready = [r["s"] for r in results["ready"] if r["server"] == "tuned"]
    if ready:
        rows.append(f"| time to READY measured (tuned, all models) | median {statistics.median(ready):.1f} s | met |")
    return rows
