"""Serving core: request payload -> decoded image -> TorchScript model -> top-k JSON.

No TorchServe import: the TorchServe handler (handler.py) is a thin adapter over this module,
and tests and benchmarks use it directly. The model file holds the preprocessing (Kornia),
so this module only decodes images to uint8 RGB tensors and formats the answer.
"""

import base64
import binascii
import io
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from drift import DriftMonitor, Reference, features
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

FORMATS = {"PNG", "JPEG", "BMP", "GIF", "WEBP"}


class InputError(ValueError):
    """A request the model cannot answer; `status` is the HTTP code to send back."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Settings:
    """The `handler:` section of the archive's model-config.yaml."""

    top_k: int = 3
    max_pixels: int = 16_000_000
    threads: int = 1
    device: str = "cpu"
    drift: dict = field(default_factory=lambda: {"window": 500, "min_samples": 50, "threshold": 0.3})

    @classmethod
    def from_dict(cls, values: dict | None) -> "Settings":
        known = {k: v for k, v in (values or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)


@dataclass
class Result:
    """One request's answer: an HTTP status and a JSON-able body."""

    status: int
    body: dict = field(default_factory=dict)


def decode_image(data: bytes, max_pixels: int) -> torch.Tensor:
    """Image bytes -> uint8 RGB tensor [3, H, W]; the size is checked before the pixels are decoded."""
    if not data:
        raise InputError("empty body: send an image")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputError(f"not an image, or not one of {sorted(FORMATS)}", 415) from None
    except Image.DecompressionBombError as err:
        raise InputError(f"image over the pixel limit: {err}", 413) from None
    except Exception as err:  # a malformed header can raise anything inside PIL's parsers
        raise InputError(f"cannot read the image header: {err}") from None
    if img.format not in FORMATS:
        raise InputError(f"unsupported image format {img.format}: send one of {sorted(FORMATS)}", 415)
    width, height = img.size
    if width * height > max_pixels:
        raise InputError(f"image is {width}x{height} pixels, over the limit of {max_pixels}", 413)
    try:
        img = ImageOps.exif_transpose(img)  # also decodes the first frame of an animation
        if img.mode.startswith("I"):  # 16-bit gray: keep the high byte; PIL's convert would clip at 255
            img = Image.fromarray((np.asarray(img, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8))
        rgb = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError as err:
        raise InputError(f"image over the pixel limit: {err}", 413) from None
    except Exception as err:  # truncated or corrupt data: OSError, ValueError, SyntaxError, ...
        raise InputError(f"corrupt or truncated {img.format} image: {err}") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1)


def images_in(payload: object) -> tuple[list[bytes], bool]:
    """The images in one request, and whether it asked for a list of predictions.

    Raw image bytes, or JSON (parsed by TorchServe, or still bytes from a multipart field):
    {"data": "<base64>"} or {"instances": [{"b64": "<base64>"}, ...]}.
    """
    if isinstance(payload, (bytes, bytearray)):
        if payload[:1] in (b"{", b"["):
            try:
                payload = json.loads(payload)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise InputError("body starts like JSON but is not valid JSON") from None
        else:
            return [bytes(payload)], False
    if isinstance(payload, str):
        return [_b64(payload)], False
    if isinstance(payload, dict):
        if "instances" in payload:
            instances = payload["instances"]
            if not isinstance(instances, list) or not instances:
                raise InputError('"instances" must be a non-empty list of {"b64": "..."}')
            return [_b64(i.get("b64") if isinstance(i, dict) else i) for i in instances], True
        if "data" in payload:
            return [_b64(payload["data"])], False
    raise InputError('JSON body must be {"data": "<base64>"} or {"instances": [{"b64": "<base64>"}, ...]}')


def _b64(value: object) -> bytes:
    """Standard base64; line breaks and a data-URI prefix ("data:image/png;base64,") are accepted."""
    if not isinstance(value, str):
        raise InputError("expected a base64 string")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError("invalid base64") from None


@dataclass
class Batch:
    """What the last `handle` call did, for metrics."""

    decode_ms: float = 0.0
    inference_ms: float = 0.0
    drift_ms: float = 0.0
    top: list[tuple[str, float]] = field(default_factory=list)  # (label, probability) per answered image


class ImageClassifier:
    """Loads the TorchScript model once; answers batches of requests."""

    def __init__(
        self,
        model_path: Path | str,
        labels: list[str],
        settings: Settings,
        name: str = "",
        version: str = "",
        reference: Reference | None = None,
    ) -> None:
        self.settings, self.labels, self.name, self.version = settings, labels, name, version
        self.device = torch.device(settings.device)
        torch.set_num_threads(settings.threads)
        self.model = torch.jit.load(str(model_path), map_location=self.device).eval()
        self.top_k = max(1, min(settings.top_k, len(labels)))
        self.last_batch = Batch()
        drift = settings.drift
        self.drift = DriftMonitor(reference, drift["window"], drift["min_samples"]) if reference else None

    @classmethod
    def from_dir(
        cls, model_dir: Path | str, model_file: str, settings: Settings, name: str = "", version: str = ""
    ) -> "ImageClassifier":
        model_dir = Path(model_dir)
        index = json.loads((model_dir / "index_to_name.json").read_text())
        labels = [index[str(i)] for i in range(len(index))]
        ref = model_dir / "drift_reference.json"
        reference = Reference.load(ref) if ref.is_file() else None
        return cls(model_dir / model_file, labels, settings, name, version, reference)

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

    def predict(self, images: list[torch.Tensor]) -> torch.Tensor:
        """Class probabilities [N, classes]; images of one size run as one batch."""
        probs = torch.empty(len(images), len(self.labels))
        by_size: dict[tuple, list[int]] = {}
        for i, img in enumerate(images):
            by_size.setdefault(tuple(img.shape), []).append(i)
        with torch.inference_mode():
            for idx in by_size.values():
                batch = torch.stack([images[i] for i in idx]).to(self.device)
                probs[idx] = self.model(batch).float().cpu()
        return probs

    def answer(self, probs: torch.Tensor) -> dict:
        top = probs.topk(self.top_k)
        classes = [
            {"label": self.labels[i], "index": i, "probability": round(p, 6)}
            for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)
        ]
        return {"label": classes[0]["label"], "probability": classes[0]["probability"], "top_k": classes}

    def handle(self, payloads: list[object]) -> list[Result]:
        """One Result per request; a bad request fails alone, the rest of the batch is answered."""
        start = time.perf_counter()
        results: list[Result | None] = [None] * len(payloads)
        images, owners, listed = [], [], set()
        for r, payload in enumerate(payloads):
            try:
                blobs, many = images_in(payload)
                decoded = [decode_image(b, self.settings.max_pixels) for b in blobs]
            except InputError as err:
                results[r] = Result(err.status, {"error": str(err), "status": err.status})
                continue
            if many:
                listed.add(r)
            images += decoded
            owners += [r] * len(decoded)
        decoded_at = time.perf_counter()
        probs = self.predict(images) if images else torch.empty(0, len(self.labels))
        inferred_at = time.perf_counter()
        if self.drift is not None and images:
            top = probs.max(dim=1)
            self.drift.add(features(images), top.indices.tolist(), top.values.tolist())
        tracked_at = time.perf_counter()
        answers: dict[int, list[dict]] = {}
        for owner, p in zip(owners, probs, strict=True):
            answers.setdefault(owner, []).append(self.answer(p))
        self.last_batch = Batch(
            decode_ms=(decoded_at - start) * 1e3,
            inference_ms=(inferred_at - decoded_at) * 1e3,
            drift_ms=(tracked_at - inferred_at) * 1e3,
            top=[(a["label"], a["probability"]) for found in answers.values() for a in found],
        )
        for r, found in answers.items():
            body = {"model": self.name, "version": self.version}
            if r in listed:
                body["predictions"] = found
            else:
                body.update(found[0])
            results[r] = Result(200, body)
        return results
