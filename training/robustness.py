"""Accuracy of the exported model under realistic input shifts: `python -m training.robustness [Hydra overrides]`.

Each shift of `robustness.shifts` (configs/monitoring.yaml) is applied at increasing severities to the
test split in the serving input form (uint8 RGB [N, 3, H, W], what the handler hands the TorchScript
graph), and the exported model.pt is evaluated on it. Severity 0 is the clean split. Writes to
`robustness.out`: robustness.md (table), robustness.png (plot), robustness.json (DVC metrics: clean accuracy,
mean accuracy under shift, overall and per shift) and robustness_plot.csv (DVC plots: one column per
shift, one row per severity).
"""

import io
import logging
import math
from collections.abc import Callable
from pathlib import Path

import hydra
import kornia
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor

from training.data import load_split
from training.export import as_rgb
from training.io import atomic_path, write_json

log = logging.getLogger(__name__)

SHIFTS = ("brightness", "contrast", "blur", "noise", "rotation", "scale", "translate", "jpeg", "inversion")


class RobustnessError(RuntimeError):
    """The report cannot be made; the message says why."""


def to_float(images: Tensor) -> Tensor:
    return images.float() / 255


def to_uint8(images: Tensor) -> Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def blur(images: Tensor, sigma: float) -> Tensor:
    """Gaussian blur; the kernel covers +-3 sigma, capped so that reflect padding fits the image."""
    size = 2 * math.ceil(3 * sigma) + 1
    size = min(size, 2 * min(images.shape[-2:]) - 1)
    sigmas = torch.tensor([[sigma, sigma]]).expand(len(images), 2)
    return kornia.filters.gaussian_blur2d(images, (size, size), sigmas)


def jpeg(images: Tensor, quality: int) -> Tensor:
    """A real JPEG round trip through Pillow, as a client's camera or upload form would do."""
    out = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=int(quality))
        decoded = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        out.append(torch.from_numpy(np.asarray(decoded).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).contiguous()


def shift(images: Tensor, name: str, param: float, generator: torch.Generator) -> Tensor:
    """uint8 RGB [N, 3, H, W] -> the same images under shift `name` with parameter `param`."""
    n = len(images)
    if name == "jpeg":
        return jpeg(images, int(param))
    if name == "inversion":  # a seeded subset; a larger share contains the smaller one
        chosen = torch.randperm(n, generator=generator)[: round(param * n)]
        out = images.clone()
        out[chosen] = 255 - out[chosen]
        return out
    x = to_float(images)
    ops: dict[str, Callable[[], Tensor]] = {
        "brightness": lambda: kornia.enhance.adjust_brightness(x, param),
        "contrast": lambda: kornia.enhance.adjust_contrast(x, param),
        "blur": lambda: blur(x, param),
        "noise": lambda: x + param * torch.randn(x.shape, generator=generator),
        "rotation": lambda: kornia.geometry.transform.rotate(x, torch.full((n,), float(param))),
        "scale": lambda: kornia.geometry.transform.scale(x, torch.full((n, 2), float(param))),
        "translate": lambda: kornia.geometry.transform.translate(
            x, torch.tensor([[param * x.shape[-1], param * x.shape[-2]]]).expand(n, 2)
        ),
    }
    return to_uint8(ops[name]())


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
    ax.set(xlabel="severity (0 = clean)", ylabel="top-1 accuracy", ylim=(0, 1.02), title=f"Robustness of {model}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize="small", ncols=3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def write_report(result: dict, out: Path, model: str, n: int) -> list[Path]:
    shifts = result["shifts"]
    metrics = {
        "clean": round(result["clean"], 4),
        "mean_shifted": round(
            sum(sum(r["accuracy"][1:]) for r in shifts.values()) / sum(len(r["accuracy"]) - 1 for r in shifts.values()),
            4,
        ),
        "mean_by_shift": {
            name: round(sum(r["accuracy"][1:]) / (len(r["accuracy"]) - 1), 4) for name, r in shifts.items()
        },
    }
    levels = max(len(r["accuracy"]) for r in shifts.values())
    rows = ["severity," + ",".join(shifts)]
    for s in range(levels):
        rows.append(
            f"{s}," + ",".join(f"{r['accuracy'][s]:.4f}" if s < len(r["accuracy"]) else "" for r in shifts.values())
        )
    paths = [out / name for name in ("robustness.md", "robustness.png", "robustness.json", "robustness_plot.csv")]
    with atomic_path(paths[0]) as tmp:
        tmp.write_text(markdown(result, model, n))
    plot(result, model, paths[1])
    write_json(paths[2], metrics)
    with atomic_path(paths[3]) as tmp:
        tmp.write_text("\n".join(rows) + "\n")
    return paths


def robustness(cfg: DictConfig) -> dict:
    rc = cfg.robustness
    model_path, data = Path(rc.model), Path(rc.data)
    if not model_path.is_file():
        raise RobustnessError(f"no TorchScript model at {model_path}: run `make export` (or `dvc repro export`)")
    if not (data / f"{rc.split}.npz").is_file():
        raise RobustnessError(f"no {rc.split} split in {data}: run `make data` (or `dvc repro data`)")
    if not rc.shifts:
        raise RobustnessError("robustness.shifts is empty: nothing to evaluate")
    if unknown := set(rc.shifts) - set(SHIFTS):
        raise RobustnessError(f"unknown shifts {sorted(unknown)} in robustness.shifts: use {', '.join(SHIFTS)}")
    try:
        model = torch.jit.load(str(model_path), map_location="cpu").eval()
    except RuntimeError as err:
        raise RobustnessError(f"cannot load {model_path} as TorchScript: {str(err).splitlines()[0]}") from None
    images, labels = load_split(data, rc.split)
    result = evaluate(model, images, labels, dict(rc.shifts), rc.batch_size, rc.seed)
    paths = write_report(result, Path(rc.out), cfg.name, len(labels))
    log.info("clean accuracy %.3f; wrote %s", result["clean"], ", ".join(map(str, paths)))
    return result


@hydra.main(config_path="../configs", config_name="monitoring", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        robustness(cfg)
    except RobustnessError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
