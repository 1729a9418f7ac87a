"""Pack the exported model into <model_store>/<name>.mar (handlers/archive.py reads archives back).

The archive holds the model file of `export.variant` (with its preprocessing; the one CPU workers run), the portable
model.pt for workers given a GPU where that variant runs on CPUs only (`archive.gpu_file`), handler.py at its root (what
TorchServe loads) with the `handlers/` package it imports, the label map, the drift reference,
the lineage (training run, data hash, git commit) and a model-config.yaml built from the `serve:` config
section. It refuses a model whose run it cannot identify unless `archive.require_lineage=false`.
`archive.from_alias=champion` packs the files of the MLflow registry version that alias names (training/registry.py)
instead of `paths.artifacts`.
"""

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from common.cli import BundleError
from common.config import ROOT
from common.io import atomic_path, write_json
from handlers import files
from handlers.archive import ModelConfig, mar_file, read_manifest
from training import lineage, registry

log = logging.getLogger(__name__)

HANDLERS = ROOT / "handlers"
HANDLER = HANDLERS / "handler.py"


class ArchiveError(BundleError):
    pass


def model_config(cfg: DictConfig) -> ModelConfig:
    """TorchServe's per-model settings; the handler reads its own `handler:` section."""
    try:
        return ModelConfig.from_serve(OmegaConf.to_container(cfg.serve, resolve=True))
    except ValueError as err:
        raise ArchiveError(str(err)) from None


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
    """Pack `paths.artifacts`, or with `archive.from_alias` the registry version that alias names."""
    variant = cfg.export.variant
    if variant not in files.VARIANTS:
        raise ArchiveError(f"unknown export.variant {variant!r}: one of {', '.join(files.VARIANTS)}")
    alias = cfg.archive.get("from_alias")
    if not alias:
        return pack(cfg, Path(cfg.paths.artifacts))
    if cfg.logger.kind != "mlflow":
        raise ArchiveError(f"archive.from_alias needs logger=mlflow: logger={cfg.logger.kind} has no model registry")
    names = [files.VARIANTS[variant], files.LABELS, files.REFERENCE, files.MODEL]
    with tempfile.TemporaryDirectory() as tmp:
        registry.fetch(cfg.logger.tracking_uri, cfg.name, alias, names, tmp)
        return pack(cfg, Path(tmp))


def pack(cfg: DictConfig, artifacts: Path) -> Path:
    """Build the archive in a temporary folder, check it, then replace the old one."""
    variant = cfg.export.variant
    if cfg.serve.max_batch_delay_ms < 1:
        raise ArchiveError(
            f"serve.max_batch_delay_ms={cfg.serve.max_batch_delay_ms}: use 1 or more "
            f"(TorchServe reads 0 as unset and waits its default {ModelConfig.max_batch_delay_ms} ms for every batch)"
        )
    settings = model_config(cfg)
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
    target = Path(cfg.paths.model_store) / mar_file(cfg.name)
    with tempfile.TemporaryDirectory() as tmp:
        extra = Path(tmp) / "extra"  # its contents land at the archive's root
        (extra / HANDLERS.name).mkdir(parents=True)
        for src in handler_files():
            shutil.copy2(ROOT / src, extra / src)
        for src in (labels, reference, *gpu):
            shutil.copy2(src, extra / src.name)
        write_json(extra / files.LINEAGE, record)
        config = Path(tmp) / files.MODEL_CONFIG
        config.write_text(settings.to_yaml())
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
        built = Path(tmp) / mar_file(cfg.name)
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
