"""Vertex AI custom job entrypoint (the training image, Dockerfile target `train`).

    python -m scripts.vertex_train [Hydra overrides]    # e.g. model=resnet18 trainer.max_epochs=20

Runs data -> train -> export -> archive in one process with the project's own stage functions,
then copies the .mar, model.pt, index_to_name.json and metrics.json to OUTPUT_DIR, by default
the job's AIP_MODEL_DIR (gs://bucket/path, set by Vertex from baseOutputDirectory) read through
Vertex's Cloud Storage mount /gcs/bucket/path (GCS_MOUNT). Without either they stay local.
"""

import argparse
import logging
import os
import shutil
from pathlib import Path

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from training.io import atomic_path

log = logging.getLogger(__name__)


class JobError(ValueError):
    """The job's environment is wrong; the message says how."""


def output_dir(env: dict[str, str]) -> Path | None:
    """OUTPUT_DIR, else AIP_MODEL_DIR mapped from gs:// onto the GCS mount."""
    if env.get("OUTPUT_DIR"):
        return Path(env["OUTPUT_DIR"])
    model_dir = env.get("AIP_MODEL_DIR", "")
    if not model_dir:
        return None
    if not model_dir.startswith("gs://"):
        raise JobError(f"AIP_MODEL_DIR {model_dir!r} is not a gs:// URI")
    return Path(env.get("GCS_MOUNT", "/gcs")) / model_dir.removeprefix("gs://")


def run(overrides: list[str], env: dict[str, str]) -> list[Path]:
    """The pipeline, then the copies; returns the files written to the output folder."""
    from scripts.archive import archive
    from training.config import load_config
    from training.data import make_dataset
    from training.export import export
    from training.train import train

    out = output_dir(env)  # a bad AIP_MODEL_DIR fails before hours of training
    cfg = load_config(overrides)
    make_dataset(cfg)
    train(cfg)
    export(cfg)
    mar = archive(cfg)
    if out is None:
        log.warning("no OUTPUT_DIR or AIP_MODEL_DIR: the outputs stay in the container")
        return []
    artifacts = Path(cfg.paths.artifacts)
    written = []
    for src in (mar, artifacts / "model.pt", artifacts / "index_to_name.json", artifacts / "metrics.json"):
        with atomic_path(out / src.name) as tmp:
            shutil.copyfile(src, tmp)
        written.append(out / src.name)
    log.info("copied %s to %s", [p.name for p in written], out)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_epochs=20")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from scripts.archive import ArchiveError
    from training.data import DataError
    from training.export import ExportError

    try:
        run(args.overrides, dict(os.environ))
    except (JobError, DataError, ExportError, ArchiveError, HydraException, OmegaConfBaseException) as err:
        raise SystemExit("error: " + " ".join(str(err).split())) from None


if __name__ == "__main__":
    main()
