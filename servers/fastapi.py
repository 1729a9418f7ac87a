"""A FastAPI app over the serving core (handlers.classifier): the benchmark's peer, one uvicorn process
per core there (`workers`).

It answers POST /predictions/<model> like TorchServe does (same classifier, same JSON, a bearer token,
one request per forward pass) and GET /ping. `FastAPIPeer` runs it under uvicorn as a child process.
"""

import os
import socket
import sys
from pathlib import Path

from handlers.archive import read_manifest, read_model_config
from handlers.classifier import ImageClassifier, Settings
from servers.peer import MAR, MODEL_DIR, Peer, authorized, error, json_response


def load_classifier(mar: Path | str, model_dir: Path | str) -> ImageClassifier:
    """The archive's classifier as a TorchServe worker loads it from `model_dir` (the unpacked archive):
    settings from its model-config.yaml, name, version and model file from its manifest."""
    model = read_manifest(mar)["model"]
    settings = Settings.from_dict(read_model_config(mar).handler)
    name, version = model["modelName"], model.get("modelVersion", "")
    return ImageClassifier.from_dir(model_dir, settings, name, version, model["serializedFile"])


def serving_core() -> ImageClassifier:
    """The classifier of $PEER_MAR, unpacked in $PEER_MODEL_DIR, with the torch threads the TorchServe handler
    sets, warmed up."""
    import torch

    classifier = load_classifier(os.environ[MAR], os.environ[MODEL_DIR])
    torch.set_num_threads(classifier.settings.threads)
    classifier.warm_up()
    return classifier


def tcp_nodelay_everywhere() -> None:
    """uvicorn --workers binds its socket itself with protocol number 0, and asyncio sets TCP_NODELAY only on
    sockets whose protocol is TCP: every answer then waited for the client's delayed ACK (Linux holds it up to
    40 ms; the benchmark's numbers before and after are in commit 637cd09). Set it on every TCP stream, as a
    single uvicorn process has it."""
    import asyncio.base_events

    def nodelay(sock: socket.socket) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    asyncio.base_events._set_nodelay = nodelay


def app():
    """The app (uvicorn --factory)."""
    from fastapi import FastAPI, Request, Response

    tcp_nodelay_everywhere()
    classifier = serving_core()
    api = FastAPI()

    @api.get("/ping")
    async def ping(request: Request) -> Response:
        if not authorized(request.headers):
            return error(400, "missing or wrong token")
        return json_response({"status": "Healthy"})

    @api.post("/predictions/{name}")
    async def predict(name: str, request: Request) -> Response:
        if not authorized(request.headers):
            return error(400, "missing or wrong token")
        if name != classifier.name:
            return error(404, f"no model {name}")
        result = classifier.handle([await request.body()])[0]
        return json_response(result.body, result.status)

    return api


class FastAPIPeer(Peer):
    """uvicorn serving `app`, one process per worker (they share the port)."""

    name = "the FastAPI app"
    log_name = "uvicorn.log"
    factory = f"{__name__}:app"  # what uvicorn --factory calls in each worker process

    def command(self, workers: int) -> list[str]:
        cmd = [sys.executable, "-m", "uvicorn", self.factory, "--factory", "--host", "127.0.0.1"]
        cmd += ["--workers", str(workers)] if workers > 1 else []
        return [*cmd, "--port", str(self.port)]
