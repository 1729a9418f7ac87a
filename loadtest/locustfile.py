"""Locust users that post real test-set images to TorchServe and check every answer.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080                  # web UI on :8089
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8080 --headless -u 16 -r 16 -t 30s

Run it from the repository root (Locust puts the working directory on sys.path: `loadtest`, `common`, `training`).

Each request is one image of the dataset's test split (npz or shards: training/splits.py), PNG-encoded in memory, sent
as raw bytes, a multipart field `data`, JSON {"data": b64} or {"instances": [{"b64": ...}]}
(weights: --mix). A share of requests (--malformed-share) is malformed on purpose; those count as
successes when the server answers 4xx and as failures otherwise. Every other answer must be 200
with the handler's schema and a label among the dataset's classes.

Defaults come from configs/loadtest.yaml; each option has an environment variable too:
--model (LOCUST_MODEL), --data (LOCUST_DATA), --token (LOCUST_TOKEN) or --key-file
(LOCUST_KEY_FILE, TorchServe's key_file.json), --mix (LOCUST_MIX), --malformed-share
(LOCUST_MALFORMED_SHARE), --wait-min/--wait-max (LOCUST_WAIT_MIN/MAX, seconds),
--instances (LOCUST_INSTANCES), --summary-json (LOCUST_SUMMARY_JSON: exact latencies of the
measured window, written at exit; `make loadtest` checks its SLOs from it), --client-cpu
(LOCUST_CLIENT_CPU, off by default; 1: the summary also gets `client_cpu`, this process's CPU
seconds over the measured window's wall seconds, 1.0 = a core: what `make bench` sets to show
Locust's own cost beside wrk's).
"""

import base64
import json
import random
import time
import uuid
from collections import Counter
from pathlib import Path

from locust import FastHttpUser, events, task

from common.config import load_config
from common.images import encode
from common.io import write_json
from loadtest.checks import check_answer, parse_mix, read_token
from loadtest.summary import MALFORMED_PREFIX, summarize
from training.splits import DataError, read_meta, read_split

DEFAULTS = load_config(config_name="loadtest").loadtest
MALFORMED = ("empty", "not_an_image", "truncated", "bad_base64", "wrong_json", "bad_token")


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument("--model", env_var="LOCUST_MODEL", default=str(DEFAULTS.model), help="model name in the URL")
    parser.add_argument("--data", env_var="LOCUST_DATA", default=str(DEFAULTS.data), help="dataset directory")
    parser.add_argument("--key-file", env_var="LOCUST_KEY_FILE", default=str(DEFAULTS.key_file), help="key_file.json")
    parser.add_argument("--token", env_var="LOCUST_TOKEN", default="", is_secret=True, help="inference token")
    parser.add_argument("--mix", env_var="LOCUST_MIX", default=str(DEFAULTS.mix), help="form weights, raw=7,json=1")
    parser.add_argument("--instances", env_var="LOCUST_INSTANCES", type=int, default=int(DEFAULTS.instances))
    parser.add_argument(
        "--malformed-share", env_var="LOCUST_MALFORMED_SHARE", type=float, default=float(DEFAULTS.malformed_share)
    )
    parser.add_argument("--wait-min", env_var="LOCUST_WAIT_MIN", type=float, default=float(DEFAULTS.wait_s[0]))
    parser.add_argument("--wait-max", env_var="LOCUST_WAIT_MAX", type=float, default=float(DEFAULTS.wait_s[1]))
    parser.add_argument("--summary-json", env_var="LOCUST_SUMMARY_JSON", default="", include_in_web_ui=False)
    parser.add_argument(
        "--client-cpu", env_var="LOCUST_CLIENT_CPU", type=int, default=0, include_in_web_ui=False,
        help="1: add Locust's own CPU share over the measured window to --summary-json (off by default)",
    )  # fmt: skip


class Scenario:
    """What every user shares: the encoded images, the known classes, the token, the request mix."""

    def __init__(self, options) -> None:
        try:
            self.classes = set(read_meta(options.data)["classes"])
            self.images = [encode(image) for image in read_split(options.data, "test")[0]]
        except DataError as err:
            raise SystemExit(f"error: {err}, or pass --data") from None
        self.model = options.model
        self.path = f"/predictions/{options.model}"
        self.token = options.token or read_token(Path(options.key_file))
        self.forms, self.weights = zip(*parse_mix(options.mix).items(), strict=True)
        self.instances = max(1, int(options.instances))  # the web UI may hand over strings
        self.malformed_share = min(max(float(options.malformed_share), 0.0), 1.0)
        self.malformed = [m for m in MALFORMED if m != "bad_token" or self.token]
        wait_min, wait_max = float(options.wait_min), float(options.wait_max)
        self.wait = (wait_min, max(wait_min, wait_max))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Recorder:
    """Exact latencies of the measured window (Locust's own percentiles are rounded), per request name."""

    LIMIT = 2_000_000

    def __init__(self) -> None:
        self.sent = 0  # every request of the run, the reset ones too (server CPU per request)
        self.track_cpu = False  # --client-cpu: this process's CPU time at the window's last request
        self.reset()

    def reset(self) -> None:
        self.rows: dict[str, list[tuple[float, bool]]] = {}
        self.errors: Counter[str] = Counter()
        self.count, self.start, self.end = 0, time.time(), time.time()
        self.cpu_start = self.cpu_end = time.process_time()  # every thread of this process, user + system

    def add(self, name: str, ms: float, error: BaseException | None) -> None:
        self.sent += 1
        if self.count < self.LIMIT:
            self.rows.setdefault(name, []).append((ms, error is None))
            self.count += 1
            self.end = time.time()
            if self.track_cpu:
                self.cpu_end = time.process_time()
        key = f"{name}: {str(error)[:160]}"
        if error is not None and (len(self.errors) < 100 or key in self.errors):
            self.errors[key] += 1


scenario: Scenario | None = None
recorder = Recorder()


@events.test_start.add_listener
def _start(environment, **_) -> None:
    global scenario
    scenario = Scenario(environment.parsed_options)
    recorder.track_cpu = bool(int(getattr(environment.parsed_options, "client_cpu", 0) or 0))
    recorder.reset()


@events.reset_stats.add_listener
def _reset(**_) -> None:
    recorder.reset()


@events.request.add_listener
def _record(name: str, response_time: float, exception: BaseException | None, **_) -> None:
    recorder.add(name, response_time, exception)


@events.quitting.add_listener
def _write_summary(environment, **_) -> None:
    target = getattr(environment.parsed_options, "summary_json", "")
    if target:
        summary = summarize(recorder.rows, recorder.end - recorder.start, recorder.errors)
        if recorder.track_cpu:
            seconds = max(recorder.end - recorder.start, 1e-9)
            summary["client_cpu"] = round((recorder.cpu_end - recorder.cpu_start) / seconds, 4)
        write_json(target, {**summary, "sent": recorder.sent})


class ImageUser(FastHttpUser):
    def wait_time(self) -> float:
        return random.uniform(*scenario.wait)

    def on_start(self) -> None:
        self.auth = {"Authorization": f"Bearer {scenario.token}"} if scenario.token else {}

    @task
    def predict(self) -> None:
        if random.random() < scenario.malformed_share:
            self.malformed(random.choice(scenario.malformed))
        else:
            self.wellformed(random.choices(scenario.forms, scenario.weights)[0])

    def wellformed(self, form: str) -> None:
        image = random.choice(scenario.images)
        headers = dict(self.auth)
        if form == "raw":
            body, headers["Content-Type"] = image, "image/png"
        elif form == "multipart":
            boundary = uuid.uuid4().hex
            body = (
                (
                    f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="image.png"\r\n'
                    f"Content-Type: image/png\r\n\r\n"
                ).encode()
                + image
                + f"\r\n--{boundary}--\r\n".encode()
            )
            headers["Content-Type"] = f"multipart/form-data; boundary={boundary}"
        elif form == "json":
            body, headers["Content-Type"] = json.dumps({"data": b64(image)}), "application/json"
        else:
            images = [random.choice(scenario.images) for _ in range(scenario.instances)]
            body = json.dumps({"instances": [{"b64": b64(i)} for i in images]})
            headers["Content-Type"] = "application/json"
        with self.client.post(scenario.path, data=body, headers=headers, name=form, catch_response=True) as r:
            problem = check_answer(r.status_code, r.text, form, scenario.model, scenario.classes, scenario.instances)
            if problem:
                r.failure(problem)
            else:
                r.success()

    def malformed(self, kind: str) -> None:
        image = random.choice(scenario.images)
        headers = dict(self.auth, **{"Content-Type": "image/png"})
        body: bytes | str = b""
        if kind == "not_an_image":
            body = b"this is not an image, " * 8
        elif kind == "truncated":
            body = image[: len(image) // 2]
        elif kind in ("bad_base64", "wrong_json"):
            headers["Content-Type"] = "application/json"
            body = json.dumps({"data": "@@not base64@@"} if kind == "bad_base64" else {"image": b64(image)})
        elif kind == "bad_token":
            body, headers["Authorization"] = image, "Bearer not-the-token"
        name = f"{MALFORMED_PREFIX}{kind}"
        with self.client.post(scenario.path, data=body, headers=headers, name=name, catch_response=True) as r:
            if 400 <= r.status_code < 500:
                r.success()
            else:
                r.failure(f"malformed request ({kind}) answered {r.status_code}, expected 4xx")
