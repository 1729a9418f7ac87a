"""The benchmark's models (the shipped archive and a heavier ResNet-18) and the archive variants it serves."""

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig

from common.cli import BundleError
from common.config import load_config
from common.images import encode
from common.io import atomic_path
from handlers.archive import ModelConfig, mar_file, repack, unpack
from training.data import load_split
from training.pipeline import run
from training.train import CHECKPOINT

HEAVY = "resnet18"  # --models key of the second model (bench.heavy in configs/loadtest.yaml)


class BenchError(BundleError):
    """The benchmark cannot run; the message says what to do."""


@dataclass
class Model:
    key: str  # its name: the report's section and plot
    cfg: DictConfig
    mar: Path
    images: list[bytes] = field(default_factory=list)  # the test set, PNG-encoded: what every request sends
    unpacked: Path | None = None  # the archive as a worker sees it: what the in-process measurement loads

    @property
    def name(self) -> str:
        return str(self.cfg.name)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare(cfg: DictConfig, overrides: list[str], keys: list[str], retrain: bool) -> list[Model]:
    """The models named by `keys`: the default config's archive (`make pipeline`), and the heavy one."""
    models = []
    for key in keys:
        model_cfg = load_config([*overrides, *map(str, cfg.bench.heavy)], "loadtest") if key == HEAVY else cfg
        images = load_images(model_cfg)
        mar = build_heavy(model_cfg, retrain) if key == HEAVY else Path(cfg.paths.model_store) / mar_file(cfg.name)
        if not mar.is_file():
            raise BenchError(f"no archive {mar}: run `make pipeline` first")
        models.append(Model(str(model_cfg.name), model_cfg, mar, images))
    return models


def build_heavy(cfg: DictConfig, retrain: bool) -> Path:
    """Train ResNet-18 once (the checkpoint stays in its artifacts folder), then export and archive it
    with the current code, handlers and `serve:` settings."""
    trained = (Path(cfg.paths.artifacts) / CHECKPOINT).is_file() and not retrain
    stages = ["export", "archive"] if trained else ["train", "export", "archive"]
    log(f"{cfg.name}: {', '.join(stages)} into {cfg.paths.artifacts}")
    return run(cfg, only=stages)["archive"]


def load_images(cfg: DictConfig) -> list[bytes]:
    """The test split (npz or shards), PNG-encoded."""
    images, _ = load_split(cfg.paths.data, "test")
    return [encode(image) for image in images]


def unpack_model(model: Model, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    model.unpacked = unpack(model.mar, folder)


def stock_model_config(shipped: ModelConfig, default_threads: int) -> ModelConfig:
    """TorchServe's defaults for workers, batch and delay; torch's default thread count."""
    return ModelConfig(handler={**shipped.handler, "threads": default_threads})


def variant(model: Model, workdir: Path, label: str, config: ModelConfig) -> Path:
    """A store holding the model's archive with `config` as its model-config.yaml; returns the store."""
    store = workdir / "stores" / label.replace(" ", "_").replace(":", "").replace("=", "_")
    with atomic_path(store / model.mar.name) as tmp:
        repack(model.mar, tmp, config)
    return store
