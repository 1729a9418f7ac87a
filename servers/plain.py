"""The server a user might write instead of this bundle: the benchmark's plain peer.

FastAPI under uvicorn, one worker process per core (`workers`), one torch thread each (the archive's handler
settings say 1 too). It runs the archive's own model file (the manifest's serializedFile, the file TorchServe
serves) with torch.jit.load: uint8 RGB [1, 3, H, W] in, class probabilities out (preprocessing and softmax are in
the file). Pillow decodes the raw request body; one forward pass per request; the top k classes (the handler
settings' top_k, else 3) come back as {"label", "probability", "top_k": [{"label", "probability"}, ...]}.

Deliberately not the serving core (handlers.classifier): no input checks beyond Pillow's (a body Pillow cannot
open is an unhandled exception: uvicorn answers 500 "Internal Server Error", as text), no drift tracking, no
metrics, no token (the benchmark's Authorization header is ignored). POST /predictions/<model>, GET /ping.
"""

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from PIL import Image

from handlers import files
from handlers.archive import read_manifest, read_model_config
from servers.fastapi import FastAPIPeer, tcp_nodelay_everywhere
from servers.peer import MAR, MODEL_DIR


def app() -> FastAPI:
    """The app (uvicorn --factory), for the archive $PEER_MAR unpacked in $PEER_MODEL_DIR."""
    tcp_nodelay_everywhere()
    torch.set_num_threads(1)
    mar, model_dir = os.environ[MAR], Path(os.environ[MODEL_DIR])
    manifest = read_manifest(mar)["model"]
    model = torch.jit.load(model_dir / manifest["serializedFile"]).eval()
    labels = json.loads((model_dir / files.LABELS).read_text())  # {"0": "<class name>", ...}
    top_k = min(read_model_config(mar).handler.get("top_k", 3), len(labels))
    api = FastAPI()

    @api.get("/ping")
    async def ping() -> dict:
        return {"status": "Healthy"}

    @api.post(f"/predictions/{manifest['modelName']}")
    async def predict(request: Request) -> dict:
        image = Image.open(io.BytesIO(await request.body())).convert("RGB")
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)  # [1, 3, H, W] uint8
        with torch.inference_mode():
            probabilities = model(pixels)[0]
        values, indices = probabilities.topk(top_k)
        top = [
            {"label": labels[str(i)], "probability": p} for p, i in zip(values.tolist(), indices.tolist(), strict=True)
        ]
        return {"label": top[0]["label"], "probability": top[0]["probability"], "top_k": top}

    return api


class PlainPeer(FastAPIPeer):
    """uvicorn serving the plain `app`, one process per worker (they share the port)."""

    name = "the plain FastAPI app"
    log_name = "plain.log"
    factory = f"{__name__}:app"
