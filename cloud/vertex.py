"""The Vertex AI custom job (the training image's entrypoint, `python -m scripts.vertex_train`).

Runs the pipeline's stages in one process (training.pipeline: data -> train -> export -> archive),
then copies the .mar, the model, the label map, the lineage and the training metrics (and the local
tracking store runs/, unless MLFLOW_TRACKING_URI names a team server) to OUTPUT_DIR, by default
the job's AIP_MODEL_DIR (gs://bucket/path, set by Vertex from baseOutputDirectory) read through
Vertex's Cloud Storage mount /gcs/bucket/path (GCS_MOUNT). Without either they stay local.

Several replicas (a chief and workers, `scripts.deploy train --replicas N`): cloud/cluster.py maps Vertex's
CLUSTER_SPEC to Lightning's DDP variables and `trainer.num_nodes`; every replica prepares the data and trains,
only the chief (rank 0) exports, archives and copies. Sharded data can stay in the bucket:
`paths.data=/gcs/<bucket>/<folder>` reads the shards through the mount, without copying them first.
"""

import logging
import os
import shutil
from pathlib import Path

from cloud.cluster import lightning_env
from common.cli import BundleError
from common.config import load_config
from common.io import atomic_dir, atomic_path
from handlers import files
from training import pipeline
from training.train import METRICS

log = logging.getLogger(__name__)


class JobError(BundleError):
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


def join_cluster(env: dict[str, str], overrides: list[str]) -> tuple[dict[str, str], list[str]]:
    """Several replicas: export Lightning's DDP variables into this process, add trainer.num_nodes (one
    process per machine); return them and the overrides. One replica: nothing changes."""
    cluster = lightning_env(env)
    if not cluster:
        return {}, list(overrides)
    os.environ.update(cluster)
    log.info("replica %s of %s, chief %s", cluster["NODE_RANK"], cluster["WORLD_SIZE"], cluster["MASTER_ADDR"])
    return cluster, [*overrides, f"trainer.num_nodes={cluster['WORLD_SIZE']}", "trainer.devices=1"]


def run(overrides: list[str], env: dict[str, str]) -> list[Path]:
    """The pipeline, then the copies; returns the files written to the output folder."""
    out = output_dir(env)  # a bad AIP_MODEL_DIR fails before hours of training
    cluster, overrides = join_cluster(env, overrides)
    cfg = load_config(overrides)
    if cluster and cluster["NODE_RANK"] != "0":  # a worker: train with the others; the chief does the rest
        pipeline.run(cfg, only=["data", "train"])
        return []
    mar = pipeline.run(cfg)["archive"]
    if out is None:
        log.warning("no OUTPUT_DIR or AIP_MODEL_DIR: the outputs stay in the container")
        return []
    artifacts = Path(cfg.paths.artifacts)
    written = []
    for src in (mar, *(artifacts / name for name in (files.MODEL, files.LABELS, files.LINEAGE, METRICS))):
        with atomic_path(out / src.name) as tmp:
            shutil.copyfile(src, tmp)
        written.append(out / src.name)
    runs = Path(cfg.paths.runs)
    if runs.is_dir() and not env.get("MLFLOW_TRACKING_URI"):  # a local store ends with the container
        with atomic_dir(out / runs.name) as tmp:
            shutil.copytree(runs, tmp, dirs_exist_ok=True)
        written.append(out / runs.name)
    log.info("copied %s to %s", [p.name for p in written], out)
    return written
