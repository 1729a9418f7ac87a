"""The sharded canonical form: WebDataset tar shards, for datasets larger than memory.

In `paths.data` (a local folder, Vertex's /gcs/<bucket>/... mount, or gs://<bucket>/...):
  <split>-000000.tar, <split>-000001.tar, ...   POSIX tar files of `data.shard_size` samples each:
                                                <key>.png (the canonical uint8 image, lossless) and <key>.cls
  meta.json                                     as for every dataset, plus "format": "shards" and the shard names

Writing streams: one image in memory at a time, the train statistics accumulate as it goes (`Stats`).
Reading streams too: DataLoader workers open the shards, decode the PNGs and yield uint8 tensors.
"""

import io
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor

from common.cli import BundleError
from common.images import encode

PATTERN = "{split}-%06d.tar"


class Stats:
    """Per-channel mean and (population) std of uint8 images in [0, 1], accumulated one image at a time."""

    def __init__(self) -> None:
        self.total = self.squares = self.shape = None
        self.count = 0

    def add(self, image: np.ndarray) -> None:
        self.shape = [int(n) for n in image.shape]
        x = image.reshape(image.shape[0], -1).astype(np.float64) / 255
        total, squares = x.sum(axis=1), (x * x).sum(axis=1)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += x.shape[1]

    def mean(self) -> list[float]:
        return (self.total / self.count).tolist()

    def std(self) -> list[float]:
        mean = self.total / self.count
        return np.sqrt(np.maximum(self.squares / self.count - mean**2, 0)).clip(min=1e-3).tolist()


def decode(sample: dict) -> tuple[Tensor, int]:
    """A WebDataset sample {"png": bytes, "cls": bytes} -> (uint8 [C, H, W], label)."""
    with Image.open(io.BytesIO(sample["png"])) as img:
        pixels = np.array(img)  # writable, for torch
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(pixels)), int(sample["cls"])


def write(
    folder: Path, split: str, samples: Iterable[tuple[np.ndarray, int]], shard_size: int, stats: Stats | None = None
) -> list[str]:
    """Write (image, label) pairs into folder/<split>-NNNNNN.tar; return the shard names in order."""
    pattern = str(folder / PATTERN.format(split=split))
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as sink:
        for index, (image, label) in enumerate(samples):
            if stats is not None:
                stats.add(image)
            sink.write({"__key__": f"{split}{index:09d}", "png": encode(image, compress_level=1), "cls": int(label)})
    return sorted(p.name for p in folder.glob(f"{split}-*.tar"))


def _open_gs(url: str, mode: str = "rb", bufsize: int = 8192, **kw):
    """gs:// through fsspec (gcsfs, which dvc-gs installs) instead of WebDataset's default `gsutil cat`."""
    import fsspec

    return fsspec.open(url, mode).open()


wds.gopen_schemes["gs"] = _open_gs


def urls(data_dir: str, shards: list[str]) -> list[str]:
    return [f"{str(data_dir).rstrip('/')}/{name}" for name in shards]


def every_node(src: Iterable) -> Iterator:
    """All shards on every rank: validation and test see the whole split on each process."""
    yield from src


def stream(
    data_dir: str,
    shards: list[str],
    count: int,
    shuffle: int = 0,
    seed: int = 0,
    world: int = 1,
    workers: int = 0,
) -> wds.WebDataset:
    """An IterableDataset of (uint8 image, label), decoded in the DataLoader's workers.

    shuffle > 0 (training): shard order and a buffer of `shuffle` samples are shuffled, seeded.
    world > 1 (DDP): WebDataset's multi-node recipe: every rank draws shards at random (resampled) and
    stops after the same number of samples, so all ranks run the same number of steps.
    """
    if not shards:
        raise BundleError(f"no shards listed in {data_dir}/meta.json")
    if world > 1 and shuffle:
        per_worker = math.ceil(count / world / max(1, workers))
        ds = wds.WebDataset(urls(data_dir, shards), resampled=True, nodesplitter=every_node, empty_check=False)
        ds = ds.compose(wds.detshuffle(shuffle, seed=seed)).with_epoch(per_worker)
    else:
        ds = wds.WebDataset(
            urls(data_dir, shards),
            shardshuffle=len(shards) if shuffle else False,
            detshuffle=True,  # seed + epoch: reproducible, and a new order each epoch (persistent workers)
            nodesplitter=every_node,
            empty_check=False,
            seed=seed,
        )
        ds = ds.compose(wds.detshuffle(shuffle, seed=seed)) if shuffle else ds
    return ds.map(decode)


def read_all(data_dir: str, shards: list[str], limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A whole split (or its first `limit` samples) in memory: for evaluation tools, not for training."""
    images, labels = [], []
    for image, label in stream(data_dir, shards, count=0):
        if limit is not None and len(labels) >= limit:
            break
        images.append(image.numpy())
        labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64)
