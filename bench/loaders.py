"""How fast the DataLoader feeds training, by number of workers: `make loaders` (scripts/loaders.py).

An image folder decoded at run time (the handler's decoder and the graph's resize, as the data stage does
them), batched by a DataLoader, then the training augmentation (Kornia, on the batch, as Classifier runs
it). Each setting times `batches` batches, `repeats` times; a repeat starts a fresh iterator, so worker
start-up counts unless the workers persist. pin_memory is measured only where a GPU exists (it pins
host memory for the copy to the GPU; on a CPU-only machine it does nothing).
"""

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler
from tqdm import tqdm

from common.io import atomic_path, write_json, write_text
from training.data import list_folder, read_image
from training.model import build_augment


class FolderImages(Dataset):
    """root/<class>/<image>, decoded and resized when a worker asks for it."""

    def __init__(self, root: Path, size: int, channels: int) -> None:
        self.files, self.labels, _ = list_folder(root)
        self.size, self.channels = size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(read_image(self.files[index], self.size, self.channels)), int(self.labels[index])


@dataclass
class Result:
    workers: int
    persistent: bool
    pin_memory: bool
    seconds: list[float]  # per repeat, for `batches` batches

    @property
    def label(self) -> str:
        flags = [f for f, on in (("persistent", self.persistent), ("pinned", self.pin_memory)) if on]
        return f"{self.workers} workers" + (f" ({', '.join(flags)})" if flags else "")


def settings(workers: list[int]) -> list[tuple[int, bool, bool]]:
    """(workers, persistent_workers, pin_memory) to measure: persistence only with workers, pinning only with a GPU."""
    pins = (False, True) if torch.cuda.is_available() else (False,)
    return [(w, p, pin) for w in workers for p in ((False, True) if w > 0 else (False,)) for pin in pins]


def measure(data: Dataset, augment: torch.nn.Module, batch_size: int, batches: int, repeats: int, setting) -> Result:
    workers, persistent, pin = setting
    loader = DataLoader(
        data,
        batch_size=batch_size,
        sampler=RandomSampler(data, replacement=True, num_samples=batch_size * batches),
        num_workers=workers,
        persistent_workers=persistent,
        pin_memory=pin,
    )
    device = "cuda" if pin else "cpu"
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for images, _labels in loader:
            augment(images.to(device, non_blocking=pin).float() / 255)
        seconds.append(time.perf_counter() - start)
    return Result(workers, persistent, pin, seconds)


def make_folder(root: Path, count: int, size: int, classes: int = 4, seed: int = 0) -> Path:
    """count JPEGs of size x size in `classes` class folders: textured, so decoding costs what a photo's does."""
    rng = np.random.default_rng(seed)
    for i in tqdm(range(count), desc="make folder", unit="img", mininterval=2):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
        with atomic_path(folder / f"{i:06d}.jpg") as tmp:
            img.save(tmp, "JPEG", quality=90)
    return root


def benchmark(cfg: DictConfig, root: Path, workers: list[int], batches: int, repeats: int) -> list[Result]:
    data = FolderImages(root, cfg.data.image_size, cfg.data.channels)
    augment = build_augment(OmegaConf.create({**OmegaConf.to_container(cfg.augment, resolve=True), "enabled": True}))
    torch.set_num_threads(1)  # the main process's share of the cores; the workers decode on the rest
    results = []
    for setting in tqdm(settings(workers), desc="loader settings", unit="setting"):
        results.append(measure(data, augment, cfg.data.batch_size, batches, repeats, setting))
    return results


def report(results: list[Result], out: Path, context: dict) -> list[Path]:
    """loaders.md (table), loaders.png (mean and std per setting), loaders.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches, batch_size = context["batches"], context["batch_size"]
    rows = []
    for r in results:
        mean, std = statistics.mean(r.seconds), statistics.stdev(r.seconds) if len(r.seconds) > 1 else 0.0
        rows.append((r, mean, std, batches * batch_size / mean))
    best = min(rows, key=lambda row: row[1])[0]
    lines = [
        f"# DataLoader throughput: {batches} batches of {batch_size} × {context['repeats']} repeats",
        "",
        f"{context['images']} images, decoded and resized to {context['image_size']} px at run time, then the "
        f"training augmentation. {context['cores']} cores; load average before: {context['load_before']}, "
        f"after: {context['load_after']} (a shared machine: timings are noisy).",
        "",
        f"| setting | seconds per {batches} batches (mean ± std) | images/s |",
        "| --- | ---: | ---: |",
        *(f"| {r.label} | {mean:.2f} ± {std:.2f} | {rate:.0f} |" for r, mean, std, rate in rows),
        "",
        f"Fastest: **{best.label}**.",
        "",
    ]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.errorbar(range(len(rows)), [m for _, m, _, _ in rows], yerr=[s for _, _, s, _ in rows], fmt="o", capsize=4)
    ax.set_xticks(range(len(rows)), [r.label.replace(" (", "\n(") for r, *_ in rows], fontsize=8)
    ax.set_ylabel(f"seconds per {batches} batches")
    ax.set_title(f"DataLoader + augmentation, {context['cores']} cores (mean ± std of {context['repeats']})")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    png = out / "loaders.png"
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    write_text(out / "loaders.md", "\n".join(lines))
    write_json(out / "loaders.json", {**context, "results": [asdict(r) | {"label": r.label} for r in results]})
    return [out / "loaders.md", png, out / "loaders.json"]


def run(cfg: DictConfig, root: Path, out: Path, workers: list[int], batches: int, repeats: int) -> list[Path]:
    """Measure every setting on the folder and write the report; the load average goes beside the numbers."""
    load_before = [round(x, 2) for x in os.getloadavg()]
    results = benchmark(cfg, root, workers, batches, repeats)
    context = {
        "batches": batches,
        "repeats": repeats,
        "batch_size": cfg.data.batch_size,
        "image_size": cfg.data.image_size,
        "images": len(FolderImages(root, 1, 1)),
        "cores": len(os.sched_getaffinity(0)),
        "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    return report(results, out, context)
