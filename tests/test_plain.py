"""The benchmark's plain peer (servers/plain.py): the real app under uvicorn over the session's archive (its
model-config.yaml's top_k raised to every class, so that the answers carry the whole distribution), real HTTP,
answers compared with the serving core's (handlers.classifier) in this process."""

import pytest

from handlers.archive import read_model_config, repack
from servers.fastapi import load_classifier
from servers.plain import PlainPeer
from tests import client


@pytest.fixture(scope="module")
def core(mar, model_dir):
    return load_classifier(mar, model_dir)


@pytest.fixture(scope="module")
def peer(mar, core, tmp_path_factory):
    """The plain app with two uvicorn workers on a free port; always stopped."""
    folder = tmp_path_factory.mktemp("plain")
    every_class = read_model_config(mar).changed(handler={"top_k": len(core.labels)})
    with PlainPeer(repack(mar, folder / mar.name, every_class), folder, workers=2) as server:
        server.wait_ready(timeout=180)
        yield server


@pytest.fixture(scope="module")
def images(test_split) -> list[bytes]:
    """Every test image, as PNG files."""
    return [client.png(image) for image in test_split[0]]


def test_every_test_image_gets_the_serving_core_answer(peer, cfg, core, images):
    """The same top label for every image, or a different class with exactly the same probability (int8 ties:
    the serving core ranks the lower class first, topk need not); every class's probability as the core has it,
    and they sum to 1."""
    expected = core.handle(images)
    for body, want in zip(images, expected, strict=True):
        status, got = client.post(peer.url(), cfg.name, body, "image/png")
        assert status == 200 and len(got["top_k"]) == len(core.labels), got
        probs = want.probs[0]
        assert got["label"] == want.body["label"] or probs[core.labels.index(got["label"])] == probs.max(), (got, want)
        assert got["top_k"][0] == {"label": got["label"], "probability": got["probability"]}, got
        for entry in got["top_k"]:
            assert abs(entry["probability"] - float(probs[core.labels.index(entry["label"])])) < 1e-4, (entry, want)
        assert abs(sum(entry["probability"] for entry in got["top_k"]) - 1) < 1e-4, got


def test_a_body_pillow_cannot_open_is_a_500_and_the_app_answers_on(peer, cfg, images):
    """No input checks of its own: Pillow's UnidentifiedImageError goes unhandled, and uvicorn answers 500 with
    a plain-text body (not JSON) at once; the worker lives on."""
    status, raw = client.call(f"{peer.url()}/predictions/{cfg.name}", b"not an image", timeout=10)
    assert status == 500 and raw == b"Internal Server Error", (status, raw)
    assert client.post(peer.url(), cfg.name, images[0], "image/png")[0] == 200


def test_no_token_and_only_the_archive_model(peer, cfg, images):
    assert client.call(f"{peer.url()}/ping")[0] == 200  # no Authorization header
    assert client.post(peer.url(), "other", images[0], "image/png")[0] == 404
