"""A plain FastAPI app over the serving core (handlers.classifier): the benchmark's peer, one uvicorn process
per core there (`workers`).

It answers POST /predictions/<model> like TorchServe does (same classifier, same JSON, a bearer token,
one request per forward pass) and GET /ping. `FastAPIPeer` runs it under uvicorn as a child process.
"""

import json
import os
import secrets
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

from common.config import ROOT
from handlers.classifier import ImageClassifier, Settings
from servers.process import Process, free_port
from training.archive import read_manifest, read_model_config, unpack

MAR, MODEL_DIR, TOKEN = "FASTAPI_MAR", "FASTAPI_MODEL_DIR", "FASTAPI_TOKEN"  # what the app reads


def load_classifier(mar: Path | str, model_dir: Path | str) -> ImageClassifier:
    """The archive's classifier as a TorchServe worker loads it from `model_dir` (the unpacked archive):
    settings from its model-config.yaml, name, version and model file from its manifest."""
    model = read_manifest(mar)["model"]
    settings = Settings.from_dict(read_model_config(mar).get("handler"))
    name, version = model["modelName"], model.get("modelVersion", "")
    return ImageClassifier.from_dir(model_dir, settings, name, version, model["serializedFile"])


def tcp_nodelay_everywhere() -> None:
    """uvicorn --workers binds its socket itself with protocol number 0, and asyncio sets TCP_NODELAY only on
    sockets whose protocol is TCP: every answer then waited ~40 ms for a delayed ACK (p50 52 ms at one
    connection vs 2.9 ms with one process). Set it on every TCP stream, as a single uvicorn process has it."""
    import asyncio.base_events

    def nodelay(sock: socket.socket) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    asyncio.base_events._set_nodelay = nodelay


def app():
    """The app (uvicorn --factory): the classifier of $FASTAPI_MAR, unpacked in $FASTAPI_MODEL_DIR."""
    import torch
    from fastapi import FastAPI, Request, Response

    tcp_nodelay_everywhere()

    classifier = load_classifier(os.environ[MAR], os.environ[MODEL_DIR])
    torch.set_num_threads(classifier.settings.threads)  # as the TorchServe handler does
    classifier.warm_up()
    expected = f"Bearer {os.environ[TOKEN]}"
    api = FastAPI()

    def error(status: int, message: str) -> Response:
        body = json.dumps({"error": message, "status": status})
        return Response(body, status_code=status, media_type="application/json")

    @api.get("/ping")
    async def ping(request: Request) -> Response:
        if request.headers.get("authorization") != expected:
            return error(400, "missing or wrong token")
        return Response(json.dumps({"status": "Healthy"}), media_type="application/json")

    @api.post("/predictions/{name}")
    async def predict(name: str, request: Request) -> Response:
        if request.headers.get("authorization") != expected:
            return error(400, "missing or wrong token")
        if name != classifier.name:
            return error(404, f"no model {name}")
        result = classifier.handle([await request.body()])[0]
        return Response(json.dumps(result.body), status_code=result.status, media_type="application/json")

    return api


class FastAPIPeer(Process):
    """uvicorn serving `app` for the archive `mar` on a free loopback port, with its own token."""

    name = "the FastAPI app"

    def __init__(self, mar: Path | str, workdir: Path | str, workers: int = 1) -> None:
        self.mar, self.workdir = Path(mar).resolve(), Path(workdir).resolve()
        self.port, self.token = free_port(), secrets.token_hex(8)
        cmd = [sys.executable, "-m", "uvicorn", f"{__name__}:app", "--factory", "--host", "127.0.0.1"]
        cmd += ["--workers", str(workers)] if workers > 1 else []  # uvicorn's processes share the port
        env = dict(os.environ, **{MAR: str(self.mar), MODEL_DIR: str(self.workdir / "model"), TOKEN: self.token})
        super().__init__([*cmd, "--port", str(self.port)], self.workdir / "uvicorn.log", ROOT, env)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> "FastAPIPeer":
        unpack(self.mar, self.workdir / "model")
        super().start()
        return self

    def ready(self) -> bool:
        request = urllib.request.Request(f"{self.url()}/ping", headers=self.headers())
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout: float = 120) -> float:
        return self.wait_until(self.ready, timeout, "answering /ping")
