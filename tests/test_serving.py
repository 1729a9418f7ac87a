"""The serving core and the TorchServe adapter, in-process (a stand-in for TorchServe's context)."""

import base64
import json
import logging
import subprocess
import sys

import pytest
import torch

from handlers.archive import read_manifest, read_model_config
from handlers.classifier import ImageClassifier
from handlers.decode import InputError, decode_image, images_in
from handlers.handler import GAUGE_EVERY_S, Handler
from tests.client import close, metric_lines, metric_name, png
from training.archive import handler_files


@pytest.fixture(scope="module")
def core(model_dir, settings, cfg):
    return ImageClassifier.from_dir(model_dir, settings(top_k=3), cfg.name, str(cfg.version))


@pytest.fixture(scope="module")
def archived(mar, model_dir):
    """What TorchServe hands the handler for the session's archive: model_dir, manifest, model-config."""
    return model_dir, read_manifest(mar), read_model_config(mar).to_dict()


@pytest.fixture(scope="module")
def handler(archived, make_context):
    threads = torch.get_num_threads()
    h = Handler()
    h.initialize(make_context(*archived))
    torch.set_num_threads(threads)  # initialize sets it for a worker process; this is the test process
    return h


@pytest.fixture
def context(archived, make_context):
    """A fresh context per test: per-request statuses do not leak between tests."""
    return make_context(*archived)


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
    assert body["model"] == "digits_cnn" and body["version"] == "1.0"  # the default config's name and version
    assert len(body["top_k"]) == 3
    assert body["label"] == body["top_k"][0]["label"] and body["probability"] == body["top_k"][0]["probability"]
    probs = [c["probability"] for c in body["top_k"]]
    assert probs == sorted(probs, reverse=True)
    assert all(c["label"] == str(c["index"]) for c in body["top_k"])


def test_top_k_is_clipped_to_the_class_count(model_dir, settings, test_split):
    core = ImageClassifier.from_dir(model_dir, settings(top_k=50))
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


def test_pixel_limit_is_checked_before_decoding(model_dir, settings):
    core = ImageClassifier.from_dir(model_dir, settings(max_pixels=100))
    [result] = core.handle([png(torch.zeros(3, 20, 20, dtype=torch.uint8))])
    assert result.status == 413


def test_one_bad_request_fails_alone_in_a_batch(core, test_split):
    good = png(test_split[0][0])
    results = core.handle([good, b"junk", good])
    assert [r.status for r in results] == [200, 415, 200]
    assert close(results[0].body, results[2].body)


def test_handler_adapter_sets_per_request_status(handler, context, test_split):
    h = handler
    good = png(test_split[0][1])
    out = h.handle([{"body": good}, {"data": bytearray(b"")}, {"data": good}], context)
    assert len(out) == 3
    assert json.loads(out[0])["label"] == json.loads(out[2])["label"]
    assert context.statuses == {1: (400, "empty body: send an image")}


def test_handler_emits_the_declared_metrics(handler, context, test_split, caplog):
    """A batch a sampling period after the last one emits every metric, the sampled timing gauges too."""
    h = handler
    h.gauges_at -= GAUGE_EVERY_S
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        h.handle([{"body": png(test_split[0][0])}, {"body": b"junk"}], context)
    lines = metric_lines(caplog)
    emitted = {metric_name(line) for line in lines}
    assert {"DecodeTime", "InferenceTime", "BatchSize", "TopConfidence", "Predictions", "RejectedRequests"} <= emitted
    assert any("Status:415" in line for line in lines)


def test_images_in_rejects_non_string_base64():
    with pytest.raises(InputError, match="base64 string"):
        images_in({"data": 42})


def test_handler_files_import_without_torchserve(model_dir):
    """The archive's serving core is self-contained: only the TorchServe adapter (handler.py, and wire.py, which trims
    TorchServe's worker) imports TorchServe."""
    packed = [model_dir / path for path in handler_files() if path.name not in ("handler.py", "wire.py")]
    assert packed and all(path.is_file() for path in packed)
    for path in packed:
        text = path.read_text()
        assert "import ts" not in text and "from ts" not in text, path
    modules = ", ".join(f"handlers.{path.stem}" for path in packed if path.stem != "__init__")
    blocked = f"import sys; sys.modules['ts'] = None; import {modules}"  # any `import ts` now fails
    run = subprocess.run([sys.executable, "-c", blocked], cwd=model_dir, env={}, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_multipart_field_with_another_name_is_used(handler, context, test_split):
    h = handler
    good = png(test_split[0][2])
    [named, other] = h.handle([{"data": good}, {"file": good}], context)
    assert close(json.loads(named), json.loads(other))
