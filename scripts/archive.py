"""Pack the exported model into model_store/<name>.mar: `python -m scripts.archive [Hydra overrides]`."""

import hydra
from omegaconf import DictConfig

from common.cli import one_line_errors
from training.archive import archive


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        archive(cfg)


if __name__ == "__main__":
    main()
