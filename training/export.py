"""Export the best checkpoint to TorchScript: `python -m training.export [Hydra overrides]`.

The graph is Kornia preprocessing + backbone + softmax. Input: uint8 RGB [B, 3, H, W] at any
H, W (what the handler decodes); output: class probabilities [B, classes]. The file is checked
against the eager model before it is written, and carries no device-bound constants.
Writes to `paths.artifacts`: model.pt, index_to_name.json and drift_reference.json (features of
the validation images and the model's answers on them, for drift tracking while serving).
"""

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from common.cli import BundleError, one_line_errors
from common.io import atomic_path, write_json
from experiments import tracking
from handlers import files
from handlers.drift import Reference
from training.data import DataError, load_split
from training.model import Classifier
from training.train import CHECKPOINT

log = logging.getLogger(__name__)

BATCH_SIZES = (1, 7, 32)
TOLERANCE = 1e-5


class ExportError(BundleError):
    """The TorchScript graph does not reproduce the eager model."""


def inference_module(classifier: Classifier) -> nn.Module:
    return nn.Sequential(classifier.preprocess, classifier.backbone, nn.Softmax(dim=1)).eval()


def as_rgb(images: Tensor) -> Tensor:
    """The handler always hands the graph 3-channel RGB; gray images become three equal channels."""
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


def trace(module: nn.Module, images: Tensor) -> torch.jit.ScriptModule:
    """Trace at a size the model does not use, so no input-size shortcut is baked into the graph."""
    example = as_rgb(images[:2]).repeat_interleave(3, dim=2).repeat_interleave(3, dim=3)
    with torch.no_grad():
        return torch.jit.trace(module, example)


def tensor_constants(scripted: torch.jit.ScriptModule) -> list[str]:
    """Non-scalar tensors baked into the graph: they stay on the device the trace ran on.

    0-dim constants (e.g. the 255 in x / 255) are fine: PyTorch mixes CPU scalars with any device.
    """
    return [
        str(node).strip()
        for node in scripted.inlined_graph.nodes()
        if node.kind() == "prim::Constant" and node.output().type().kind() == "TensorType" and node.t("value").dim() > 0
    ]


def verify(scripted: nn.Module, eager: nn.Module, images: Tensor) -> float:
    """Compare graph and eager model at several batch and image sizes; return the max abs difference."""
    worst = 0.0
    cases = [images[:n] for n in BATCH_SIZES]
    cases.append(images[:7].repeat_interleave(4, dim=2).repeat_interleave(4, dim=3))  # a larger upload
    with torch.no_grad():
        for batch in cases:
            batch = as_rgb(batch)
            got, want = scripted(batch), eager(batch)
            diff = (got - want).abs().max().item()
            if diff > TOLERANCE or not torch.equal(got.argmax(1), want.argmax(1)):
                raise ExportError(
                    f"TorchScript differs from eager on input {tuple(batch.shape)}: "
                    f"max abs diff {diff:.2e} (limit {TOLERANCE:.0e}) or a different argmax"
                )
            worst = max(worst, diff)
    return worst


def reference(eager: nn.Module, data_dir: str) -> Reference:
    """What served traffic should look like: the held-out validation images and the answers on them."""
    images, _ = load_split(data_dir, "val")
    rgb = as_rgb(images)
    with torch.no_grad():
        probs = torch.cat([eager(batch) for batch in rgb.split(256)])
    return Reference.build(list(rgb), probs)


def export(cfg: DictConfig) -> Path:
    out = Path(cfg.paths.artifacts)
    checkpoint = out / CHECKPOINT
    if not checkpoint.is_file():
        raise DataError(f"no checkpoint at {checkpoint}: run `python -m training.train` first")
    classifier = Classifier.load_from_checkpoint(checkpoint, map_location="cpu")
    eager = inference_module(classifier)
    images, _ = load_split(cfg.paths.data, "test")
    if len(images) < max(BATCH_SIZES):
        images = images.repeat((max(BATCH_SIZES) + len(images) - 1) // len(images), 1, 1, 1)
    scripted = trace(eager, images)
    if constants := tensor_constants(scripted):
        raise ExportError(f"graph holds device-bound tensor constants: {constants[:3]}")
    diff = verify(scripted, eager, images)
    with atomic_path(out / files.MODEL) as tmp:
        torch.jit.save(scripted, str(tmp))
    classes = classifier.hparams.classes
    write_json(out / files.LABELS, {str(i): name for i, name in enumerate(classes)})
    write_json(out / files.REFERENCE, reference(eager, cfg.paths.data).to_json())
    log.info("wrote %s (max abs diff vs eager %.1e at batch sizes %s)", out / files.MODEL, diff, BATCH_SIZES)
    tracking.attach(out, [out / files.MODEL])  # to the training run that lineage.json names
    return out / files.MODEL


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        export(cfg)


if __name__ == "__main__":
    main()
