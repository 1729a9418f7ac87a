"""Exact latencies of a run -> counts, throughput and percentiles; the SLO check; the printed table."""

from collections.abc import Mapping

import numpy as np

MALFORMED_PREFIX = "malformed:"  # request names of the malformed-on-purpose requests


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


def format_summary(summary: dict) -> str:
    lines = [f"{'request':<26}{'count':>8}{'fail':>6}{'req/s':>9}{'p50':>8}{'p95':>8}{'p99':>8}  (ms)"]
    for name, s in [*summary["by_name"].items(), ("well-formed", summary["wellformed"])]:
        lines.append(
            f"{name:<26}{s['count']:>8}{s['failures']:>6}{s['rps']:>9.1f}"
            f"{s['p50_ms']:>8.1f}{s['p95_ms']:>8.1f}{s['p99_ms']:>8.1f}"
        )
    return "\n".join(lines)
