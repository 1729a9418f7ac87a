"""Input and output drift: cheap per-image features, a reference, and two-sample scores.

The same `features` function describes the training inputs at export (the reference shipped in
the .mar) and every served image (handler), so the two are comparable. No TorchServe import.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FEATURES = ("brightness", "contrast", "sharpness", "width", "height")


def features(images: list[torch.Tensor]) -> np.ndarray:
    """uint8 RGB images [3, H, W] (any sizes) -> [N, len(FEATURES)]; vectorised per image size, computed on the
    images' device (a GPU worker's decoded JPEGs stay there: only the features come back).

    brightness and contrast: mean and std of the gray image in [0, 1]; sharpness: mean absolute
    difference between neighbouring pixels, across and down; width and height in pixels.
    """
    out = np.zeros((len(images), len(FEATURES)), dtype=np.float64)
    by_size: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault((*img.shape, img.device), []).append(i)
    for (_, h, w, device), idx in by_size.items():
        gray = torch.stack([images[i].to(device) for i in idx]).float().mean(dim=1) / 255
        zero = gray.new_zeros(len(idx))
        across = (gray[:, :, 1:] - gray[:, :, :-1]).abs().mean(dim=(1, 2)) if w > 1 else zero
        down = (gray[:, 1:] - gray[:, :-1]).abs().mean(dim=(1, 2)) if h > 1 else zero
        stats = torch.stack([gray.mean(dim=(1, 2)), gray.std(dim=(1, 2), correction=0), across + down], dim=1)
        out[idx, :3] = stats.cpu().numpy()
        out[idx, 3], out[idx, 4] = w, h
    return out


def ks_statistic(a: np.ndarray, b: np.ndarray, b_sorted: bool = False) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    a, b = np.sort(a), (b if b_sorted else np.sort(b))
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between two class distributions."""
    p, q = p / max(p.sum(), 1e-12), q / max(q.sum(), 1e-12)
    m = (p + q) / 2

    def kl(x: np.ndarray) -> float:
        mask = x > 0
        return float((x[mask] * np.log2(x[mask] / m[mask])).sum())

    return (kl(p) + kl(q)) / 2


@dataclass
class Reference:
    """What the training data looked like: a sample of each feature, class shares, top-1 confidences."""

    features: dict[str, list[float]]
    class_shares: list[float]
    confidence: list[float]

    @classmethod
    def build(cls, images: list[torch.Tensor], probs: torch.Tensor, size: int = 1000, seed: int = 0) -> "Reference":
        rng = np.random.default_rng(seed)
        pick = rng.permutation(len(images))[:size]
        values = features([images[i] for i in pick])
        classes = probs.argmax(1).numpy()
        shares = np.bincount(classes, minlength=probs.shape[1]) / len(classes)
        return cls(
            features={name: values[:, j].round(6).tolist() for j, name in enumerate(FEATURES)},
            class_shares=shares.round(6).tolist(),
            confidence=probs.max(1).values[pick].numpy().round(6).tolist(),
        )

    def __post_init__(self) -> None:
        self.sorted = {name: np.sort(np.asarray(v, dtype=np.float64)) for name, v in self.features.items()}
        self.sorted["confidence"] = np.sort(np.asarray(self.confidence, dtype=np.float64))
        self.shares = np.asarray(self.class_shares, dtype=np.float64)

    def to_json(self) -> dict:
        return {"features": self.features, "class_shares": self.class_shares, "confidence": self.confidence}

    @classmethod
    def load(cls, path: Path | str) -> "Reference":
        return cls(**json.loads(Path(path).read_text()))


def scores(ref: Reference, values: np.ndarray, classes: np.ndarray, confidence: np.ndarray) -> dict[str, float]:
    """Drift of a sample against the reference: KS per feature and for confidence, JS for classes."""
    out = {name: ks_statistic(values[:, j], ref.sorted[name], b_sorted=True) for j, name in enumerate(FEATURES)}
    out["confidence"] = ks_statistic(confidence, ref.sorted["confidence"], b_sorted=True)
    counts = np.bincount(classes.astype(int), minlength=len(ref.shares)).astype(float)
    out["classes"] = js_divergence(counts, ref.shares) if len(classes) else 0.0
    return out


class DriftMonitor:
    """A bounded rolling window (ring buffer) of what one worker served, scored against the reference."""

    def __init__(self, ref: Reference, window: int, min_samples: int, every: int = 16) -> None:
        self.ref, self.min_samples, self.every = ref, min_samples, every
        self.values = np.zeros((window, len(FEATURES)))
        self.classes = np.zeros(window, dtype=np.int64)
        self.confidence = np.zeros(window)
        self.count = 0  # images seen; the window holds the last min(count, window)
        self._scores: dict[str, float] | None = None
        self.scored_at = 0  # `count` when the scores were last computed: the handler emits them only then

    def __len__(self) -> int:
        return min(self.count, len(self.classes))

    def add(self, values: np.ndarray, classes: list[int], confidence: list[float]) -> None:
        """Append a batch to the ring buffer, vectorised: one write per array, the oldest rows overwritten."""
        window = len(self.classes)
        n = len(values)
        keep = min(n, window)
        slots = (self.count + n - keep + np.arange(keep)) % window
        self.values[slots] = values[n - keep :]
        self.classes[slots] = np.asarray(classes[n - keep :], dtype=np.int64)
        self.confidence[slots] = np.asarray(confidence[n - keep :], dtype=np.float64)
        self.count += n

    def scores(self) -> dict[str, float] | None:
        """None until the window holds `min_samples` images; recomputed every `every` new images."""
        n = len(self)
        if n < self.min_samples:
            return None
        if self._scores is None or self.count - self.scored_at >= self.every:
            self._scores = scores(self.ref, self.values[:n], self.classes[:n], self.confidence[:n])
            self.scored_at = self.count
        return self._scores
