"""Pack the exported model into <model_store>/<name>.mar, and read archives back.

The archive holds the model file of `export.variant` (with its preprocessing; the one CPU workers run), the portable
model.pt for workers given a GPU where that variant runs on CPUs only (`archive.gpu_file`), handler.py at its root (what
TorchServe loads) with the `handlers/` package it imports, the label map, the drift reference,
the lineage (training run, data hash, git commit) and a model-config.yaml built from the `serve:` config
section. It refuses a model whose run it cannot identify unless `archive.require_lineage=false`.
"""

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from common.cli import BundleError
from common.config import ROOT
from common.io import atomic_path, write_json
from experiments import lineage
from handlers import files

log = logging.getLogger(__name__)

HANDLERS = ROOT / "handlers"
HANDLER = HANDLERS / "handler.py"


class ArchiveError(BundleError):
    pass


def model_config(cfg: DictConfig) -> dict:
    """TorchServe's per-model settings; the handler reads its own `handler:` section."""
    serve = cfg.serve
    return {
        "minWorkers": serve.workers,
        "maxWorkers": serve.workers,
        "batchSize": serve.batch_size,
        "maxBatchDelay": serve.max_batch_delay_ms,
        "responseTimeout": serve.response_timeout_s,
        "handler": OmegaConf.to_container(serve.handler, resolve=True),
    }


def read_manifest(mar: Path | str) -> dict:
    with zipfile.ZipFile(mar) as z:
        return json.loads(z.read(files.MANIFEST))


def read_model_config(mar: Path | str) -> dict:
    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read(files.MODEL_CONFIG))


def read_lineage(mar: Path | str) -> dict | None:
    """The training run, data hash and git commit the archive's model comes from (None: an older archive)."""
    with zipfile.ZipFile(mar) as z:
        return json.loads(z.read(files.LINEAGE)) if files.LINEAGE in z.namelist() else None


def unpack(mar: Path | str, folder: Path | str) -> Path:
    """Extract the archive into `folder`: the layout a TorchServe worker sees as its model_dir."""
    with zipfile.ZipFile(mar) as z:
        z.extractall(folder)
    return Path(folder)


def handler_files() -> list[Path]:
    """The handlers package as it is packed: its Python files, relative to the repository root."""
    return sorted(p.relative_to(ROOT) for p in HANDLERS.glob("*.py"))


def check(mar: Path, name: str, version: str, model_file: str, expected: set[str]) -> dict:
    """The archive's manifest names this model and its handler; every expected file is inside."""
    manifest = read_manifest(mar)
    model = manifest.get("model", {})
    problems = []
    if (model.get("modelName"), model.get("modelVersion")) != (name, version):
        problems.append(f"manifest names {model.get('modelName')} {model.get('modelVersion')}")
    if model.get("handler") != HANDLER.name or model.get("serializedFile") != model_file:
        problems.append(f"manifest handler/model {model.get('handler')}/{model.get('serializedFile')}")
    with zipfile.ZipFile(mar) as z:
        missing = expected - set(z.namelist())
    if missing:
        problems.append(f"missing files {sorted(missing)}")
    if problems:
        raise ArchiveError(f"{mar}: " + "; ".join(problems))
    return manifest


def archive(cfg: DictConfig) -> Path:
    """Build the archive in a temporary folder, check it, then replace the old one."""
    artifacts = Path(cfg.paths.artifacts)
    variant = cfg.export.variant
    if variant not in files.VARIANTS:
        raise ArchiveError(f"unknown export.variant {variant!r}: one of {', '.join(files.VARIANTS)}")
    if cfg.serve.max_batch_delay_ms < 1:
        raise ArchiveError(
            f"serve.max_batch_delay_ms={cfg.serve.max_batch_delay_ms}: use 1 or more "
            "(TorchServe reads 0 as unset and waits its default 100 ms for every batch)"
        )
    model, labels, reference = (artifacts / f for f in (files.VARIANTS[variant], files.LABELS, files.REFERENCE))
    gpu = [artifacts / files.MODEL] if cfg.archive.gpu_file and "cuda" not in files.REGISTRY[variant].devices else []
    for path in (model, labels, reference, *gpu):
        if not path.is_file():
            raise ArchiveError(f"{path} not found: run `python -m training.export export.variant={variant}` first")
    record = lineage.read(artifacts)
    if found := lineage.problems(record):
        if cfg.archive.require_lineage:  # configs/config.yaml
            raise ArchiveError(
                f"cannot identify the run that trained {model}: {'; '.join(found)} "
                "(retrain with a logger, or pass archive.require_lineage=false)"
            )
        log.warning("packing %s without a full lineage: %s", model, "; ".join(found))
        record = {**(record or {}), "problems": found}
    target = Path(cfg.paths.model_store) / f"{cfg.name}.mar"
    with tempfile.TemporaryDirectory() as tmp:
        extra = Path(tmp) / "extra"  # its contents land at the archive's root
        (extra / HANDLERS.name).mkdir(parents=True)
        for src in handler_files():
            shutil.copy2(ROOT / src, extra / src)
        for src in (labels, reference, *gpu):
            shutil.copy2(src, extra / src.name)
        write_json(extra / files.LINEAGE, record)
        config = Path(tmp) / files.MODEL_CONFIG
        config.write_text(yaml.safe_dump(model_config(cfg), sort_keys=False))
        cmd = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", cfg.name,
            "--version", str(cfg.version),
            "--serialized-file", str(model),
            "--handler", str(HANDLER),
            "--extra-files", str(extra),
            "--config-file", str(config),
            "--export-path", tmp,
        ]  # fmt: skip
        # the archiver stages in <temp dir>/<model name>, deleting it first: a private temp dir keeps two builds
        # at once (two checkouts, CI runs side by side) from deleting each other's files
        run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TMPDIR": tmp})
        if run.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed: {run.stderr.strip().splitlines()[-1:]}")
        built = Path(tmp) / f"{cfg.name}.mar"
        expected = {model.name, HANDLER.name, labels.name, reference.name, files.LINEAGE, config.name}
        expected |= {path.name for path in gpu}
        expected |= set(map(str, handler_files()))
        check(built, cfg.name, str(cfg.version), model.name, expected)
        with atomic_path(target) as out:
            shutil.copyfile(built, out)
    with zipfile.ZipFile(target) as z:
        for info in z.infolist():
            log.info("  %-28s %9d bytes", info.filename, info.file_size)
    log.info("wrote %s (%s v%s)", target, cfg.name, cfg.version)
    return target
