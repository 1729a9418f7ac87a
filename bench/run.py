"""`make bench`: prepare the models, measure every server (or the sweep's candidates), write the report."""

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bench import wrk
from bench.measure import measure
from bench.models import HEAVY, BenchError, log, prepare, unpack_model
from bench.report import plot, report
from bench.servers import PEERS, comparison, describe
from bench.sweep import sweep_report, sweep_servers
from common.config import ROOT
from common.io import write_json, write_text
from handlers.archive import ModelConfig, read_model_config
from servers.torchserve import CONFIG_PROPERTIES, read_properties

MODELS = ("digits", HEAVY)  # --models: the shipped archive, the heavier model


@dataclass
class Plan:
    """How much to measure: bench.* of configs/loadtest.yaml, or bench.quick.*, or the command line."""

    connections: list[int]
    repeats: int
    run_time_s: float
    warmup_s: float
    inprocess_s: float
    batch_sizes: list[int]
    rates: list[float]  # paced (open-loop) arrival rates, requests/s
    paced_connections: int  # connections wrk spreads a paced run over
    locust_connections: list[int] = field(default_factory=list)  # Locust users beside wrk (tuned server only)

    @classmethod
    def of(
        cls,
        bench: DictConfig,
        quick: bool,
        connections: list[int] | None,
        repeats: int | None,
        sweep: bool,
        with_locust: bool = True,
    ):
        chosen = {**bench, **(bench.quick if quick else {})}
        return cls(
            connections=list(connections or chosen["connections"]),
            repeats=repeats or chosen["repeats"],
            run_time_s=chosen["run_time_s"],
            warmup_s=chosen["warmup_s"],
            inprocess_s=chosen["inprocess_s"],
            batch_sizes=[] if sweep else list(bench.batch_sizes),
            rates=[] if sweep else list(chosen["rates"]),
            paced_connections=bench.paced_connections,
            locust_connections=list(chosen.get("locust_connections") or []) if with_locust and not sweep else [],
        )


def benchmark(
    cfg: DictConfig,
    overrides: list[str],
    models: list[str] = MODELS,
    quick: bool = False,
    sweep: bool = False,
    variants: list[str] | None = None,
    connections: list[int] | None = None,
    repeats: int | None = None,
    peers: tuple[str, ...] = tuple(PEERS),
    retrain: bool = False,
    out: str | None = None,
    command: str = "",
    with_locust: bool = True,
) -> None:
    """Measure and write <out>/README.md, results.json and a plot per model (with `sweep`: tuning.md, tuning.json
    for the first model's candidates). `overrides` are the Hydra overrides that made `cfg` (the heavy model's too).
    `with_locust`: Locust beside wrk against the tuned server at bench.locust_connections (not with `sweep`)."""
    started = time.monotonic()
    plan = Plan.of(cfg.bench, quick, connections, repeats, sweep, with_locust)
    goals = OmegaConf.to_container(cfg.bench.goals, resolve=True)
    out, workdir = Path(out or cfg.bench.out), ROOT / cfg.bench.workdir
    default_threads = torch.get_num_threads()  # the stock server's: torch's default on this machine
    prepared = prepare(cfg, overrides, models[:1] if sweep else models, retrain)
    tuned_props = read_properties(CONFIG_PROPERTIES)
    results = {"runs": [], "open": [], "ready": [], "inprocess": [], "locust": [], "errors": []}
    load_start = os.getloadavg()[0]
    log(f"load average {load_start:.1f}; models {', '.join(m.name for m in prepared)}; connections {plan.connections}")
    tuned_config = None
    for model in prepared:
        unpack_model(model, workdir / model.key / "unpacked")
        shipped = read_model_config(model.mar)
        tuned_config = tuned_config or shipped
        if sweep:
            servers = sweep_servers(model, shipped, workdir, plan.connections, variants)
        else:
            mwork = workdir / model.key
            servers = comparison(model, shipped, mwork, plan, goals["connections"], default_threads, peers)
        measure(model, servers, plan, workdir, results)

    loads = [r["load1"] for r in results["runs"]] or [load_start]
    busy = statistics.median(loads) > 2.5
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "args": command,
        "minutes": (time.monotonic() - started) / 60,
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, Python "
        f"{platform.python_version()}",
        "torch": torch.__version__,
        "torchserve": version("torchserve"),
        "wrk": wrk.version(),
        "locust": version("locust") if plan.locust_connections else "",
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "load_median": statistics.median(loads),
        "note": (
            "Other processes shared the CPU during the run (load above 2 on 2 cores): absolute numbers are low "
            "and noisy; compare servers within this run."
            if busy
            else ""
        ),
        "run_time_s": plan.run_time_s,
        "repeats": plan.repeats,
        "connections": plan.connections,
        "rates": plan.rates,
        "paced_connections": plan.paced_connections,
        "locust_connections": plan.locust_connections,
        "cores": os.cpu_count(),
        "stock": f"one worker per core ({os.cpu_count()}), batchSize {ModelConfig.batch_size}, maxBatchDelay "
        f"{ModelConfig.max_batch_delay_ms}, torch threads {default_threads}, log metrics, system metrics, "
        "synchronous logging",
        "tuned": describe(tuned_config, tuned_props),
        "delay_ms": tuned_config.max_batch_delay_ms,
        "goals": goals,
    }
    if sweep:
        write_json(out / "tuning.json", results)
        write_text(out / "tuning.md", sweep_report(results, prepared[0].key, plan.connections))
        log(f"wrote {out / 'tuning.md'}")
    else:
        labels = [s.label for s in servers]
        for model in prepared:
            plot(results, model.key, labels, out / f"{model.key}.png")
        write_json(out / "results.json", results)
        heavy = next((m.key for m in prepared if m.cfg.model.name == HEAVY), None)
        write_text(out / "README.md", report(results, [m.key for m in prepared], labels, heavy))
        log(f"wrote {out / 'README.md'} ({(time.monotonic() - started) / 60:.1f} min)")
    if results["errors"]:
        raise BenchError(f"{len(results['errors'])} measurements failed, first: {results['errors'][0]}")
