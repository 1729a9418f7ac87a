import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import load_config
from handlers.decode import decode_image
from training.data import DataError, ImageDataModule, load_split, make_dataset, read_meta, split_indices
from training.export import inference_module
from training.pipeline import run
from training.variants import trace


def test_digits_splits_are_deterministic_disjoint_and_complete(cfg, dataset, tmp_path):
    again = make_dataset(load_config([f"paths.data={tmp_path}/again"]))
    sizes = 0
    seen = set()
    for split in ("train", "val", "test"):
        x, y = load_split(dataset, split)
        x2, y2 = load_split(again, split)
        assert (x == x2).all() and (y == y2).all()
        assert x.dtype.is_floating_point is False and str(x.dtype) == "torch.uint8"
        assert tuple(x.shape[1:]) == (1, 8, 8) and len(x) == len(y)
        rows = {bytes(img.numpy()) + bytes([int(label)]) for img, label in zip(x, y, strict=True)}
        seen |= rows
        sizes += len(x)
    assert sizes == 1797
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["counts"]["test"] == pytest.approx(1797 * 0.15, abs=10)


def test_split_indices_disjoint_stratified_and_seeded():
    labels = np.repeat(np.arange(3), 20)
    a = split_indices(labels, 0.2, 0.2, seed=1)
    b = split_indices(labels, 0.2, 0.2, seed=1)
    c = split_indices(labels, 0.2, 0.2, seed=2)
    assert all((a[s] == b[s]).all() for s in a)
    assert any((a[s] != c[s]).any() for s in a)
    union = np.concatenate(list(a.values()))
    assert len(union) == len(set(union.tolist())) == 60
    assert [int((labels[a["test"]] == k).sum()) for k in range(3)] == [4, 4, 4]


def test_samples_written_one_per_class(dataset):
    samples = sorted(p.name for p in (dataset / "samples").glob("*.png"))
    assert samples == [f"{i}_{i}.png" for i in range(10)]


def make_folder(root, mode: str, sizes=((20, 30), (64, 48), (100, 100))):
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            color = (40 + 100 * c + i,) * (1 if mode == "L" else 3)
            img = Image.new(mode, sizes[i % len(sizes)], color[0] if mode == "L" else color)
            img.save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")


@pytest.mark.parametrize(("mode", "channels"), [("L", 1), ("RGB", 3), ("L", 3), ("RGB", 1)])
def test_image_folder_gray_and_rgb(tmp_path, mode, channels):
    make_folder(tmp_path / "imgs", mode)
    cfg = load_config(
        ["data=folder", f"data.root={tmp_path}/imgs", f"data.channels={channels}", "data.image_size=16"]
        + [f"paths.data={tmp_path}/out", "data.val_fraction=0.2", "data.test_fraction=0.2"]
    )
    out = make_dataset(cfg)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == ["cat", "dog"] and meta["channels"] == channels
    total = 0
    for split in ("train", "val", "test"):
        x, y = load_split(out, split)
        assert tuple(x.shape[1:]) == (channels, 16, 16)
        assert set(y.tolist()) == {0, 1}
        total += len(y)
    assert total == 12
    module = ImageDataModule(str(out), batch_size=4)
    module.setup()
    images, labels = next(iter(module.train_dataloader()))
    assert images.shape[1:] == (channels, 16, 16) and labels.dtype.is_floating_point is False


def folder_cfg(tmp_path, root):
    return load_config(["data=folder", f"data.root={root}", f"paths.data={tmp_path}/out"])


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(DataError, match="not found"):
        make_dataset(folder_cfg(tmp_path, tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="at least two class"):
        make_dataset(folder_cfg(tmp_path, tmp_path / "empty"))
    (tmp_path / "one" / "a").mkdir(parents=True)
    (tmp_path / "one" / "b").mkdir(parents=True)
    Image.new("L", (4, 4)).save(tmp_path / "one" / "a" / "x.png")
    with pytest.raises(DataError, match=r"has no images \(.*\.jpg.*\.png"):
        make_dataset(folder_cfg(tmp_path, tmp_path / "one"))
    (tmp_path / "one" / "b" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read image"):
        make_dataset(folder_cfg(tmp_path, tmp_path / "one"))
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.slow  # a new Python importing the data stage
def test_data_cli_prints_one_line_error(tmp_path):
    args = ["data=folder", f"data.root={tmp_path}/nope", f"paths.data={tmp_path}/o"]
    run = subprocess.run(
        [sys.executable, "-m", "training.data", *args],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].startswith("error: image folder not found")


def textured_folder(root, classes=("blue", "green", "red"), sizes=((37, 23), (64, 48), (100, 80), (16, 16), (20, 50))):
    """root/<class>/<i>.png|jpg: noisy RGB images of several sizes, tinted by class, seeded."""
    rng = np.random.default_rng(0)
    files = []
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i, (width, height) in enumerate(sizes):
            tint = np.zeros(3)
            tint[len(classes) - 1 - c] = 120
            pixels = (rng.normal(60, 50, (height, width, 3)) + tint).clip(0, 255).astype(np.uint8)
            path = root / name / f"{i}.{'jpg' if i == 1 else 'png'}"
            Image.fromarray(pixels).save(path)
            files.append(path)
    return files  # in the data stage's order: classes sorted, files sorted within a class


def test_folder_images_and_their_canonical_form_get_the_same_answer(tmp_path, new_classifier):
    """No training/serving skew: the graph answers a folder image as it answers its stored (canonical) form."""
    files = textured_folder(tmp_path / "imgs")
    cfg = load_config(
        ["data=folder", f"data.root={tmp_path}/imgs", f"paths.data={tmp_path}/data", "data.image_size=16"]
    )
    out = run(cfg, only=["data"])["data"]
    meta = read_meta(out)
    assert meta["channels"] == 3 and meta["image_size"] == [16, 16]
    labels = np.asarray([meta["classes"].index(path.parent.name) for path in files])
    shuffled = cfg.data.format == "shards"  # shards are written in a seeded shuffled order
    where = split_indices(labels, cfg.data.val_fraction, cfg.data.test_fraction, cfg.seed, shuffled)  # each file

    torch.manual_seed(0)
    classifier = new_classifier(
        channels=3,
        augment=False,
        classes=meta["classes"],
        mean=meta["mean"],
        std=meta["std"],
        overrides=("data.image_size=16",),
    )
    with torch.no_grad():  # an untrained net answers near-uniformly: sharpen it so that small input changes show
        classifier.backbone[-1].weight.mul_(300)
    graph = trace(inference_module(classifier), load_split(out, "train")[0])

    tolerance, worst, skewed, checked = 1e-2, 0.0, 0.0, 0
    with torch.no_grad():
        for split in ("train", "val", "test"):
            images, stored = load_split(out, split)
            for sample, label, index in zip(images, stored.tolist(), where[split], strict=True):
                path = files[index]
                assert label == labels[index]
                original = graph(decode_image(path.read_bytes(), 10**8)[None])
                canonical = graph(sample[None])
                worst = max(worst, (original - canonical).abs().max().item())
                with Image.open(path) as img:  # the old data path: Pillow's own resize
                    pil = np.asarray(img.convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))
                resized = torch.from_numpy(pil.copy()).permute(2, 0, 1)[None]
                skewed = max(skewed, (original - graph(resized)).abs().max().item())
                checked += 1
    assert checked == len(files)
    assert worst < tolerance, worst  # only the rounding to uint8 differs
    assert skewed > tolerance, skewed  # the check sees a resize that is not the graph's own


def test_a_write_that_fails_midway_leaves_the_previous_dataset_intact(tmp_path, monkeypatch):
    """The disk fills up after the first split is written: the old dataset stays whole, no temp folder is left."""
    cfg = load_config([f"paths.data={tmp_path}/digits"])
    out = make_dataset(cfg)
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    real_save, calls = np.savez_compressed, []

    def save_then_fail(*args, **kwargs):
        calls.append(args[0])
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real_save(*args, **kwargs)

    monkeypatch.setattr(np, "savez_compressed", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        make_dataset(load_config([f"paths.data={tmp_path}/digits", "seed=1"]))  # other splits: other bytes
    assert len(calls) == 2  # one split was written when it failed
    after = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]
