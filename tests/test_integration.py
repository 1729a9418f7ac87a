"""A real TorchServe (Java frontend + Python workers) serving the session's archive over HTTP."""

import io
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import png

pytestmark = pytest.mark.server


def post(server, name: str, data: bytes, content_type: str, auth: bool = True) -> tuple[int, dict]:
    headers = {"Content-Type": content_type, **(server.headers() if auth else {})}
    request = urllib.request.Request(f"{server.url('inference')}/predictions/{name}", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        body = err.read()
        return err.code, json.loads(body) if body.startswith(b"{") else {"raw": body.decode(errors="replace")}


def offline_top1(eager, data: bytes) -> int:
    """What the trained (eager) model predicts for the image these bytes decode to."""
    rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    with torch.no_grad():
        return int(eager(torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None]).argmax(1))


@pytest.mark.parametrize(
    ("fmt", "scale", "content_type"),
    [("PNG", 1, "image/png"), ("JPEG", 1, "image/jpeg"), ("PNG", 5, "image/png"), ("JPEG", 9, "image/jpeg")],
)
def test_served_top1_equals_offline_prediction(server, cfg, eager, test_split, fmt, scale, content_type):
    images, _ = test_split
    for image in images[:10]:
        data = png(image, fmt, scale)
        status, body = post(server, cfg.name, data, content_type)
        assert status == 200, body
        assert body["top_k"][0]["index"] == offline_top1(eager, data)
        assert body["model"] == cfg.name


def test_served_accuracy_equals_offline_test_accuracy(server, cfg, metrics, test_split):
    images, labels = test_split
    with ThreadPoolExecutor(8) as pool:  # concurrent requests, so TorchServe batches them
        answers = list(pool.map(lambda img: post(server, cfg.name, png(img), "image/png"), images))
    assert all(status == 200 for status, _ in answers)
    predicted = torch.tensor([body["top_k"][0]["index"] for _, body in answers])
    served = (predicted == labels).float().mean().item()
    assert served == pytest.approx(metrics["test_acc"], abs=1e-6)
    assert served >= 0.9


def test_bad_requests_get_4xx_and_the_worker_survives(server, cfg, test_split):
    pids = {w["pid"] for w in server.workers(cfg.name)}
    assert post(server, cfg.name, b"not an image", "image/png")[0] == 415
    assert post(server, cfg.name, b'{"data": "@@@"}', "application/json")[0] == 400
    status, body = post(server, cfg.name, png(test_split[0][0]), "image/png")
    assert status == 200
    assert {w["pid"] for w in server.workers(cfg.name)} == pids


def test_token_is_required(server, cfg, test_split):
    """TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException."""
    status, body = post(server, cfg.name, png(test_split[0][0]), "image/png", auth=False)
    assert (status, body.get("type")) == (400, "InvalidKeyException")


def test_ping(server):
    request = urllib.request.Request(f"{server.url('inference')}/ping", headers=server.headers())
    with urllib.request.urlopen(request, timeout=10) as response:
        assert json.loads(response.read())["status"] == "Healthy"
