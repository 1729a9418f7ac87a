"""Prepare a dataset into one canonical on-disk form, and load it for training.

Canonical form, in `paths.data`:
  train.npz, val.npz, test.npz   images: uint8 [N, C, H, W], labels: int64 [N]
  samples/<index>_<class>.png    one test image per class, for curl
  meta.json                      classes, channels, image_size, mean/std of the train split

Run `python -m training.data` (Hydra overrides: `data=folder data.root=...`).
"""

import json
import logging
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from common.cli import BundleError, one_line_errors
from common.io import atomic_dir
from handlers.decode import InputError, decode_image, suffixes
from training.preprocess import canonical

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}


class DataError(BundleError):
    """The input data cannot be turned into a dataset; the message says why."""


def load_digits() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's digits as uint8 [N, 1, 8, 8] (ink bright, 0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    return images, digits.target.astype(np.int64), [str(c) for c in digits.target_names]


def read_image(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file as uint8 [C, size, size]: decoded by the handler's decoder, resized by the graph's resize.

    `canonical` is the serving graph's own first steps, so a folder image and its canonical form
    differ only by the rounding to uint8: no training/serving skew.
    """
    try:
        rgb = decode_image(path.read_bytes(), max_pixels=Image.MAX_IMAGE_PIXELS or 10**9)
    except (InputError, OSError) as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    return canonical(rgb[None], size, channels)[0].numpy()


def load_folder(root: Path, size: int, channels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """root/<class>/<image>: one sub-folder per class, PNG or JPEG, any size."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root} needs at least two class sub-folders, found {len(classes)}")
    images, labels = [], []
    for index, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in suffixes())
        if not files:
            raise DataError(f"class folder {root / name} has no images ({', '.join(sorted(suffixes()))})")
        images += [read_image(f, size, channels) for f in files]
        labels += [index] * len(files)
    return np.stack(images), np.asarray(labels, dtype=np.int64), classes


def load_torchvision(name: str, root: Path) -> tuple[dict[str, np.ndarray], list[str]]:
    """A torchvision dataset (downloads on first use) as uint8 arrays, official splits."""
    import torchvision

    cls = getattr(torchvision.datasets, TORCHVISION[name])
    arrays = {}
    for split, train in (("train", True), ("test", False)):
        ds = cls(str(root), train=train, download=True)
        data = np.asarray(ds.data, dtype=np.uint8)
        arrays[split] = data[:, None] if data.ndim == 3 else data.transpose(0, 3, 1, 2)
        arrays[split + "_labels"] = np.asarray(ds.targets, dtype=np.int64)
    return arrays, [str(c) for c in ds.classes]


def split_indices(labels: np.ndarray, val: float, test: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified, seeded, disjoint train/val/test indices."""
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_test, n_val = round(len(idx) * test), round(len(idx) * val)
        if len(idx) - n_test - n_val < 1:
            raise DataError(f"class {label} has {len(idx)} images: too few to split")
        parts["test"].append(idx[:n_test])
        parts["val"].append(idx[n_test : n_test + n_val])
        parts["train"].append(idx[n_test + n_val :])
    return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def build_splits(cfg: DictConfig) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    data = cfg.data
    if data.source == "digits":
        images, labels, classes = load_digits()
    elif data.source == "folder":
        images, labels, classes = load_folder(Path(data.root), data.image_size, data.channels)
    elif data.source in TORCHVISION:
        arrays, classes = load_torchvision(data.source, Path(data.root))
        train_idx = split_indices(arrays["train_labels"], data.val_fraction, 0.0, cfg.seed)
        splits = {s: (arrays["train"][train_idx[s]], arrays["train_labels"][train_idx[s]]) for s in ("train", "val")}
        splits["test"] = (arrays["test"], arrays["test_labels"])
        return splits, classes
    else:
        raise DataError(f"unknown data.source {data.source!r}: digits, folder, {', '.join(TORCHVISION)}")
    idx = split_indices(labels, data.val_fraction, data.test_fraction, cfg.seed)
    return {s: (images[idx[s]], labels[idx[s]]) for s in SPLITS}, classes


def to_pil(image: np.ndarray) -> Image.Image:
    """uint8 [C, H, W] -> PIL image (L or RGB)."""
    return Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0))


def write_samples(folder: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    """One PNG per class from the test split, for trying the served model with curl."""
    folder.mkdir()
    for index, name in enumerate(classes):
        found = np.flatnonzero(labels == index)
        if len(found):
            to_pil(images[found[0]]).save(folder / f"{index}_{name}.png")


def make_dataset(cfg: DictConfig) -> Path:
    """Write the canonical dataset to `paths.data`, atomically (all files or none)."""
    splits, classes = build_splits(cfg)
    train = splits["train"][0].astype(np.float32) / 255
    meta = {
        "source": cfg.data.source,
        "classes": classes,
        "channels": int(train.shape[1]),
        "image_size": [int(s) for s in train.shape[2:]],
        "mean": train.mean(axis=(0, 2, 3)).tolist(),
        "std": train.std(axis=(0, 2, 3)).clip(min=1e-3).tolist(),
        "counts": {s: len(y) for s, (_, y) in splits.items()},
        "seed": cfg.seed,
    }
    out = Path(cfg.paths.data)
    with atomic_dir(out) as tmp:
        for split, (x, y) in splits.items():
            np.savez_compressed(tmp / f"{split}.npz", images=x, labels=y)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        write_samples(tmp / "samples", *splits["test"], classes)
    return out


def read_meta(data_dir: Path | str) -> dict:
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"no dataset at {data_dir}: run `python -m training.data` (or `dvc repro data`)")
    return json.loads(path.read_text())


def load_split(data_dir: Path | str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as (uint8 images [N, C, H, W], int64 labels [N])."""
    with np.load(Path(data_dir) / f"{split}.npz") as f:
        return torch.from_numpy(f["images"]), torch.from_numpy(f["labels"])


class ImageDataModule(L.LightningDataModule):
    """Serves the canonical splits as uint8 batches; augmentation and preprocessing run on the device."""

    def __init__(self, data_dir: str, batch_size: int, num_workers: int = 0) -> None:
        super().__init__()
        self.data_dir, self.batch_size, self.num_workers = data_dir, batch_size, num_workers
        self.meta = read_meta(data_dir)

    def setup(self, stage: str | None = None) -> None:
        self.sets = {s: TensorDataset(*load_split(self.data_dir, s)) for s in SPLITS}

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        return DataLoader(
            self.sets[split],
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        out = make_dataset(cfg)
    meta = read_meta(out)
    log.info("wrote %s: %s images per split, classes %s", out, meta["counts"], meta["classes"])


if __name__ == "__main__":
    main()
