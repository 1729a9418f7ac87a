"""Accuracy of the exported model under realistic input shifts: `python -m monitoring.robustness [Hydra overrides]`.

Each shift of `robustness.shifts` (configs/monitoring.yaml) is applied at increasing severities to the
test split in the serving input form (uint8 RGB [N, 3, H, W], what the handler hands the TorchScript
graph), and the exported model.pt is evaluated on it. Severity 0 is the clean split. Writes to
`robustness.out`: robustness.md (table), robustness.png (plot), robustness.json (DVC metrics: clean accuracy,
mean accuracy under shift, overall and per shift) and robustness_plot.csv (DVC plots: one column per
shift, one row per severity).
"""

import json
import logging
from contextlib import ExitStack
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor

from common.cli import BundleError, one_line_errors
from common.io import atomic_path
from monitoring.shifts import SHIFTS, check, shift
from training import tracking
from training.data import load_split
from training.export import as_rgb

log = logging.getLogger(__name__)

REPORT = ("robustness.md", "robustness.png", "robustness.json", "robustness_plot.csv")


class RobustnessError(BundleError):
    """The report cannot be made; the message says why."""


def accuracy(model: torch.nn.Module, images: Tensor, labels: Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of the model on uint8 RGB images."""
    with torch.no_grad():
        preds = torch.cat([model(batch).argmax(1) for batch in images.split(batch_size)])
    return (preds == labels).float().mean().item()


def evaluate(model: torch.nn.Module, images: Tensor, labels: Tensor, shifts: dict, batch_size: int, seed: int) -> dict:
    """{"clean": acc, "shifts": {name: {"params": [0-severity param is None, ...], "accuracy": [...]}}}."""
    images = as_rgb(images)
    clean = accuracy(model, images, labels, batch_size)
    results = {}
    for name, params in shifts.items():
        accs = [clean]
        for param in params:  # the same random draws at every severity: nested inverted subsets, scaled noise
            generator = torch.Generator().manual_seed(seed)
            accs.append(accuracy(model, shift(images, name, float(param), generator), labels, batch_size))
        results[name] = {"params": [None, *map(float, params)], "accuracy": accs}
        log.info("%-11s %s", name, " ".join(f"{a:.3f}" for a in accs))
    return {"clean": clean, "shifts": results}


def markdown(result: dict, model: str, n: int) -> str:
    levels = max(len(r["accuracy"]) for r in result["shifts"].values())
    lines = [
        f"# Robustness of {model}",
        "",
        f"Top-1 accuracy on {n} held-out images under each shift; severity 0 is the clean split "
        f"({result['clean']:.3f}). In brackets: the change from clean, in percentage points.",
        "",
        "| shift | " + " | ".join(str(s) for s in range(levels)) + " |",
        "| --- |" + " ---: |" * levels,
    ]
    for name, r in result["shifts"].items():
        cells = [
            f"{a:.3f}" if s == 0 else f"{a:.3f} ({round(100 * (a - result['clean']), 1) + 0.0:+.1f})"
            for s, a in enumerate(r["accuracy"])
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Parameters per severity (configs/monitoring.yaml, `robustness.shifts`):", ""]
    lines += ["| shift | " + " | ".join(str(s) for s in range(1, levels)) + " |", "| --- |" + " ---: |" * (levels - 1)]
    for name, r in result["shifts"].items():
        lines.append(f"| {name} | " + " | ".join(f"{p:g}" for p in r["params"][1:]) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict, model: str, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    for name, r in result["shifts"].items():
        ax.plot(range(len(r["accuracy"])), r["accuracy"], marker="o", label=name)
    ax.set(xlabel="severity (0 = clean)", ylabel="top-1 accuracy", ylim=(0, 1.02))
    ax.set_title(f"Robustness of {model}", parse_math=False)  # a "$" in a name is no formula
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small", ncols=3)
    fig.savefig(path, format="png", dpi=100)


def metrics(result: dict) -> dict:
    """DVC metrics: clean accuracy, mean accuracy under shift, overall and per shift."""
    shifts = result["shifts"]
    shifted = [a for r in shifts.values() for a in r["accuracy"][1:]]
    return {
        "clean": round(result["clean"], 4),
        "mean_shifted": round(sum(shifted) / len(shifted), 4),
        "mean_by_shift": {
            name: round(sum(r["accuracy"][1:]) / (len(r["accuracy"]) - 1), 4) for name, r in shifts.items()
        },
    }


def plot_csv(result: dict) -> str:
    """DVC plots: one row per severity, one column per shift."""
    shifts = result["shifts"]
    levels = max(len(r["accuracy"]) for r in shifts.values())
    rows = ["severity," + ",".join(shifts)]
    for s in range(levels):
        rows.append(
            f"{s}," + ",".join(f"{r['accuracy'][s]:.4f}" if s < len(r["accuracy"]) else "" for r in shifts.values())
        )
    return "\n".join(rows) + "\n"


def write_report(result: dict, out: Path, model: str, n: int) -> list[Path]:
    """All four files or none: each is written beside its target, and all replace the old ones at the end."""
    paths = [Path(out) / name for name in REPORT]
    if blocked := [p for p in paths if p.exists() and not p.is_file()]:
        raise RobustnessError(f"{blocked[0]} is in the way of the report and not a file: remove it")
    with ExitStack() as stack:
        md, png, metrics_json, csv = (stack.enter_context(atomic_path(p)) for p in paths)
        md.write_text(markdown(result, model, n))
        plot(result, model, png)
        metrics_json.write_text(json.dumps(metrics(result), indent=2) + "\n")
        csv.write_text(plot_csv(result))
    return paths


def robustness(cfg: DictConfig) -> dict:
    rc = cfg.robustness
    model_path, data = Path(rc.model), Path(rc.data)
    if not model_path.is_file():
        raise RobustnessError(f"no TorchScript model at {model_path}: run `make export` (or `dvc repro export`)")
    if not (data / "meta.json").is_file():  # npz or shards: load_split reads either
        raise RobustnessError(f"no {rc.split} split in {data}: run `make data` (or `dvc repro data`)")
    if not rc.shifts:
        raise RobustnessError("robustness.shifts is empty: nothing to evaluate")
    if unknown := set(rc.shifts) - set(SHIFTS):
        raise RobustnessError(f"unknown shifts {sorted(unknown)} in robustness.shifts: use {', '.join(SHIFTS)}")
    for name, params in rc.shifts.items():  # before minutes of evaluation
        for param in params:
            check(name, param)
    try:
        model = torch.jit.load(str(model_path), map_location="cpu").eval()
    except RuntimeError as err:
        raise RobustnessError(f"cannot load {model_path} as TorchScript: {str(err).splitlines()[0]}") from None
    images, labels = load_split(data, rc.split)
    result = evaluate(model, images, labels, dict(rc.shifts), rc.batch_size, rc.seed)
    paths = write_report(result, Path(rc.out), cfg.name, len(labels))
    log.info("clean accuracy %.3f; wrote %s", result["clean"], ", ".join(map(str, paths)))
    tracking.attach(model_path.parent, paths, "robustness")  # to the run that trained the model, if tracked
    return result


@hydra.main(config_path="../configs", config_name="monitoring", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        robustness(cfg)


if __name__ == "__main__":
    main()
