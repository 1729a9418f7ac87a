"""Pack the exported model into model_store/<name>.mar: `python -m scripts.archive [Hydra overrides]`.

Where torch sees a CUDA device and no `serve=` override is given, the archive carries the `serve=gpu` profile
(configs/serve/gpu.yaml); `serve=cpu` keeps the CPU one.
"""

import sys

import hydra
import torch
from omegaconf import DictConfig

from common.cli import one_line_errors
from training.archive import archive


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        archive(cfg)


if __name__ == "__main__":
    if torch.cuda.is_available() and not any(arg.startswith("serve=") for arg in sys.argv[1:]):
        print("a CUDA device is present: packing the serve=gpu settings (pass serve=cpu for the CPU ones)", flush=True)
        sys.argv.append("serve=gpu")
    main()
