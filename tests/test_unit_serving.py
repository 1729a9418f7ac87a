"""The serving core and the TorchServe adapter on a tiny TorchScript model: no trained model, runs in seconds.

The tiny model answers which colour channel is brightest (red, green or blue), so every answer is known.
"""

import base64
import json
import logging
import os

import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

import handlers.handler
from handlers import files
from handlers.classifier import ImageClassifier
from handlers.decode import InputError
from handlers.drift import FEATURES, DriftMonitor, Reference
from handlers.handler import Handler
from tests.client import close, metric_lines, metric_name, png
from training.archive import model_config

LABELS = ["red", "green", "blue"]


class Brightest(nn.Module):
    """uint8 RGB [B, 3, H, W] at any size -> softmax over the three channels' mean brightness."""

    def forward(self, images: Tensor) -> Tensor:
        x = F.adaptive_avg_pool2d(images.float() / 255, (4, 4))  # resize by averaging
        return torch.softmax(x.mean(dim=(2, 3)) * 8, dim=1)


def solid(rgb: tuple[int, int, int], height: int = 6, width: int = 6) -> Tensor:
    return torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, height, width).contiguous()


def textured(rgb: tuple[int, int, int], seed: int, height: int = 6, width: int = 6) -> Tensor:
    """A colour with seeded noise on it: images of one colour that still differ."""
    noise = torch.randint(-20, 21, (3, height, width), generator=torch.Generator().manual_seed(seed))
    return (solid(rgb, height, width).int() + noise).clamp(0, 255).to(torch.uint8)


RED, GREEN, BLUE = (200, 30, 30), (30, 200, 30), (30, 30, 200)


def write_model(folder, reference: Reference | None = None):
    folder.mkdir(parents=True)
    torch.jit.save(torch.jit.script(Brightest()), str(folder / files.MODEL))
    (folder / files.LABELS).write_text(json.dumps({str(i): name for i, name in enumerate(LABELS)}))
    if reference is not None:
        (folder / files.REFERENCE).write_text(json.dumps(reference.to_json()))
    return folder


def reference() -> Reference:
    """What the tiny model's 'training traffic' looked like: dim, noisy images of all three colours."""
    images = [textured(rgb, 3 * i + c) for i in range(100) for c, rgb in enumerate((RED, GREEN, BLUE))]
    with torch.no_grad():
        probs = Brightest()(torch.stack(images))
    return Reference.build(images, probs)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A model_dir as an archive lays it out (model, labels), without a drift reference."""
    return write_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_dir_with_reference(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("tiny") / "model", reference())


@pytest.fixture(scope="module")
def core(tiny_dir, settings):
    return ImageClassifier.from_dir(tiny_dir, settings(top_k=2), "tiny", "0.1")


def test_decode_predict_encode(core):
    payloads = [png(solid(RED)), b"junk", {"instances": [{"b64": base64.b64encode(png(solid(BLUE))).decode()}]}]
    decoded = core.decode(payloads)
    assert decoded.owners == [0, 2] and decoded.listed == {2}
    assert set(decoded.errors) == {1} and isinstance(decoded.errors[1], InputError)
    assert [tuple(img.shape) for img in decoded.images] == [(3, 6, 6), (3, 6, 6)]
    assert all(img.dtype == torch.uint8 for img in decoded.images)

    probs = core.predict(decoded.images)
    assert probs.shape == (2, 3)
    assert torch.allclose(probs.sum(1), torch.ones(2), atol=1e-5)
    assert probs.argmax(1).tolist() == [0, 2]

    answers = [core.answer(p) for p in probs]
    assert [a["label"] for a in answers] == ["red", "blue"]
    red, junk, listed = core.encode(len(payloads), decoded, answers)
    assert (red.status, red.body["label"], red.body["model"], red.body["version"]) == (200, "red", "tiny", "0.1")
    assert (junk.status, junk.body["status"]) == (415, 415) and "not an image" in junk.body["error"]
    assert listed.status == 200 and [p["label"] for p in listed.body["predictions"]] == ["blue"]


def test_answer_probabilities_match_the_model(core):
    """The answer's probabilities are the model's, rounded; top_k is sorted and starts with the label."""
    image = textured((120, 90, 60), seed=1)
    with torch.no_grad():
        want = Brightest()(image[None])[0]
    [result] = core.handle([png(image)])
    body = result.body
    assert [c["index"] for c in body["top_k"]] == want.argsort(descending=True)[:2].tolist()
    for c in body["top_k"]:
        assert c["probability"] == pytest.approx(want[c["index"]].item(), abs=1e-5)
        assert c["label"] == LABELS[c["index"]]
    assert (body["label"], body["probability"]) == (body["top_k"][0]["label"], body["top_k"][0]["probability"])


def test_tied_probabilities_rank_the_lower_index_first_as_argmax_does(tiny_dir, settings):
    """int8 models give exact ties; the answer must name the class argmax names (what offline tools report)."""
    core = ImageClassifier.from_dir(tiny_dir, settings(top_k=2), "tiny", "0.1")
    core.labels = [str(i) for i in range(10)]  # answer() ranks probabilities over 10 classes
    for first, second in [(0, 1), (0, 9), (6, 8), (2, 7)]:
        probs = torch.full((10,), 0.05)
        probs[[first, second]] = 0.3
        answer = core.answer(probs)
        assert answer["top_k"][0]["index"] == first == probs.argmax().item()
        assert [c["index"] for c in answer["top_k"]] == [first, second]


def test_mixed_batch_gets_per_request_statuses(core):
    big = png(solid(GREEN, 40, 25))
    payloads = [png(solid(RED)), b"", big, b"hello", {"data": "%%%"}, {"instances": []}, png(solid(BLUE), "JPEG")]
    batch = core.run(payloads)
    assert [r.status for r in batch.results] == [200, 400, 200, 415, 400, 400, 200]
    assert [r.body.get("label") for r in batch.results] == ["red", None, "green", None, None, None, "blue"]
    assert all(r.body["error"] and r.body["status"] == r.status for r in batch.results if r.status != 200)
    assert [label for label, _ in batch.top] == ["red", "green", "blue"]  # what the metrics count
    assert all(0 < p <= 1 for _, p in batch.top)
    assert min(batch.decode_ms, batch.inference_ms, batch.drift_ms) >= 0


def test_a_batch_answers_as_its_requests_alone(core):
    payloads = [png(textured(RED, 1)), png(textured(GREEN, 2, 30, 9)), png(textured(BLUE, 3)), b"junk"]
    together = core.handle(payloads)
    alone = [core.handle([p])[0] for p in payloads]
    for mixed, single in zip(together, alone, strict=True):
        assert mixed.status == single.status
        assert close(mixed.body, single.body), (mixed.body, single.body)


@pytest.mark.parametrize(("top_k", "listed"), [(1, 1), (2, 2), (3, 3), (50, 3)])
def test_top_k_is_clipped_to_the_class_count(tiny_dir, settings, top_k, listed):
    core = ImageClassifier.from_dir(tiny_dir, settings(top_k=top_k))
    [result] = core.handle([png(solid(GREEN))])
    assert len(result.body["top_k"]) == listed
    assert result.body["top_k"][0]["label"] == "green"


def test_instances_keep_their_order(core):
    b64 = [base64.b64encode(png(solid(rgb))).decode() for rgb in (BLUE, RED, GREEN, RED)]
    listed, single = core.handle([{"instances": [{"b64": b} for b in b64]}, {"data": b64[0]}])
    assert listed.status == single.status == 200
    assert [p["label"] for p in listed.body["predictions"]] == ["blue", "red", "green", "red"]
    assert "predictions" not in single.body and single.body["label"] == "blue"
    assert set(listed.body) == {"model", "version", "predictions"}


def test_pixel_limit(tiny_dir, settings):
    core = ImageClassifier.from_dir(tiny_dir, settings(max_pixels=100))
    small, large = core.handle([png(solid(RED, 10, 10)), png(solid(RED, 10, 11))])
    assert (small.status, large.status) == (200, 413)
    assert "over the limit of 100" in large.body["error"]


def test_drift_summary_goes_from_collecting_to_ok_to_drift(tiny_dir, tiny_dir_with_reference, settings):
    drift = {"window": 90, "min_samples": 60, "threshold": 0.3}
    assert ImageClassifier.from_dir(tiny_dir, settings(drift=drift)).drift_summary() == {
        "status": "no reference in the archive"
    }
    core = ImageClassifier.from_dir(tiny_dir_with_reference, settings(drift=drift))
    # new images from the training distribution (other noise seeds), then brighter and larger ones
    like_training = [
        png(textured(rgb, 1000 + 3 * i + c)) for i in range(30) for c, rgb in enumerate((RED, GREEN, BLUE))
    ]
    core.handle(like_training[:30])
    summary = core.drift_summary()
    assert summary["status"].startswith("collecting") and summary["window"] == 30 and summary["scores"] is None
    core.handle(like_training[30:])
    summary = core.drift_summary()
    assert summary["status"] == "ok" and summary["drifted"] == [], summary
    assert max(summary["scores"].values()) < 0.3 and summary["window"] == 90
    core.handle([png(textured((250, 250, 250), seed, 12, 12)) for seed in range(90)])
    summary = core.drift_summary()
    assert summary["status"] == "drift" and summary["window"] == 90, summary
    assert {"brightness", "width", "height"} <= set(summary["drifted"])


@pytest.fixture
def adapter(tiny_dir_with_reference, cfg, make_context):
    """The TorchServe adapter initialised as a worker would be, with a stand-in context; returns (handler, context)."""
    manifest = {"model": {"modelName": "tiny", "modelVersion": "0.1", "serializedFile": files.MODEL}}
    config = model_config(cfg).to_dict()  # what the archive's model-config.yaml holds
    threads = torch.get_num_threads()
    handler = Handler()
    handler.initialize(make_context(tiny_dir_with_reference, manifest, config))
    assert torch.get_num_threads() == cfg.serve.handler.threads
    torch.set_num_threads(threads)  # the setting is for a worker process; this is the test process
    return handler, make_context(tiny_dir_with_reference, manifest, config)


def test_handler_answers_each_request_and_sets_statuses(adapter):
    handler, context = adapter
    good = png(solid(BLUE))
    rows = [{"body": good}, {"data": bytearray(b"")}, {"data": good}, {"file": png(solid(RED))}, {"body": b"junk"}]
    out = [json.loads(answer) for answer in handler.handle(rows, context)]
    assert [body.get("label") for body in out] == ["blue", None, "blue", "red", None]
    assert out[0]["model"] == "tiny" and out[0]["version"] == "0.1"
    assert len(out[0]["top_k"]) == min(3, len(LABELS))
    assert context.statuses == {1: (400, "empty body: send an image"), 4: (415, out[4]["error"])}


def test_handler_emits_the_declared_metrics(adapter, caplog):
    handler, context = adapter
    with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
        handler.handle([{"body": png(solid(RED))}, {"body": png(solid(RED))}, {"body": b"junk"}], context)
    lines = metric_lines(caplog)
    emitted = {metric_name(line) for line in lines}
    want = {"DecodeTime", "InferenceTime", "BatchSize", "TopConfidence", "Predictions", "RejectedRequests", "DriftTime"}
    assert want <= emitted
    assert any("Predictions.Count:2" in line and "Label:red" in line for line in lines), lines
    assert any("Status:415" in line for line in lines)


def test_handler_emits_metrics_once_per_batch(adapter, caplog):
    """One TopConfidence (the batch's mean top-1 probability) per batch, one request id per line, and DriftScore
    only when the drift window rescored (every 16 images), whatever the batch size."""
    handler, context = adapter
    min_samples, every = handler.classifier.drift.min_samples, handler.classifier.drift.every

    def batch(n: int) -> tuple[list[str], list[dict]]:
        context.metrics.request_ids = {i: f"request-{i}" for i in range(n)}
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
            answers = [json.loads(a) for a in handler.handle([{"body": png(solid(RED))}] * n, context)]
        return metric_lines(caplog), answers

    def named(lines: list[str], name: str) -> list[str]:
        return [line for line in lines if line.startswith(f"[METRICS]{name}.")]

    lines, answers = batch(min_samples + 6)  # enough for the first drift scores
    [top] = named(lines, "TopConfidence")
    mean = sum(a["probability"] for a in answers) / len(answers)
    assert abs(float(top.split(":")[1].split("|")[0]) - mean) < 1e-6
    assert all(line.endswith(",request-0") for line in lines), lines[0]
    assert len(named(lines, "DriftScore")) == len(handler.classifier.drift_summary()["scores"])
    small = batch(1)[0]
    assert named(small, "DriftScore") == [] and named(batch(every - 2)[0], "DriftScore") == []  # no rescore yet
    large = batch(every)[0]
    assert len(named(large, "DriftScore")) == len(named(lines, "DriftScore"))

    def counted(lines: list[str]) -> int:  # DriftScore and the timing gauges go out on their own schedules
        return len(lines) - sum(len(named(lines, name)) for name in ("DriftScore", *TIMING_GAUGES))

    assert counted(small) == counted(large)  # per batch, not per image


TIMING_GAUGES = ("DecodeTime", "InferenceTime", "DriftTime")


def test_timing_gauges_are_sampled_and_counts_are_not(adapter, caplog, monkeypatch):
    """The timing gauges go out at most once per GAUGE_EVERY_S; BatchSize, Predictions and TopConfidence
    with every batch, so counts stay exact. The period is stretched to an hour: no pause between two calls
    can reach it."""
    handler, context = adapter
    monkeypatch.setattr(handlers.handler, "GAUGE_EVERY_S", 3600.0)
    handler.gauges_at = -float("inf")  # nothing emitted yet

    def emitted() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ts.metrics.caching_metric"):
            handler.handle([{"body": png(solid(RED))}], context)
        return [metric_name(line) for line in metric_lines(caplog)]

    first, second = emitted(), emitted()
    handler.gauges_at -= handlers.handler.GAUGE_EVERY_S  # as if a period had passed
    third = emitted()
    for names in (first, second, third):
        assert {"BatchSize", "Predictions", "TopConfidence"} <= set(names)
    assert set(TIMING_GAUGES) <= set(first) and set(TIMING_GAUGES) <= set(third)
    assert not set(TIMING_GAUGES) & set(second)


def test_drift_window_keeps_the_last_images():
    """The ring buffer, written a batch at a time, holds exactly the last `window` rows, any batch size."""
    monitor = DriftMonitor(reference(), window=5, min_samples=1)
    rows = np.arange(14 * len(FEATURES), dtype=np.float64).reshape(14, len(FEATURES))
    added = 0
    for n in (3, 1, 7, 0, 3):
        monitor.add(rows[added : added + n], list(range(added, added + n)), [float(k) for k in range(added, added + n)])
        added += n
        kept = list(range(max(0, added - 5), added))
        assert len(monitor) == len(kept)
        assert sorted(monitor.classes[: len(monitor)].tolist()) == kept
        assert sorted(monitor.confidence[: len(monitor)].tolist()) == [float(k) for k in kept]
        assert sorted(map(tuple, monitor.values[: len(monitor)].tolist())) == [tuple(rows[k]) for k in kept]


def test_handler_describe_returns_its_pid_and_the_drift_summary(adapter):
    handler, context = adapter
    context.headers["describe"] = "True"
    [answer] = handler.handle([{}], context)
    core = handler.classifier
    want = {"worker": os.getpid(), "served": core.served(), "drift": core.drift_summary(), "lineage": core.lineage}
    assert json.loads(answer) == want
    assert core.served() == {
        "file": files.MODEL, "variant": "torchscript", "device": "cpu", "precision": "fp32", "decoder": "pillow on cpu"
    }  # fmt: skip
    assert json.loads(answer)["drift"]["status"].startswith("collecting")
