"""The serving image, built and run for real: docker where a daemon answers, else buildah (chroot).

The image bakes in the session's archive (conftest's `mar`), runs its own entrypoint with PORT
set on free host ports, answers a real prediction and a malformed request over HTTP, and exits
cleanly on SIGTERM. The base image and the build's layers stay cached for the next run.
"""

import base64
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from scripts import container
from scripts.container import Container, ContainerError
from scripts.serve import free_port, read_properties
from tests.conftest import png

ROOT = Path(__file__).resolve().parent.parent
MAX_IMAGE_BYTES = 1.5e9
STOP_SECONDS = 10  # Cloud Run sends SIGKILL 10 s after SIGTERM


def test_serving_pins_agree_with_requirements_txt():
    serve, full = container.pins(container.REQUIREMENTS_SERVE), container.pins(container.REQUIREMENTS)
    assert {"torchserve", "pyyaml", "psutil", "pillow", "numpy"} <= set(serve)
    assert {name: full.get(name) for name in serve} == serve
    assert container.dockerfile_arg("TORCH_VERSION") == full["torch"]
    assert not {"kornia", "lightning", "torchvision", "hydra-core"} & set(serve)


def test_dockerfile_defaults_match_the_config(cfg, capsys):
    assert container.dockerfile_arg("MODEL_NAME") == cfg.name
    container.main(["tag"])
    assert capsys.readouterr().out.strip() == f"{cfg.name}:{cfg.version}"
    props = read_properties(ROOT / "docker" / "config.properties")
    assert props["inference_address"].startswith("http://0.0.0.0:")
    for key in ("management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    assert props["disable_token_authorization"] == "true"  # Cloud Run IAM authenticates instead


def test_dockerignore_keeps_data_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", "data", "artifacts", "checkpoints", "logs", "reports", "dvc-remote", ".dvc/cache"} <= ignored


def test_pip_settings_become_mounted_build_args(tmp_path):
    index, wheels = tmp_path / "pypi", tmp_path / "wheels"
    (index / "simple").mkdir(parents=True)
    wheels.mkdir()
    (wheels / "torch-9.9.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").touch()
    settings = {"extra-index-url": f"file://{index}/simple https://example.org/simple", "find-links": str(wheels)}
    args, volumes = container.pip_build_args(settings)
    assert args["PIP_EXTRA_INDEX_URL"] == "file:///mnt/host-pip/0/simple https://example.org/simple"
    assert args["PIP_FIND_LINKS"] == "/mnt/host-pip/1"
    assert volumes == [f"{index}:/mnt/host-pip/0:ro", f"{wheels}:/mnt/host-pip/1:ro"]
    assert container.local_cpu_torch(str(wheels)) == "9.9.0+cpu"
    assert container.local_cpu_torch(str(tmp_path)) is None


@pytest.fixture(scope="module")
def engine() -> str:
    """docker if its daemon answers, else buildah, installed here when missing (root + apt-get)."""
    if container.docker_works():
        return "docker"
    try:
        container.install_buildah()
        return container.engine("buildah")
    except (ContainerError, OSError) as err:
        pytest.skip(f"no container engine: {err}")


@pytest.fixture(scope="module")
def image(cfg, mar, engine, tmp_path_factory):
    """The runtime image with the session's archive baked in; removed afterwards (its cache stays)."""
    tag = f"localhost/{cfg.name}-test:{int(time.time())}"
    log = tmp_path_factory.mktemp("container") / "build.log"
    start = time.monotonic()
    try:
        try:
            container.build("runtime", tag, cfg.name, mar.parent, engine, log=log)
        except ContainerError as err:
            pytest.fail(f"{err}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        size = container.image_size(tag, engine)
        print(f"\nimage {tag}: built in {time.monotonic() - start:.0f} s, {size / 1e9:.2f} GB ({engine})")
        yield tag, size
    finally:
        rmi = ["docker", "rmi", "-f", tag] if engine == "docker" else ["buildah", "rmi", "-f", tag]
        container.sh(rmi, check=False, capture_output=True)


def get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def post(url: str, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def wait_ready(ctr: Container, management: str, name: str, timeout: float = 120) -> None:
    """/ping answers Healthy while workers still load: wait for every worker READY instead."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert ctr.proc.poll() is None, f"container exited with {ctr.proc.returncode}:\n{ctr.log.read_text()[-3000:]}"
        try:
            status, body = get(f"{management}/models/{name}", timeout=2)
            workers = json.loads(body)[0]["workers"] if status == 200 else []
            if workers and all(w["status"] == "READY" for w in workers):
                return
        except (OSError, ValueError, KeyError, IndexError):
            pass
        time.sleep(0.2)
    pytest.fail(f"{name} not READY after {timeout:.0f} s:\n{ctr.log.read_text()[-3000:]}")


@pytest.mark.server
def test_image_is_small_enough(image):
    assert image[1] <= MAX_IMAGE_BYTES, f"{image[1] / 1e9:.2f} GB"


@pytest.mark.server
def test_entrypoint_refuses_a_missing_archive(image, engine, tmp_path):
    env = {"MODEL_NAME": "no_such_model", "PORT": str(free_port())}
    with Container(image[0], env, tmp_path / "run.log", engine) as ctr:
        assert ctr.proc.wait(timeout=120) != 0
        assert "no archive /opt/ts/model-store/no_such_model.mar" in ctr.log.read_text()


@pytest.mark.server
def test_container_serves_then_stops_on_sigterm(cfg, image, engine, test_split, tmp_path):
    ports = {key: free_port() for key in ("PORT", "MANAGEMENT_PORT", "METRICS_PORT")}
    ports |= {key: free_port() for key in ("GRPC_INFERENCE_PORT", "GRPC_MANAGEMENT_PORT")}
    env = {key: str(port) for key, port in ports.items()}
    inference, management = f"http://127.0.0.1:{ports['PORT']}", f"http://127.0.0.1:{ports['MANAGEMENT_PORT']}"
    with Container(image[0], env, tmp_path / "run.log", engine) as ctr:
        start = time.monotonic()
        wait_ready(ctr, management, cfg.name)
        print(f"\ncontainer start to {cfg.name} READY: {time.monotonic() - start:.1f} s")
        assert get(f"{inference}/ping")[0] == 200
        log = ctr.log.read_text()
        assert "token authorization is DISABLED" in log and "--no-allow-unauthenticated" in log

        smoke = [sys.executable, str(ROOT / "docker" / "smoke.py"), inference, cfg.name, "--timeout", "30"]
        run = subprocess.run(smoke, capture_output=True, text=True)  # what Cloud Build runs against the image
        assert run.returncode == 0 and run.stdout.startswith("smoke: OK"), run.stderr

        images, labels = test_split
        instances = [{"b64": base64.b64encode(png(images[i])).decode()} for i in range(16)]
        url = f"{inference}/predictions/{cfg.name}"
        status, body = post(url, json.dumps({"instances": instances}).encode(), "application/json")
        assert status == 200, body
        assert body["model"] == cfg.name and len(body["predictions"]) == 16
        correct = sum(p["label"] == str(int(labels[i])) for i, p in enumerate(body["predictions"]))
        assert correct >= 12, body["predictions"]

        status, body = post(url, b"certainly not an image", "application/octet-stream")
        assert 400 <= status < 500 and "error" in body, (status, body)
        status, metrics = get(f"http://127.0.0.1:{ports['METRICS_PORT']}/metrics")
        assert status == 200 and b"ts_inference_requests_total" in metrics

        first = ctr.first_process()
        assert first is not None and first.uids().real != 0, "the server must not run as root"
        assert "java" in first.name(), f"PID 1 is {first.cmdline()}: the entrypoint must exec the server"
        workers = first.children(recursive=True)
        assert workers, "no Python worker under the frontend"
        start = time.monotonic()
        code = ctr.stop(grace=STOP_SECONDS + 5)
        seconds = time.monotonic() - start
        print(f"SIGTERM to exit: {seconds:.1f} s, code {code}")
        assert code in (0, 143), f"exit code {code}:\n{ctr.log.read_text()[-2000:]}"  # 143: JVM after SIGTERM
        assert seconds <= STOP_SECONDS
        assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
