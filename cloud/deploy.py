"""Deploy to Google Cloud with gcloud: the commands, from the config; `python -m scripts.deploy` runs them.

Model name and version come from the Hydra config, the port from docker/config.properties, the
Cloud Run concurrency and CPU from the `serve:` section. `serve` builds, smoke-tests, pushes and
deploys through Cloud Build (cloud/cloudbuild.yaml), whose `gcloud run deploy` is `run_deploy`'s;
`train` builds the training image (cloud/cloudbuild-train.yaml) and submits cloud/vertex-job.yaml.
With `gpu`, `serve` builds the image's gpu target (cloud/cloudbuild-gpu.yaml) and deploys it on an NVIDIA L4
with the serve=gpu profile's concurrency; `train` runs the job on a G2 machine with one L4 (the training
image's torch is PyPI's CUDA build).
`rollout` moves the service to a new model version gradually (`rollout_commands`): a revision of that version's
pushed image that gets no traffic, then a share of it (canary), then all of it (promote), or all back (rollback).
"""

import copy
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import yaml
from omegaconf import DictConfig

from common.cli import BundleError
from common.config import ROOT
from common.io import write_text
from handlers.archive import AUTO
from servers.torchserve import read_properties
from training.lineage import git_state

CLOUDBUILD = ROOT / "cloud" / "cloudbuild.yaml"
CLOUDBUILD_GPU = ROOT / "cloud" / "cloudbuild-gpu.yaml"
CLOUDBUILD_TRAIN = ROOT / "cloud" / "cloudbuild-train.yaml"
VERTEX_JOB = ROOT / "cloud" / "vertex-job.yaml"
CONTAINER_CONFIG = ROOT / "docker" / "config.properties"
RENDERED = ROOT / "logs" / "deploy"
CLOUD_RUN_CPUS = (1, 2, 4, 8)
AUTO_CPUS = 2  # vCPUs of an instance with serve.workers=auto: TorchServe starts a worker per vCPU it sees
CLOUD_RUN_MAX_CONCURRENCY = 1000
# Cloud Run's GPU (one per instance): its service page asks at least 4 CPUs and 16 GiB with it (gcloud 528's
# --help says 8Gi; the stricter holds), and instance-based billing (--no-cpu-throttling).
CLOUD_RUN_GPU = {"type": "nvidia-l4", "min_cpus": 4, "min_memory_gib": 16}
# Vertex AI: the L4 comes on G2 machines; g2-standard-8 has one L4, 8 vCPUs, 32 GB.
VERTEX_GPU = {"machine": "g2-standard-8", "acceleratorType": "NVIDIA_L4", "acceleratorCount": 1}
APIS = ["run.googleapis.com", "artifactregistry.googleapis.com", "cloudbuild.googleapis.com"]
# Cloud defaults (flags override); cloud/cloudbuild.yaml and cloud/service.yaml carry the same values.
DEFAULTS = {"region": "europe-west1", "repository": "models", "memory": "2Gi", "min_instances": 0, "max_instances": 3}
DEFAULTS["machine"] = "n1-standard-4"  # Vertex AI's machine for train without --gpu
GPU_MEMORY = f"{CLOUD_RUN_GPU['min_memory_gib']}Gi"  # --memory's default with --gpu


class DeployError(BundleError):
    """Settings that cannot be deployed; the message says which."""


def container_port() -> int:
    return urlparse(read_properties(CONTAINER_CONFIG)["inference_address"]).port


def workers(serve, gpu: bool = False) -> int:
    """The workers an instance runs: serve.workers, or for `auto` what TorchServe starts there: one per vCPU
    (AUTO_CPUS), or one per GPU."""
    if serve.workers != AUTO:
        return serve.workers
    return 1 if gpu else AUTO_CPUS


def concurrency(serve, gpu: bool = False) -> int:
    """Requests Cloud Run sends one instance at once: per worker, one batch running and one filling."""
    n = workers(serve, gpu) * serve.batch_size * 2
    if n > CLOUD_RUN_MAX_CONCURRENCY:
        raise DeployError(
            f"serve.workers x serve.batch_size x 2 = {n} requests per instance: Cloud Run takes at most "
            f"{CLOUD_RUN_MAX_CONCURRENCY}"
        )
    return n


def cpus(serve, gpu: bool = False) -> int:
    """One core per worker thread plus one for the Java frontend, rounded up to a Cloud Run size (at least
    Cloud Run's minimum beside a GPU); with serve.workers=auto, AUTO_CPUS, each running a worker."""
    if serve.workers == AUTO:
        return max(AUTO_CPUS, CLOUD_RUN_GPU["min_cpus"] if gpu else 1)
    need = max(serve.workers * serve.handler.threads + 1, CLOUD_RUN_GPU["min_cpus"] if gpu else 1)
    fits = [n for n in CLOUD_RUN_CPUS if n >= need]
    if not fits:
        raise DeployError(f"serve.workers x serve.handler.threads + 1 = {need} CPUs: Cloud Run offers at most 8")
    return fits[0]


def gib(memory: str) -> float:
    """Cloud Run's memory string (512Mi, 16Gi, 2G) in GiB."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi|M|G)", memory)
    if not match:
        raise DeployError(f"--memory {memory}: use a number with Mi or Gi, e.g. 16Gi")
    number, unit = float(match.group(1)), match.group(2)
    return number * {"Mi": 1 / 1024, "Gi": 1, "M": 1e6 / 2**30, "G": 1e9 / 2**30}[unit]


def substitutions(
    cfg,
    region: str,
    repository: str,
    service: str | None,
    memory: str,
    instances: tuple[int, int],
    gpu: bool = False,
):
    """Cloud Build's user substitutions (cloud/cloudbuild.yaml and cloudbuild-gpu.yaml declare the same keys)."""
    if instances[0] > instances[1] or instances[1] < 1:
        raise DeployError(
            f"--min-instances {instances[0]} / --max-instances {instances[1]}: need 0 <= min <= max, 1 <= max"
        )
    if gpu and gib(memory) < CLOUD_RUN_GPU["min_memory_gib"]:
        raise DeployError(f"--memory {memory}: Cloud Run needs at least {GPU_MEMORY} beside a GPU")
    return {
        "_REGION": region,
        "_REPOSITORY": repository,
        "_SERVICE": service or cfg.name.replace("_", "-").lower() + ("-gpu" if gpu else ""),
        "_MODEL_NAME": cfg.name,
        "_MODEL_VERSION": str(cfg.version),
        "_DVC_REMOTE": "gcs",
        "_CPU": str(cpus(cfg.serve, gpu)),
        "_MEMORY": memory,
        "_CONCURRENCY": str(concurrency(cfg.serve, gpu)),
        "_MIN_INSTANCES": str(instances[0]),
        "_MAX_INSTANCES": str(instances[1]),
        "_TIMEOUT": str(2 * cfg.serve.response_timeout_s),  # TorchServe answers or gives up first
    }


def image_uri(subs: dict[str, str], project: str, suffix: str = "") -> str:
    s = subs
    return (
        f"{s['_REGION']}-docker.pkg.dev/{project}/{s['_REPOSITORY']}/{s['_MODEL_NAME']}{suffix}:{s['_MODEL_VERSION']}"
    )


def run_deploy(subs: dict[str, str], project: str, gpu: bool = False) -> list[str]:
    """`gcloud run deploy` exactly as cloud/cloudbuild.yaml's (gpu: cloudbuild-gpu.yaml's) deploy step runs it."""
    s = subs
    gpu_flags = ["--gpu=1", f"--gpu-type={CLOUD_RUN_GPU['type']}", "--no-cpu-throttling"] if gpu else []
    return [
        "gcloud", "run", "deploy", s["_SERVICE"],
        f"--project={project}",
        f"--image={image_uri(s, project, '-gpu' if gpu else '')}",
        f"--region={s['_REGION']}",
        f"--port={container_port()}",
        f"--cpu={s['_CPU']}",
        f"--memory={s['_MEMORY']}",
        f"--concurrency={s['_CONCURRENCY']}",
        f"--min-instances={s['_MIN_INSTANCES']}",
        f"--max-instances={s['_MAX_INSTANCES']}",
        f"--timeout={s['_TIMEOUT']}",
        *gpu_flags,
        "--cpu-boost",
        "--no-allow-unauthenticated",
    ]  # fmt: skip


def serve_commands(subs: dict[str, str], project: str, skip_build: bool, gpu: bool = False) -> list[list[str]]:
    region, repository = subs["_REGION"], subs["_REPOSITORY"]
    commands = [
        ["gcloud", "services", "enable", *APIS, f"--project={project}"],
        ["gcloud", "artifacts", "repositories", "create", repository, "--repository-format=docker",
         f"--location={region}", f"--project={project}"],
    ]  # fmt: skip
    if skip_build:
        commands.append(run_deploy(subs, project, gpu))
    else:
        pairs = ",".join(f"{k}={v}" for k, v in subs.items())
        config = str((CLOUDBUILD_GPU if gpu else CLOUDBUILD).relative_to(ROOT))
        commands.append(
            [
                "gcloud",
                "builds",
                "submit",
                f"--project={project}",
                f"--config={config}",
                f"--substitutions={pairs}",
                ".",
            ]
        )
    commands.append(
        ["gcloud", "run", "services", "describe", subs["_SERVICE"], f"--project={project}", f"--region={region}",
         "--format=value(status.url)"]
    )  # fmt: skip
    return commands


ROLLOUT_STAGES = ("canary", "promote", "rollback")


def revision_tag(version: str) -> str:
    """The Cloud Run traffic tag of a model version (lowercase letters, digits, dashes): 1.1 -> v1-1."""
    return "v" + re.sub(r"[^a-z0-9]+", "-", version.lower()).strip("-")


def rollout_commands(
    subs: dict[str, str], project: str, stage: str, percent: int, previous: str, gpu: bool = False
) -> list[list[str]]:
    """canary: deploy the version's image as a revision with no traffic, tagged (its own URL), then give it `percent`
    of the traffic; promote: all of it; rollback: all of it to the `previous` revision."""
    tag = revision_tag(subs["_MODEL_VERSION"])
    traffic = ["gcloud", "run", "services", "update-traffic", subs["_SERVICE"], f"--project={project}",
               f"--region={subs['_REGION']}"]  # fmt: skip
    if stage == "canary":
        if not 0 < percent < 100:
            raise DeployError(f"--percent {percent}: a canary gets between 1 and 99 percent of the traffic")
        return [
            [*run_deploy(subs, project, gpu), "--no-traffic", f"--tag={tag}"],
            [*traffic, f"--to-tags={tag}={percent}"],
        ]
    if stage == "promote":
        return [[*traffic, f"--to-tags={tag}=100"]]
    return [[*traffic, f"--to-revisions={previous}=100"]]


def vertex_spec(
    subs: dict[str, str],
    project: str,
    bucket: str,
    machine: str,
    overrides: list[str],
    replicas: int = 1,
    gpu: bool = False,
) -> dict:
    """cloud/vertex-job.yaml with this project's image, output bucket, machine and Hydra overrides;
    gpu: one NVIDIA L4 per replica (VERTEX_GPU), which Lightning's `accelerator: auto` trains on.

    replicas > 1: the chief (workerPoolSpecs[0]) and replicas - 1 workers (workerPoolSpecs[1]) run the same
    image with `trainer=ddp`; the entrypoint (cloud/cluster.py) turns Vertex's CLUSTER_SPEC into the ranks.
    """
    if replicas < 1:
        raise DeployError(f"--replicas {replicas}: need at least 1 (the chief)")
    spec = yaml.safe_load(VERTEX_JOB.read_text())
    pool = spec["workerPoolSpecs"][0]
    pool["machineSpec"]["machineType"] = machine
    if gpu:
        pool["machineSpec"].update({k: v for k, v in VERTEX_GPU.items() if k != "machine"})
    pool["containerSpec"]["imageUri"] = image_uri(subs, project, "-train")
    pool["containerSpec"]["args"] = (["trainer=ddp"] if replicas > 1 else []) + list(overrides)
    if replicas > 1:
        spec["workerPoolSpecs"].append({**copy.deepcopy(pool), "replicaCount": replicas - 1})
    spec["baseOutputDirectory"]["outputUriPrefix"] = f"gs://{bucket}/vertex/{subs['_MODEL_NAME']}"
    return spec


def train_commands(subs: dict[str, str], project: str, spec_path: Path) -> list[list[str]]:
    keys = ("_REGION", "_REPOSITORY", "_MODEL_NAME", "_MODEL_VERSION")
    commit, _ = git_state()  # the image has no .git: the archive's lineage takes the commit from the build
    pairs = ",".join([*(f"{k}={subs[k]}" for k in keys), f"_GIT_COMMIT={commit}"])
    return [
        ["gcloud", "services", "enable", "aiplatform.googleapis.com", *APIS[1:], f"--project={project}"],
        ["gcloud", "builds", "submit", f"--project={project}", f"--config={CLOUDBUILD_TRAIN.relative_to(ROOT)}",
         f"--substitutions={pairs}", "."],
        ["gcloud", "ai", "custom-jobs", "create", f"--project={project}", f"--region={subs['_REGION']}",
         f"--display-name={subs['_MODEL_NAME']}-train", f"--config={spec_path}"],
    ]  # fmt: skip


def execute(commands: list[list[str]], dry_run: bool) -> None:
    if not dry_run and not shutil.which("gcloud"):
        raise DeployError("gcloud not found: install the Google Cloud CLI, or use --dry-run")
    for cmd in commands:
        print(("" if dry_run else "+ ") + shlex.join(cmd), flush=True)
        if dry_run:
            continue
        run = subprocess.run(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True)
        if run.returncode != 0 and "ALREADY_EXISTS" not in run.stderr:  # e.g. the repository
            last = (run.stderr.strip().splitlines() or ["no message"])[-1]
            raise DeployError(f"`{shlex.join(cmd[:4])} ...` failed with code {run.returncode}: {last}")


def deploy(
    what: str,
    cfg: DictConfig,
    project: str | None,
    region: str = DEFAULTS["region"],
    repository: str = DEFAULTS["repository"],
    service: str | None = None,
    memory: str | None = None,
    instances: tuple[int, int] = (DEFAULTS["min_instances"], DEFAULTS["max_instances"]),
    skip_build: bool = False,
    bucket: str | None = None,
    machine: str | None = None,
    overrides: tuple[str, ...] = (),
    dry_run: bool = False,
    replicas: int = 1,
    gpu: bool = False,
    stage: str = "canary",
    percent: int = 10,
    previous: str | None = None,
) -> None:
    """`serve` (Cloud Run), `rollout` (a gradual one on Cloud Run: `stage`) or `train` (a Vertex AI custom job): print
    each gcloud command, run it unless dry_run. gpu: on an NVIDIA L4; for serve and rollout, `cfg` is composed with
    serve=gpu (scripts/deploy.py does)."""
    project = project or ("PROJECT_ID" if dry_run else None)
    if not project:
        raise DeployError("no GCP project: pass --project or set GOOGLE_CLOUD_PROJECT")
    machine = machine or (VERTEX_GPU["machine"] if gpu else DEFAULTS["machine"])
    serving = what in ("serve", "rollout")
    memory = memory or (GPU_MEMORY if gpu and serving else DEFAULTS["memory"])
    subs = substitutions(cfg, region, repository, service, memory, instances, gpu and serving)
    if what == "serve":
        commands = serve_commands(subs, project, skip_build, gpu)
    elif what == "rollout":
        if stage == "rollback" and not previous and not dry_run:
            raise DeployError(
                f"rollout --stage rollback needs --previous REVISION (`gcloud run revisions list "
                f"--service={subs['_SERVICE']} --region={region}` lists them)"
            )
        commands = rollout_commands(subs, project, stage, percent, previous or "PREVIOUS_REVISION", gpu)
    else:
        if not bucket:
            raise DeployError("train needs --bucket, the GCS bucket for the job's outputs")
        spec_path = RENDERED / f"vertex-job.{subs['_MODEL_NAME']}.yaml"
        spec = vertex_spec(subs, project, bucket, machine, list(overrides), replicas, gpu)
        text = yaml.safe_dump(spec, sort_keys=False)
        write_text(spec_path, text)
        shown = spec_path.relative_to(ROOT) if spec_path.is_relative_to(ROOT) else spec_path
        print(f"# wrote {shown}:", *(f"#   {line}" for line in text.splitlines()), sep="\n", flush=True)
        commands = train_commands(subs, project, shown)
    execute(commands, dry_run)
