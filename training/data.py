"""Prepare a dataset into one canonical on-disk form, and load it for training.

Canonical form, in `paths.data`, one of two formats (`data.format`):
  npz      train.npz, val.npz, test.npz: images uint8 [N, C, H, W], labels int64 [N]; read whole (the digits)
  shards   <split>-NNNNNN.tar WebDataset shards (training/shards.py), written and read streaming: datasets
           larger than memory (image folders, torchvision sets)
  samples/<index>_<class>.png    one test image per class, for curl
  meta.json                      the one description: format, classes, channels, image_size, mean/std of
                                 the train split, counts, shard names

Run `python -m training.data` (Hydra overrides: `data=folder data.root=...`). Reading it back without torch:
training/splits.py; `load_split` is that as tensors.
"""

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

from common.cli import one_line_errors
from common.images import to_pil
from common.io import atomic_dir
from handlers.decode import InputError, decode_image, suffixes
from training import shards
from training.preprocess import canonical
from training.splits import DataError, read_meta, read_split

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
TORCHVISION = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "CIFAR10"}


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


def list_folder(root: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    """root/<class>/<image>: the files and their labels (classes sorted, files sorted), no pixel read."""
    if not root.is_dir():
        raise DataError(f"image folder not found: {root}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"{root} needs at least two class sub-folders, found {len(classes)}")
    files, labels = [], []
    for index, name in enumerate(classes):
        found = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in suffixes())
        if not found:
            raise DataError(f"class folder {root / name} has no images ({', '.join(sorted(suffixes()))})")
        files += found
        labels += [index] * len(found)
    return files, np.asarray(labels, dtype=np.int64), classes


def load_folder(root: Path, size: int, channels: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """root/<class>/<image>: one sub-folder per class, PNG or JPEG, any size; every image in memory."""
    files, labels, classes = list_folder(root)
    return np.stack([read_image(f, size, channels) for f in tqdm(files, desc="decode", unit="img")]), labels, classes


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


def split_indices(
    labels: np.ndarray, val: float, test: float, seed: int, shuffled: bool = False
) -> dict[str, np.ndarray]:
    """Stratified, seeded, disjoint train/val/test indices: sorted, or `shuffled` (seeded) to mix the classes
    within each shard."""
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
    if shuffled:
        return {s: rng.permutation(np.concatenate(p)) for s, p in parts.items()}
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


def write_samples(folder: Path, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    """One PNG per class from the test split, for trying the served model with curl."""
    folder.mkdir()
    for index, name in enumerate(classes):
        found = np.flatnonzero(labels == index)
        if len(found):
            to_pil(images[found[0]]).save(folder / f"{index}_{name}.png")


def stream_splits(cfg: DictConfig) -> tuple[dict[str, tuple[int, Iterator]], list[str]]:
    """Each split as (count, iterator of (uint8 image [C, H, W], label)), in a seeded order that mixes the classes.

    An image folder is decoded one image at a time; the other sources are in memory already.
    """
    data = cfg.data
    if data.source != "folder":
        splits, classes = build_splits(cfg)
        rng = np.random.default_rng(cfg.seed)

        def shuffled(x: np.ndarray, y: np.ndarray) -> Iterator:
            for i in rng.permutation(len(y)):
                yield x[i], int(y[i])

        return {s: (len(y), shuffled(x, y)) for s, (x, y) in splits.items()}, classes
    files, labels, classes = list_folder(Path(data.root))
    idx = split_indices(labels, data.val_fraction, data.test_fraction, cfg.seed, shuffled=True)

    def decoded(split: str) -> Iterator:
        for i in tqdm(idx[split], desc=f"shard {split}", unit="img", mininterval=2):
            yield read_image(files[i], data.image_size, data.channels), int(labels[i])

    return {s: (len(idx[s]), decoded(s)) for s in SPLITS}, classes


def make_shards(cfg: DictConfig) -> Path:
    """Write the sharded canonical dataset to `paths.data`, streaming, atomically (all files or none)."""
    splits, classes = stream_splits(cfg)
    stats, names = shards.Stats(), {}
    out = Path(cfg.paths.data)
    with atomic_dir(out) as tmp:
        for split, (_, samples) in splits.items():
            names[split] = shards.write(tmp, split, samples, cfg.data.shard_size, stats if split == "train" else None)
        meta = {
            "format": "shards",
            "source": cfg.data.source,
            "classes": classes,
            "channels": stats.shape[0],
            "image_size": list(stats.shape[1:]),
            "mean": stats.mean(),
            "std": stats.std(),
            "counts": {s: count for s, (count, _) in splits.items()},
            "seed": cfg.seed,
            "shards": names,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        first = {}  # one test image per class
        for image, label in shards.stream(str(tmp), names["test"], meta["counts"]["test"]):
            first.setdefault(label, image.numpy())
        labels = np.asarray(sorted(first))
        write_samples(tmp / "samples", np.stack([first[k] for k in labels]), labels, classes)
    return out


def make_dataset(cfg: DictConfig) -> Path:
    """Write the canonical dataset to `paths.data`, atomically (all files or none), in `data.format`."""
    if cfg.data.format == "shards":
        return make_shards(cfg)
    if cfg.data.format != "npz":
        raise DataError(f"unknown data.format {cfg.data.format!r}: npz or shards")
    splits, classes = build_splits(cfg)
    train = splits["train"][0].astype(np.float32) / 255
    meta = {
        "format": "npz",
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


def load_split(data_dir: Path | str, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One split (or its first `limit` samples) as tensors (training/splits.py's arrays, not copied)."""
    images, labels = read_split(data_dir, split, limit)
    return torch.from_numpy(images), torch.from_numpy(labels)


class ImageDataModule(L.LightningDataModule):
    """Serves the canonical splits as uint8 batches; augmentation and preprocessing run on the device.

    npz: the splits in memory. shards: streamed from the shards, decoded in the loader's workers; the train
    split shuffled through a buffer of `shuffle_buffer` samples.
    """

    def __init__(
        self, data_dir: str, batch_size: int, num_workers: int = 0, shuffle_buffer: int = 1000, seed: int = 0
    ) -> None:
        super().__init__()
        self.data_dir, self.batch_size, self.num_workers = data_dir, batch_size, num_workers
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.meta = read_meta(data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self.meta.get("format") != "shards":
            self.sets = {s: TensorDataset(*load_split(self.data_dir, s)) for s in SPLITS}
            return
        world = self.trainer.world_size if self.trainer is not None else 1
        self.sets = {
            s: shards.stream(
                str(self.data_dir),
                self.meta["shards"][s],
                self.meta["counts"][s],
                shuffle=self.shuffle_buffer if s == "train" else 0,
                seed=self.seed,
                world=world,
                workers=self.num_workers,
            )
            for s in SPLITS
        }

    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        streamed = self.meta.get("format") == "shards"  # shuffled by the stream itself
        return DataLoader(
            self.sets[split],
            batch_size=self.batch_size,
            shuffle=shuffle and not streamed,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
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
