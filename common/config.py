"""Loads the Hydra config for code that is not a Hydra entry point (scripts, servers, tests)."""

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = ROOT / "configs"


def load_config(overrides: list[str] | None = None, config_name: str = "config") -> DictConfig:
    """Compose configs/<config_name>.yaml (the root config by default) with command-line style overrides."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [])
