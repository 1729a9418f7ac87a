"""Drift features, statistics and tracking: in the core, and on a real TorchServe."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from handlers import files
from handlers.classifier import ImageClassifier
from handlers.decode import decode_image
from handlers.drift import FEATURES, Reference, features, js_divergence, ks_statistic, scores
from servers.torchserve import TorchServe
from tests import client
from tests.client import png


def shifted(images: torch.Tensor, kind: str) -> torch.Tensor:
    """Clearly shifted versions of uint8 images: what a broken camera or a new client might send."""
    x = images.float()
    if kind == "brightened":
        x = x * 0.4 + 150
    elif kind == "inverted":
        x = 255 - x
    elif kind == "noisy":
        x = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * 60
    return x.clamp(0, 255).to(torch.uint8)


def test_statistics_on_known_samples():
    a = np.arange(100.0)
    assert ks_statistic(a, a) == pytest.approx(0.0, abs=1e-12)
    assert ks_statistic(a, a + 1000) == pytest.approx(1.0, abs=1e-12)
    assert 0.0 < ks_statistic(a, a + 30) < 1.0
    p = np.array([5.0, 5.0, 0.0])
    assert js_divergence(p, p) == pytest.approx(0.0)
    assert js_divergence(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)


def test_features_are_vectorised_per_size():
    a = torch.full((3, 8, 8), 100, dtype=torch.uint8)
    b = torch.randint(0, 256, (3, 20, 10), dtype=torch.uint8)
    together = features([a, b, a])
    assert together.shape == (3, len(FEATURES))
    assert np.allclose(together[0], together[2]) and np.allclose(together[1], features([b])[0])
    assert together[0, 0] == pytest.approx(100 / 255) and together[0, 1:3] == pytest.approx([0, 0], abs=1e-6)
    assert tuple(together[1, 3:]) == (10, 20)


@pytest.fixture(scope="module")
def reference(cfg, model_file) -> Reference:
    return Reference.load(model_file.parent / files.REFERENCE)


def served_features(images: torch.Tensor) -> np.ndarray:
    return features([decode_image(png(img), 10**8) for img in images])


def test_in_distribution_scores_below_and_shifts_above_the_threshold(cfg, reference, eager, test_split):
    threshold = cfg.serve.handler.drift.threshold
    images = test_split[0]

    def drift(batch: torch.Tensor) -> dict[str, float]:
        rgb = torch.stack([decode_image(png(img), 10**8) for img in batch])
        with torch.no_grad():
            probs = eager(rgb)
        return scores(reference, features(list(rgb)), probs.argmax(1).numpy(), probs.max(1).values.numpy())

    clean = drift(images)
    assert max(clean.values()) < threshold, clean
    for kind in ("brightened", "inverted", "noisy"):
        found = drift(shifted(images, kind))
        assert max(found.values()) > threshold, (kind, found)


def test_reference_is_in_the_archive(model_dir):
    ref = json.loads((model_dir / files.REFERENCE).read_text())
    assert set(ref["features"]) == set(FEATURES)
    assert len(ref["class_shares"]) == 10 and sum(ref["class_shares"]) == pytest.approx(1, abs=1e-4)


def test_core_summary_goes_from_ok_to_drift(model_dir, cfg, settings, test_split):
    drift = dict(cfg.serve.handler.drift, window=200)
    core = ImageClassifier.from_dir(model_dir, settings(drift=drift))
    images = test_split[0]
    assert core.drift_summary()["status"].startswith("collecting")
    core.handle([png(img) for img in images[:200]])
    assert core.drift_summary()["status"] == "ok"
    batch = core.run([png(img) for img in shifted(images[:200], "inverted")])
    assert [r.status for r in batch.results] == [200] * 200
    summary = core.drift_summary()
    assert summary["status"] == "drift" and "brightness" in summary["drifted"]
    assert summary["window"] == 200 and len(batch.top) == 200
    assert batch.drift_ms > 0  # the batch's drift tracking is timed (for the DriftTime metric)


@pytest.fixture(scope="module")
def server(cfg, mar, tmp_path_factory):
    """This module's own TorchServe, in place of the session's (which `post` then uses too): every worker's drift
    window starts empty here, whatever the tests before sent the session's server (upscaled or JPEG images move
    the sharpness feature)."""
    with TorchServe(mar.parent, {cfg.name: mar.name}, tmp_path_factory.mktemp("torchserve"), ports={}) as ts:
        ts.wait_ready(timeout=180)
        yield ts


def drift_metrics(server) -> dict[str, float]:
    status, raw = client.call(f"{server.url('metrics')}/metrics")
    assert status == 200
    found = {}
    for line in raw.decode().splitlines():
        if line.startswith("DriftScore{"):
            feature = line.split('Feature="')[1].split('"')[0]
            found[feature] = float(line.rsplit(" ", 1)[1])
    return found


def summary(server, name: str) -> dict:
    status, raw = client.call(
        f"{server.url('management')}/models/{name}?customized=true", headers=server.headers("management")
    )
    assert status == 200, raw
    meta = json.loads(raw)[0]["customizedMetadata"]
    return (json.loads(meta) if isinstance(meta, str) else meta)["drift"]


def test_served_drift_moves_above_the_threshold(server, post, cfg, test_split):
    threshold = cfg.serve.handler.drift.threshold
    window = cfg.serve.handler.drift.window
    images = test_split[0]
    clean = [png(images[i % len(images)]) for i in range(window)]  # fills the window with clean traffic
    bad = [png(img) for img in shifted(images, "inverted")] * 2
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda d: post(d, "image/png")[0], clean))
        assert set(statuses) == {200}
        before, described = drift_metrics(server), summary(server, cfg.name)
        statuses = list(pool.map(lambda d: post(d, "image/png")[0], bad))
        assert set(statuses) == {200}
        after, described_after = drift_metrics(server), summary(server, cfg.name)
    assert before and max(before.values()) < threshold, before
    assert described["status"] == "ok"
    assert max(after.values()) > threshold, after
    assert described_after["status"] == "drift" and described_after["drifted"]
