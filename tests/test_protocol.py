"""The Open Inference Protocol (KServe v2) and KServe v1 on the bundle's TorchServe: the handler's mapping on a
stand-in context, then the real clients from PyPI (tritonclient, the kserve SDK) against a real TorchServe."""

import asyncio
import base64
import io
import json

import numpy as np
import pytest
import torch
import tritonclient.http
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from PIL import Image
from tritonclient.utils import InferenceServerException

from handlers import protocol
from handlers.archive import read_manifest, read_model_config
from handlers.classifier import ImageClassifier
from handlers.decode import InputError, decode_batch
from handlers.handler import Handler
from tests import client
from tests.client import hostile_corpus, png

TOL = 1e-5


@pytest.fixture(scope="module")
def handler(mar, model_dir, make_context):
    threads = torch.get_num_threads()
    h = Handler()
    h.initialize(make_context(model_dir, read_manifest(mar), read_model_config(mar).to_dict()))
    torch.set_num_threads(threads)  # initialize sets it for a worker process; this is the test process
    return h


@pytest.fixture
def context(mar, model_dir, make_context):
    return make_context(model_dir, read_manifest(mar), read_model_config(mar).to_dict())


@pytest.fixture(scope="module")
def digits(test_split) -> list[bytes]:
    """Six real test digits as PNG files."""
    return [png(test_split[0][i], scale=2) for i in range(6)]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tensor(datatype: str, shape: list[int], data: object) -> dict:
    return {"inputs": [{"name": "image", "shape": shape, "datatype": datatype, "data": data}]}


def v2(*elements: str, **extra) -> dict:
    return {**tensor("BYTES", [len(elements)], list(elements)), **extra}


def rgb(data: bytes) -> np.ndarray:
    """The image of a PNG file as the UINT8 [H, W, 3] array a v2 client sends."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def same(tensors: dict, answers: list[dict]) -> None:
    """v2 output tensors agree with /predictions answers: labels exact, each top_k probability within TOL."""
    probs = np.asarray(tensors["probabilities"], dtype=np.float32).reshape(len(answers), -1)
    assert list(tensors["labels"]) == [a["label"] for a in answers]
    for row, answer in zip(probs, answers, strict=True):
        for top in answer["top_k"]:
            assert abs(row[top["index"]] - top["probability"]) <= TOL, (row, answer)
        assert abs(row.sum() - 1) <= 1e-4


def outputs(body: dict) -> dict:
    return {t["name"]: t["data"] for t in body["outputs"]}


def test_v2_requests_share_a_batch_with_the_bundles_own(handler, context, digits):
    """BYTES and UINT8 tensors, as parsed JSON and as raw bytes, in one TorchServe batch with /predictions bodies."""
    pixels = np.stack([rgb(d) for d in digits[:2]])
    uint8 = {
        "inputs": [{"name": "x", "shape": list(pixels.shape), "datatype": "UINT8", "data": pixels.flatten().tolist()}]
    }
    rows = [
        {"body": digits[0]},
        {"body": v2(*map(b64, digits[:3]), id="req-1")},
        {"body": json.dumps(uint8).encode()},
        {"body": {"instances": [{"data": b64(digits[3])}]}},  # KServe v1, as its TorchServe examples send
    ]
    first, many, tensor, listed = [json.loads(a) for a in handler.handle(rows, context)]
    assert context.statuses == {}
    own = [json.loads(a) for a in handler.handle([{"body": d} for d in digits[:4]], context)]
    assert first == own[0]
    assert listed["predictions"] == [{k: v for k, v in own[3].items() if k not in ("model", "version")}]
    served = (handler.classifier.name, handler.classifier.version)
    assert (many["model_name"], many["model_version"], many["id"]) == (*served, "req-1")
    assert [(t["name"], t["datatype"], t["shape"]) for t in many["outputs"]] == [
        ("probabilities", "FP32", [3, 10]),
        ("labels", "BYTES", [3]),
    ]
    same(outputs(many), own[:3])
    same(outputs(tensor), own[:2])


BAD = [
    ("two input tensors", {"inputs": v2("x")["inputs"] * 2}, "exactly one tensor"),
    ("inputs not a list", {"inputs": {"name": "x"}}, "exactly one tensor"),
    ("an FP32 tensor", tensor("FP32", [1], [0.5]), "datatype 'FP32'"),
    ("no shape", tensor("BYTES", None, ["x"]), "shape"),
    ("shape and data disagree", tensor("BYTES", [2], ["x"]), "match"),
    ("BYTES of rank 3", tensor("BYTES", [1, 1, 1], ["x"]), "[N]"),
    ("data not a list", tensor("BYTES", [1], "x"), "JSON list"),
    ("UINT8 not RGB", tensor("UINT8", [1, 2, 2, 1], [0] * 4), "RGB"),
    ("UINT8 over 255", tensor("UINT8", [1, 1, 1, 3], [0, 0, 256]), "255"),
    ("UINT8 floats", tensor("UINT8", [1, 1, 1, 3], [0, 0.5, 1]), "integers"),
    ("UINT8 ragged", tensor("UINT8", [1, 1, 2, 3], [[1, 2, 3], [4]]), "nested"),
    ("UINT8 text", tensor("UINT8", [1, 1, 1, 3], ["a", "b", "c"]), "integers"),
    ("an unknown output", v2("x", outputs=[{"name": "logits"}]), "unknown outputs ['logits']"),
    ("an element not base64", v2("***"), "invalid base64"),
    ("an element that is no image", v2(b64(b"just text")), "not an image"),
]


@pytest.mark.parametrize("name, body, words", BAD, ids=[b[0] for b in BAD])
def test_a_bad_v2_request_fails_alone_in_the_protocols_form(handler, context, digits, name, body, words):
    good = v2(b64(digits[0]))
    answers = [json.loads(a) for a in handler.handle([{"body": good}, {"body": body}, {"body": good}], context)]
    assert list(answers[1]) == ["error"] and words in answers[1]["error"], answers[1]
    assert set(context.statuses) == {1} and 400 <= context.statuses[1][0] < 500
    assert outputs(answers[0]) == outputs(answers[2]) and outputs(answers[0])["labels"]


def test_pixel_limit_holds_for_pixels_too(model_dir, settings):
    """UINT8 images skip the file header checks; the core's pixel limit still refuses them, with 413."""
    core = ImageClassifier.from_dir(model_dir, settings(max_pixels=100))
    small, large = (protocol.parse(tensor("UINT8", [1, s, s, 3], [0] * (s * s * 3))).payload for s in (10, 11))
    ok, refused = core.handle([small, large])
    assert ok.status == 200 and refused.status == 413 and "over the limit of 100" in refused.body["error"]


def test_outputs_asked_for_and_a_nested_bytes_tensor(handler, context, digits):
    body = tensor("BYTES", [2, 1], [[b64(digits[0])], [b64(digits[1])]])
    [only] = handler.handle([{"body": {**body, "outputs": [{"name": "labels"}]}}], context)
    assert [(t["name"], t["shape"]) for t in json.loads(only)["outputs"]] == [("labels", [2])]


def test_binary_tensor_data_is_refused_with_a_clear_error(handler, context):
    context.headers[protocol.BINARY_HEADERS[0]] = "40"
    body = json.dumps(v2("")).encode() + b"\x00\x01"
    [answer] = handler.handle([{"body": body}], context)
    assert "binary tensor data" in json.loads(answer)["error"] and context.statuses[0][0] == 400


def predictions(server, cfg, data: list[bytes]) -> list[dict]:
    """What /predictions answers for these files: the reference every protocol is held to."""
    status, body = client.post(
        server.url("inference"),
        cfg.name,
        json.dumps({"instances": list(map(b64, data))}).encode(),
        "application/json",
        server.headers(),
    )
    assert status == 200, body
    return body["predictions"]


def pids(server, cfg) -> set[int]:
    return {int(w["pid"]) for w in server.workers(cfg.name)}


@pytest.mark.server
def test_tritonclient_gets_the_answers_of_predictions(server, cfg, digits):
    """tritonclient.http, unmodified: BYTES and UINT8 inputs as JSON, both outputs asked for by name; the v2 health
    routes that ts_open_inference_protocol=true (config.properties) adds."""
    want = predictions(server, cfg, digits)
    triton = tritonclient.http.InferenceServerClient(server.url("inference").split("//")[1])
    files = tritonclient.http.InferInput("image", [len(digits)], "BYTES")
    files.set_data_from_numpy(np.array(list(map(b64, digits)), dtype=object), binary_data=False)
    pixels = np.stack([rgb(d) for d in digits])
    array = tritonclient.http.InferInput("image", list(pixels.shape), "UINT8")
    array.set_data_from_numpy(pixels, binary_data=False)
    asked = [tritonclient.http.InferRequestedOutput(name, binary_data=False) for name in protocol.OUTPUTS]
    for given in (files, array):
        result = triton.infer(cfg.name, [given], outputs=asked, headers=server.headers(), request_id="r1")
        found = result.get_response()
        assert (found["model_name"], found["model_version"], found["id"]) == (cfg.name, str(cfg.version), "r1")
        assert result.as_numpy("probabilities").shape == (len(digits), 10)
        same({name: result.as_numpy(name).tolist() for name in protocol.OUTPUTS}, want)
    assert triton.is_server_live(headers=server.headers()) and triton.is_server_ready(headers=server.headers())
    binary = tritonclient.http.InferInput("image", [1], "BYTES")
    binary.set_data_from_numpy(np.array([b64(digits[0])], dtype=object), binary_data=True)
    with pytest.raises(InferenceServerException, match="binary tensor data"):
        triton.infer(cfg.name, [binary], headers=server.headers())


@pytest.mark.server
def test_the_kserve_sdk_gets_the_answers_of_predictions(server, cfg, digits):
    """The kserve SDK's InferenceRESTClient, v2 and v1, against the same server."""
    want = predictions(server, cfg, digits)

    async def ask():
        async with InferenceRESTClient(RESTConfig(protocol="v2")) as v2_client:
            request = InferRequest(cfg.name, [InferInput("image", [len(digits)], "BYTES", list(map(b64, digits)))])
            found = await v2_client.infer(server.url("inference"), request, cfg.name, headers=server.headers())
        async with InferenceRESTClient(RESTConfig(protocol="v1")) as v1_client:
            body = {"instances": [{"data": b64(d)} for d in digits]}
            listed = await v1_client.infer(server.url("inference"), body, cfg.name, headers=server.headers())
        return found, listed

    found, listed = asyncio.run(ask())
    assert found.model_name == cfg.name
    same({out.name: out.as_numpy().tolist() for out in found.outputs}, want)
    assert listed["predictions"] == want


@pytest.mark.server
def test_hostile_corpus_through_v2_and_v1_gets_4xx_and_no_restart(server, cfg, digit):
    """Each corpus input as a v2 BYTES element and as a v1 instance (files), or as the whole body (JSON): the
    handler's own 4xx in each protocol's form, never a 5xx; no worker restarts."""
    before = pids(server, cfg)
    base = server.url("inference")
    routes = {"v2": f"{base}/v2/models/{cfg.name}/infer", "v1": f"{base}/v1/models/{cfg.name}:predict"}
    headers = {**server.headers(), "Content-Type": "application/json"}
    wrong = []
    for name, payload, want in hostile_corpus(digit, cfg.serve.handler.max_pixels):
        if isinstance(payload, bytes) and payload[:1] != b"{":  # a file
            bodies = {"v2": v2(b64(payload)), "v1": {"instances": [{"b64": b64(payload)}]}}
        else:  # a body
            bodies = dict.fromkeys(routes, payload if isinstance(payload, bytes) else json.dumps(payload).encode())
        for route, body in bodies.items():
            body = body if isinstance(body, bytes) else json.dumps(body).encode()
            status, raw = client.call(routes[route], body, headers)
            answer = client.parsed(raw)
            if status != want or not answer.get("error"):
                wrong.append((name, route, status, answer))
    for name, body, _ in BAD:
        status, raw = client.call(routes["v2"], json.dumps(body).encode(), headers)
        if not 400 <= status < 500 or list(client.parsed(raw)) != ["error"]:
            wrong.append((name, "v2", status, raw))
    assert wrong == []
    assert pids(server, cfg) == before


def test_pixels_pass_the_gpu_workers_decoder_too(cfg, digits):
    """A GPU worker decodes a batch's JPEGs together (decode_batch with a device); Pixels pass through it as through
    the CPU path, their pixel limit included. Run here with the CPU as the device: the same code path."""
    pixels = np.stack([rgb(d) for d in digits[:2]])
    uint8 = protocol.parse(tensor("UINT8", list(pixels.shape), pixels.flatten().tolist())).payload
    jpeg = png(torch.from_numpy(rgb(digits[2])).permute(2, 0, 1).contiguous(), "JPEG")
    payloads = [uint8, jpeg, protocol.parse(v2(b64(digits[3]))).payload, uint8]
    plain = decode_batch(payloads, cfg.serve.handler.max_pixels)
    batched = decode_batch(payloads, cfg.serve.handler.max_pixels, torch.device("cpu"))
    for (want, many), (got, listed) in zip(plain, batched, strict=True):
        assert many == listed and all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    assert [img.shape[1:] for img in batched[0][0]] == [pixels.shape[1:3]] * 2
    [refused] = decode_batch([uint8], 10, torch.device("cpu"))
    assert isinstance(refused, InputError) and refused.status == 413
    limit = cfg.serve.handler.max_pixels
    [(only, _)] = decode_batch([digits[0]], limit, torch.device("cpu"))  # a batch without a JPEG
    assert torch.equal(only[0], decode_batch([digits[0]], limit)[0][0][0])


@pytest.mark.gpu
def test_a_gpu_worker_answers_both_tensor_forms_alike(model_dir, settings, digits):
    """On a GPU worker (nvJPEG for JPEGs, the portable file in bf16), BYTES files and the same images as UINT8 pixels
    get the same answers."""
    gpu = ImageClassifier.from_dir(model_dir, settings(device="cuda"))
    pixels = np.stack([rgb(d) for d in digits])
    files = protocol.parse(v2(*map(b64, digits))).payload
    uint8 = protocol.parse(tensor("UINT8", list(pixels.shape), pixels.flatten().tolist())).payload
    as_files, as_pixels = gpu.handle([files, uint8])
    assert as_files.status == as_pixels.status == 200 and gpu.served()["device"].startswith("cuda")
    assert as_files.body["predictions"] == as_pixels.body["predictions"]
    assert torch.allclose(as_files.probs, as_pixels.probs) and as_files.probs.shape == (len(digits), 10)


@pytest.mark.server
def test_the_protocol_benchmark_measures_both_routes(server, cfg, digits):
    """bench/protocol.py for a second per route: both answered without errors, the share and load recorded."""
    from bench import protocol as bench

    result = bench.measure(server, cfg.name, digits[:2], connections=4, seconds=1, rounds=1)
    assert set(result["rps"]) == {"predictions", "v2"} and min(result["rps"].values()) > 0
    assert result["errors"] == {"predictions": 0, "v2": 0} and len(result["load_average_1m"]) == 3
    assert result["v2_share"] == result["rps"]["v2"] / result["rps"]["predictions"]
    assert "| `v2` |" in bench.summary(result) and "cores" in bench.summary(result)
