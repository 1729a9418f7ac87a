"""Render TorchServe's settings of every serving profile (configs/serve/<profile>.yaml) for the image.

    PYTHONPATH=. python docker/settings.py OUT    # OUT/cpu.yaml, OUT/gpu.yaml, ...

Each file holds the TorchServe keys of the model-config.yaml that `make archive serve=<profile>` would pack
(handlers.archive.ModelConfig.from_serve: workers, batch size, batch delay, response timeout), without the handler's
own section, which stays the archive's. The Dockerfile's `settings` stage runs this at build time;
docker/pick_profile.py applies one file at container start.
"""

import argparse
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from common.config import CONFIG_DIR, load_config
from handlers.archive import ModelConfig


def profiles() -> list[str]:
    return sorted(path.stem for path in (CONFIG_DIR / "serve").glob("*.yaml"))


def torchserve_settings(profile: str) -> dict:
    serve = OmegaConf.to_container(load_config([f"serve={profile}"]).serve, resolve=True)
    settings = ModelConfig.from_serve(serve).to_dict()
    settings.pop("handler")
    return settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for <profile>.yaml")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for profile in profiles():
        settings = torchserve_settings(profile)
        (args.out / f"{profile}.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        print(f"settings: {profile}: {settings}")


if __name__ == "__main__":
    main()
