"""What tests send: encoded images, and one HTTP helper for every server they start (TorchServe, the container)."""

import http.client
import io
import json
import math
import urllib.error
import urllib.request
import uuid
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image


def call(url: str, body: bytes | None = None, headers: dict | None = None, method: str | None = None, timeout=30):
    """(status, raw body) of one request; HTTP errors are answers too."""
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def parsed(raw: bytes) -> dict:
    """A JSON body, or {"raw": text} when the server answered something else."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {"raw": raw.decode(errors="replace")}


def post(base: str, model: str, data: bytes, content_type: str, headers: dict | None = None) -> tuple[int, dict]:
    """POST /predictions/<model> with this content type; (status, parsed body)."""
    status, raw = call(f"{base}/predictions/{model}", data, {"Content-Type": content_type, **(headers or {})})
    return status, parsed(raw)


def png(image: np.ndarray | torch.Tensor, fmt: str = "PNG", scale: int = 1, **save) -> bytes:
    """uint8 [C, H, W] -> encoded image bytes, optionally upscaled (nearest) by `scale`."""
    array = np.asarray(image)
    pil = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    if scale != 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format=fmt, **save)
    return buf.getvalue()


def send(url: str, method: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    """One request with exactly these headers (urllib adds a Content-Type; curl -T sends a PUT without one)."""
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(method, parts.path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, parsed(response.read())
    finally:
        conn.close()


def multipart(field: str, filename: str, data: bytes, content_type: str) -> tuple[bytes, str]:
    """A multipart/form-data body with one file field (curl -F field=@file), and its Content-Type."""
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    )
    return head.encode() + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def close(a: object, b: object, tol: float = 1e-4) -> bool:
    """Two JSON answers agree: the same keys, labels, indices and statuses; floats (probabilities) within `tol`."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b, rel_tol=0, abs_tol=tol)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b, strict=True))
    return a == b
