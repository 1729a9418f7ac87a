"""Pick the serving profile at container start and lay the archive out with its TorchServe settings.

    python pick_profile.py MAR MODEL_DIR --settings DIR --properties FILE

The profile is gpu where a GPU is visible (`nvidia-smi -L` lists one, or /dev/nvidia<N> exists), else cpu;
SERVE_PROFILE=cpu|gpu forces one. The archive is unpacked into MODEL_DIR (TorchServe serves a model folder as
it serves a .mar) with the profile's TorchServe keys (DIR/<profile>.yaml, rendered from configs/serve/ at build
time by docker/settings.py) over those of its model-config.yaml: TorchServe takes a model's workers and batch
settings from the archive before config.properties. `number_of_gpu` (the GPUs seen for gpu, 0 for cpu) is
appended to FILE. One line says what was picked and why. Standard library and PyYAML: the image's own Python.
"""

import argparse
import glob
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

MODEL_CONFIG = "model-config.yaml"
PROFILES = ("cpu", "gpu")
WORKERS = ("minWorkers", "maxWorkers")  # a profile without them (workers: auto) leaves TorchServe a worker per core


def visible_gpus() -> tuple[int, str]:
    """(how many NVIDIA GPUs this container sees, how that was found)."""
    try:
        run = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        listed = [line for line in run.stdout.splitlines() if line.startswith("GPU ")]
        if run.returncode == 0 and listed:
            return len(listed), "nvidia-smi -L"
    except (OSError, subprocess.TimeoutExpired):
        pass
    nodes = [path for path in glob.glob("/dev/nvidia*") if re.fullmatch(r"/dev/nvidia\d+", path)]
    return len(nodes), ("/dev/nvidia<N>" if nodes else "no nvidia-smi -L, no /dev/nvidia<N>")


def pick(requested: str, gpus: int) -> str:
    if requested == "auto":
        return "gpu" if gpus else "cpu"
    if requested not in PROFILES:
        raise ValueError(f"SERVE_PROFILE={requested!r}: one of auto, {', '.join(PROFILES)}")
    return requested


def lay_out(mar: Path, model_dir: Path, settings: dict) -> dict:
    """Unpack the archive into model_dir with `settings` over its model-config.yaml; return the result."""
    with zipfile.ZipFile(mar) as z:
        z.extractall(model_dir)
    config_path = model_dir / MODEL_CONFIG
    config = (yaml.safe_load(config_path.read_text()) if config_path.is_file() else None) or {}
    config = {key: value for key, value in config.items() if key not in WORKERS} | settings
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mar", type=Path, help="the archive, MODEL_STORE/MODEL_NAME.mar")
    parser.add_argument("model_dir", type=Path, help="folder to unpack it into (TorchServe's model store/MODEL_NAME)")
    parser.add_argument("--settings", type=Path, required=True, help="folder of <profile>.yaml (docker/settings.py)")
    parser.add_argument("--properties", type=Path, required=True, help="config.properties to append number_of_gpu to")
    args = parser.parse_args(argv)
    gpus, found = visible_gpus()
    try:
        profile = pick(os.environ.get("SERVE_PROFILE", "auto"), gpus)
    except ValueError as err:
        sys.exit(f"entrypoint: error: {err}")
    config = lay_out(args.mar, args.model_dir, yaml.safe_load((args.settings / f"{profile}.yaml").read_text()))
    number_of_gpu = gpus if profile == "gpu" else 0
    with open(args.properties, "a") as out:
        out.write(f"number_of_gpu={number_of_gpu}\n")
    why = "SERVE_PROFILE" if "SERVE_PROFILE" in os.environ else "auto"
    workers = f"{config['minWorkers']} worker(s)" if "minWorkers" in config else "a worker per core"
    print(
        f"entrypoint: serving profile {profile} ({why}; {gpus} GPU(s) visible: {found}): "
        f"{workers}, batch {config['batchSize']}, max batch delay {config['maxBatchDelay']} ms, "
        f"number_of_gpu={number_of_gpu} (configs/serve/{profile}.yaml)",
        flush=True,
    )


if __name__ == "__main__":
    main()
