"""The serving core and the TorchServe adapter, in-process (a stand-in for TorchServe's context)."""

import base64
import json
import logging
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from handler import Handler
from serving import ImageClassifier, InputError, Settings, decode_image, images_in
from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

from tests.conftest import png

ROOT = Path(__file__).resolve().parent.parent


class Context:
    """What TorchServe hands a handler: manifest, system properties, model-config, response statuses,
    and TorchServe's real metrics cache loaded from the bundle's metrics.yaml."""

    def __init__(self, model_dir, manifest: dict, model_yaml_config: dict) -> None:
        self.metrics = MetricsCacheYamlImpl(str(ROOT / "metrics.yaml"))
        self.metrics.initialize_cache()
        self.metrics.model_name = manifest["model"]["modelName"]
        self.manifest = manifest
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.model_yaml_config = model_yaml_config
        self.statuses: dict[int, tuple[int, str]] = {}
        self.headers: dict[str, str] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)

    def get_request_header(self, idx: int, key: str) -> str | None:
        return self.headers.get(key)


@pytest.fixture(scope="module")
def model_dir(mar, tmp_path_factory):
    out = tmp_path_factory.mktemp("unpacked")
    with zipfile.ZipFile(mar) as z:
        z.extractall(out)
    return out


@pytest.fixture(scope="module")
def core(model_dir):
    return ImageClassifier.from_dir(model_dir, "model.pt", Settings(top_k=3), "digits_cnn", "1.0")


@pytest.fixture(scope="module")
def handler(model_dir):
    import yaml

    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    h = Handler()
    h.initialize(Context(model_dir, manifest, config))
    return h, Context(model_dir, manifest, config)


def test_core_matches_the_eager_model(core, eager, test_split):
    images, labels = test_split
    decoded = [decode_image(png(img), core.settings.max_pixels) for img in images[:40]]
    want = eager(torch.stack(decoded)).argmax(1)
    got = core.predict(decoded).argmax(1)
    assert torch.equal(got, want)


def test_answers_follow_the_schema(core, test_split):
    images, _ = test_split
    [result] = core.handle([png(images[0])])
    assert result.status == 200
    body = result.body
    assert body["model"] == "digits_cnn" and body["version"] == "1.0"
    assert len(body["top_k"]) == 3
    assert body["label"] == body["top_k"][0]["label"] and body["probability"] == body["top_k"][0]["probability"]
    probs = [c["probability"] for c in body["top_k"]]
    assert probs == sorted(probs, reverse=True)
    assert all(c["label"] == str(c["index"]) for c in body["top_k"])


def test_top_k_is_clipped_to_the_class_count(model_dir, test_split):
    core = ImageClassifier.from_dir(model_dir, "model.pt", Settings(top_k=50))
    [result] = core.handle([png(test_split[0][0])])
    assert len(result.body["top_k"]) == 10


def test_input_forms(core, test_split):
    img = png(test_split[0][3])
    b64 = base64.b64encode(img).decode()
    raw, from_json, from_bytes_json, many = core.handle(
        [img, {"data": b64}, json.dumps({"data": b64}).encode(), {"instances": [{"b64": b64}, {"b64": b64}]}]
    )
    assert raw.status == from_json.status == from_bytes_json.status == many.status == 200
    assert raw.body["label"] == from_json.body["label"] == from_bytes_json.body["label"]
    assert [p["label"] for p in many.body["predictions"]] == [raw.body["label"]] * 2


@pytest.mark.parametrize(
    ("payload", "status", "words"),
    [
        (b"", 400, "empty"),
        (b"hello, not an image", 415, "not an image"),
        ({"data": "%%%not base64%%%"}, 400, "base64"),
        ({"instances": []}, 400, "instances"),
        ({"image": "x"}, 400, "JSON body must be"),
        (b"{not json", 400, "not valid JSON"),
    ],
)
def test_bad_input_gets_a_clear_status(core, payload, status, words):
    [result] = core.handle([payload])
    assert result.status == status
    assert words in result.body["error"]


def test_pixel_limit_is_checked_before_decoding(model_dir):
    core = ImageClassifier.from_dir(model_dir, "model.pt", Settings(max_pixels=100))
    [result] = core.handle([png(torch.zeros(3, 20, 20, dtype=torch.uint8))])
    assert result.status == 413


def test_one_bad_request_fails_alone_in_a_batch(core, test_split):
    good = png(test_split[0][0])
    results = core.handle([good, b"junk", good])
    assert [r.status for r in results] == [200, 415, 200]
    assert results[0].body == results[2].body


def test_handler_adapter_sets_per_request_status(handler, test_split):
    h, context = handler
    good = png(test_split[0][1])
    out = h.handle([{"body": good}, {"data": bytearray(b"")}, {"data": good}], context)
    assert len(out) == 3
    assert json.loads(out[0])["label"] == json.loads(out[2])["label"]
    assert context.statuses == {1: (400, "empty body: send an image")}


def test_handler_emits_the_declared_metrics(handler, test_split, caplog):
    h, context = handler
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        h.handle([{"body": png(test_split[0][0])}, {"body": b"junk"}], context)
    lines = [r.getMessage() for r in caplog.records if "[METRICS]" in r.getMessage()]
    emitted = {line.split("[METRICS]")[1].split(".")[0] for line in lines}
    assert {"DecodeTime", "InferenceTime", "BatchSize", "TopConfidence", "Predictions", "RejectedRequests"} <= emitted
    assert any("Status:415" in line for line in lines)


def test_images_in_rejects_non_string_base64():
    with pytest.raises(InputError, match="base64 string"):
        images_in({"data": 42})


def test_handler_files_import_without_torchserve(model_dir, tmp_path):
    """The archive's Python files are self-contained: the core has no TorchServe import."""
    shutil.copy(model_dir / "serving.py", tmp_path)
    assert "import ts" not in (tmp_path / "serving.py").read_text()
    assert "from ts" not in (tmp_path / "serving.py").read_text()


def test_multipart_field_with_another_name_is_used(handler, test_split):
    h, context = handler
    good = png(test_split[0][2])
    [named, other] = h.handle([{"data": good}, {"file": good}], context)
    assert json.loads(named) == json.loads(other)
