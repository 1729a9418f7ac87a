"""Read the canonical dataset that training/data.py writes: meta.json and one split as numpy arrays.

numpy alone for the npz form, so light clients (the Locust users) read the splits as training does without
importing torch or Lightning; the sharded form imports training/shards.py (torch, WebDataset) when it is met.
"""

import json
from pathlib import Path

import numpy as np

from common.cli import BundleError


class DataError(BundleError):
    """The input data cannot be turned into a dataset; the message says why."""


def read_meta(data_dir: Path | str) -> dict:
    """meta.json of a dataset in a folder, or in a bucket (gs://...: read through fsspec/gcsfs)."""
    if str(data_dir).startswith("gs://"):
        import fsspec

        with fsspec.open(f"{str(data_dir).rstrip('/')}/meta.json", "rt") as f:
            return json.load(f)
    path = Path(data_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"no dataset at {data_dir}: run `python -m training.data` (or `dvc repro data`)")
    return json.loads(path.read_text())


def read_split(data_dir: Path | str, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One split (or its first `limit` samples) as (uint8 images [N, C, H, W], int64 labels [N]), in memory."""
    meta = read_meta(data_dir)
    if meta.get("format") == "shards":
        from training import shards

        return shards.read_all(str(data_dir), meta["shards"][split], limit)
    with np.load(Path(data_dir) / f"{split}.npz") as f:
        return f["images"][:limit], f["labels"][:limit]
