"""A synthetic photo dataset for the heavier model: the digits as 224x224 RGB photos (`data=folder` reads it)."""

from pathlib import Path

import numpy as np
from PIL import Image

from common.config import ROOT
from common.io import atomic_dir

PHOTOS = ROOT / "data" / "raw" / "photos"
PHOTO_SIZE = 224


def make_photos(root: Path = PHOTOS, seed: int = 0) -> Path:
    """A 224x224 RGB image folder, root/<digit>/<i>.jpg: each of scikit-learn's 1,797 digits enlarged to 160x160,
    dark on a light background, both in random colours, with noise, at a random offset. Made once, atomically."""
    if root.is_dir():
        return root
    from sklearn.datasets import load_digits

    digits, rng = load_digits(), np.random.default_rng(seed)
    with atomic_dir(root) as tmp:
        for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
            glyph = np.asarray(Image.fromarray((image * 16).astype(np.uint8)).resize((160, 160), Image.BILINEAR))
            alpha = glyph[..., None].astype(np.float32) / 255
            bg, fg = rng.integers(160, 256, 3), rng.integers(0, 96, 3)  # any colours, the digit always darker
            canvas = np.broadcast_to(bg, (PHOTO_SIZE, PHOTO_SIZE, 3)).astype(np.float32).copy()
            y, x = rng.integers(0, PHOTO_SIZE - 160, 2)
            canvas[y : y + 160, x : x + 160] = alpha * fg + (1 - alpha) * canvas[y : y + 160, x : x + 160]
            canvas += rng.normal(0, 8, canvas.shape)
            (tmp / str(label)).mkdir(exist_ok=True)
            Image.fromarray(canvas.clip(0, 255).astype(np.uint8)).save(tmp / str(label) / f"{i}.jpg", quality=90)
    return root
