"""The pictures a run logs: training curves and the test confusion matrix (matplotlib, no display)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from common.io import atomic_path  # noqa: E402


def save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix[1:], dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def curves(epochs: list[dict], path: Path) -> Path:
    """Loss and accuracy per epoch, train and validation."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    x = [row["epoch"] for row in epochs]
    for ax, metric in zip(axes, ("loss", "acc"), strict=True):
        for stage in ("train", "val"):
            key = f"{stage}_{metric}"
            ax.plot(x, [row.get(key, float("nan")) for row in epochs], marker=".", label=key)
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    return save(fig, path)


@torch.inference_mode()
def predictions(model: torch.nn.Module, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Predicted class indices of a uint8 image tensor, on the model's device."""
    device = next(model.parameters()).device
    model.eval()
    return torch.cat([model(chunk.to(device)).argmax(1).cpu() for chunk in images.split(batch)])


def confusion_matrix(labels: torch.Tensor, predicted: torch.Tensor, classes: int) -> torch.Tensor:
    """counts[true, predicted]."""
    return torch.bincount(labels * classes + predicted, minlength=classes * classes).reshape(classes, classes)


def confusion(counts: torch.Tensor, classes: list[str], path: Path, title: str) -> Path:
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n, 1.0 + 0.45 * n))
    ax.imshow(counts.numpy(), cmap="Blues")
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        high = counts.max().item() / 2
        for i, row in enumerate(counts.tolist()):
            for j, value in enumerate(row):
                if value:
                    ax.text(j, i, value, ha="center", va="center", color="white" if value > high else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return save(fig, path)
