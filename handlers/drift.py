"""Input and output drift: cheap per-image features, a reference, and two-sample scores.

The same `features` function describes the training inputs at export (the reference shipped in
the .mar) and every served image (handler), so the two are comparable. No TorchServe import.
"""

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

FEATURES = ("brightness", "contrast", "sharpness", "width", "height")
LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)


def features(images: list[torch.Tensor]) -> np.ndarray:
    """uint8 RGB images [3, H, W] (any sizes) -> [N, len(FEATURES)]; vectorised per image size."""
    out = np.zeros((len(images), len(FEATURES)), dtype=np.float64)
    by_size: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault(tuple(img.shape), []).append(i)
    for (_, h, w), idx in by_size.items():
        gray = torch.stack([images[i] for i in idx]).float().mean(dim=1, keepdim=True) / 255
        lap = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), LAPLACIAN.to(gray.device))
        out[idx, 0] = gray.mean(dim=(1, 2, 3)).cpu().numpy()
        out[idx, 1] = gray.std(dim=(1, 2, 3), unbiased=False).cpu().numpy()
        out[idx, 2] = lap.abs().mean(dim=(1, 2, 3)).cpu().numpy()
        out[idx, 3], out[idx, 4] = w, h
    return out


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    if len(a) == 0 or len(b) == 0:
        return 0.0
    a, b = np.sort(a), np.sort(b)
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

    def to_json(self) -> dict:
        return {"features": self.features, "class_shares": self.class_shares, "confidence": self.confidence}

    @classmethod
    def load(cls, path: Path | str) -> "Reference":
        return cls(**json.loads(Path(path).read_text()))


def scores(ref: Reference, values: np.ndarray, classes: np.ndarray, confidence: np.ndarray) -> dict[str, float]:
    """Drift of a sample against the reference: KS per feature and for confidence, JS for classes."""
    out = {name: ks_statistic(values[:, j], np.asarray(ref.features[name])) for j, name in enumerate(FEATURES)}
    out["confidence"] = ks_statistic(confidence, np.asarray(ref.confidence))
    counts = np.bincount(classes.astype(int), minlength=len(ref.class_shares)).astype(float)
    out["classes"] = js_divergence(counts, np.asarray(ref.class_shares)) if len(classes) else 0.0
    return out


class DriftMonitor:
    """A bounded rolling window of what one worker served, scored against the reference."""

    def __init__(self, ref: Reference, window: int = 500, min_samples: int = 50) -> None:
        self.ref, self.min_samples = ref, min_samples
        self.values: deque[np.ndarray] = deque(maxlen=window)
        self.classes: deque[int] = deque(maxlen=window)
        self.confidence: deque[float] = deque(maxlen=window)

    def add(self, values: np.ndarray, classes: list[int], confidence: list[float]) -> None:
        self.values.extend(values)
        self.classes.extend(classes)
        self.confidence.extend(confidence)

    def scores(self) -> dict[str, float] | None:
        """None until the window holds `min_samples` images."""
        if len(self.values) < self.min_samples:
            return None
        return scores(self.ref, np.stack(self.values), np.asarray(self.classes), np.asarray(self.confidence))
