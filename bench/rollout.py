"""A rollout under load: concurrent keep-alive clients against a real TorchServe while a new version is rolled in
and back (servers/rollout.py), every answer recorded; `measure` writes reports/rollout/rollout.{json,md}.

`Load` is also what tests/test_rollout.py drives the server with.
"""

import http.client
import json
import logging
import os
import platform
import shutil
import threading
import time
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

from omegaconf import DictConfig

from common.config import ROOT
from common.io import write_json, write_text
from handlers.archive import mar_file
from servers.rollout import Report, roll_back, roll_out
from servers.torchserve import TorchServe
from training import release

log = logging.getLogger(__name__)

REPORT = ROOT / "reports" / "rollout"
HOLD_S = 5.0  # load before, between and after the switches


class Answer(NamedTuple):
    client: int
    sent: float  # time.monotonic() when the request was sent
    status: int  # 0: no HTTP answer (connection refused, reset, timed out)
    version: str | None


def version_of(raw: bytes) -> str | None:
    """The version an answer names (None: not a JSON answer with one)."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body.get("version") if isinstance(body, dict) else None


class Load:
    """`clients` threads, each sending the images in turn to /predictions/<name> over its own keep-alive connection
    until `stop()`, which returns every Answer, in the order each client sent them."""

    def __init__(self, url: str, name: str, images: list[bytes], key: str | None, clients: int) -> None:
        self.address, self.path = urlparse(url), f"/predictions/{name}"
        self.images, self.clients = images, clients
        auth = {"Authorization": f"Bearer {key}"} if key else {}
        self.headers = {"Content-Type": "application/octet-stream", **auth}
        self.running = threading.Event()
        self.answers: list[list[Answer]] = [[] for _ in range(clients)]
        self.threads = [threading.Thread(target=self.client, args=(i,), daemon=True) for i in range(clients)]

    def connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.address.hostname, self.address.port, timeout=60)

    def client(self, index: int) -> None:
        conn, sent = self.connect(), 0
        while self.running.is_set():
            start = time.monotonic()
            try:
                conn.request("POST", self.path, self.images[(index + sent) % len(self.images)], self.headers)
                response = conn.getresponse()
                status, raw = response.status, response.read()
            except (OSError, http.client.HTTPException):
                status, raw = 0, b""
                conn.close()
                conn = self.connect()
            self.answers[index].append(Answer(index, start, status, version_of(raw)))
            sent += 1
        conn.close()

    def __enter__(self) -> "Load":
        self.running.set()
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> list[list[Answer]]:
        self.running.clear()
        for thread in self.threads:
            thread.join()
        return self.answers

    def __exit__(self, *exc: object) -> None:
        self.stop()


def versions_in_order(answers: list[Answer]) -> list[str | None]:
    """One client's versions with repeats collapsed: [1.0, 1.1, 1.0] for a rollout and a rollback."""
    runs: list[str | None] = []
    for answer in answers:
        if not runs or runs[-1] != answer.version:
            runs.append(answer.version)
    return runs


def summary(answers: list[list[Answer]], known: set[str], expected: list[str]) -> dict:
    """Counts over every answer: failed (not 200), from a version not in `known`, and the clients whose sequence of
    versions is not `expected` (a flap, or a switch that never reached them)."""
    flat = [a for per_client in answers for a in per_client]
    return {
        "requests": len(flat),
        "failed": sum(a.status != 200 for a in flat),
        "unknown_version": sum(a.version not in known for a in flat),
        "clients": len(answers),
        "clients_off_sequence": sum(versions_in_order(per_client) != expected for per_client in answers),
        "expected_sequence": expected,
    }


def markdown(result: dict) -> str:
    out, back, load = result["rollout"], result["rollback"], result["load"]
    rows = [f"| {step} | {seconds:.2f} |" for step, seconds in out["steps"].items()]
    back_rows = [f"| {step} | {seconds:.2f} |" for step, seconds in back["steps"].items()]
    return "\n".join(
        [
            "# Rollout under load",
            "",
            f"`{result['command']}` on {result['machine']}: {load['clients']} keep-alive clients sent "
            f"{load['requests']} requests to `/predictions/{result['name']}` while version {out['version']} was "
            f"rolled in over {out['previous']}, {result['workers']} worker(s) each, and rolled back ({HOLD_S:.0f} s "
            "of load before, between and after).",
            "",
            "| measure | value | goal |",
            "| --- | --- | --- |",
            f"| failed requests (not 200) | {load['failed']} | 0 |",
            f"| answers from a version other than {out['previous']} or {out['version']} | "
            f"{load['unknown_version']} | 0 |",
            f"| clients whose answers were not {' → '.join(load['expected_sequence'])} | "
            f"{load['clients_off_sequence']} | 0 |",
            f"| rollout start → new default (no training) | {out['to_default_s']:.2f} s | ≤ 30 s |",
            f"| rollback start → old default | {back['to_default_s']:.2f} s | |",
            "",
            "Rollout steps (s; `retire` follows the switch: the old version's in-flight requests finish, then its "
            "workers stop):",
            "",
            "| step | seconds |",
            "| --- | --- |",
            *rows,
            "",
            "Rollback steps (s):",
            "",
            "| step | seconds |",
            "| --- | --- |",
            *back_rows,
            "",
        ]
    )


def as_dict(report: Report) -> dict:
    return {
        "version": report.version,
        "previous": report.previous,
        "steps": report.steps,
        "to_default_s": round(report.to_default_s, 2),
    }


def measure(cfg: DictConfig, clients: int, workdir: Path, command: str, out: Path = REPORT) -> dict:
    """Serve model_store/<name>.mar (`make pipeline`'s), build the release `cfg` describes (training: not timed), then
    roll it in and back under load from `clients` connections; write rollout.json and rollout.md to `out`, with the
    `command` that ran it."""
    mar = release.build(cfg)
    images = release.held_out(cfg, cfg.rollout.gate_images)
    store = workdir / "model_store"
    store.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(cfg.paths.model_store) / mar_file(cfg.name), store / mar_file(cfg.name))
    with TorchServe(store, {cfg.name: mar_file(cfg.name)}, workdir / "torchserve", ports={}) as server:
        server.wait_ready(180)
        api, workers = server.api(), len(server.workers(cfg.name))
        with Load(server.url("inference"), cfg.name, images, server.key(), clients) as load:
            time.sleep(HOLD_S)
            rolled = roll_out(api, mar, store, images)
            time.sleep(HOLD_S)
            back = roll_back(api, cfg.name)
            time.sleep(HOLD_S)
            answers = load.stop()
    versions = [rolled.previous, rolled.version, rolled.previous]
    result = {
        "command": command,
        "machine": f"{len(os.sched_getaffinity(0))} cores, {platform.machine()}",
        "name": cfg.name,
        "workers": workers,
        "load": summary(answers, {rolled.previous, rolled.version}, versions),
        "rollout": as_dict(rolled),
        "rollback": as_dict(back),
    }
    write_json(out / "rollout.json", result)
    write_text(out / "rollout.md", markdown(result))
    log.info("wrote %s and rollout.md", out / "rollout.json")
    return result
