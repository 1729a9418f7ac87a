"""`--sweep`: one shipped setting changed at a time (model-config.yaml or config.properties), and tuning.md."""

from pathlib import Path

from bench.models import BenchError, Model, variant
from bench.report import median_rows
from bench.servers import Server
from common.io import write_text
from handlers.archive import ModelConfig
from servers.torchserve import CONFIG_PROPERTIES

# Candidates for --sweep: (label, ModelConfig changes, config.properties changes) over the shipped settings.
SHIPPED = "shipped"  # the candidate that changes nothing: every other is compared to it
SWEEP: list[tuple[str, dict, dict]] = [
    (SHIPPED, {}, {}),
    ("batch 1", {"batch_size": 1}, {}),
    ("batch 4", {"batch_size": 4}, {}),
    ("batch 8", {"batch_size": 8}, {}),
    ("batch 16", {"batch_size": 16}, {}),
    ("batch 32", {"batch_size": 32}, {}),
    ("delay 0 ms", {"max_batch_delay_ms": 0}, {}),
    ("delay 1 ms", {"max_batch_delay_ms": 1}, {}),
    ("delay 10 ms", {"max_batch_delay_ms": 10}, {}),
    ("2 workers", {"workers": 2}, {}),
    ("delay 1 ms, 2 workers", {"max_batch_delay_ms": 1, "workers": 2}, {}),
    ("torch threads 2", {"handler": {"threads": 2}}, {}),
    ("synchronous logging", {}, {"async_logging": "false"}),
    ("netty threads 1+1", {}, {"number_of_netty_threads": "1", "netty_client_threads": "1"}),
    ("netty threads: default", {}, {"number_of_netty_threads": "0", "netty_client_threads": "0"}),
    ("system metrics off", {}, {"disable_system_metrics": "true"}),
    ("system metrics on", {}, {"disable_system_metrics": "false"}),
    ("JVM serial GC", {}, {"vmargs": "-XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError"}),
    ("JVM C1 JIT only", {}, {"vmargs": "-XX:TieredStopAtLevel=1 -XX:+ExitOnOutOfMemoryError"}),
    ("queue 50", {}, {"job_queue_size": "50"}),
    ("queue 500", {}, {"job_queue_size": "500"}),
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


def sweep_servers(
    model: Model, shipped: ModelConfig, workdir: Path, connections: list[int], labels: list[str] | None
) -> list[Server]:
    """The candidates named by `labels` (all when None), each at `connections` connections."""
    chosen = [c for c in SWEEP if not labels or c[0] in labels]
    if not chosen:
        raise BenchError(f"no sweep variant among {labels}: use {[c[0] for c in SWEEP]}")
    write_text(workdir / "log4j2-quiet.xml", QUIET_LOG4J)
    return [
        Server(label, connections, [], variant(model, workdir / model.key, label, shipped.changed(**changes)),
               CONFIG_PROPERTIES,
               {k: v.format(workdir=workdir) for k, v in props.items()})
        for label, changes, props in chosen
    ]  # fmt: skip


def sweep_report(results: dict, model: str, connections: list[int]) -> str:
    """One row per candidate: req/s (and its ratio to shipped) and p50/p99 at every connection count."""
    medians = median_rows(results, model)
    lines = [
        "# Tuning sweep",
        "",
        f"`python -m scripts.bench --sweep` on {results['meta']['date']}: {model}, wrk at {connections} connections, "
        f"{results['meta']['repeats']} interleaved repeats (medians), the same load generator settings as the "
        f"benchmark. Each row changes one setting of the shipped configuration ({results['meta']['tuned']}). "
        f"Load average (1 min) median {results['meta']['load_median']:.1f}. {results['meta']['note']}",
        "",
        "Each cell: req/s (× shipped) · p50 / p99 ms; last column: server CPU ms per request at the most connections.",
        "",
        "| variant | " + " | ".join(f"{c} conn." for c in connections) + " | CPU ms/req | errors |",
        "| --- |" + " ---: |" * (len(connections) + 2),
    ]
    for label, _, _ in SWEEP:
        cells, failures = [], 0
        for c in connections:
            m, base = medians.get((label, c)), medians.get((SHIPPED, c))
            if not m:
                cells.append("")
                continue
            rel = f" ({m['rps'] / base['rps']:.2f}×)" if base and base["rps"] and label != SHIPPED else ""
            cells.append(f"{m['rps']:.0f}{rel} · {m['p50_ms']:.1f} / {m['p99_ms']:.1f}")
            failures += m["failures"]
        last = medians.get((label, connections[-1]))
        if any(cells):
            cpu = f"{last['cpu_ms']:.2f}" if last else ""
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {cpu} | {failures} |")
    if results["errors"]:
        lines += ["", "Errors:", "", *[f"- {e}" for e in results["errors"]]]
    return "\n".join(lines) + "\n"
