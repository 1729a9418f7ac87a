"""The benchmark's models (the shipped archive and a heavier ResNet-18) and the archive variants it serves."""

import shutil
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from omegaconf import DictConfig

from common.cli import BundleError
from common.config import load_config
from common.io import atomic_path
from handlers import files
from loadtest.checks import encode
from training.archive import unpack
from training.pipeline import run

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
        mar = build_heavy(model_cfg, retrain) if key == HEAVY else Path(cfg.paths.model_store) / f"{cfg.name}.mar"
        if not mar.is_file():
            raise BenchError(f"no archive {mar}: run `make pipeline` first")
        models.append(Model(str(model_cfg.name), model_cfg, mar, images))
    return models


def build_heavy(cfg: DictConfig, retrain: bool) -> Path:
    """Train ResNet-18 once (the checkpoint stays in its artifacts folder), then export and archive it
    with the current code, handlers and `serve:` settings."""
    from training.train import CHECKPOINT  # imports Lightning: only when the heavy model is asked for

    trained = (Path(cfg.paths.artifacts) / CHECKPOINT).is_file() and not retrain
    stages = ["export", "archive"] if trained else ["train", "export", "archive"]
    log(f"{cfg.name}: {', '.join(stages)} into {cfg.paths.artifacts}")
    return run(cfg, only=stages)["archive"]


def load_images(cfg: DictConfig) -> list[bytes]:
    path = Path(cfg.paths.data) / "test.npz"
    if not path.is_file():
        raise BenchError(f"{path} not found: run `make pipeline` first")
    with np.load(path) as f:
        return [encode(image) for image in f["images"]]


def unpack_model(model: Model, folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    model.unpacked = unpack(model.mar, folder)


def rewrite_mar(src: Path, dst: Path, model_config: dict) -> Path:
    """The same archive (model, handler, labels, manifest) with another model-config.yaml."""
    with atomic_path(dst) as tmp, zipfile.ZipFile(src) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            if item.filename != files.MODEL_CONFIG:
                zout.writestr(item, zin.read(item.filename))
        zout.writestr(files.MODEL_CONFIG, yaml.safe_dump(model_config, sort_keys=False))
    return dst


def merge(base: dict, changes: dict) -> dict:
    out = dict(base)
    for key, value in changes.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def stock_model_config(shipped: dict, default_threads: int) -> dict:
    """TorchServe's defaults: no workers, batch or delay settings; torch's default thread count."""
    return {"handler": {**shipped.get("handler", {}), "threads": default_threads}}


def variant(model: Model, workdir: Path, label: str, model_config: dict) -> Path:
    """A store holding the model's archive with `model_config`; returns the store."""
    store = workdir / "stores" / label.replace(" ", "_").replace(":", "").replace("=", "_")
    rewrite_mar(model.mar, store / model.mar.name, model_config)
    return store
