"""KServe: the storage folder its TorchServe runtime mounts, and the InferenceService that serves it.

KServe's `kserve-torchserve` runtime (modelFormat pytorch) copies the InferenceService's storageUri to /mnt/models
and runs `torchserve --start --model-store=/mnt/models/model-store --ts-config=/mnt/models/config/config.properties`
with KServe's Python model server in front (HTTP 8080, gRPC 8081), which answers the health, readiness and
metadata routes and forwards inference to TorchServe's inference address (8085 here) in the InferenceService's
protocol (servers/kserve.py runs such a pod locally). The runtime also sets
TS_SERVICE_ENVELOPE; the config below leaves TorchServe's environment-variable settings off, so the stock envelope,
which reads one request per batch, stays off and the handler reads both protocols itself (handlers/protocol.py).
"""

import json
import re
import shutil
from pathlib import Path

import yaml

from cloud import deploy
from cloud.deploy import CONTAINER_CONFIG, DEFAULTS, DeployError, concurrency, cpus, workers
from common.config import ROOT
from common.io import write_text
from handlers import files
from handlers.archive import mar_file, members, read_manifest
from servers.kserve import MOUNT
from servers.torchserve import read_properties

TORCHSERVE_PORT = 8085  # TorchServe's inference and management address inside the pod (KServe's front is 8080)
METRICS_PORT = 8082  # the runtime's prometheus.kserve.io/port annotation
PROTOCOLS = ("v1", "v2")
GPU = "nvidia.com/gpu"
RENDERED = ROOT / "logs" / "deploy" / "kserve"


def gpu_ready(mar: Path) -> bool:
    """Whether a worker given a GPU finds a file to run on it in the archive (the shipped one, else model.pt)."""
    shipped = read_manifest(mar)["model"]["serializedFile"]
    variant = next((name for name, v in files.REGISTRY.items() if v.file == shipped), None)
    return (variant is not None and "cuda" in files.REGISTRY[variant].devices) or files.MODEL in members(mar)


def properties(cfg, gpu: bool = False) -> dict[str, str]:
    """config/config.properties: the container's settings (docker/config.properties: performance, metrics, token
    auth off) with the addresses and paths the runtime expects and the model as a snapshot entry, which is how the
    runtime's front learns the model's name and TorchServe loads it with the serve profile's workers and batching."""
    props = read_properties(CONTAINER_CONFIG)
    serve = cfg.serve
    model = {
        "defaultVersion": True,
        "marName": mar_file(cfg.name),
        "minWorkers": workers(serve, gpu),  # TorchServe's snapshot needs the number
        "maxWorkers": workers(serve, gpu),
        "batchSize": serve.batch_size,
        "maxBatchDelay": serve.max_batch_delay_ms,
        "responseTimeout": serve.response_timeout_s,
    }
    snapshot = {"name": "startup.cfg", "modelCount": 1, "models": {cfg.name: {str(cfg.version): model}}}
    props.update(
        inference_address=f"http://0.0.0.0:{TORCHSERVE_PORT}",
        management_address=f"http://0.0.0.0:{TORCHSERVE_PORT}",
        metrics_address=f"http://0.0.0.0:{METRICS_PORT}",
        disable_token_authorization="true",  # TorchServe's token check also guards /ping; KServe's ingress gates
        ts_open_inference_protocol="false",  # KServe's front answers the v2 health routes
        enable_envvars_config="false",  # the runtime's TS_SERVICE_ENVELOPE would drop batching: ignored
        model_store=f"{MOUNT}/model-store",
        metrics_config=f"{MOUNT}/config/metrics.yaml",
        model_snapshot=json.dumps(snapshot, separators=(",", ":")),
    )
    return props


def storage(cfg, mar: Path, out: Path, gpu: bool = False) -> Path:
    """The storage folder: config/config.properties, config/metrics.yaml, model-store/<name>.mar."""
    if not mar.is_file():
        raise DeployError(f"no archive {mar}: run `make archive` (or pass --archive)")
    if out.exists():
        if not (out / "config" / "config.properties").is_file():
            raise DeployError(f"{out} exists and is not a storage folder this command wrote: move it or pass --out")
        shutil.rmtree(out)
    (out / "model-store").mkdir(parents=True)
    shutil.copy2(mar, out / "model-store" / mar_file(cfg.name))
    head = "# TorchServe in KServe's TorchServe runtime, written by `python -m scripts.deploy kserve`\n"
    write_text(
        out / "config" / "config.properties", head + "".join(f"{k}={v}\n" for k, v in properties(cfg, gpu).items())
    )
    shutil.copy2(ROOT / "metrics.yaml", out / "config" / "metrics.yaml")
    return out


def service_name(cfg) -> str:
    """The InferenceService's name: the model's, as a DNS label (lowercase, dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", cfg.name.lower()).strip("-")[:63]


def inference_service(
    cfg,
    storage_uri: str,
    protocol: str = "v2",
    gpu: bool = False,
    memory: str = DEFAULTS["memory"],
    replicas: tuple[int, int] = (DEFAULTS["min_instances"], DEFAULTS["max_instances"]),
) -> dict:
    """The InferenceService: modelFormat pytorch, the protocol, the storage folder, the serve profile's CPUs and
    concurrency target (as Cloud Run's, cloud/deploy.py), a GPU when asked."""
    if protocol not in PROTOCOLS:
        raise DeployError(f"--protocol {protocol}: KServe's TorchServe runtime speaks {' or '.join(PROTOCOLS)}")
    if replicas[0] > replicas[1] or replicas[1] < 1:
        low, high = replicas
        raise DeployError(f"--min-instances {low} / --max-instances {high}: need 0 <= min <= max, 1 <= max")
    amounts = {"cpu": str(cpus(cfg.serve, gpu)), "memory": memory, **({GPU: "1"} if gpu else {})}
    predictor = {
        "minReplicas": replicas[0],
        "maxReplicas": replicas[1],
        "scaleMetric": "concurrency",
        "scaleTarget": concurrency(cfg.serve, gpu),
        "timeout": 2 * cfg.serve.response_timeout_s,  # TorchServe answers or gives up first
        "model": {
            "modelFormat": {"name": "pytorch"},
            "protocolVersion": protocol,
            "storageUri": storage_uri,
            "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        },
    }
    meta = {"name": service_name(cfg), "labels": {"model": cfg.name, "version": str(cfg.version)}}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": meta,
        "spec": {"predictor": predictor},
    }


def sdk_model(data: object, kind: str, where: str = ""):
    """`data` as the kserve SDK's (or the Kubernetes client's) model `kind`, strictly: an unknown field or a value
    of the wrong type is a DeployError naming where it is (the SDK's own deserializer drops unknown fields)."""
    import kserve.models
    import kubernetes.client.models

    if match := re.fullmatch(r"(?:list|List)\[(.+)\]", kind):
        if not isinstance(data, list):
            raise DeployError(f"{where or 'spec'}: expected a list")
        return [sdk_model(item, match.group(1), f"{where}[{i}]") for i, item in enumerate(data)]
    if match := re.fullmatch(r"(?:dict\(str, |Dict\[str, )(.+)[)\]]", kind):
        if not isinstance(data, dict):
            raise DeployError(f"{where or 'spec'}: expected a mapping")
        return {k: sdk_model(v, match.group(1), f"{where}.{k}") for k, v in data.items()}
    natives = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if kind in natives:
        if not isinstance(data, natives[kind]) or (kind == "int" and isinstance(data, bool)):
            raise DeployError(f"{where}: expected {kind}, got {data!r}")
        return data
    klass = getattr(kserve.models, kind, None) or getattr(kubernetes.client.models, kind)
    if not isinstance(data, dict):
        raise DeployError(f"{where or 'spec'}: expected a {kind} mapping")
    fields = {json_name: attr for attr, json_name in klass.attribute_map.items()}
    if unknown := sorted(set(data) - set(fields)):
        raise DeployError(f"{where or 'spec'}: {kind} has no field {unknown[0]!r}")
    values = {}
    for key, value in data.items():
        values[fields[key]] = sdk_model(value, klass.openapi_types[fields[key]], f"{where}.{key}".lstrip("."))
    return klass(**values)


def validate(spec: dict):
    """The InferenceService as the SDK's V1beta1InferenceService; DeployError where it is not one."""
    return sdk_model(spec, "V1beta1InferenceService")


def commands(folder: Path, storage_uri: str, manifest: Path) -> list[list[str]]:
    """Upload the storage folder to the bucket, then apply the InferenceService."""
    parts = [str(folder / "config"), str(folder / "model-store")]
    return [
        ["gcloud", "storage", "cp", "--recursive", *parts, storage_uri + "/"],
        ["kubectl", "apply", "-f", str(manifest)],
    ]


def prepare(cfg, mar: Path, bucket: str | None, out: Path, **service) -> tuple[Path, Path, list[list[str]]]:
    """Write the storage folder and the InferenceService (validated) under `out`; the upload and apply commands."""
    if not bucket:
        raise DeployError("kserve needs --bucket, the GCS bucket KServe reads the storage folder from")
    storage_uri = f"gs://{bucket}/kserve/{cfg.name}/{cfg.version}"
    spec = inference_service(cfg, storage_uri, **service)
    if service.get("gpu") and not gpu_ready(mar):
        raise DeployError(f"{mar.name} has no file a GPU runs: rebuild it with archive.gpu_file=true")
    validate(spec)
    folder = storage(cfg, mar, out / cfg.name, bool(service.get("gpu")))
    manifest = out / f"{service_name(cfg)}.inferenceservice.yaml"
    write_text(manifest, yaml.safe_dump(spec, sort_keys=False))
    return folder, manifest, commands(folder, storage_uri, manifest)


def execute(commands: list[list[str]], dry_run: bool) -> None:
    if not dry_run and not shutil.which("kubectl"):
        raise DeployError("kubectl not found: install it and point it at the cluster, or use --dry-run")
    deploy.execute(commands, dry_run)
