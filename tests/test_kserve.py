"""The KServe pod without a cluster: the storage folder `scripts.deploy kserve` writes, served as KServe's
TorchServe runtime serves it (TorchServe from the folder with the runtime's environment, KServe's model server in
front: servers/kserve.py); the real clients get health, readiness, metadata and the answers of /predictions."""

import asyncio
import base64
import json

import numpy as np
import pytest
import tritonclient.http
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

from cloud import kserve
from servers import kserve as pod_servers
from servers.kserve import ModelServer, RuntimeTorchServe
from tests import client
from tests.client import png

TOL = 1e-5


@pytest.fixture(scope="module")
def pod(cfg, mar, tmp_path_factory):
    """(TorchServe, KServe's model server) from a freshly written storage folder, protocol v2; always stopped."""
    out = tmp_path_factory.mktemp("kserve")
    folder, _, _ = kserve.prepare(cfg, mar, "bucket", out)
    with RuntimeTorchServe(folder, out / "torchserve", protocol="v2") as torchserve:
        torchserve.wait_ready(timeout=180)
        with ModelServer(torchserve.workdir / "config.properties", out / "kserve.log", protocol="v2") as front:
            front.wait_until(front.live, timeout=120, what="live")
            yield torchserve, front


@pytest.fixture(scope="module")
def digits(test_split) -> list[str]:
    return [base64.b64encode(png(test_split[0][i], scale=2)).decode() for i in range(5)]


def reference(torchserve, cfg, digits) -> list[dict]:
    """/predictions on the pod's TorchServe (no token: the folder's config turns it off)."""
    body = json.dumps({"instances": digits}).encode()
    status, answer = client.post(torchserve.url("inference"), cfg.name, body, "application/json")
    assert status == 200, answer
    return answer["predictions"]


def agree(labels: list, probs: np.ndarray, want: list[dict]) -> None:
    assert list(labels) == [w["label"] for w in want]
    for row, answer in zip(probs.reshape(len(want), -1), want, strict=True):
        assert all(abs(row[top["index"]] - top["probability"]) <= TOL for top in answer["top_k"])


@pytest.mark.server
def test_the_runtime_environment_does_not_turn_the_stock_envelope_on(pod, cfg, digits):
    """The runtime sets TS_SERVICE_ENVELOPE=kservev2; the folder's config ignores environment settings, so the
    handler reads the protocol itself. The stock envelope would answer the first image only, in one output named
    after the input."""
    torchserve, _ = pod
    assert torchserve.env["TS_SERVICE_ENVELOPE"] == "kservev2" and not torchserve.auth
    body = {"inputs": [{"name": "image", "shape": [2], "datatype": "BYTES", "data": digits[:2]}]}
    url = f"{torchserve.url('inference')}/v2/models/{cfg.name}/infer"
    status, raw = client.call(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    outputs = [(t["name"], t["shape"]) for t in client.parsed(raw)["outputs"]]
    assert status == 200 and outputs == [("probabilities", [2, 10]), ("labels", [2])]


@pytest.mark.server
def test_tritonclient_through_kserve_gets_health_metadata_and_answers(pod, cfg, digits):
    torchserve, front = pod
    want = reference(torchserve, cfg, digits)
    triton = tritonclient.http.InferenceServerClient(front.url().split("//")[1])
    assert triton.is_server_live() and triton.is_server_ready() and triton.is_model_ready(cfg.name)
    assert triton.get_model_metadata(cfg.name)["name"] == cfg.name
    given = tritonclient.http.InferInput("image", [len(digits)], "BYTES")
    given.set_data_from_numpy(np.array(digits, dtype=object), binary_data=False)
    asked = [tritonclient.http.InferRequestedOutput(name, binary_data=False) for name in ("probabilities", "labels")]
    json_body = {"Content-Type": "application/json"}  # KServe reads a body without it as the binary extension's
    result = triton.infer(cfg.name, [given], outputs=asked, request_id="pod-1", headers=json_body)
    assert result.get_response()["id"] == "pod-1"
    agree(result.as_numpy("labels").tolist(), result.as_numpy("probabilities"), want)


@pytest.mark.server
def test_the_kserve_sdk_through_kserve_gets_readiness_and_answers(pod, cfg, digits):
    torchserve, front = pod
    want = reference(torchserve, cfg, digits)

    async def ask():
        async with InferenceRESTClient(RESTConfig(protocol="v2")) as rest:
            ready = await rest.is_server_ready(front.url()) and await rest.is_model_ready(front.url(), cfg.name)
            request = InferRequest(cfg.name, [InferInput("image", [len(digits)], "BYTES", digits)])
            return ready, await rest.infer(front.url(), request, cfg.name)

    ready, found = asyncio.run(ask())
    outputs = {out.name: out.as_numpy() for out in found.outputs}
    assert ready and found.model_name == cfg.name
    agree(outputs["labels"].tolist(), outputs["probabilities"], want)


def test_the_front_waits_for_torchserve_and_says_what_it_lacks(tmp_path, capsys):
    """The front's one-line errors: a config without the snapshot naming the models, a TorchServe that never
    answers (a port nobody listens on)."""
    config = tmp_path / "config.properties"
    config.write_text("inference_address=http://127.0.0.1:9\nmanagement_address=http://127.0.0.1:9\n")
    with pytest.raises(SystemExit) as exc:
        pod_servers.main(["--config", str(config)])
    assert str(exc.value) == "error: config.properties has no model_snapshot naming the models"
    config.write_text(config.read_text() + 'model_snapshot={"models": {"m": {}}}\n')
    with pytest.raises(SystemExit) as exc:
        pod_servers.main(["--config", str(config), "--timeout", "1"])
    assert str(exc.value) == "error: TorchServe at http://127.0.0.1:9 has no READY worker for m after 1 s"
