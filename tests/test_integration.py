"""A real TorchServe (Java frontend + Python workers) serving the session's archive over HTTP."""

import base64
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from common import apt
from tests import client
from tests.client import png
from training.data import read_meta
from training.variants import as_rgb

pytestmark = pytest.mark.server


@pytest.mark.parametrize(
    ("fmt", "scale", "content_type"),
    [("PNG", 1, "image/png"), ("JPEG", 1, "image/jpeg"), ("PNG", 5, "image/png"), ("JPEG", 9, "image/jpeg")],
)
def test_served_top1_equals_offline_prediction(post, cfg, offline_top1, test_split, fmt, scale, content_type):
    images, _ = test_split
    for image in images[:10]:
        data = png(image, fmt, scale)
        status, body = post(data, content_type)
        assert status == 200, body
        assert body["top_k"][0]["index"] == offline_top1(data)
        assert body["model"] == cfg.name


def test_served_accuracy_equals_offline_test_accuracy(post, shipped, test_split):
    images, labels = test_split
    with ThreadPoolExecutor(8) as pool:  # concurrent requests, so TorchServe batches them
        answers = list(pool.map(lambda img: post(png(img), "image/png"), images))
    assert all(status == 200 for status, _ in answers)
    predicted = torch.tensor([body["top_k"][0]["index"] for _, body in answers])
    served = (predicted == labels).float().mean().item()
    with torch.no_grad():
        offline = (shipped(as_rgb(images)).argmax(1) == labels).float().mean().item()
    assert served == pytest.approx(offline, abs=1e-6)
    assert served >= 0.9


def test_bad_requests_get_4xx_and_the_worker_survives(server, post, cfg, test_split):
    pids = {w["pid"] for w in server.workers(cfg.name)}
    assert post(b"not an image", "image/png")[0] == 415
    assert post(b'{"data": "@@@"}', "application/json")[0] == 400
    status, body = post(png(test_split[0][0]), "image/png")
    assert status == 200
    assert {w["pid"] for w in server.workers(cfg.name)} == pids


def test_concurrent_good_and_bad_requests_each_get_their_own_status(server, post, cfg, test_split):
    """Mixed requests land in shared batches (batchSize > 1); each gets its own answer; workers survive."""
    assert cfg.serve.batch_size > 1
    pids = {w["pid"] for w in server.workers(cfg.name)}
    images, labels = test_split
    classes = read_meta(cfg.paths.data)["classes"]
    truncated = png(images[0], scale=4)[:60]
    bad = [(b"", "image/png", 400), (truncated, "image/png", 400), (b"plain text", "image/png", 415)]
    jobs = []
    for i in range(48):
        if i % 3 == 0:
            data, content_type, want = bad[(i // 3) % len(bad)]
            jobs.append((data, content_type, want))
        else:
            jobs.append((png(images[i]), "image/png", 200))
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: post(job[0], job[1]), jobs))
    for (_, _, want), (status, body) in zip(jobs, answers, strict=True):
        assert status == want, body
        if want == 200:
            assert body["label"] in classes
        else:
            assert body["error"]
    assert {w["pid"] for w in server.workers(cfg.name)} == pids


def test_body_over_the_size_limit_gets_413(server, cfg, tmp_path):
    """TorchServe's frontend refuses bodies over max_request_size (6.5 MB) before the handler.

    curl, installed through the project's own apt path when missing: urllib cannot read a reply sent mid-upload.
    """
    curl = apt.ensure({"curl": "curl"})["curl"]
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 7_000_000)
    auth = [f"-H{k}: {v}" for k, v in server.headers().items()]
    url = f"{server.url('inference')}/predictions/{cfg.name}"
    cmd = [curl, "-s", "-o", "/dev/null", "-w", "%{http_code}", *auth, "-H", "Content-Type: image/png"]
    result = subprocess.run([*cmd, "--data-binary", f"@{big}", url], capture_output=True, text=True, timeout=60)
    assert result.stdout == "413"


def test_metrics_endpoint_exports_the_handler_metrics(server, post, cfg, test_split):
    post(png(test_split[0][0]), "image/png")
    post(b"junk", "image/png")
    status, raw = client.call(f"{server.url('metrics')}/metrics")
    assert status == 200
    text = raw.decode()
    for name in ("DecodeTime", "InferenceTime", "BatchSize", "TopConfidence", "Predictions", "RejectedRequests"):
        assert f"\n{name}" in text, name
    assert 'Status="415"' in text
    assert f'ModelName="{cfg.name}"' in text


def test_every_input_kind_over_http(server, cfg, test_split):
    image = png(test_split[0][5], scale=3)
    b64 = base64.b64encode(image).decode()
    form, form_type = client.multipart("data", "digit.png", image, "image/png")
    url = f"{server.url('inference')}/predictions/{cfg.name}"

    def send(method: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
        return client.send(url, method, body, {**server.headers(), **headers})

    answers = [
        send("PUT", image, {}),  # curl -T
        send("POST", image, {"Content-Type": "image/png"}),  # --data-binary + -H
        send("POST", form, {"Content-Type": form_type}),  # curl -F data=@
        send("POST", json.dumps({"data": b64}).encode(), {"Content-Type": "application/json"}),
    ]
    assert [status for status, _ in answers] == [200] * 4, answers
    assert len({body["label"] for _, body in answers}) == 1
    listed = json.dumps({"instances": [{"b64": b64}, {"b64": b64}]}).encode()
    status, body = send("POST", listed, {"Content-Type": "application/json"})
    assert status == 200
    assert [p["label"] for p in body["predictions"]] == [answers[0][1]["label"]] * 2


def test_token_is_required(post, test_split):
    """TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException."""
    status, body = post(png(test_split[0][0]), "image/png", headers={})
    assert (status, body.get("type")) == (400, "InvalidKeyException")
    status, body = post(png(test_split[0][0]), "image/png", headers={"Authorization": "Bearer wrong"})
    assert (status, body.get("type")) == (400, "InvalidKeyException")


def test_ping(server):
    status, raw = client.call(f"{server.url('inference')}/ping", headers=server.headers())
    assert status == 200
    assert json.loads(raw)["status"] == "Healthy"
