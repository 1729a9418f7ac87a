"""handlers/wire.py against TorchServe's own protocol reader: the same messages out of the same bytes."""

import json
import logging
import socket
import struct
import threading

import numpy as np
import pytest
from ts.protocol import otf_message_handler as otf

from handlers import wire
from tests.client import png


def body(size: int) -> bytes:
    return png(np.random.default_rng(size).integers(0, 256, (3, size, size), dtype=np.uint8))


def frame(*parts: bytes) -> bytes:
    return b"".join(struct.pack("!i", len(p)) + p for p in parts)


def inference_message(request_id: bytes, body: bytes) -> bytes:
    """One batch of two requests in TorchServe's frame format (ts/protocol/otf_message_handler.py), as the
    frontend writes it: an image body with HTTP headers, and a JSON input."""
    end = struct.pack("!i", -1)
    headers = frame(b"Content-Type", b"image/png", b"Authorization", b"Bearer x" * 8, b"Host", b"127.0.0.1:8080")
    image = frame(request_id + b"-a") + headers + end + frame(b"body", b"image/png", body) + end
    listed = frame(request_id + b"-b") + end + frame(b"data", b"application/json", json.dumps([1, 2]).encode()) + end
    return b"I" + image + listed + end


def read_all(message: bytes, piece: int, messages: int = 1) -> list:
    """`messages` copies of `message` sent back to back in `piece`-byte writes, read with the current reader."""
    ours, theirs = socket.socketpair()
    ours.settimeout(10)  # a reader that loses bytes waits for more: fail instead of hanging

    def send() -> None:
        data = message * messages
        for i in range(0, len(data), piece):
            theirs.sendall(data[i : i + piece])

    sender = threading.Thread(target=send)
    sender.start()
    try:
        return [otf.retrieve_msg(ours) for _ in range(messages)]
    finally:
        ours.close()  # first: a sender blocked on a reader that stopped then fails instead of waiting
        sender.join()
        theirs.close()


@pytest.fixture
def buffered(monkeypatch):
    monkeypatch.setattr(otf, "_retrieve_buffer", otf._retrieve_buffer)  # put back after the test
    wire.buffered_reads()


@pytest.mark.parametrize("piece", [1, 7, 1 << 20])
def test_buffered_reads_return_what_torchserves_reader_returns(piece, monkeypatch):
    message = inference_message(b"r1", body(40))
    expected = read_all(message, piece)
    assert expected[0][1][0]["parameters"][0]["value"] == body(40)  # the frame is one TorchServe reads
    monkeypatch.setattr(otf, "_retrieve_buffer", otf._retrieve_buffer)
    wire.buffered_reads()
    assert otf._retrieve_buffer is wire.buffered_read
    assert read_all(message, piece) == expected


def test_bytes_read_past_a_message_stay_for_the_next(buffered):
    first, second = inference_message(b"r1", body(20)), inference_message(b"r2", body(30))
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    with ours, theirs:
        theirs.sendall(first + second)  # one recv takes both
        one, two = otf.retrieve_msg(ours), otf.retrieve_msg(ours)
    assert [r["requestId"] for r in one[1]] == [b"r1-a", b"r1-b"]
    assert [r["requestId"] for r in two[1]] == [b"r2-a", b"r2-b"]
    assert two[1][0]["parameters"][0]["value"] == body(30)


def test_a_closed_frontend_ends_the_worker_as_before(buffered):
    ours, theirs = socket.socketpair()
    theirs.sendall(b"I" + struct.pack("!i", 10) + b"abc")
    theirs.close()
    with ours, pytest.raises(SystemExit):
        otf.retrieve_msg(ours)


def test_only_the_per_batch_line_is_dropped():
    root = logging.getLogger()
    seen: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.INFO)
    try:
        wire.quiet_batch_log()
        wire.quiet_batch_log()  # once per worker, however often
        assert root.filters.count(wire.not_batch_line) == 1
        logging.info(wire.BATCH_LINE, 1796402041)
        logging.info("Frontend disconnected.")
        logging.getLogger("ts.metrics.caching_metric").info("[METRICS]Predictions.count:1|#Label:3")
    finally:
        root.removeFilter(wire.not_batch_line)
        root.removeHandler(handler)
        root.setLevel(level)
    assert seen == ["Frontend disconnected.", "[METRICS]Predictions.count:1|#Label:3"]


def test_it_applies_to_the_pinned_torchserve():
    assert wire.applies()
