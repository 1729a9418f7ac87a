"""The serving image, built and run for real: docker where a daemon answers, else buildah (chroot).

The image bakes in the session's archive (conftest's `mar`), runs its own entrypoint with PORT
set on free host ports, answers a real prediction and a malformed request over HTTP, and exits
cleanly on SIGTERM. The base image and the build's layers stay cached for the next run.
"""

import base64
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import psutil
import pytest
import yaml

from cloud import image as container
from common import engine as engines
from common.cli import BundleError
from common.config import load_config
from handlers.archive import AUTO
from scripts.container import main as container_main
from servers.container import Container
from servers.process import Process, free_port
from servers.torchserve import CONFIG_PROPERTIES, read_properties
from tests.client import call, container_on_host, parsed, png, rendered_settings

ROOT = Path(__file__).resolve().parent.parent
MAX_IMAGE_BYTES = 1.5e9
STOP_SECONDS = 10  # Cloud Run sends SIGKILL 10 s after SIGTERM


def test_serving_pins_agree_with_requirements_txt():
    serve, full = container.pins(container.REQUIREMENTS_SERVE), container.pins(container.REQUIREMENTS)
    assert {"torchserve", "pyyaml", "psutil", "pillow", "numpy"} <= set(serve)
    assert {name: full.get(name) for name in serve} == serve
    assert container.dockerfile_arg("TORCH_VERSION") == full["torch"]
    assert container.dockerfile_arg("TORCHVISION_VERSION") == full["torchvision"]  # the GPU image's nvJPEG
    assert not {"kornia", "lightning", "torchvision", "hydra-core"} & set(serve)


def test_image_tags_follow_the_config_and_only_inference_listens_outside(cfg, capsys):
    container_main(["tag"])
    assert capsys.readouterr().out.strip() == f"{cfg.name}:{cfg.version}"
    container_main(["tag", "--gpu"])
    assert capsys.readouterr().out.strip() == f"{cfg.name}-gpu:{cfg.version}"
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
    for sub in (["build"], ["run"], ["tag"]):  # the subcommands (tests/test_docs.py checks the command itself)
        run = subprocess.run([*cmd, *sub, "--help"], capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0 and "usage" in run.stdout, sub
    nowhere = tmp_path / "nowhere"
    run = subprocess.run([*cmd, "build", "--models", str(nowhere)], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1 and run.stderr.strip() == f"error: --models {nowhere} is not a folder"
    run = subprocess.run([*cmd, "build", "--gpu", "--target", "train"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1 and run.stderr.strip() == "error: --gpu builds the target gpu, not train"


DOCKER = ROOT / "docker"
TS_KEYS = {"minWorkers": "workers", "maxWorkers": "workers", "batchSize": "batch_size"}
TS_KEYS |= {"maxBatchDelay": "max_batch_delay_ms", "responseTimeout": "response_timeout_s"}


def ts_settings(serve) -> dict:
    """The model-config.yaml keys a serve profile sets: workers: auto leaves the workers to TorchServe."""
    return {key: serve[name] for key, name in TS_KEYS.items() if name != "workers" or serve.workers != AUTO}


def stages(dockerfile: str) -> dict[str, str]:
    """Each `FROM ... AS name` stage's text, by name."""
    parts = re.split(r"^FROM ", dockerfile, flags=re.M)[1:]
    return {re.match(r"\S+ AS (\S+)", part).group(1): part for part in parts}


def test_the_image_renders_each_serving_profile_from_configs_serve(tmp_path):
    out = rendered_settings(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["cpu.yaml", "gpu.yaml"]
    for profile in ("cpu", "gpu"):
        serve = load_config([f"serve={profile}"]).serve
        assert yaml.safe_load((out / f"{profile}.yaml").read_text()) == ts_settings(serve), profile
    assert yaml.safe_load((out / "gpu.yaml").read_text()) != yaml.safe_load((out / "cpu.yaml").read_text())


def archive_with_config(path: Path, config: dict) -> Path:
    """A .mar-shaped zip: the manifest and model-config.yaml (what pick_profile.py reads and rewrites)."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "m", "modelVersion": "1.0"}}))
        z.writestr("model-config.yaml", yaml.safe_dump(config))
        z.writestr("handlers/__init__.py", "")
    return path


@pytest.mark.parametrize("profile", ["cpu", "gpu"], ids=["cpu-profile", "gpu-profile"])  # "gpu": a GPU marker
def test_the_entrypoint_applies_the_profile_it_is_given(tmp_path, profile):
    """docker/pick_profile.py with SERVE_PROFILE set: the profile's TorchServe keys over the archive's, the handler's
    own section kept, number_of_gpu appended, and one line saying so."""
    settings = rendered_settings(tmp_path)
    handler = {"top_k": 5, "max_pixels": 1000}
    mar = archive_with_config(tmp_path / "m.mar", {"minWorkers": 9, "batchSize": 2, "handler": handler})
    properties = tmp_path / "config.properties"
    properties.write_text("model_store=x\n")
    model_dir = tmp_path / "store" / "m"
    cmd = [sys.executable, str(DOCKER / "pick_profile.py"), str(mar), str(model_dir)]
    cmd += ["--settings", str(settings), "--properties", str(properties)]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SERVE_PROFILE": profile})
    assert run.returncode == 0, run.stderr
    serve = load_config([f"serve={profile}"]).serve
    config = yaml.safe_load((model_dir / "model-config.yaml").read_text())
    assert config == {**ts_settings(serve), "handler": handler}
    assert (model_dir / "MAR-INF" / "MANIFEST.json").is_file() and (model_dir / "handlers").is_dir()
    gpus = int(read_properties(properties)["number_of_gpu"])
    assert gpus == 0 if profile == "cpu" else gpus >= 0
    line = run.stdout.strip()
    assert "\n" not in line and line.startswith(f"entrypoint: serving profile {profile} (SERVE_PROFILE; ")
    workers = "a worker per core" if serve.workers == AUTO else f"{serve.workers} worker(s)"
    assert f"{workers}, batch {serve.batch_size}, max batch delay {serve.max_batch_delay_ms} ms" in line


def test_the_entrypoint_picks_the_profile_by_the_gpus_it_sees(tmp_path):
    """Without SERVE_PROFILE: gpu where a GPU is visible, else cpu (here: whatever this machine has)."""
    spec = importlib.util.spec_from_file_location("image_profile", DOCKER / "pick_profile.py")  # the image's own script
    picker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(picker)
    assert (picker.pick("auto", 0), picker.pick("auto", 1), picker.pick("cpu", 2), picker.pick("gpu", 0)) == (
        "cpu",
        "gpu",
        "cpu",
        "gpu",
    )
    gpus, found = picker.visible_gpus()
    mar = archive_with_config(tmp_path / "m.mar", {"handler": {}})
    properties = tmp_path / "config.properties"
    cmd = [sys.executable, str(DOCKER / "pick_profile.py"), str(mar), str(tmp_path / "m")]
    cmd += ["--settings", str(rendered_settings(tmp_path)), "--properties", str(properties)]
    env = {k: v for k, v in os.environ.items() if k != "SERVE_PROFILE"}
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    expected = "gpu" if gpus else "cpu"
    assert run.stdout.startswith(f"entrypoint: serving profile {expected} (auto; {gpus} GPU(s) visible: {found})")
    run = subprocess.run(cmd, capture_output=True, text=True, env={**env, "SERVE_PROFILE": "tpu"})
    assert run.returncode == 1
    assert run.stderr.strip() == "entrypoint: error: SERVE_PROFILE='tpu': one of auto, cpu, gpu"


def test_the_gpu_target_shares_the_serving_stage_and_installs_cuda_torch():
    """What can be checked of the gpu image without its several GB of wheels."""
    dockerfile = container.DOCKERFILE.read_text()
    by_name = stages(dockerfile)
    assert list(by_name)[-1] == "runtime", "runtime must stay the default (last) target"
    for target, builder in (("runtime", "builder"), ("gpu", "builder-gpu")):
        stage = by_name[target]
        assert stage.startswith(f"serving AS {target}\n"), target
        assert f"COPY --from={builder} /opt/venv /opt/venv" in stage and "COPY --from=ts /opt/ts /opt/ts" in stage
    assert "NVIDIA_VISIBLE_DEVICES=all" in by_name["gpu"] and "NVIDIA_VISIBLE_DEVICES" not in by_name["runtime"]
    assert "ENTRYPOINT" in by_name["serving"] and "USER model-server" in by_name["serving"]
    cpu, gpu = by_name["builder"], by_name["builder-gpu"]
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in cpu and "ARG GPU_TORCH_INDEX_URL=\n" in gpu
    assert "RUN /tmp/finish-venv.sh\n" in cpu and "RUN /tmp/finish-venv.sh --cuda\n" in gpu
    assert (
        "docker/pick_profile.py" in by_name["ts"] and "COPY --from=settings /settings /opt/ts/serve/" in by_name["ts"]
    )
    assert container.TARGETS.keys() <= set(by_name)
    run = subprocess.run(["sh", "-n", str(DOCKER / "finish-venv.sh")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert os.access(DOCKER / "finish-venv.sh", os.X_OK) and os.access(DOCKER / "entrypoint.sh", os.X_OK)


def test_the_settings_stage_copies_every_package_its_script_imports():
    """The settings stage has hydra-core and pyyaml only: docker/settings.py must reach no other third-party
    package, and every local package it imports must be copied into /src."""
    stage = stages(container.DOCKERFILE.read_text())["settings"]
    copied = {src for src, dest in re.findall(r"^COPY (\S+) /src/(\S+)$", stage, re.M) if src == dest}
    code = (
        "import sys; before = set(sys.modules); import runpy; runpy.run_path(sys.argv[1]); "
        "own = lambda f: f.startswith(" + repr(str(ROOT) + "/") + ") and not f.startswith(sys.prefix + '/'); "
        "mods = {m.split('.')[0]: getattr(mod, '__file__', None) or '' for m, mod in sys.modules.items() "
        "if m not in before}; "
        "print(*sorted(m for m, f in mods.items() if own(f))); "
        "print(*sorted(m for m, f in mods.items() if 'site-packages' in f))"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", code, str(DOCKER / "settings.py")], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr
    local, third_party = (set(line.split()) for line in run.stdout.splitlines()[-2:])
    assert local | {"configs"} <= copied, f"missing COPY lines for {sorted(local | {'configs'} - copied)}"
    allowed = {"hydra", "omegaconf", "antlr4", "packaging", "yaml", "_yaml"}  # hydra-core, pyyaml and their deps
    allowed.add("attr")  # omegaconf uses attrs where installed, and goes without
    assert third_party <= allowed, sorted(third_party - allowed)


@pytest.mark.server
def test_the_entrypoint_serves_the_gpu_profile_settings_through_torchserve(cfg, mar, tmp_path):
    """docker/entrypoint.sh on this host (no image), laid out as /opt/ts, with SERVE_PROFILE=gpu: the real
    TorchServe reports the gpu profile's workers, batch size and delay for the archive (which carries the cpu's)."""
    ts_dir, env, ports = container_on_host(tmp_path, cfg.name)
    shutil.copy2(mar, ts_dir / "model-store" / mar.name)
    env["SERVE_PROFILE"] = "gpu"
    gpu = load_config(["serve=gpu"]).serve
    assert read_model_config_batch(mar) != gpu.batch_size  # the archive's own settings are not the gpu profile's
    with Process(["sh", str(ts_dir / "entrypoint.sh")], tmp_path / "run.log", env=env) as server:
        management = f"http://127.0.0.1:{ports['MANAGEMENT_PORT']}"
        wait_ready(server, management, cfg.name, timeout=180)
        model = parsed(call(f"{management}/models/{cfg.name}")[1])[0]
        assert (model["batchSize"], model["maxBatchDelay"]) == (gpu.batch_size, gpu.max_batch_delay_ms)
        assert (model["minWorkers"], model["maxWorkers"], len(model["workers"])) == (gpu.workers,) * 3
        assert "entrypoint: serving profile gpu (SERVE_PROFILE; " in server.log.read_text()
        status, _ = call(f"http://127.0.0.1:{ports['PORT']}/ping")
        assert status == 200


def read_model_config_batch(mar: Path) -> int:
    with zipfile.ZipFile(mar) as z:
        return yaml.safe_load(z.read("model-config.yaml"))["batchSize"]


@pytest.fixture(scope="module")
def engine() -> str:
    """docker if its daemon answers, else buildah, installed here when missing (common/apt.py: root or sudo)."""
    if engines.docker_works():
        return "docker"
    try:
        return engines.engine("buildah")
    except (BundleError, OSError) as err:
        pytest.skip(f"no container engine: {err}")


@pytest.fixture(scope="module")
def image(cfg, mar, engine, tmp_path_factory):
    """The runtime image with the session's archive baked in. Afterwards it stays as <name>-test:cache, the one
    image kept: removing it would take the build's cached layers with it (buildah drops an image's intermediate
    images), and the next run would install Java again."""
    tag = f"localhost/{cfg.name}-test:{int(time.time())}"
    log = tmp_path_factory.mktemp("container") / "build.log"
    start = time.monotonic()
    tool = ["docker"] if engine == "docker" else [*engines.as_root(), "buildah"]
    try:
        try:
            container.build("runtime", tag, cfg.name, mar.parent, engine, log=log)
        except BundleError as err:
            pytest.fail(f"{err}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        size = container.image_size(tag, engine)
        print(f"\nimage {tag}: built in {time.monotonic() - start:.0f} s, {size / 1e9:.2f} GB ({engine})")
        yield tag, size
        engines.sh([*tool, "tag", tag, f"localhost/{cfg.name}-test:cache"], check=False, capture_output=True)
    finally:
        engines.sh([*tool, "rmi", "-f", tag], check=False, capture_output=True)


def wait_ready(ctr: Process, management: str, name: str, timeout: float = 120) -> float:
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
