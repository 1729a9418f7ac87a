"""Shared fixtures: one small real pipeline (data -> train -> export -> archive) per test session,
built with the project's own Hydra config and code, in a temporary directory."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.archive import archive
from scripts.serve import TorchServe
from training.config import load_config
from training.data import load_split, make_dataset
from training.export import export, inference_module
from training.model import Classifier
from training.train import train

EPOCHS = 10


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="session")
def cfg(workspace: Path):
    return load_config(
        [
            f"paths.data={workspace}/data",
            f"paths.artifacts={workspace}/artifacts",
            f"paths.model_store={workspace}/model_store",
            f"trainer.max_epochs={EPOCHS}",
            "trainer.enable_progress_bar=false",
        ]
    )


@pytest.fixture(scope="session")
def dataset(cfg) -> Path:
    return make_dataset(cfg)


@pytest.fixture(scope="session")
def metrics(cfg, dataset) -> dict:
    return train(cfg)


@pytest.fixture(scope="session")
def model_file(cfg, metrics) -> Path:
    return export(cfg)


@pytest.fixture(scope="session")
def eager(cfg, metrics) -> torch.nn.Module:
    """The trained model as the export sees it: uint8 RGB in, probabilities out."""
    classifier = Classifier.load_from_checkpoint(Path(cfg.paths.artifacts) / "model.ckpt", map_location="cpu")
    return inference_module(classifier)


@pytest.fixture(scope="session")
def mar(cfg, model_file) -> Path:
    return archive(cfg)


@pytest.fixture(scope="session")
def test_split(cfg, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return load_split(cfg.paths.data, "test")


@pytest.fixture(scope="session")
def server(cfg, mar, workspace):
    """A real TorchServe on free loopback ports, serving the session's archive; always stopped."""
    ts = TorchServe(mar.parent, {cfg.name: mar.name}, workspace / "torchserve", ports={})  # all free
    with ts:
        ts.wait_ready(timeout=180)
        yield ts


def png(image: np.ndarray | torch.Tensor, fmt: str = "PNG", scale: int = 1, **save) -> bytes:
    """uint8 [C, H, W] -> encoded image bytes, optionally upscaled (nearest) by `scale`."""
    array = np.asarray(image)
    pil = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    if scale != 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **save)
    return buf.getvalue()
