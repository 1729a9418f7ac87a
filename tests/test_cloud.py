"""Google Cloud deployment files, offline: they parse, agree with each other and with the config,
and cloud/deploy.py prints the commands they describe. Nothing here talks to Google Cloud."""

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from cloud import deploy, vertex
from common.config import load_config
from handlers.archive import read_manifest
from scripts.deploy import main as deploy_main
from servers.process import free_port
from servers.torchserve import read_properties

ROOT = Path(__file__).resolve().parent.parent
CLOUD = ROOT / "cloud"
BUILTINS = {"PROJECT_ID", "PROJECT_NUMBER", "LOCATION", "BUILD_ID", "COMMIT_SHA", "SHORT_SHA", "REVISION_ID"}
BUILTINS |= {"REPO_NAME", "REPO_FULL_NAME", "BRANCH_NAME", "TAG_NAME", "TRIGGER_NAME", "SERVICE_ACCOUNT"}


@pytest.fixture(scope="module")
def default_cfg():
    return load_config()


@pytest.fixture(scope="module")
def default_subs(default_cfg):
    d = deploy.DEFAULTS
    return deploy.substitutions(
        default_cfg, d["region"], d["repository"], None, d["memory"], (d["min_instances"], d["max_instances"])
    )


@pytest.fixture(autouse=True)
def no_cloud_env(monkeypatch):
    for name in ("GOOGLE_CLOUD_PROJECT", "GOOGLE_CLOUD_REGION"):
        monkeypatch.delenv(name, raising=False)


def resolve(value: str, subs: dict[str, str]) -> str:
    """What Cloud Build makes of a string: $NAME and ${NAME} substituted, $$ -> $."""
    value = re.sub(r"(?<!\$)\$\{?([A-Z_][A-Z0-9_]*)\}?", lambda m: subs[m.group(1)], value)
    return value.replace("$$", "$")


@pytest.mark.parametrize("path", sorted(CLOUD.glob("*.yaml")), ids=lambda p: p.name)
def test_cloud_files_are_valid_yaml(path):
    assert isinstance(yaml.safe_load(path.read_text()), dict)


@pytest.mark.parametrize("name", ["cloudbuild.yaml", "cloudbuild-gpu.yaml", "cloudbuild-train.yaml"])
def test_cloudbuild_substitutions_used_are_declared(name):
    text = (CLOUD / name).read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    body = body.replace("$$", "")  # escaped dollars are bash's
    used = set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", body))
    declared = set(yaml.safe_load(text)["substitutions"])
    assert {u for u in used if u.startswith("_")} == declared
    assert {u for u in used if not u.startswith("_")} <= BUILTINS, "unknown substitution (escape bash's $ as $$)"


def test_cloudbuild_defaults_are_what_deploy_derives_from_the_config(default_subs):
    declared = yaml.safe_load((CLOUD / "cloudbuild.yaml").read_text())["substitutions"]
    assert {k: str(v) for k, v in declared.items()} == default_subs
    train = yaml.safe_load((CLOUD / "cloudbuild-train.yaml").read_text())["substitutions"]
    assert train.pop("_GIT_COMMIT") == "unknown"  # deploy.py passes the checkout's commit (the image has no .git)
    assert {k: str(v) for k, v in train.items()} == {k: default_subs[k] for k in train}


def test_cloudbuild_deploys_exactly_what_deploy_py_prints(default_subs):
    steps = {step["id"]: step for step in yaml.safe_load((CLOUD / "cloudbuild.yaml").read_text())["steps"]}
    assert list(steps) == ["pull-archive", "build", "start", "smoke", "stop", "push", "deploy"]
    subs = {**default_subs, "PROJECT_ID": "my-proj"}
    step = steps["deploy"]
    command = [step["entrypoint"], *(resolve(arg, subs) for arg in step["args"])]
    assert command == deploy.run_deploy(default_subs, "my-proj")
    assert "--no-allow-unauthenticated" in command
    image = deploy.image_uri(default_subs, "my-proj")
    assert resolve(steps["push"]["args"][1], subs) == image
    assert resolve(steps["smoke"]["name"], subs) == image
    assert f"--env=PORT={deploy.container_port()}" in steps["start"]["args"]


def test_service_yaml_agrees_with_the_config(default_cfg, default_subs):
    service = yaml.safe_load((CLOUD / "service.yaml").read_text())
    template = service["spec"]["template"]
    assert service["metadata"]["name"] == default_subs["_SERVICE"]
    assert template["spec"]["containerConcurrency"] == deploy.concurrency(default_cfg.serve)
    assert template["spec"]["timeoutSeconds"] == int(default_subs["_TIMEOUT"])
    annotations = template["metadata"]["annotations"]
    assert annotations["autoscaling.knative.dev/minScale"] == default_subs["_MIN_INSTANCES"]
    assert annotations["autoscaling.knative.dev/maxScale"] == default_subs["_MAX_INSTANCES"]
    server = template["spec"]["containers"][0]
    port = deploy.container_port()
    assert server["image"].endswith(f"/{default_cfg.name}:{default_cfg.version}")
    assert server["ports"][0]["containerPort"] == port
    assert server["resources"]["limits"] == {"cpu": default_subs["_CPU"], "memory": default_subs["_MEMORY"]}
    for probe in ("startupProbe", "livenessProbe"):
        assert server[probe]["httpGet"] == {"path": "/ping", "port": port}, probe
    collector = template["spec"]["containers"][1]
    assert collector["volumeMounts"][0]["mountPath"] == "/etc/rungmp"


def test_concurrency_and_cpus_follow_the_serve_section(default_cfg):
    cfg = load_config(["serve.workers=2", "serve.batch_size=4", "serve.handler.threads=2"])
    assert deploy.concurrency(cfg.serve) == 16 and deploy.cpus(cfg.serve) == 8
    assert deploy.cpus(default_cfg.serve) == 2
    auto = load_config(["serve.workers=auto", "serve.batch_size=4"]).serve
    assert deploy.cpus(auto) == deploy.workers(auto) == deploy.AUTO_CPUS  # a worker on each vCPU
    assert deploy.concurrency(auto) == deploy.AUTO_CPUS * 4 * 2
    assert deploy.workers(auto, gpu=True) == 1 and deploy.concurrency(auto, gpu=True) == 8  # TorchServe: one per GPU
    with pytest.raises(deploy.DeployError, match="at most 8"):
        deploy.cpus(load_config(["serve.workers=4", "serve.handler.threads=2"]).serve)


def test_dry_run_prints_every_gcloud_command(capsys, default_cfg):
    concurrency = deploy.concurrency(default_cfg.serve)
    deploy_main(["serve", "--project", "my-proj", "--region", "us-central1", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines] == [
        ["gcloud", "services", "enable"],
        ["gcloud", "artifacts", "repositories"],
        ["gcloud", "builds", "submit"],
        ["gcloud", "run", "services"],
    ]
    assert "--config=cloud/cloudbuild.yaml" in lines[2] and "_REGION=us-central1" in lines[2]
    assert f"_CONCURRENCY={concurrency}" in lines[2] and f"_MODEL_NAME={default_cfg.name}" in lines[2]

    deploy_main(["serve", "--project", "my-proj", "--skip-build", "--dry-run", "model=resnet18"])
    out = capsys.readouterr().out
    assert "gcloud run deploy digits-resnet18 --project=my-proj" in out
    assert "--image=europe-west1-docker.pkg.dev/my-proj/models/digits_resnet18:1.0" in out
    assert (
        f"--port=8080 --cpu=2 --memory=2Gi --concurrency={concurrency}" in out and "--no-allow-unauthenticated" in out
    )


def test_train_dry_run_renders_the_vertex_job(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(deploy, "RENDERED", tmp_path)
    deploy_main(["train", "--project", "my-proj", "--bucket", "my-bucket", "--dry-run", "trainer.max_epochs=3"])
    out = capsys.readouterr().out
    spec_path = tmp_path / "vertex-job.digits_cnn.yaml"
    spec = yaml.safe_load(spec_path.read_text())
    container = spec["workerPoolSpecs"][0]["containerSpec"]
    assert container["imageUri"] == "europe-west1-docker.pkg.dev/my-proj/models/digits_cnn-train:1.0"
    assert container["args"] == ["trainer.max_epochs=3"]
    assert spec["baseOutputDirectory"]["outputUriPrefix"] == "gs://my-bucket/vertex/digits_cnn"
    assert "--config=cloud/cloudbuild-train.yaml" in out
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert f"_GIT_COMMIT={head or 'unknown'}" in out  # the image has no .git: the build gets the commit
    job = "gcloud ai custom-jobs create --project=my-proj --region=europe-west1 --display-name=digits_cnn-train"
    assert f"{job} --config={spec_path}" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["serve"], "error: no GCP project: pass --project or set GOOGLE_CLOUD_PROJECT"),
        (["serve", "--dry-run", "--min-instances", "4"], "error: --min-instances 4 / --max-instances 3"),
        (["train", "--dry-run"], "error: train needs --bucket"),
        (["serve", "--dry-run", "no_such_key=1"], "error: Could not override 'no_such_key'."),
    ],
)
def test_bad_input_is_a_one_line_error(argv, message):
    with pytest.raises(SystemExit) as exc:
        deploy_main(argv)
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


@pytest.mark.slow
def test_dvc_has_a_gcs_remote_and_local_stays_the_default():
    dvc = [str(Path(sys.executable).parent / "dvc")]
    remotes = subprocess.run([*dvc, "remote", "list"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    urls = dict(line.split()[:2] for line in remotes.splitlines())
    assert urls["gcs"].startswith("gs://")
    default = subprocess.run([*dvc, "remote", "default"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert default.stdout.strip() == "local"
    version = subprocess.run([*dvc, "version"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert re.search(r"\bgs \(gcsfs", version), "dvc-gs is not installed: the gcs remote would not work"


def test_smoke_check_fails_clearly_without_a_server():
    port = free_port()
    run = subprocess.run(
        [sys.executable, str(ROOT / "docker" / "smoke.py"), f"http://127.0.0.1:{port}", "m", "--timeout", "1"],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 1
    assert run.stderr.startswith(f"smoke: FAILED: no prediction from http://127.0.0.1:{port}/predictions/m")


def test_vertex_job_maps_its_model_dir_onto_the_gcs_mount():
    assert vertex.output_dir({"AIP_MODEL_DIR": "gs://b/vertex/model/"}) == Path("/gcs/b/vertex/model")
    assert vertex.output_dir({"OUTPUT_DIR": "/out", "AIP_MODEL_DIR": "gs://b/m"}) == Path("/out")
    assert vertex.output_dir({}) is None
    with pytest.raises(vertex.JobError, match="not a gs:// URI"):
        vertex.output_dir({"AIP_MODEL_DIR": "/local/path"})


@pytest.mark.slow
def test_vertex_entrypoint_runs_the_pipeline_and_copies_the_outputs(tmp_path):
    """The training image's entrypoint, in this process (1 epoch), as Vertex sets its environment."""
    overrides = [f"paths.{key}={tmp_path}/{key}" for key in ("data", "artifacts", "model_store", "runs")]
    overrides += ["trainer.max_epochs=1", "trainer.enable_progress_bar=false"]
    overrides += ["export.variant=torchscript-frozen"]  # 1 epoch leaves near-ties that int8 flips: it is refused
    env = {"AIP_MODEL_DIR": "gs://bucket/vertex/model/", "GCS_MOUNT": str(tmp_path / "gcs")}
    written = vertex.run(overrides, env)
    out = tmp_path / "gcs" / "bucket" / "vertex" / "model"
    names = ("digits_cnn.mar", "model.pt", "index_to_name.json", "lineage.json", "metrics.json", "runs")
    assert written == [out / name for name in names]
    assert all(path.stat().st_size > 0 for path in written[:-1])
    assert (out / "runs" / "mlflow.db").is_file()  # the local tracking store outlives the container
    assert read_manifest(out / "digits_cnn.mar")["model"]["modelName"] == "digits_cnn"


@pytest.mark.slow
def test_command_lines_one_line_errors(tmp_path):
    env = {**os.environ, "AIP_MODEL_DIR": str(tmp_path)}
    env.pop("OUTPUT_DIR", None)
    run = subprocess.run(
        [sys.executable, "-m", "scripts.vertex_train"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert run.returncode == 1 and run.stderr.strip() == f"error: AIP_MODEL_DIR {str(tmp_path)!r} is not a gs:// URI"
    assert not list(tmp_path.iterdir())


def test_train_dry_run_with_replicas_prints_a_chief_and_workers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(deploy, "RENDERED", tmp_path)
    deploy_main(["train", "--bucket", "b", "--replicas", "3", "--dry-run", "paths.data=/gcs/b/data/pets"])
    out = capsys.readouterr().out
    spec = yaml.safe_load((tmp_path / "vertex-job.digits_cnn.yaml").read_text())
    chief, workers = spec["workerPoolSpecs"]
    assert (chief["replicaCount"], workers["replicaCount"]) == (1, 2)
    assert chief["containerSpec"] == workers["containerSpec"] and chief["machineSpec"] == workers["machineSpec"]
    assert chief["containerSpec"]["args"] == ["trainer=ddp", "paths.data=/gcs/b/data/pets"]
    assert "#     replicaCount: 2" in out  # the job itself is printed
    deploy_main(["train", "--bucket", "b", "--dry-run"])
    one = yaml.safe_load((tmp_path / "vertex-job.digits_cnn.yaml").read_text())
    assert len(one["workerPoolSpecs"]) == 1 and one["workerPoolSpecs"][0]["containerSpec"]["args"] == []
    with pytest.raises(SystemExit, match="--replicas 0: need at least 1"):
        deploy_main(["train", "--bucket", "b", "--replicas", "0", "--dry-run"])


HOSTS = {"workerpool0": ["chief-0:2222"], "workerpool1": ["worker-0:2222", "worker-1:2222"]}
TF_HOSTS = {"chief": HOSTS["workerpool0"], "worker": HOSTS["workerpool1"]}
REPLICAS = [  # (variable, cluster, task, expected node rank)
    ("CLUSTER_SPEC", HOSTS, {"type": "workerpool0", "index": 0}, 0),
    ("CLUSTER_SPEC", HOSTS, {"type": "workerpool1", "index": 0}, 1),
    ("CLUSTER_SPEC", HOSTS, {"type": "workerpool1", "index": 1}, 2),
    ("TF_CONFIG", TF_HOSTS, {"type": "worker", "index": 1}, 2),
]
DERIVE = """
import json, os, sys
import lightning as L
from cloud.vertex import join_cluster
from common.config import load_config
for variable, spec in json.loads(sys.argv[1]):
    for name in ("CLUSTER_SPEC", "TF_CONFIG"):
        os.environ.pop(name, None)
    os.environ[variable] = spec
    cluster, overrides = join_cluster(dict(os.environ), ["trainer=ddp"])
    t = load_config(overrides).trainer
    trainer = L.Trainer(accelerator="cpu", strategy=t.strategy, devices=t.devices, num_nodes=t.num_nodes, logger=False)
    env = trainer.strategy.cluster_environment
    print(json.dumps({"global_rank": trainer.global_rank, "node_rank": trainer.node_rank,
        "world_size": trainer.world_size, "address": env.main_address, "port": env.main_port,
        "launches": not env.creates_processes_externally, "environment": type(env).__name__,
        "exported": {k: os.environ[k] for k in cluster}}))
"""


@pytest.mark.slow
def test_vertex_cluster_spec_gives_lightning_the_ranks_and_the_chief_address():
    """Each replica's environment as Vertex sets it, through the entrypoint's mapping, into a real Lightning
    Trainer (in a subprocess: the Trainer sets process-wide rank state)."""
    import json

    cases = [
        (variable, json.dumps({"cluster": hosts, "task": task, "environment": "cloud"}))
        for variable, hosts, task, _ in REPLICAS
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("CLUSTER_SPEC", "TF_CONFIG", "LOCAL_RANK", "RANK")}
    run = subprocess.run(
        [sys.executable, "-c", DERIVE, json.dumps(cases)], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == len(REPLICAS)
    for got, (variable, _, task, rank) in zip(results, REPLICAS, strict=True):
        assert got == {
            "global_rank": rank,
            "node_rank": rank,
            "world_size": 3,
            "address": "chief-0",
            "port": 2222,
            "launches": True,
            "environment": "LightningEnvironment",
            "exported": {"MASTER_ADDR": "chief-0", "MASTER_PORT": "2222", "WORLD_SIZE": "3", "NODE_RANK": str(rank)},
        }, (variable, task)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{not json", "not Vertex's cluster description"),
        ('{"cluster": {"workerpool1": ["w:1"]}, "task": {"type": "workerpool1", "index": 0}}', "exactly one chief"),
        ('{"cluster": {"workerpool0": ["c:1"]}, "task": {"type": "workerpool3", "index": 0}}', "does not train"),
    ],
)
def test_a_bad_cluster_spec_is_a_clear_error(spec, message):
    from cloud.cluster import ClusterError, lightning_env

    assert lightning_env({}) == {}
    with pytest.raises(ClusterError, match=message):
        lightning_env({"CLUSTER_SPEC": spec})


@pytest.fixture(scope="module")
def gpu_subs():
    d = deploy.DEFAULTS
    cfg = load_config(["serve=gpu"])
    instances = (d["min_instances"], d["max_instances"])
    return deploy.substitutions(cfg, d["region"], d["repository"], None, deploy.GPU_MEMORY, instances, gpu=True)


def test_the_gpu_cloudbuild_is_the_cpu_one_with_the_gpu_target_and_flags(gpu_subs):
    """cloudbuild-gpu.yaml: cloudbuild.yaml's steps with the gpu target, the -gpu image and the GPU flags only;
    its defaults are what deploy.py derives from serve=gpu, its deploy step what `serve --gpu` prints."""
    cpu, gpu = (yaml.safe_load((CLOUD / name).read_text()) for name in ("cloudbuild.yaml", "cloudbuild-gpu.yaml"))
    assert {k: str(v) for k, v in gpu["substitutions"].items()} == gpu_subs
    gpu_flags = ["--gpu=1", "--gpu-type=nvidia-l4", "--no-cpu-throttling"]
    image = "$_MODEL_NAME:$_MODEL_VERSION"
    expected = yaml.safe_load(yaml.safe_dump(cpu["steps"]).replace(image, image.replace(":", "-gpu:")))
    expected[1]["args"].insert(1, "--target=gpu")
    deploy_args = expected[-1]["args"]
    deploy_args[deploy_args.index("--cpu-boost") : deploy_args.index("--cpu-boost")] = gpu_flags
    assert gpu["steps"] == expected
    rest = ("steps", "substitutions")
    assert {k: v for k, v in gpu.items() if k not in rest} == {k: v for k, v in cpu.items() if k not in rest}
    step = gpu["steps"][-1]
    command = [step["entrypoint"], *(resolve(arg, {**gpu_subs, "PROJECT_ID": "my-proj"}) for arg in step["args"])]
    assert command == deploy.run_deploy(gpu_subs, "my-proj", gpu=True)


def test_gpu_dry_run_deploys_an_l4_with_the_gpu_profiles_concurrency(capsys):
    gpu, cpu = load_config(["serve=gpu"]).serve, load_config().serve
    concurrency = gpu.workers * gpu.batch_size * 2
    assert concurrency != cpu.workers * cpu.batch_size * 2  # the test can tell the profiles apart
    deploy_main(["serve", "--gpu", "--project", "my-proj", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    assert "--config=cloud/cloudbuild-gpu.yaml" in lines[2] and f"_CONCURRENCY={concurrency}" in lines[2]
    assert "_MEMORY=16Gi" in lines[2] and "_SERVICE=digits-cnn-gpu" in lines[2]
    deploy_main(["serve", "--gpu", "--project", "my-proj", "--skip-build", "--dry-run"])
    command = capsys.readouterr().out.splitlines()[2].split()
    assert command[:4] == ["gcloud", "run", "deploy", "digits-cnn-gpu"]
    assert "--image=europe-west1-docker.pkg.dev/my-proj/models/digits_cnn-gpu:1.0" in command
    assert {"--gpu=1", "--gpu-type=nvidia-l4", "--no-cpu-throttling", "--no-allow-unauthenticated"} <= set(command)
    flags = dict(arg[2:].split("=", 1) for arg in command if "=" in arg)
    assert int(flags["cpu"]) >= 4 and flags["memory"] == "16Gi" and flags["concurrency"] == str(concurrency)
    deploy_main(["serve", "--project", "my-proj", "--skip-build", "--dry-run"])
    assert "--gpu" not in capsys.readouterr().out  # the CPU deploy is unchanged


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--memory", "8Gi"], "error: --memory 8Gi: Cloud Run needs at least 16Gi beside a GPU"),
        (["--memory", "lots"], "error: --memory lots: use a number with Mi or Gi, e.g. 16Gi"),
        (["serve.batch_size=256"], "error: serve.workers x serve.batch_size x 2 = 2048 requests per instance"),
    ],
)
def test_bad_gpu_deploys_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit) as exc:
        deploy_main(["serve", "--gpu", "--dry-run", *argv])
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


GCLOUD = shutil.which("gcloud")


@pytest.mark.skipif(not GCLOUD, reason="needs the gcloud CLI")
def test_gcloud_accepts_every_flag_of_the_gpu_deploy(gpu_subs, tmp_path):
    """gcloud parses the flags before it asks for credentials: with none (a fresh config folder), an unknown
    flag fails with `unrecognized arguments` (exit 2), a known set with the missing account (exit 1)."""
    env = {**os.environ, "CLOUDSDK_CONFIG": str(tmp_path), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}
    command = deploy.run_deploy(gpu_subs, "my-proj", gpu=True)
    run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 1 and "active account" in run.stderr, run.stderr
    run = subprocess.run([*command, "--gpu-kind=l4"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and "unrecognized arguments: --gpu-kind=l4" in run.stderr, run.stderr


VALIDATE_JOB = """
import sys
import zipfile
sys.path[:0] = [sys.argv[1] + "/lib", sys.argv[1] + "/lib/third_party"]
from googlecloudsdk.api_lib.util import apis, messages
from googlecloudsdk.core import yaml
spec_type = apis.GetMessagesModule("aiplatform", "v1").GoogleCloudAiplatformV1CustomJobSpec
spec = messages.DictToMessageWithErrorCheck(yaml.load(open(sys.argv[2]).read()), spec_type)
machine = spec.workerPoolSpecs[0].machineSpec
print(machine.machineType, machine.acceleratorType, machine.acceleratorCount)
"""


def gcloud_python() -> tuple[str, str] | None:
    """(gcloud's own Python, its SDK folder), where the Google Cloud CLI bundles one."""
    if not GCLOUD:
        return None
    sdk = Path(GCLOUD).resolve().parent.parent
    python = sdk / "platform" / "bundledpythonunix" / "bin" / "python3"
    return (str(python), str(sdk)) if python.is_file() else None


@pytest.mark.skipif(gcloud_python() is None, reason="needs the gcloud CLI with its bundled Python")
def test_train_gpu_dry_run_renders_a_vertex_job_that_the_api_schema_accepts(tmp_path, monkeypatch, capsys):
    """The Vertex job with an L4, checked against aiplatform v1's CustomJobSpec as gcloud's own client defines
    it (an unknown field or accelerator type fails there), beside the CPU job."""
    monkeypatch.setattr(deploy, "RENDERED", tmp_path)
    python, sdk = gcloud_python()

    def validate(path: Path) -> str:
        run = subprocess.run([python, "-c", VALIDATE_JOB, sdk, str(path)], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr[-500:]
        return run.stdout.strip()

    deploy_main(["train", "--gpu", "--bucket", "b", "--dry-run"])
    spec_path = tmp_path / "vertex-job.digits_cnn.yaml"
    machine = yaml.safe_load(spec_path.read_text())["workerPoolSpecs"][0]["machineSpec"]
    assert machine == {"machineType": "g2-standard-8", "acceleratorType": "NVIDIA_L4", "acceleratorCount": 1}
    assert validate(spec_path) == "g2-standard-8 NVIDIA_L4 1"
    broken = tmp_path / "broken.yaml"
    broken.write_text(spec_path.read_text().replace("NVIDIA_L4", "NVIDIA_L5"))
    run = subprocess.run([python, "-c", VALIDATE_JOB, sdk, str(broken)], capture_output=True, text=True)
    assert run.returncode != 0 and "acceleratorType" in run.stderr
    deploy_main(["train", "--gpu", "--bucket", "b", "--replicas", "2", "--machine-type", "g2-standard-12", "--dry-run"])
    pools = yaml.safe_load(spec_path.read_text())["workerPoolSpecs"]
    assert [p["machineSpec"]["machineType"] for p in pools] == ["g2-standard-12"] * 2
    assert all(p["machineSpec"]["acceleratorType"] == "NVIDIA_L4" for p in pools)
    deploy_main(["train", "--bucket", "b", "--dry-run"])
    assert validate(spec_path) == "n1-standard-4 None None"
    capsys.readouterr()


def test_rollout_dry_run_prints_a_gradual_cloud_run_rollout(capsys):
    """canary: 1.1's image as a tagged revision with no traffic, then 10% to it; promote: 100%; rollback: all of it
    back to the revision named."""
    deploy_main(["rollout", "--project", "my-proj", "--dry-run", "version=1.1"])
    canary, split = capsys.readouterr().out.splitlines()
    assert canary.startswith("gcloud run deploy digits-cnn --project=my-proj")
    assert "--image=europe-west1-docker.pkg.dev/my-proj/models/digits_cnn:1.1" in canary
    assert canary.endswith("--no-allow-unauthenticated --no-traffic --tag=v1-1")
    traffic = "gcloud run services update-traffic digits-cnn --project=my-proj --region=europe-west1"
    assert split == f"{traffic} --to-tags=v1-1=10"
    deploy_main(["rollout", "--stage", "promote", "--project", "my-proj", "--dry-run", "version=1.1"])
    assert capsys.readouterr().out.splitlines() == [f"{traffic} --to-tags=v1-1=100"]
    deploy_main(
        ["rollout", "--stage", "rollback", "--previous", "digits-cnn-00001-abc", "--project", "my-proj", "--dry-run"]
    )
    assert capsys.readouterr().out.splitlines() == [f"{traffic} --to-revisions=digits-cnn-00001-abc=100"]
    assert deploy.revision_tag("2.0rc1") == "v2-0rc1"


def test_kserve_dry_run_writes_the_storage_folder_and_a_valid_inference_service(tmp_path, mar, cfg, capsys):
    """The storage folder KServe's TorchServe runtime mounts and the InferenceService, read back through the kserve
    SDK's models; the upload and apply commands printed."""
    from cloud import kserve

    deploy_main(["kserve", "--bucket", "my-bucket", "--dry-run", "--archive", str(mar), "--out", str(tmp_path)])
    out = capsys.readouterr().out
    folder = tmp_path / cfg.name
    assert (folder / "model-store" / mar.name).read_bytes() == mar.read_bytes()
    props = read_properties(folder / "config" / "config.properties")
    container = read_properties(ROOT / "docker" / "config.properties")
    for key in ("job_queue_size", "async_logging", "default_workers_per_model", "metrics_mode"):
        assert props.get(key) == container.get(key), key
    assert props["disable_token_authorization"] == "true" and props["enable_envvars_config"] == "false"
    assert props["inference_address"] == props["management_address"] == "http://0.0.0.0:8085"
    assert props["model_store"] == "/mnt/models/model-store"
    assert (folder / "config" / "metrics.yaml").read_text() == (ROOT / "metrics.yaml").read_text()
    [(version, model)] = json.loads(props["model_snapshot"])["models"][cfg.name].items()
    assert version == str(cfg.version) and model["marName"] == mar.name
    assert (model["batchSize"], model["minWorkers"]) == (cfg.serve.batch_size, deploy.workers(cfg.serve))
    manifest = tmp_path / "digits-cnn.inferenceservice.yaml"
    service = kserve.validate(yaml.safe_load(manifest.read_text()))
    assert type(service).__name__ == "V1beta1InferenceService" and service.kind == "InferenceService"
    predictor = service.spec.predictor
    assert predictor.model.model_format.name == "pytorch" and predictor.model.protocol_version == "v2"
    assert predictor.model.storage_uri == f"gs://my-bucket/kserve/{cfg.name}/{cfg.version}"
    assert (predictor.scale_metric, predictor.scale_target) == ("concurrency", deploy.concurrency(cfg.serve))
    assert predictor.model.resources.limits == {"cpu": str(deploy.cpus(cfg.serve)), "memory": "2Gi"}
    upload = f"gcloud storage cp --recursive {folder}/config {folder}/model-store gs://my-bucket/kserve/{cfg.name}/"
    assert f"{upload}{cfg.version}/" in out and f"kubectl apply -f {manifest}" in out


def test_kserve_gpu_service_asks_for_a_gpu_where_the_archive_has_a_gpu_file(tmp_path, mar, capsys):
    from cloud import kserve

    deploy_main(["kserve", "--gpu", "--dry-run", "--archive", str(mar), "--out", str(tmp_path)])
    spec = yaml.safe_load((tmp_path / "digits-cnn.inferenceservice.yaml").read_text())
    predictor = spec["spec"]["predictor"]
    gpu_cfg = load_config(["serve=gpu"])
    assert predictor["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert predictor["scaleTarget"] == deploy.concurrency(gpu_cfg.serve)
    assert predictor["model"]["storageUri"].startswith("gs://BUCKET/")
    cpu_only = tmp_path / "cpu_only.mar"
    with zipfile.ZipFile(cpu_only, "w") as z:  # an archive's listing without model.pt beside the int8 file
        z.writestr(
            "MAR-INF/MANIFEST.json", json.dumps({"model": {"modelName": "m", "serializedFile": "model.int8.pt"}})
        )
        z.writestr("model.int8.pt", b"")
    assert not kserve.gpu_ready(cpu_only) and kserve.gpu_ready(mar)
    with pytest.raises(SystemExit) as exc:
        deploy_main(["kserve", "--gpu", "--dry-run", "--archive", str(cpu_only), "--out", str(tmp_path)])
    assert str(exc.value) == "error: cpu_only.mar has no file a GPU runs: rebuild it with archive.gpu_file=true"
    capsys.readouterr()


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s["spec"]["predictor"].update(scaleTarget="64"), "spec.predictor.scaleTarget: expected int"),
        (lambda s: s["spec"]["predictor"]["model"].update(storageURI="gs://x"), "has no field 'storageURI'"),
        (lambda s: s["metadata"].update(labels=["a"]), "metadata.labels: expected a mapping"),
    ],
)
def test_kserve_validation_names_what_is_wrong(default_cfg, change, message):
    from cloud import kserve

    spec = kserve.inference_service(default_cfg, "gs://b/kserve")
    kserve.validate(spec)
    change(spec)
    with pytest.raises(deploy.DeployError, match=re.escape(message)):
        kserve.validate(spec)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--percent", "100", "--dry-run"], "error: --percent 100: a canary gets between 1 and 99 percent"),
        (["--stage", "rollback", "--project", "p"], "error: rollout --stage rollback needs --previous REVISION"),
    ],
)
def test_bad_rollouts_are_one_line_errors(argv, message):
    with pytest.raises(SystemExit) as exc:
        deploy_main(["rollout", *argv])
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)


@pytest.mark.skipif(not GCLOUD, reason="needs the gcloud CLI")
def test_gcloud_accepts_every_flag_of_the_gradual_rollout(default_cfg, tmp_path):
    """Each rollout command parses (without credentials: exit 1 for the missing account), and a misspelt flag
    does not (exit 2), as for the GPU deploy above."""
    env = {**os.environ, "CLOUDSDK_CONFIG": str(tmp_path), "CLOUDSDK_CORE_DISABLE_PROMPTS": "1"}
    d = deploy.DEFAULTS
    cfg = load_config(["version=1.1"])
    subs = deploy.substitutions(cfg, d["region"], d["repository"], None, d["memory"], (0, 3))
    commands = [c for stage in deploy.ROLLOUT_STAGES for c in deploy.rollout_commands(subs, "my-proj", stage, 10, "r1")]
    assert len(commands) == 4
    for command in commands:
        run = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert run.returncode == 1 and "active account" in run.stderr, (command, run.stderr)
    run = subprocess.run([*commands[1][:-1], "--to-tagz=v1-1=10"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and "unrecognized arguments: --to-tagz" in run.stderr, run.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["kserve"], "error: kserve needs --bucket"),
        (["kserve", "--dry-run", "--archive", "/no/such.mar"], "error: no archive /no/such.mar"),
        (["kserve", "--dry-run", "--min-instances", "5"], "error: --min-instances 5 / --max-instances 3"),
    ],
)
def test_kserve_bad_input_is_a_one_line_error(argv, message, tmp_path):
    with pytest.raises(SystemExit) as exc:
        deploy_main([*argv, "--out", str(tmp_path)])
    assert str(exc.value).startswith(message) and "\n" not in str(exc.value)
