"""What tests send and read: encoded images, one HTTP helper for every server they start (TorchServe, the container),
a load of several keep-alive clients, and the metric lines a handler logged."""

import base64
import http.client
import io
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image

from common.config import ROOT
from common.images import to_pil
from servers.process import free_port
from servers.torchserve import find_java_home


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
    pil = to_pil(image)
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


@dataclass
class Answer:
    sent: float  # time.monotonic() when the request went out
    done: float  # and when its answer (or error) came back
    status: int | str  # the HTTP status, or the error when there was no HTTP answer
    body: dict
    index: int  # which of the bodies was sent


@contextmanager
def streaming(url: str, headers: dict, bodies: list[bytes], clients: int, timeout=60) -> Iterator[list[Answer]]:
    """`clients` threads, each on its own keep-alive connection, POST the image/png `bodies` in turn while the block
    runs; leaving it stops new requests and waits for those in flight. Yields the answers, filled as they come."""
    parts = urlparse(url)
    stop, answers = threading.Event(), []

    def client(k: int) -> None:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        i = k
        while not stop.is_set():
            sent = time.monotonic()
            try:
                conn.request("POST", parts.path, bodies[i % len(bodies)], {"Content-Type": "image/png", **headers})
                response = conn.getresponse()
                status, body = response.status, parsed(response.read())
            except (OSError, http.client.HTTPException) as err:  # reset, refused, cut, timed out: no HTTP answer
                status, body = repr(err), {}
                conn.close()  # the next request opens a new connection
            answers.append(Answer(sent, time.monotonic(), status, body, i % len(bodies)))
            i += clients
        conn.close()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    try:
        yield answers
    finally:
        stop.set()
        for thread in threads:
            thread.join()


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


def metric_lines(caplog) -> list[str]:
    """The metric lines TorchServe's metric cache logged (the handler's and its own), as the frontend reads them."""
    return [r.getMessage() for r in caplog.records if "[METRICS]" in r.getMessage()]


def metric_name(line: str) -> str:
    return line.split("[METRICS]")[1].split(".")[0]


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with one tiny compressed row: a decompression bomb."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b"")


def hostile_corpus(digit: Image.Image, max_pixels: int) -> list[tuple[str, object, int]]:
    """(name, payload, expected status) for a handler refusing images over `max_pixels`.

    Payload: bytes as sent raw, or parsed JSON as TorchServe hands it (None is JSON's null)."""
    gray = np.asarray(digit)[None]
    rgb = np.asarray(digit.convert("RGB")).transpose(2, 0, 1)
    good, jpeg = png(gray), png(rgb, "JPEG")
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 8] = b"\xff" * 8
    b64 = base64.b64encode(good).decode()
    side = math.isqrt(max_pixels) + 1  # side * side is just over the limit
    return [
        ("empty body", b"", 400),
        ("one byte", b"\x00", 415),
        ("plain text", b"hello, I am not an image", 415),
        ("html page", b"<html><body>hi</body></html>", 415),
        ("svg image", b'<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8"/>', 415),
        ("pdf document", b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", 415),
        ("png signature only", b"\x89PNG\r\n\x1a\n", 415),
        ("png truncated in the header", good[:20], 400),
        ("png truncated in the data", good[: len(good) // 2], 400),
        ("png with corrupt data", bytes(corrupt), 400),
        ("jpeg truncated", jpeg[: len(jpeg) // 2], 400),
        ("tiff (unsupported format)", png(gray, "TIFF"), 415),
        ("ico (unsupported format)", png(rgb, "ICO"), 415),
        ("decompression bomb 100000x100000", png_header(100_000, 100_000), 413),
        (f"over the pixel limit {side}x{side}", png_header(side, side), 413),
        ("json that does not parse", b'{"data": "abc', 400),
        ("json list", [1, 2, 3], 400),
        ("json number", 42, 400),
        ("json without data or instances", {"image": b64}, 400),
        ("data not a string", {"data": 123}, 400),
        ("data not base64", {"data": "***not base64***"}, 400),
        ("data is base64 of text", {"data": base64.b64encode(b"just text").decode()}, 415),
        ("instances not a list", {"instances": {"b64": b64}}, 400),
        ("instances empty", {"instances": []}, 400),
        ("instance without b64", {"instances": [{"bytes": b64}]}, 400),
        ("one bad instance among good ones", {"instances": [{"b64": b64}, {"b64": "!!"}]}, 400),
        ("null body", None, 400),
    ]


def rendered_settings(folder: Path) -> Path:
    """docker/settings.py run as the Dockerfile's settings stage runs it: <folder>/serve/<profile>.yaml."""
    out = folder / "serve"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "settings.py"), str(out)], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    return out


def container_on_host(folder: Path, model_name: str) -> tuple[Path, dict[str, str], dict[str, int]]:
    """The image's /opt/ts laid out on this host (docker/entrypoint.sh and its files, the rendered profiles), and
    the environment that runs the entrypoint there on free loopback ports: (TS_DIR, environment, ports)."""
    ts_dir = folder / "opt_ts"
    (ts_dir / "model-store").mkdir(parents=True)
    for src in ("entrypoint.sh", "pick_profile.py", "config.properties", "log4j2.xml"):
        shutil.copy2(ROOT / "docker" / src, ts_dir)
    shutil.copy2(ROOT / "metrics.yaml", ts_dir)
    shutil.copy2(ROOT / "servers" / "drain.py", ts_dir)
    shutil.copytree(rendered_settings(folder), ts_dir / "serve")
    ports = {key: free_port() for key in ("PORT", "MANAGEMENT_PORT", "METRICS_PORT", "WORKER_PORT")}
    ports |= {key: free_port() for key in ("GRPC_INFERENCE_PORT", "GRPC_MANAGEMENT_PORT")}
    path = os.pathsep.join([str(Path(sys.executable).parent), str(Path(find_java_home()) / "bin"), os.environ["PATH"]])
    env = {**os.environ, **{k: str(v) for k, v in ports.items()}, "PATH": path, "BIND": "127.0.0.1"}
    return ts_dir, env | {"TS_DIR": str(ts_dir), "MODEL_NAME": model_name, "TMPDIR": str(folder)}, ports
