"""The benchmark's LitServe peer (servers/litserve.py): the real server over the session's archive, real
concurrent HTTP, answers compared with the serving core's in this process."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from servers.fastapi import load_classifier
from servers.litserve import LitServePeer, ServingCore
from tests import client

BAD = b"not an image"


@pytest.fixture(scope="module")
def peer(mar, tmp_path_factory):
    """LitServe with two inference workers on a free port, batching as the archive says; always stopped."""
    server = LitServePeer(mar, tmp_path_factory.mktemp("litserve"), workers=2)
    try:
        server.start()
        server.wait_ready(timeout=180)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def core(mar, model_dir):
    return load_classifier(mar, model_dir)


@pytest.fixture(scope="module")
def images(pngs) -> list[bytes]:
    return pngs[:24]


def test_a_burst_is_answered_as_the_serving_core_answers_and_a_bad_image_fails_alone(peer, cfg, core, images):
    def send(body: bytes) -> tuple[int, dict]:
        return client.post(peer.url(), cfg.name, body, "image/png", peer.headers())

    bodies = [*images[:12], BAD, *images[12:]]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(send, bodies))
    status, body = answers.pop(12)
    assert status == 415 and body["status"] == 415 and body["error"], body
    expected = core.handle(images)
    for (status, body), want in zip(answers, expected, strict=True):
        assert status == 200 and body["label"] == want.body["label"], (body, want.body)
        assert client.close(body, want.body, tol=1e-4), (body, want.body)


def test_a_batch_with_a_bad_image_answers_the_good_ones(core, images):
    """What LitServe's batched loop calls, in this process: one bad request in a batch does not fail the rest."""
    api = ServingCore(max_batch_size=4)
    api.classifier = core
    responses = [api.encode_response(r) for r in api.predict([images[0], BAD, images[1]])]
    assert [r.status_code for r in responses] == [200, 415, 200]


def test_the_token_is_required(peer, cfg, images):
    status, body = client.post(peer.url(), cfg.name, images[0], "image/png", {"Authorization": "Bearer wrong"})
    assert 400 <= status < 500 and body["error"], body
    assert 400 <= client.call(f"{peer.url()}/ping")[0] < 500
    assert client.call(f"{peer.url()}/ping", headers=peer.headers())[0] == 200
