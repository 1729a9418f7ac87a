"""The sharded canonical form (training/shards.py): written and read streaming, same pixels as the in-memory form."""

import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import ROOT, load_config
from training import shards
from training.data import DataError, ImageDataModule, load_split, make_dataset, read_meta
from training.memory import measure


def rows(images: torch.Tensor, labels: torch.Tensor) -> list[bytes]:
    """Each sample as bytes (pixels + label), sorted: the split as a multiset, whatever its order."""
    return sorted(bytes(x.numpy()) + bytes([int(y)]) for x, y in zip(images, labels, strict=True))


@pytest.fixture(scope="module")
def digits_both(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    npz = make_dataset(load_config([f"paths.data={root}/npz"]))
    sharded = make_dataset(load_config([f"paths.data={root}/shards", "data.format=shards", "data.shard_size=500"]))
    return npz, sharded


def test_shards_hold_the_same_pixels_and_labels_as_the_in_memory_form(digits_both):
    npz, sharded = digits_both
    meta = read_meta(sharded)
    assert meta["format"] == "shards" and meta["shards"]["train"] == [f"train-{i:06d}.tar" for i in range(3)]
    with tarfile.open(sharded / "train-000000.tar") as tar:  # plain tar: <key>.png + <key>.cls, 500 samples
        names = tar.getnames()
    assert len(names) == 1000 and {name.rsplit(".", 1)[1] for name in names} == {"png", "cls"}
    for split in ("train", "val", "test"):
        x, y = load_split(npz, split)
        xs, ys = load_split(sharded, split)
        assert xs.dtype == torch.uint8 and xs.shape == x.shape and meta["counts"][split] == len(ys)
        assert rows(xs, ys) == rows(x, y), split
        assert not torch.equal(ys, y)  # written in a seeded shuffled order (classes mixed in every shard)
    first, labels = load_split(sharded, "test", limit=7)
    assert first.shape == (7, 1, 8, 8) and torch.equal(first, load_split(sharded, "test")[0][:7])


def test_the_in_memory_form_is_read_without_torch(digits_both):
    """training/splits.py is how light clients (the Locust users) read a split: numpy, no torch or Lightning to
    import first. The sharded form imports torch when it is met."""
    npz, sharded = digits_both
    read = "import sys; from training.splits import read_split; x, y = read_split(sys.argv[1], 'test'); "
    read += "print(type(x).__name__, *x.shape, len(y), 'torch' in sys.modules)"
    for data, imports_torch in ((npz, False), (sharded, True)):
        run = subprocess.run([sys.executable, "-c", read, str(data)], cwd=ROOT, capture_output=True, text=True)
        x, y = load_split(data, "test")
        assert run.stdout.split() == ["ndarray", *map(str, x.shape), str(len(y)), str(imports_torch)], run.stderr


def test_streaming_statistics_equal_the_in_memory_ones(digits_both):
    npz, sharded = digits_both
    a, b = read_meta(npz), read_meta(sharded)
    assert b["mean"] == pytest.approx(a["mean"], abs=1e-6) and b["std"] == pytest.approx(a["std"], abs=1e-6)
    assert (a["channels"], a["image_size"], a["classes"], a["counts"]) == (
        b["channels"],
        b["image_size"],
        b["classes"],
        b["counts"],
    )
    stats = shards.Stats()
    for image in np.random.default_rng(0).integers(0, 256, (5, 3, 4, 6), dtype=np.uint8):
        stats.add(image)
    assert stats.shape == [3, 4, 6]


def numbered_folder(root, count: int, size: int = 24, classes: int = 3) -> None:
    """root/c<k>/<i>.png: every image unique (its number in its first pixels), lossless."""
    for i in range(count):
        folder = root / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = np.full((size, size, 3), 60 * (i % classes), np.uint8)
        pixels[0, 0], pixels[0, 1] = i % 256, i // 256
        Image.fromarray(pixels).save(folder / f"{i}.png")


def split_rows(data_dir) -> dict[str, set[bytes]]:
    return {s: set(rows(*load_split(data_dir, s))) for s in ("train", "val", "test")}


def test_folder_splits_are_seeded_deterministic_disjoint_and_complete(tmp_path):
    numbered_folder(tmp_path / "imgs", 60)
    base = ["data=folder", f"data.root={tmp_path}/imgs", "data.image_size=24", "data.shard_size=7"]
    a = split_rows(make_dataset(load_config([*base, f"paths.data={tmp_path}/a"])))
    b = split_rows(make_dataset(load_config([*base, f"paths.data={tmp_path}/b"])))
    c = split_rows(make_dataset(load_config([*base, f"paths.data={tmp_path}/c", "seed=7"])))
    assert a == b and a != c
    assert sum(len(v) for v in a.values()) == len(set().union(*a.values())) == 60
    meta = read_meta(tmp_path / "a")
    assert meta["counts"] == {"train": 42, "val": 9, "test": 9} and len(meta["shards"]["train"]) == 6
    assert sorted(p.name for p in (tmp_path / "a" / "samples").iterdir()) == ["0_c0.png", "1_c1.png", "2_c2.png"]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_train_stream_yields_every_sample_once_per_epoch_shuffled(tmp_path, workers):
    numbered_folder(tmp_path / "imgs", 60)
    overrides = ["data=folder", f"data.root={tmp_path}/imgs", "data.image_size=24", "data.shard_size=7"]
    out = make_dataset(load_config([*overrides, f"paths.data={tmp_path}/d"]))
    module = ImageDataModule(str(out), batch_size=8, num_workers=workers, shuffle_buffer=20, seed=1)
    module.setup()
    epochs = [[(x, y) for x, y in module.train_dataloader()] for _ in range(2)]
    stored = load_split(out, "train")
    for batches in epochs:
        images, labels = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
        assert images.dtype == torch.uint8 and images.shape[1:] == (3, 24, 24)
        assert rows(images, labels) == rows(*stored)
        assert not torch.equal(labels, stored[1])
    val = [(x, y) for x, y in module.val_dataloader()]
    assert rows(torch.cat([x for x, _ in val]), torch.cat([y for _, y in val])) == rows(*load_split(out, "val"))


def test_a_folder_larger_than_the_memory_budget_is_sharded_without_loading_it_whole(tmp_path):
    """400 images of 3x192x192 = 44 MB in canonical form; preparing them may add at most 20 MB."""
    budget_mib, size, count = 20, 192, 400
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = tmp_path / "imgs" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        ramp = np.linspace(0, 200, size)[None, :, None] + rng.integers(0, 50, (1, 1, 3))
        Image.fromarray(np.broadcast_to(ramp, (size, size, 3)).astype(np.uint8)).save(folder / f"{i}.jpg")
    assert count * 3 * size * size / 2**20 > 2 * budget_mib
    cfg = load_config(
        ["data=folder", f"data.root={tmp_path}/imgs", f"data.image_size={size}", f"paths.data={tmp_path}/out"]
    )
    out, peak = measure(make_dataset, cfg)
    assert sum(read_meta(out)["counts"].values()) == count
    assert peak < budget_mib, f"preparing the shards added {peak:.1f} MiB"


def test_an_unknown_format_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="unknown data.format 'parquet': npz or shards"):
        make_dataset(load_config([f"paths.data={tmp_path}/x", "data.format=parquet"]))
    assert not (tmp_path / "x").exists()


def test_under_ddp_each_rank_streams_an_equal_share_drawn_from_the_shards(tmp_path):
    """world > 1: shards drawn at random per rank and worker, cut at count / world, so every rank runs the same
    number of steps (here one process stands for rank 0 of 2)."""
    numbered_folder(tmp_path / "imgs", 60)
    overrides = ["data=folder", f"data.root={tmp_path}/imgs", "data.image_size=24", "data.shard_size=7"]
    out = make_dataset(load_config([*overrides, f"paths.data={tmp_path}/d"]))
    meta = read_meta(out)
    share = list(shards.stream(str(out), meta["shards"]["train"], meta["counts"]["train"], shuffle=10, world=2))
    assert len(share) == 21  # 42 / 2
    train = set(rows(*load_split(out, "train")))
    assert set(rows(torch.stack([x for x, _ in share]), torch.tensor([y for _, y in share]))) <= train
