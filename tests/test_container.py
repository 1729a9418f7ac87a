"""The serving image, built and run for real: docker where a daemon answers, else buildah (chroot).

The image bakes in the session's archive (conftest's `mar`), runs its own entrypoint with PORT
set on free host ports, answers a real prediction and a malformed request over HTTP, and exits
cleanly on SIGTERM. The base image and the build's layers stay cached for the next run.
"""

import base64
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from common.cli import BundleError
from scripts.container import main as container_main
from servers import container
from servers.container import Container
from servers.process import free_port
from servers.torchserve import CONFIG_PROPERTIES, read_properties
from tests.client import call, parsed, png

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
    container_main(["tag"])
    assert capsys.readouterr().out.strip() == f"{cfg.name}:{cfg.version}"
    props = read_properties(ROOT / "docker" / "config.properties")
    assert props["inference_address"].startswith("http://0.0.0.0:")
    for key in ("management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    assert props["disable_token_authorization"] == "true"  # Cloud Run IAM authenticates instead


def test_the_container_serves_with_the_bundles_performance_settings():
    """docker/config.properties differs from config.properties in addresses and auth only: what `make bench`
    tuned (queue, logging, workers, metrics) is the same in both."""
    local, image = read_properties(CONFIG_PROPERTIES), read_properties(ROOT / "docker" / "config.properties")
    for key in ("job_queue_size", "async_logging", "default_workers_per_model", "metrics_mode"):
        assert image.get(key) == local.get(key), key


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


@pytest.mark.slow
def test_the_train_target_copies_every_package_its_entrypoint_imports():
    """The Vertex image runs `python -m scripts.vertex_train`: every local package it reaches is in /app."""
    dockerfile = container.DOCKERFILE.read_text()
    stage = dockerfile.split("FROM python AS train", 1)[1].split("\nFROM ", 1)[0]
    copied = {src for src, dest in re.findall(r"^COPY (\S+) /app/(\S+)$", stage, re.M) if src == dest}
    assert 'ENTRYPOINT ["python", "-m", "scripts.vertex_train"]' in stage
    code = (
        "import sys, scripts.vertex_train; from training.pipeline import stages; stages(); "
        "own = lambda f: f.startswith(" + repr(str(ROOT) + "/") + ") and not f.startswith(sys.prefix + '/'); "
        "print(*sorted({m.split('.')[0] for m, mod in sys.modules.items() "
        "if own(getattr(mod, '__file__', None) or '')}))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    imported = set(run.stdout.split())
    assert {"scripts", "cloud", "training", "handlers", "common"} <= imported
    assert imported | {"configs"} <= copied, f"missing COPY lines for {sorted(imported | {'configs'} - copied)}"


def test_command_line_help_and_one_line_errors(tmp_path):
    cmd = [sys.executable, "-m", "scripts.container"]
    for sub in ([], ["build"], ["run"], ["tag"]):
        run = subprocess.run([*cmd, *sub, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0 and "usage" in run.stdout, sub
    nowhere = tmp_path / "nowhere"
    run = subprocess.run([*cmd, "build", "--models", str(nowhere)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1 and run.stderr.strip() == f"error: --models {nowhere} is not a folder"


@pytest.fixture(scope="module")
def engine() -> str:
    """docker if its daemon answers, else buildah, installed here when missing (common/apt.py: root or sudo)."""
    if container.docker_works():
        return "docker"
    try:
        return container.engine("buildah")
    except (BundleError, OSError) as err:
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
        except BundleError as err:
            pytest.fail(f"{err}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        size = container.image_size(tag, engine)
        print(f"\nimage {tag}: built in {time.monotonic() - start:.0f} s, {size / 1e9:.2f} GB ({engine})")
        yield tag, size
    finally:
        rmi = (
            ["docker", "rmi", "-f", tag] if engine == "docker" else [*container.as_root(), "buildah", "rmi", "-f", tag]
        )
        container.sh(rmi, check=False, capture_output=True)


def wait_ready(ctr: Container, management: str, name: str, timeout: float = 120) -> float:
    """/ping answers Healthy while workers still load: wait for every worker READY instead."""

    def ready() -> bool:
        try:
            status, body = call(f"{management}/models/{name}", timeout=2)
            workers = parsed(body)[0]["workers"] if status == 200 else []
        except (OSError, KeyError, IndexError, TypeError):
            return False
        return bool(workers) and all(w["status"] == "READY" for w in workers)

    return ctr.wait_until(ready, timeout, f"{name} READY")


@pytest.mark.slow
def test_running_an_image_that_is_not_there_is_a_one_line_error(engine):
    if engine != "buildah":
        pytest.skip("docker would try to pull the image")
    run = subprocess.run(
        [sys.executable, "-m", "scripts.container", "run", "--tag", "localhost/no-such-image:0", "--engine", engine],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 1
    expected = "error: no image localhost/no-such-image:0: build it with `python -m scripts.container build`"
    assert run.stderr.strip() == expected


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
        assert call(f"{inference}/ping")[0] == 200
        log = ctr.log.read_text()
        assert "token authorization is DISABLED" in log and "--no-allow-unauthenticated" in log

        smoke = [sys.executable, str(ROOT / "docker" / "smoke.py"), inference, cfg.name, "--timeout", "30"]
        run = subprocess.run(smoke, capture_output=True, text=True)  # what Cloud Build runs against the image
        assert run.returncode == 0 and run.stdout.startswith("smoke: OK"), run.stderr

        images, labels = test_split
        instances = [{"b64": base64.b64encode(png(images[i])).decode()} for i in range(16)]
        url = f"{inference}/predictions/{cfg.name}"
        status, raw = call(url, json.dumps({"instances": instances}).encode(), {"Content-Type": "application/json"})
        body = parsed(raw)
        assert status == 200, body
        assert body["model"] == cfg.name and len(body["predictions"]) == 16
        correct = sum(p["label"] == str(int(labels[i])) for i, p in enumerate(body["predictions"]))
        assert correct >= 12, body["predictions"]

        status, raw = call(url, b"certainly not an image", {"Content-Type": "application/octet-stream"})
        body = parsed(raw)
        assert 400 <= status < 500 and "error" in body, (status, body)
        status, metrics = call(f"http://127.0.0.1:{ports['METRICS_PORT']}/metrics")
        assert status == 200 and b"ts_inference_requests_total" in metrics

        first = ctr.first_process()
        assert first is not None and first.uids().real != 0, "the server must not run as root"
        assert "drain.py" in " ".join(first.cmdline()), f"PID 1 is {first.cmdline()}: the entrypoint must exec drain.py"
        assert [p for p in first.children() if "java" in p.name()], "the Java frontend is not PID 1's child"
        workers = [p for p in first.children(recursive=True) if "java" not in p.name()]
        assert workers, "no Python worker under the frontend"
        start = time.monotonic()
        code = ctr.stop(STOP_SECONDS + 5)
        seconds = time.monotonic() - start
        print(f"SIGTERM to exit: {seconds:.1f} s, code {code}")
        assert code in (0, 143), f"exit code {code}:\n{ctr.log.read_text()[-2000:]}"  # 143: JVM after SIGTERM
        assert seconds <= STOP_SECONDS
        assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
