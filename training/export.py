"""Export the best checkpoint: `python -m training.export [export.variant=int8] [Hydra overrides]`.

The graph is Kornia preprocessing + backbone + softmax. Input: uint8 RGB [B, 3, H, W] at any
H, W (what the handler decodes); output: class probabilities [B, classes]. Each file is checked
against the eager model before it is written (training/variants.py).
Writes to `paths.artifacts`: model.pt (portable TorchScript, what offline tools read), the file of
`export.variant` (what the archive ships), index_to_name.json and drift_reference.json (features of
the validation images and the model's answers on them, for drift tracking while serving).
"""

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from common.cli import BundleError, one_line_errors
from common.io import write_json
from handlers import files
from handlers.drift import Reference
from training import tracking, variants
from training.data import DataError, load_split
from training.model import Classifier
from training.train import CHECKPOINT
from training.variants import as_rgb

log = logging.getLogger(__name__)


class ExportError(BundleError):
    """The export cannot start: no checkpoint, or no such variant."""


def inference_module(classifier: Classifier) -> nn.Module:
    return nn.Sequential(classifier.preprocess, classifier.backbone, nn.Softmax(dim=1)).eval()


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
    shipped = cfg.export.variant
    if shipped not in files.VARIANTS:
        raise ExportError(f"unknown export.variant {shipped!r}: one of {', '.join(files.VARIANTS)}")
    classifier = Classifier.load_from_checkpoint(checkpoint, map_location="cpu")
    eager = inference_module(classifier)
    test = load_split(cfg.paths.data, "test")
    calibration, _ = load_split(cfg.paths.data, "train", limit=variants.CALIBRATION_IMAGES)
    written = []
    for name in dict.fromkeys(["torchscript", shipped]):  # the portable file, and the one the archive ships
        try:
            path, check = variants.export(name, eager, test, out, calibration)
        except variants.VariantError as err:
            others = ", ".join(v for v in files.VARIANTS if v != name)
            raise variants.VariantError(f"{err} (ship another with export.variant=<{others}>)") from err
        written.append(path)
        log.info("%s: max abs diff vs eager %.1e, agreement %.2f%%", name, check.max_abs_diff, 100 * check.agreement)
    classes = classifier.hparams.classes
    write_json(out / files.LABELS, {str(i): name for i, name in enumerate(classes)})
    write_json(out / files.REFERENCE, reference(eager, cfg.paths.data).to_json())
    tracking.attach(out, [*written, out / files.LABELS, out / files.REFERENCE])  # to the run lineage.json names
    return out / files.MODEL


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        export(cfg)


if __name__ == "__main__":
    main()
