"""Reading a model archive (.mar) as TorchServe does: its manifest, its model-config.yaml as a ModelConfig, its
files unpacked. training/archive.py packs archives; every other reader (servers, monitoring, bench, experiments)
uses this module. The names of the files inside are in handlers/files.py.
"""

import json
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from handlers import files

# model-config.yaml's keys (TorchServe's names) of the ModelConfig fields beside `workers` and `handler`
KEYS = {"batch_size": "batchSize", "max_batch_delay_ms": "maxBatchDelay", "response_timeout_s": "responseTimeout"}
AUTO = "auto"  # serve.workers: as many as the machine has cores (GPUs where TorchServe sees GPUs)


class BadArchive(ValueError):
    """The file is not a model archive, or lacks what was asked of it."""


def mar_file(name: str) -> str:
    """The archive's file name in a model store: what torch-model-archiver writes for --model-name."""
    return f"{name}.mar"


@dataclass(frozen=True)
class ModelConfig:
    """TorchServe's per-model settings and the handler's own `handler:` section (handlers.classifier.Settings).

    A field's default is TorchServe's own for a setting that model-config.yaml leaves out.
    """

    # minWorkers = maxWorkers; None: TorchServe's default_workers_per_model, which config.properties leaves unset, so
    # one per core the JVM sees (the container's CPU limit included), or one per GPU
    workers: int | None = None
    batch_size: int = 1
    max_batch_delay_ms: int = 100
    response_timeout_s: int = 120
    handler: dict = field(default_factory=dict)
    other: dict = field(default_factory=dict)  # TorchServe settings this bundle does not set, kept as written

    @classmethod
    def from_dict(cls, values: dict | None) -> "ModelConfig":
        values = dict(values or {})
        workers = values.pop("minWorkers", None)
        if values.get("maxWorkers", workers) == workers:  # a different maxWorkers stays in `other`
            values.pop("maxWorkers", None)
        typed = {name: int(values.pop(key)) for name, key in KEYS.items() if key in values}
        handler = values.pop("handler", None) or {}
        return cls(None if workers is None else int(workers), **typed, handler=handler, other=values)

    @classmethod
    def from_serve(cls, serve: dict) -> "ModelConfig":
        """From the `serve:` config section (configs/serve/<profile>.yaml) as a plain dict: what the archive packs."""
        timings = {name: serve[name] for name in KEYS}
        workers = serve["workers"]
        if workers != AUTO and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
            raise ValueError(f"serve.workers={workers}: a number of workers (1 or more) or {AUTO}")
        return cls(workers=None if workers == AUTO else workers, **timings, handler=dict(serve["handler"]))

    def to_dict(self) -> dict:
        """model-config.yaml's content, as TorchServe reads it."""
        out = {"minWorkers": self.workers, "maxWorkers": self.workers} if self.workers is not None else {}
        out |= {key: getattr(self, name) for name, key in KEYS.items()}
        return {**out, "handler": self.handler, **self.other}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def changed(self, **changes) -> "ModelConfig":
        """A copy with `changes`; a `handler` change is merged into the handler section."""
        handler = {**self.handler, **changes.pop("handler", {})}
        return replace(self, **changes, handler=handler)


@contextmanager
def opened(mar: Path | str) -> Iterator[zipfile.ZipFile]:
    """The archive as a zip file; what goes wrong reading it (not a zip, a file missing or unreadable) is a
    BadArchive."""
    try:
        with zipfile.ZipFile(mar) as z:
            yield z
    except (zipfile.BadZipFile, KeyError, ValueError, yaml.YAMLError) as err:
        raise BadArchive(f"{mar} is not a model archive ({type(err).__name__}: {err})") from None


def members(mar: Path | str) -> set[str]:
    with opened(mar) as z:
        return set(z.namelist())


def read_manifest(mar: Path | str) -> dict:
    """MAR-INF/MANIFEST.json: its "model" names the model, its version, handler and model file."""
    with opened(mar) as z:
        manifest = json.loads(z.read(files.MANIFEST))
        if missing := {"modelName", "serializedFile"} - set(manifest.get("model", {})):
            raise KeyError(f"its manifest lacks model.{min(missing)}")
        return manifest


def read_model_config(mar: Path | str) -> ModelConfig:
    with opened(mar) as z:
        return ModelConfig.from_dict(yaml.safe_load(z.read(files.MODEL_CONFIG)))


def read_lineage(mar: Path | str) -> dict | None:
    """The training run, data hash and git commit the archive's model comes from (None: an older archive)."""
    with opened(mar) as z:
        return json.loads(z.read(files.LINEAGE)) if files.LINEAGE in z.namelist() else None


def unpack(mar: Path | str, folder: Path | str) -> Path:
    """Extract the archive into `folder`: the layout a TorchServe worker sees as its model_dir."""
    with opened(mar) as z:
        z.extractall(folder)
    return Path(folder)


def repack(mar: Path | str, out: Path | str, config: ModelConfig) -> Path:
    """The same archive (model, handler, labels, manifest) written to `out` with another model-config.yaml."""
    with opened(mar) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            if item.filename != files.MODEL_CONFIG:
                zout.writestr(item, zin.read(item.filename))
        zout.writestr(files.MODEL_CONFIG, config.to_yaml())
    return Path(out)
