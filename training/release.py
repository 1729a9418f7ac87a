"""A release: a new version of the model, trained, exported and archived into a folder of its own
(`<rollout.folder>/<name>-<version>/`), so that the tracked pipeline outputs `make serve` serves stay as they are;
and the held-out images its rollout gate sends (servers/rollout.py).
"""

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from common.cli import BundleError
from common.images import encode
from training.data import load_split
from training.pipeline import run


def folder(cfg: DictConfig) -> Path:
    return Path(cfg.rollout.folder) / f"{cfg.name}-{cfg.version}"


def release_config(cfg: DictConfig) -> DictConfig:
    """`cfg` with its artifacts and model store in the release's own folder."""
    out = folder(cfg)
    release = OmegaConf.merge(cfg, {"paths": {"artifacts": str(out), "model_store": str(out)}})
    OmegaConf.set_readonly(release, OmegaConf.is_readonly(cfg))
    return release


def build(cfg: DictConfig) -> Path:
    """Train, export and archive `cfg` into its release folder (the data stage is not run: it is shared); returns
    the archive. With the MLflow logger the run is a new registry version (training/tracking.py)."""
    if not (Path(cfg.paths.data) / "meta.json").is_file():
        raise BundleError(f"no dataset in {cfg.paths.data}: run `make pipeline` (or `make serve`) first")
    return run(release_config(cfg), only=["train", "export", "archive"])["archive"]


def held_out(cfg: DictConfig, count: int) -> list[bytes]:
    """The first `count` test images, as PNG files."""
    images, _ = load_split(cfg.paths.data, "test", limit=count)
    return [encode(image.numpy()) for image in images]
