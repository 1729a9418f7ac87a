"""Roll a new version of a served model into a running TorchServe, and back, without losing a request.

`roll_out` takes an archive of the same model name with a new version, on a server that serves the name now:
  1. checks: the server answers, serves `name`, has no version `version` yet;
  2. registers the archive as another version of `name` (the management API; enable_model_api=true), waiting for
     its workers to start, then until they are READY;
  3. the gate: held-out images sent to /predictions/<name>/<version> must get the labels the archive's own model
     file gives them offline (decoded as the handler decodes them);
  4. makes it the default (PUT /models/<name>/<version>/set-default): new requests go to it from then on;
  5. retires the old version: once nothing is in flight there (`drained`), scales it to 0 workers. It stays
     registered, so `roll_back` can scale it up again.
A failure in 1-4 unregisters what it registered: the old version serves as before, and the RolloutError's one
line says why. `roll_back` makes the newest version older than the default the default again, the same way.
"""

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from packaging.version import InvalidVersion, Version

from common.io import atomic_path
from handlers import runtime
from handlers.archive import read_manifest, read_model_config, unpack
from handlers.classifier import labels_in
from handlers.decode import InputError, decode_image
from servers.process import ServerError
from servers.torchserve import Api, ApiError

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120  # registering and starting the new version's workers
DRAIN_TIMEOUT_S = 120  # the old version's queue emptying after the switch
POLL_S = 0.2


class RolloutError(ServerError):
    """A step failed; the old version still serves (the message says which step and why)."""


@dataclass
class Report:
    """What a rollout or rollback did, and how long each step took (seconds)."""

    name: str
    version: str  # the default now
    previous: str  # the default before
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def to_default_s(self) -> float:
        """From the first call to the server until the new version was the default."""
        return sum(seconds for step, seconds in self.steps.items() if step != "retire")

    def line(self) -> str:
        steps = ", ".join(f"{step} {seconds:.1f} s" for step, seconds in self.steps.items())
        return f"{self.name}: {self.version} is the default ({self.previous} before); {steps}"


class Clock:
    """Times the steps of a Report."""

    def __init__(self, report: Report) -> None:
        self.report, self.start = report, time.monotonic()

    def lap(self, step: str) -> None:
        now = time.monotonic()
        self.report.steps[step] = round(now - self.start, 2)
        self.start = now


def version_key(version: str) -> tuple:
    """Sort key of a model version: PEP 440 order where it parses (1.10 after 1.9), else after those, by text."""
    try:
        return (0, Version(version), "")
    except InvalidVersion:
        return (1, Version("0"), version)


def ready(described: dict) -> bool:
    workers = described.get("workers", [])
    return bool(workers) and all(w["status"] == "READY" for w in workers)


def wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RolloutError(f"{what} not within {timeout:.0f} s")
        time.sleep(POLL_S)


def described(api: Api, name: str, version: str) -> dict:
    return next((d for d in api.versions(name) if d["modelVersion"] == version), {})


def offline_labels(mar: Path, images: list[bytes]) -> list[str | None]:
    """The label the archive's own model file gives each image, decoded as the handler decodes it; None for an
    image the handler refuses."""
    manifest = read_manifest(mar)["model"]
    max_pixels = read_model_config(mar).handler.get("max_pixels", 16_000_000)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = unpack(mar, tmp)
        model, labels = runtime.load(model_dir / manifest["serializedFile"]), labels_in(model_dir)
        answers = []
        with torch.no_grad():
            for data in images:
                try:
                    answers.append(labels[int(model(decode_image(data, max_pixels)[None]).argmax(1))])
                except InputError:
                    answers.append(None)
    return answers


def gate(api: Api, name: str, version: str, mar: Path, images: list[bytes]) -> None:
    """Every held-out image sent to the new version gets 200 and the label its file gives offline."""
    if not images:
        raise RolloutError("no held-out images for the gate")
    want = offline_labels(mar, images)
    with ThreadPoolExecutor(max_workers=8) as pool:
        got = list(pool.map(lambda data: api.predict(name, version, data), images))
    wrong = [
        (i, status, body.get("label"), label)
        for i, ((status, body), label) in enumerate(zip(got, want, strict=True))
        if status != 200 or body.get("label") != label or body.get("version") != version
    ]
    if wrong:
        i, status, label, expected = wrong[0]
        raise RolloutError(
            f"the gate: {len(wrong)} of {len(images)} held-out images answered unlike the file offline "
            f"(image {i}: {status} {label!r}, offline {expected!r})"
        )


def drained(api: Api, name: str, version: str) -> bool:
    """Nothing of `version` is in flight any more, the default being another version (no request joins it):
    its job queue is empty, and then each of its workers has answered a describe call. A worker takes a job only
    when it has answered the jobs it held, so its answer comes after theirs. Describe calls go to whichever worker
    is free; they are sent until every worker has answered one, or until the version's response timeout has
    passed, by which TorchServe has answered or failed every job a worker held."""
    state = described(api, name, version)
    if state.get("jobQueueStatus", {}).get("pendingRequests", 0) > 0:
        return False
    timeout = state.get("responseTimeout", 120)
    deadline, answered = time.monotonic() + timeout, set()
    while time.monotonic() < deadline:
        workers = {worker.get("pid") for worker in state.get("workers", [])}
        if workers <= answered or (len(workers) == 1 and answered):  # an archive whose describe has no pid
            break
        answered.add(api.describe(name, version, timeout=timeout + 30).get("worker"))
        state = described(api, name, version)  # a worker that died meanwhile leaves the list, its replacement joins
    return True


def retire(api: Api, name: str, version: str, default: str) -> None:
    """Scale `version`, no longer the default, to 0 workers once nothing of it is in flight."""
    try:
        wait(lambda: drained(api, name, version), DRAIN_TIMEOUT_S, f"{name} {version}'s queue empty")
        api.scale(name, version, 0, READY_TIMEOUT_S)
    except (RolloutError, ApiError) as err:
        raise RolloutError(f"{default} is the default, but {version} keeps its workers: {err}") from None


def stage(mar: Path, model_store: Path, name: str, version: str) -> str:
    """Copy the archive into the server's model store as <name>-<version>.mar (every version's archive is
    <name>.mar, and TorchServe keeps one file name per archive); return that name, the URL to register."""
    target = f"{name}-{version}.mar"
    with atomic_path(Path(model_store) / target) as out:
        shutil.copyfile(mar, out)
    return target


def preflight(api: Api, name: str, version: str) -> dict:
    """The server serves `name` and holds no `version` of it yet; returns the default version's description."""
    try:
        live = api.default(name)
    except ApiError as err:
        raise RolloutError(f"{name} is not served there, nothing rolled out: {err}") from None
    if any(d["modelVersion"] == version for d in api.versions(name)):
        raise RolloutError(f"{name} {version} is registered already: build the new one with another version=")
    return live


def roll_out(api: Api, mar: Path | str, model_store: Path | str, images: list[bytes]) -> Report:
    """Make the archive `mar` the default version of its model on the server `api` reaches (module docstring)."""
    mar = Path(mar)
    manifest = read_manifest(mar)["model"]
    name, version = manifest["modelName"], manifest.get("modelVersion", "")
    report = Report(name, version, previous="")
    clock = Clock(report)  # from the first call to the server
    live = preflight(api, name, version)
    report.previous = live["modelVersion"]
    workers = read_model_config(mar).workers or len(live["workers"]) or 1
    url = stage(mar, model_store, name, version)
    try:
        api.register(url, workers, READY_TIMEOUT_S)
    except ApiError as err:
        hint = " (registering needs enable_model_api=true)" if "answered 405" in str(err) else ""
        raise RolloutError(f"registering {url} failed, {report.previous} still serves: {err}{hint}") from None
    try:
        wait(lambda: ready(described(api, name, version)), READY_TIMEOUT_S, f"{name} {version}'s workers READY")
        clock.lap("register")
        gate(api, name, version, mar, images)
        clock.lap("gate")
        api.set_default(name, version)
        clock.lap("switch")
    except (RolloutError, ApiError) as err:
        try:
            api.unregister(name, version)
        except ApiError as cleanup:
            log.warning("could not unregister %s %s: %s", name, version, cleanup)
        raise RolloutError(f"{name} {version} not rolled out, {report.previous} still serves: {err}") from None
    retire(api, name, report.previous, version)
    clock.lap("retire")
    log.info(report.line())
    return report


def roll_back(api: Api, name: str) -> Report:
    """Make the newest registered version older than the default the default again; retire the default."""
    try:
        live = api.default(name)["modelVersion"]
    except ApiError as err:
        raise RolloutError(f"{name} is not served there, nothing rolled back: {err}") from None
    current = {d["modelVersion"]: d for d in api.versions(name)}
    older = sorted((v for v in current if version_key(v) < version_key(live)), key=version_key)
    if not older:
        raise RolloutError(f"no version of {name} older than {live} is registered: nothing to roll back to")
    report = Report(name, older[-1], live)
    clock = Clock(report)
    workers = len(current[live]["workers"]) or 1
    try:
        api.scale(name, report.version, workers, READY_TIMEOUT_S)
        wait(lambda: ready(described(api, name, report.version)), READY_TIMEOUT_S, f"{report.version} READY")
        clock.lap("scale up")
        api.set_default(name, report.version)
        clock.lap("switch")
    except (RolloutError, ApiError) as err:
        raise RolloutError(f"{name} not rolled back to {report.version}, {live} still serves: {err}") from None
    retire(api, name, live, report.version)
    clock.lap("retire")
    log.info(report.line())
    return report
