import json
from pathlib import Path

import pytest
import torch

from handlers import files
from training import variants
from training.export import ExportError, export, inference_module
from training.model import Classifier
from training.train import CHECKPOINT
from training.variants import VariantError, as_rgb, check_fp32, device_bound, trace


def test_export_writes_a_verified_portable_graph(cfg, model_file, eager, test_split):
    assert model_file.name == files.MODEL
    scripted = torch.jit.load(str(model_file))
    assert device_bound(scripted) == []
    images, _ = test_split
    for batch in (images[:1], images[:7], images[:32]):
        got, want = scripted(as_rgb(batch)), eager(as_rgb(batch))
        assert (got - want).abs().max() <= 1e-5
        assert torch.equal(got.argmax(1), want.argmax(1))
        assert torch.allclose(got.sum(1), torch.ones(len(batch)), atol=1e-5)
    labels = json.loads((model_file.parent / files.LABELS).read_text())
    assert labels == {str(i): str(i) for i in range(10)}
    assert (model_file.parent / files.VARIANTS[cfg.export.variant]).is_file()  # what the archive ships


def test_graph_handles_any_input_size(model_file, eager, test_split):
    scripted = torch.jit.load(str(model_file))
    images = as_rgb(test_split[0][:5])
    for size in [(8, 8), (13, 21), (64, 64)]:
        resized = torch.nn.functional.interpolate(images.float(), size=size).to(torch.uint8)
        assert torch.allclose(scripted(resized), eager(resized), atol=1e-5)


def test_check_fails_when_graph_and_eager_disagree(cfg, eager, test_split, metrics):
    scripted = trace(eager, test_split[0])
    other = Classifier.load_from_checkpoint(Path(cfg.paths.artifacts) / CHECKPOINT, map_location="cpu")
    with torch.no_grad():
        for p in other.backbone.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    with pytest.raises(VariantError, match="differs from eager"):
        check_fp32(scripted, inference_module(other), test_split[0])


def test_an_unknown_variant_fails_before_writing(cfg, metrics, tmp_path):
    from omegaconf import OmegaConf

    bad = OmegaConf.merge(cfg, {"export": {"variant": "tensorrt"}, "paths": {"artifacts": str(tmp_path)}})
    (tmp_path / CHECKPOINT).symlink_to(Path(cfg.paths.artifacts) / CHECKPOINT)
    with pytest.raises(ExportError, match="unknown export.variant 'tensorrt'"):
        export(bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]


def test_tensor_constants_are_detected():
    class Baked(torch.nn.Module):
        def forward(self, x):
            return x * torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)

    scripted = torch.jit.trace(Baked(), torch.ones(1, 3, 2, 2))
    assert device_bound(scripted)


def test_resnet18_exports_and_verifies(new_classifier, test_split):
    eager = inference_module(new_classifier("resnet18", 1, augment=False))
    images = test_split[0][:32]
    scripted = trace(eager, images)
    assert device_bound(scripted) == []
    assert check_fp32(scripted, eager, images).max_abs_diff <= variants.FP32_TOLERANCE
