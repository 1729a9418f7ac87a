"""Pack the exported model into model_store/<name>.mar: `python -m scripts.archive [Hydra overrides]`.

The archive holds the TorchScript model (with its preprocessing), the handler and serving core,
index_to_name.json and a model-config.yaml built from the `serve:` config section.
"""

import json
import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import hydra
import yaml
from omegaconf import DictConfig, OmegaConf

from training.io import atomic_path

log = logging.getLogger(__name__)

HANDLERS = Path(__file__).resolve().parent.parent / "handlers"
HANDLER = HANDLERS / "handler.py"
EXTRA = [HANDLERS / "serving.py", HANDLERS / "drift.py"]


class ArchiveError(RuntimeError):
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


def read_manifest(mar: Path) -> dict:
    with zipfile.ZipFile(mar) as z:
        return json.loads(z.read("MAR-INF/MANIFEST.json"))


def check(mar: Path, name: str, version: str, expected: set[str]) -> dict:
    """The archive's manifest names this model and its handler; every expected file is inside."""
    manifest = read_manifest(mar)
    model = manifest.get("model", {})
    problems = []
    if (model.get("modelName"), model.get("modelVersion")) != (name, version):
        problems.append(f"manifest names {model.get('modelName')} {model.get('modelVersion')}")
    if model.get("handler") != HANDLER.name or model.get("serializedFile") != "model.pt":
        problems.append(f"manifest handler/model {model.get('handler')}/{model.get('serializedFile')}")
    with zipfile.ZipFile(mar) as z:
        missing = expected - set(z.namelist())
    if missing:
        problems.append(f"missing files {sorted(missing)}")
    if problems:
        raise ArchiveError(f"{mar}: " + "; ".join(problems))
    return manifest


def archive(cfg: DictConfig) -> Path:
    artifacts = Path(cfg.paths.artifacts)
    model, labels, reference = (artifacts / f for f in ("model.pt", "index_to_name.json", "drift_reference.json"))
    for path in (model, labels, reference):
        if not path.is_file():
            raise ArchiveError(f"{path} not found: run `python -m training.export` first")
    target = Path(cfg.paths.model_store) / f"{cfg.name}.mar"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "model-config.yaml"
        config.write_text(yaml.safe_dump(model_config(cfg), sort_keys=False))
        cmd = [
            sys.executable, "-m", "model_archiver.model_packaging",
            "--model-name", cfg.name,
            "--version", str(cfg.version),
            "--serialized-file", str(model),
            "--handler", str(HANDLER),
            "--extra-files", ",".join(str(p) for p in [labels, reference, *EXTRA]),
            "--config-file", str(config),
            "--export-path", tmp,
        ]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            raise ArchiveError(f"torch-model-archiver failed: {run.stderr.strip().splitlines()[-1:]}")
        built = Path(tmp) / f"{cfg.name}.mar"
        expected = {"model.pt", HANDLER.name, labels.name, reference.name, config.name, *(p.name for p in EXTRA)}
        check(built, cfg.name, str(cfg.version), expected)
        with atomic_path(target) as out:
            out.write_bytes(built.read_bytes())
    with zipfile.ZipFile(target) as z:
        for info in z.infolist():
            log.info("  %-28s %9d bytes", info.filename, info.file_size)
    log.info("wrote %s (%s v%s)", target, cfg.name, cfg.version)
    return target


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        archive(cfg)
    except ArchiveError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
