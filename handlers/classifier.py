"""The serving core: a batch of requests -> decode -> predict -> track drift -> encode answers.

No TorchServe import: handler.py adapts it to TorchServe, and tests, benchmarks and the offline
drift report call it directly. The model file holds the preprocessing (Kornia), so this module
only hands it uint8 RGB images and formats the answer.
"""

import importlib.util
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from handlers import files, runtime
from handlers.decode import InputError, decode_batch
from handlers.drift import DriftMonitor, Reference, features

log = logging.getLogger(__name__)


class SettingsError(ValueError):
    """The archive's `handler:` section is missing a setting or has an unknown one."""


@dataclass
class Settings:
    """The `handler:` section of the archive's model-config.yaml (written from configs/config.yaml's `serve:`)."""

    top_k: int
    max_pixels: int
    threads: int
    drift: dict
    device: str = "cpu"

    @classmethod
    def from_dict(cls, values: dict | None) -> "Settings":
        values = dict(values or {})
        fields = cls.__dataclass_fields__
        if missing := [k for k in fields if k not in values and k != "device"]:
            raise SettingsError(f"the archive's handler settings lack {missing}: rebuild it with `make archive`")
        if unknown := set(values) - set(fields):
            raise SettingsError(f"unknown handler settings {sorted(unknown)}: known are {sorted(fields)}")
        return cls(**values)


@dataclass
class Result:
    """One request's answer: an HTTP status, a JSON-able body, and its images' class probabilities [images, classes]
    (unrounded, every class: for callers that answer in another form than the body)."""

    status: int
    body: dict = field(default_factory=dict)
    probs: torch.Tensor | None = None


@dataclass
class Decoded:
    """The images of a batch of requests, which request owns each image, and the requests refused."""

    images: list[torch.Tensor] = field(default_factory=list)
    owners: list[int] = field(default_factory=list)
    listed: set[int] = field(default_factory=set)  # requests that asked for {"instances": [...]}
    errors: dict[int, InputError] = field(default_factory=dict)


@dataclass
class Batch:
    """What one call did: the answers, and the timings and top predictions that metrics report."""

    results: list[Result]
    decode_ms: float = 0.0
    inference_ms: float = 0.0
    drift_ms: float = 0.0
    top: list[tuple[str, float]] = field(default_factory=list)  # (label, probability) per answered image


def pick(model_dir: Path, shipped: str, device: str) -> tuple[Path, torch.device, str]:
    """The model file a worker given `device` runs and the device it runs on, with why when that is not `device`:
    the shipped file where its variant runs there, else the portable model.pt where the archive has it."""
    device, cpu = torch.device(device), torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        return (
            model_dir / shipped,
            cpu,
            f"given {device}, but torch {torch.__version__} sees no CUDA device: serving on cpu",
        )
    variant = runtime.variant(model_dir / shipped)
    name = files.for_device(variant, device.type)
    if name == variant:
        return model_dir / shipped, device, ""
    portable = model_dir / files.MODEL
    if name == files.PORTABLE and portable.is_file():
        return portable, device, ""
    why = f"given {device}, but {shipped} ({variant}) runs on {'/'.join(files.REGISTRY[variant].devices)} only"
    return model_dir / shipped, cpu, f"{why} and the archive has no {files.MODEL} (archive.gpu_file): serving on cpu"


def labels_in(model_dir: Path) -> list[str]:
    index = json.loads((model_dir / files.LABELS).read_text())
    return [index[str(i)] for i in range(len(index))]


class ImageClassifier:
    """Loads the exported model once (any variant: handlers/runtime.py); answers batches of requests."""

    def __init__(
        self,
        model_path: Path | str,
        labels: list[str],
        settings: Settings,
        name: str = "",
        version: str = "",
        reference: Reference | None = None,
        lineage: dict | None = None,
        note: str = "",
    ) -> None:
        self.settings, self.labels, self.name, self.version = settings, labels, name, version
        self.lineage = lineage or {"status": f"no {files.LINEAGE} in the archive"}  # run, data hash, git commit
        self.model = runtime.load(model_path, settings.device)
        self.file, self.note = Path(model_path).name, note  # note: why the device is not the one the worker was given
        self.jpeg_device = None  # where nvJPEG decodes JPEG batches: a GPU worker's device, where torchvision is
        if self.model.device.type == "cuda":
            if importlib.util.find_spec("torchvision"):
                self.jpeg_device = self.model.device
            else:
                self.note = "torchvision is not installed: JPEGs decode on the CPU with Pillow"
        self.top_k = max(1, min(settings.top_k, len(labels)))
        drift = settings.drift
        self.drift = DriftMonitor(reference, drift["window"], drift["min_samples"]) if reference else None

    @classmethod
    def from_dir(
        cls, model_dir: Path | str, settings: Settings, name: str = "", version: str = "", model_file: str = ""
    ) -> "ImageClassifier":
        """The model, labels, drift reference and lineage as an archive (or the export) lays them out in `model_dir`.

        The model file: `model_file`, else the one the archive's manifest names, else the portable model.pt; on a
        GPU, the portable model.pt where that file runs on CPUs only (`pick`).
        """
        model_dir = Path(model_dir)
        manifest = model_dir / files.MANIFEST
        if not model_file and manifest.is_file():
            model_file = json.loads(manifest.read_text())["model"]["serializedFile"]
        ref, origin = model_dir / files.REFERENCE, model_dir / files.LINEAGE
        reference = Reference.load(ref) if ref.is_file() else None
        lineage = json.loads(origin.read_text()) if origin.is_file() else None
        path, device, note = pick(model_dir, model_file or files.MODEL, settings.device)
        settings = replace(settings, device=str(device))
        return cls(path, labels_in(model_dir), settings, name, version, reference, lineage, note)

    def served(self) -> dict:
        """What this worker actually runs: the file, its variant, the device and the precision there."""
        model = self.model
        found = {"file": self.file, "variant": model.variant, "device": str(model.device), "precision": model.precision}
        found["decoder"] = f"nvjpeg on {self.jpeg_device}" if self.jpeg_device else "pillow on cpu"
        return {**found, "note": self.note} if self.note else found

    def drift_summary(self) -> dict:
        """This worker's drift scores against the archive's reference, and which are over the threshold."""
        if self.drift is None:
            return {"status": "no reference in the archive"}
        threshold = self.settings.drift["threshold"]
        found = self.drift.scores()
        summary = {"window": len(self.drift), "threshold": threshold, "scores": found}
        if found is None:
            return {**summary, "status": f"collecting: fewer than {self.drift.min_samples} images"}
        drifted = sorted(name for name, score in found.items() if score > threshold)
        return {**summary, "drifted": drifted, "status": "drift" if drifted else "ok"}

    def warm_up(self) -> None:
        self.predict([torch.zeros(3, 32, 32, dtype=torch.uint8)])

    def decode(self, payloads: list[object]) -> Decoded:
        """Every request's images; a bad request is recorded with its error and the others go on."""
        out = Decoded()
        for r, found in enumerate(decode_batch(payloads, self.settings.max_pixels, self.jpeg_device)):
            if isinstance(found, InputError):
                out.errors[r] = found
                continue
            images, many = found
            if many:
                out.listed.add(r)
            out.images += images
            out.owners += [r] * len(images)
        return out

    def predict(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Class probabilities [N, classes]; images of one size run as one batch."""
        by_size: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(tuple(img.shape), []).append(i)
        device = self.model.device  # on a GPU, JPEGs are there already and other formats go there
        with torch.inference_mode():
            if len(by_size) == 1:  # the usual batch: one forward, nothing to put back in order
                return self.model(torch.stack([img.to(device) for img in images])).float().cpu()
            probs = torch.empty(len(images), len(self.labels))
            for idx in by_size.values():
                probs[idx] = self.model(torch.stack([images[i].to(device) for i in idx])).float().cpu()
        return probs

    def track(self, images: list[torch.Tensor], probs: torch.Tensor) -> None:
        """Add what was served to the drift window."""
        if self.drift is not None and images:
            top = probs.max(dim=1)
            self.drift.add(features(images), top.indices.tolist(), top.values.tolist())

    def answer(self, probs: torch.Tensor) -> dict:
        """One image's answer: its top label and probability, and the top-k classes.

        Equal probabilities (int8 models make exact ties) rank the lower class index first, as argmax does.
        """
        values, indices = probs.sort(descending=True, stable=True)
        classes = [
            {"label": self.labels[i], "index": i, "probability": round(p, 6)}
            for p, i in zip(values[: self.top_k].tolist(), indices[: self.top_k].tolist(), strict=True)
        ]
        return {"label": classes[0]["label"], "probability": classes[0]["probability"], "top_k": classes}

    def encode(self, n: int, decoded: Decoded, answers: list[dict], probs: torch.Tensor | None = None) -> list[Result]:
        """One Result per request: its error, its answer, or its list of answers (with their rows of `probs`)."""
        rows: dict[int, list[int]] = {}
        for i, owner in enumerate(decoded.owners):
            rows.setdefault(owner, []).append(i)
        results = []
        for r in range(n):
            if r in decoded.errors:
                err = decoded.errors[r]
                results.append(Result(err.status, {"error": str(err), "status": err.status}))
                continue
            body = {"model": self.name, "version": self.version}
            if r in decoded.listed:
                body["predictions"] = [answers[i] for i in rows.get(r, [])]
            else:
                body.update(answers[rows[r][0]])
            results.append(Result(200, body, None if probs is None else probs[rows.get(r, [])]))
        return results

    def run(self, payloads: list[object]) -> Batch:
        """Answer a batch of requests; a bad request fails alone, the rest of the batch is answered."""
        start = time.perf_counter()
        decoded = self.decode(payloads)
        decoded_at = time.perf_counter()
        probs = self.predict(decoded.images)
        inferred_at = time.perf_counter()
        self.track(decoded.images, probs)
        tracked_at = time.perf_counter()
        answers = [self.answer(p) for p in probs]
        return Batch(
            results=self.encode(len(payloads), decoded, answers, probs),
            decode_ms=(decoded_at - start) * 1e3,
            inference_ms=(inferred_at - decoded_at) * 1e3,
            drift_ms=(tracked_at - inferred_at) * 1e3,
            top=[(a["label"], a["probability"]) for a in answers],
        )

    def handle(self, payloads: list[object]) -> list[Result]:
        return self.run(payloads).results
