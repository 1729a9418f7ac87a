"""Export variants: each is checked before it is written, loaded by the right runtime, served by a real TorchServe."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from bench import variants as bench_variants
from handlers import files, runtime
from handlers.archive import read_manifest
from servers.torchserve import TorchServe
from tests import client
from training import variants
from training.archive import archive
from training.data import load_split
from training.train import CHECKPOINT

FP32 = ("torchscript", "torchscript-frozen", "aoti")
SERVED = [*FP32, "int8"]


@pytest.fixture(scope="module")
def variant_dir(cfg, eager, test_split, model_file, tmp_path_factory) -> Path:
    """Every variant the tests serve, with the files an archive needs beside it. The shipped variant is the
    session export's own file (checked when it was written); the others are built here."""
    folder = tmp_path_factory.mktemp("variants")
    artifacts = Path(cfg.paths.artifacts)
    for name in (files.LABELS, files.REFERENCE, files.LINEAGE, files.VARIANTS[cfg.export.variant]):
        shutil.copy2(artifacts / name, folder / name)
    calibration, _ = load_split(cfg.paths.data, "train", limit=variants.CALIBRATION_IMAGES)
    for name in SERVED:
        if not (folder / files.VARIANTS[name]).is_file():
            variants.export(name, eager, test_split, folder, calibration)
    return folder


@pytest.mark.parametrize("name", FP32)
def test_each_variant_matches_eager_at_any_size_through_its_runtime(name, variant_dir, eager, test_split):
    model = runtime.load(variant_dir / files.VARIANTS[name])
    assert model.variant == name and model.device.type == "cpu"
    images = variants.as_rgb(test_split[0][:9])
    for batch in (images[:1], images, variants.upscaled(images[:3], 5)[:, :, 2:, 1:]):  # odd sizes, a strided view
        got, want = variants.run(model, batch), variants.run(eager, batch)
        assert (got - want).abs().max().item() <= variants.FP32_TOLERANCE
        assert torch.equal(got.argmax(1), want.argmax(1))


def test_a_broken_variant_is_refused_and_nothing_is_written(eager, test_split, tmp_path, monkeypatch):
    target = tmp_path / files.VARIANTS["torchscript-frozen"]
    target.write_bytes(b"the previous file")

    def off_by_a_little(module, images, path):  # a variant that gets the numbers slightly wrong
        class Shifted(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = module

            def forward(self, x):
                return self.inner(x) * 0.99

        torch.jit.save(torch.jit.freeze(variants.trace(Shifted().eval(), images)), str(path))

    monkeypatch.setitem(variants.BUILDERS, "torchscript-frozen", off_by_a_little)
    with pytest.raises(variants.VariantError, match=r"variant torchscript-frozen refused: .*max abs diff"):
        variants.export("torchscript-frozen", eager, test_split, tmp_path)
    assert target.read_bytes() == b"the previous file"
    assert [p.name for p in tmp_path.iterdir()] == [target.name]


def test_an_exporter_failure_is_one_clear_error(eager, test_split, tmp_path, monkeypatch):
    def cannot(module, images, path):
        raise RuntimeError("Unsupported operator aten::frobnicate\nstack trace ...")

    monkeypatch.setitem(variants.BUILDERS, "onnx", cannot)
    with pytest.raises(variants.VariantError, match=r"^variant onnx failed: RuntimeError: Unsupported operator"):
        variants.export("onnx", eager, test_split, tmp_path)
    with pytest.raises(variants.VariantError, match="unknown export variant 'tensorrt'"):
        variants.export("tensorrt", eager, test_split, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_int8_is_quantized_and_keeps_agreement_and_accuracy(variant_dir, eager, test_split):
    model = runtime.load(variant_dir / files.VARIANTS["int8"])
    assert model.variant == "int8" and model.device.type == "cpu"
    ops = {node.kind() for node in model.forward.inlined_graph.nodes()}
    assert any(op.startswith("quantized::conv") for op in ops), sorted(ops)
    images, labels = test_split
    check = variants.check_int8(model, eager, images, labels)
    assert check.agreement >= variants.INT8_AGREEMENT
    assert check.accuracy >= check.eager_accuracy - variants.INT8_ACCURACY_DROP


def test_int8_check_refuses_a_model_that_disagrees(eager, test_split):
    images, labels = test_split
    same = variants.check_int8(eager, eager, images, labels)
    assert same.agreement == 1.0 and same.accuracy == same.eager_accuracy > 0.9
    with pytest.raises(variants.VariantError, match=r"agreement with eager \d+\.\d+% \(limit 99%\)"):
        variants.check_int8(lambda x: eager(x).roll(1, dims=1), eager, images, labels)


def test_runtime_refuses_a_file_it_does_not_know(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(runtime.LoadError, match="no runtime for '.bin'"):
        runtime.load(tmp_path / "model.bin")


@pytest.mark.server
def test_every_variant_is_served_by_torchserve_from_its_archive(cfg, variant_dir, eager, test_split, tmp_path):
    """One real TorchServe, one archive per variant; each answers as its own file does offline."""
    images = variants.as_rgb(test_split[0][:4])
    mars, offline = {}, {}
    for name in SERVED:
        variant_cfg = OmegaConf.merge(
            cfg,
            {
                "name": f"digits_{name.replace('-', '_')}",
                "export": {"variant": name},
                "paths": {"artifacts": str(variant_dir), "model_store": str(tmp_path / "store")},
            },
        )
        mar = archive(variant_cfg)
        assert read_manifest(mar)["model"]["serializedFile"] == files.VARIANTS[name]
        mars[variant_cfg.name] = mar.name
        with torch.inference_mode():
            offline[variant_cfg.name] = runtime.load(variant_dir / files.VARIANTS[name])(images)
    with TorchServe(tmp_path / "store", mars, tmp_path / "ts", ports={}) as ts:
        ts.wait_ready(timeout=300)
        for model in mars:
            for image, probs in zip(images, offline[model], strict=True):
                status, body = client.post(
                    ts.url("inference"), model, client.png(image.numpy()), "image/png", ts.headers()
                )
                assert status == 200, (model, body)
                assert body["label"] == str(probs.argmax().item()), model
                assert body["probability"] == pytest.approx(probs.max().item(), abs=1e-4), model


def test_variants_report_rows_are_complete(cfg, model_file, tmp_path):
    """make variants on two quick variants: every row has every column, the table and plot are written."""
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / CHECKPOINT).symlink_to(Path(cfg.paths.artifacts) / CHECKPOINT)
    for name in (files.LABELS, files.REFERENCE):
        shutil.copy2(Path(cfg.paths.artifacts) / name, artifacts / name)
    quick = OmegaConf.merge(cfg, {"paths": {"artifacts": str(artifacts)}})
    names = ["torchscript", "torchscript-frozen"]
    rows = bench_variants.measure(quick, names, seconds=0.2, serve_seconds=2, connections=2)
    folder = bench_variants.report(quick, rows, tmp_path / "report", bench_variants.context("test", 2, 2))
    written = json.loads((folder / "variants.json").read_text())
    assert [row["variant"] for row in written["rows"]] == names
    for row in written["rows"]:
        assert row["status"] == "ok"
        for key in ("path", "format", "bytes", "load_s", "accuracy", "agreement", "max_abs_diff"):
            assert row[key] is not None, key
        assert row["accuracy"] > 0.9 and row["agreement"] == 1.0
        assert all(row[f"images_s_batch{b}"] > 0 for b in bench_variants.BATCHES)
        assert row["served"]["rps"] > 0 and row["served"]["errors"] == 0
    text = (folder / "README.md").read_text()
    assert all(f"| {name} |" in text for name in names)
    assert (folder / "variants.png").stat().st_size > 0
