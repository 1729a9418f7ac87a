"""A KServe pod without a cluster: TorchServe as KServe's TorchServe runtime starts it, and KServe's Python model
server in front of it, as the runtime image runs it.

The image's entrypoint starts TorchServe with the runtime's args and environment, then TorchServe's kserve_wrapper:
it reads config.properties (CONFIG_PATH, default /mnt/models/config/config.properties) for the model names (its
model_snapshot) and TorchServe's addresses, waits until each model has a READY worker, and starts kserve.ModelServer
(HTTP 8080, gRPC 8081) with one kserve.Model per name. KServe answers health, readiness and metadata itself and
forwards inference to TorchServe in PROTOCOL_VERSION (v1: /v1/models/<name>:predict, v2: /v2/models/<name>/infer).
That wrapper targets kserve 0.13; `main` does the same with the pinned kserve's API.

    python -m servers.kserve --config /mnt/models/config/config.properties --http-port 8080 --grpc-port 8081
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from common.cli import one_line_errors
from common.config import ROOT
from handlers.archive import mar_file
from servers.process import Process, ServerError, free_port
from servers.torchserve import TorchServe, read_properties

MOUNT = "/mnt/models"  # where the runtime puts the InferenceService's storage folder
CONFIG = f"{MOUNT}/config/config.properties"
ENVELOPES = {"v1": "kserve", "v2": "kservev2"}  # what the runtime sets TS_SERVICE_ENVELOPE to, per protocol


def snapshot_models(props: dict[str, str]) -> list[str]:
    try:
        return list(json.loads(props["model_snapshot"])["models"])
    except (KeyError, ValueError, TypeError):
        raise ServerError("config.properties has no model_snapshot naming the models") from None


class RuntimeTorchServe(TorchServe):
    """TorchServe from a storage folder at `mount` (standing in for /mnt/models) as the runtime starts it: its
    config/config.properties with /mnt/models read as `mount` and the addresses moved to free loopback ports, the
    runtime's args (no --models: the snapshot names them) and environment."""

    name = "TorchServe (KServe runtime)"

    def __init__(self, mount: Path | str, workdir: Path | str, protocol: str = "v2") -> None:
        mount = Path(mount).resolve()
        config = mount / "config" / "config.properties"
        props = read_properties(config)
        names = snapshot_models(props)
        local = {key: value.replace(MOUNT, str(mount)) for key, value in props.items() if MOUNT in value}
        super().__init__(mount / "model-store", {n: mar_file(n) for n in names}, workdir, config, {}, local)
        torchserve = self.cmd[0]
        self.cmd = [torchserve, "--start", "--foreground", f"--model-store={self.model_store}"]
        self.cmd.append(f"--ts-config={self.workdir / 'config.properties'}")
        self.runtime_env = {"TS_SERVICE_ENVELOPE": ENVELOPES[protocol], "PROTOCOL_VERSION": protocol}

    def _env(self) -> dict[str, str]:
        return {**super()._env(), **self.runtime_env}


class ModelServer(Process):
    """servers/kserve.py's `main` in its own process, in front of the TorchServe whose config it reads."""

    name = "KServe model server"

    def __init__(self, config: Path | str, log: Path | str, protocol: str = "v2") -> None:
        self.http_port, self.grpc_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "servers.kserve", "--config", str(config)]
        cmd += ["--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port)]
        super().__init__(cmd, log, cwd=ROOT, env={**os.environ, "PROTOCOL_VERSION": protocol})

    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def live(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url()}/v2/health/live", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False


def wait_for_workers(management: str, name: str, timeout: float) -> None:
    """Block until TorchServe reports a READY worker for `name`, as the runtime's wrapper does before serving."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with urllib.request.urlopen(f"{management}/models/{name}", timeout=5) as response:
                if any(w["status"] == "READY" for w in json.loads(response.read())[0]["workers"]):
                    return
        except (OSError, urllib.error.URLError, KeyError, IndexError, ValueError):
            pass
        time.sleep(0.5)
    raise ServerError(f"TorchServe at {management} has no READY worker for {name} after {timeout:.0f} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.environ.get("CONFIG_PATH", CONFIG), help="TorchServe's config")
    parser.add_argument("--http-port", type=int, default=8080, help="KServe's HTTP port (the runtime's 8080)")
    parser.add_argument("--grpc-port", type=int, default=8081, help="KServe's gRPC port (the runtime's 8081)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for TorchServe's workers")
    args = parser.parse_args(argv)
    protocol = os.environ.get("PROTOCOL_VERSION", "v1")
    with one_line_errors():
        props = read_properties(args.config)
        names = snapshot_models(props)
        inference, management = props["inference_address"], props["management_address"]
        for name in names:
            wait_for_workers(management, name, args.timeout)
    sys.argv = sys.argv[:1]  # kserve parses the process's arguments when imported
    import kserve
    from kserve.predictor_config import PredictorConfig

    models = [kserve.Model(name) for name in names]
    for model in models:
        model.load()  # ready: TorchServe's workers are
    host = inference.split("//", 1)[-1]
    config = PredictorConfig(predictor_host=host, predictor_protocol=protocol)
    kserve.ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, predictor_config=config).start(models)


if __name__ == "__main__":
    main()
