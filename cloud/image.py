"""Build the serving image (Dockerfile targets `runtime`, CPU, and `gpu`, CUDA) and the training image (`train`):
docker where its daemon answers, else buildah (chroot isolation). servers/container.py runs what it builds.

Where no docker daemon answers, buildah and debootstrap are installed when missing (common/apt.py).
Where the base image cannot be pulled (no registry access), buildah gets a local stand-in for it:
`debootstrap --variant=minbase bookworm`, committed once under the base image's name and kept.
The machine's own pip settings (index, find-links, CA bundle, constraints) are passed to buildah
builds as read-only mounts, and a CPU-only torch wheel found in its find-links is used as is (CPU image).
The GPU image installs CUDA torch (several GB of wheels): it is refused, before any download, where the
engine's storage has less than GPU_DISK_GB free.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

from common import apt
from common.config import ROOT, load_config
from common.engine import BUILDAH, ContainerError, as_root, buildah_image, engine, sh

DOCKERFILE = ROOT / "Dockerfile"
REQUIREMENTS = ROOT / "requirements.txt"
REQUIREMENTS_SERVE = ROOT / "requirements-serve.txt"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
PIP_KEYS = {  # pip config key -> build arg (declared in the Dockerfile's builder stage)
    "index-url": "PIP_INDEX_URL",
    "extra-index-url": "PIP_EXTRA_INDEX_URL",
    "find-links": "PIP_FIND_LINKS",
    "cert": "PIP_CERT",
    "constraint": "PIP_CONSTRAINT",
}
TARGETS = {"runtime": "", "gpu": "-gpu", "train": "-train"}  # Dockerfile target -> image name suffix
BUILDAH_STORAGE = "/var/lib/containers/storage"  # root's image store
# Estimate: CUDA torch 2.14 and its nvidia-* wheels unpack to about 7 GB, held by the builder stage and again by
# the image's layer, plus pip's downloads while it installs.
GPU_DISK_GB = 20
# What the official debian:*-slim images configure; the stand-in mirrors it to stay as small.
SLIM_DPKG = """path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
"""
SLIM_APT = """DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
"""


def write_as_root(path: Path, text: str) -> None:
    """Write a file inside a root-owned tree (a mounted container)."""
    sh([*as_root(), "mkdir", "-p", str(path.parent)], capture_output=True)
    sh([*as_root(), "tee", str(path)], input=text, capture_output=True)


def dockerfile_arg(name: str, path: Path = DOCKERFILE) -> str:
    """The default of `ARG name=value` in the Dockerfile (its first declaration)."""
    match = re.search(rf"^ARG {name}=(\S*)$", path.read_text(), re.M)
    if not match:
        raise ContainerError(f"{path} declares no default for ARG {name}")
    return match.group(1)


def pins(path: Path) -> dict[str, str]:
    """`name==version` lines of a requirements file, names lower-cased."""
    found = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, version = line.split("#")[0].strip().split("==")
            found[name.strip().lower()] = version.strip()
    return found


def image_tag(overrides: list[str] | None = None, target: str = "runtime") -> tuple[str, str]:
    """(model name, `<name><suffix>:<version>`) from the Hydra config; the suffix names the target (TARGETS)."""
    cfg = load_config(overrides)
    return cfg.name, f"{cfg.name}{TARGETS[target]}:{cfg.version}"


def ensure_base(base: str | None = None) -> str:
    """The base image for buildah: present, else pulled, else a debootstrap stand-in (kept for next time)."""
    base = base or dockerfile_arg("BASE_IMAGE")
    if buildah_image(base):
        return "present"
    try:
        if sh([*as_root(), "buildah", "pull", base], check=False, capture_output=True, timeout=300).returncode == 0:
            return "pulled"
    except ContainerError:  # a registry that does not answer
        pass
    suite = base.rsplit(":", 1)[-1].split("-")[0]  # debian:bookworm-slim -> bookworm
    apt.ensure({"debootstrap": BUILDAH["debootstrap"]})
    ctr = sh([*as_root(), "buildah", "from", "scratch"], capture_output=True).stdout.strip()
    try:
        root = Path(sh([*as_root(), "buildah", "mount", ctr], capture_output=True).stdout.strip())
        write_as_root(root / "etc/dpkg/dpkg.cfg.d/docker", SLIM_DPKG)
        sh([*as_root(), "debootstrap", "--variant=minbase", suite, str(root), DEBIAN_MIRROR], capture_output=True)
        write_as_root(root / "etc/apt/apt.conf.d/docker-clean", SLIM_APT)
        junk = [str(root / "var/cache/apt/archives"), str(root / "var/lib/apt/lists")]
        sh([*as_root(), "find", *junk, "-maxdepth", "1", "-type", "f", "-delete"], capture_output=True)
        sh([*as_root(), "buildah", "config", "--cmd", "bash", ctr], capture_output=True)
        sh([*as_root(), "buildah", "commit", "--quiet", ctr, base], capture_output=True)
    finally:
        sh([*as_root(), "buildah", "rm", ctr], check=False, capture_output=True)
    return "debootstrap"


def pip_settings() -> dict[str, str]:
    """This machine's pip settings that say where packages come from (files and environment)."""
    listing = sh([sys.executable, "-m", "pip", "config", "list"], capture_output=True).stdout
    settings = {}
    for line in listing.splitlines():  # e.g. global.find-links='/opt/wheels'; env vars come as :env:.key
        match = re.match(r"^.*?\.([a-z-]+)='(.*)'$", line)
        if match and match.group(1) in PIP_KEYS:
            settings[match.group(1)] = match.group(2)
    return settings


def pip_build_args(settings: dict[str, str]) -> tuple[dict[str, str], list[str]]:
    """pip settings as build args, every local path they name mounted read-only under /mnt/host-pip."""
    args, mounts = {}, {}
    for key, value in settings.items():
        words = []
        for word in value.split():
            path = local_path(word).rstrip("/")
            if os.path.isabs(path) and os.path.exists(path):
                # A local index's pages link to files beside it (../../files/x.whl): mount its parent.
                folder, leaf = os.path.split(path) if key.endswith("index-url") else (path, "")
                target = mounts.setdefault(folder, f"/mnt/host-pip/{len(mounts)}")
                word = word.replace(path, os.path.join(target, leaf).rstrip("/"))
            words.append(word)
        args[PIP_KEYS[key]] = " ".join(words)
    return args, [f"{path}:{target}:ro" for path, target in mounts.items()]


def local_path(word: str) -> str:
    return urlparse(word).path if word.startswith("file://") else word


def local_cpu_torch(find_links: str) -> str | None:
    """The version of a CPU-only CPython 3.11 torch wheel in these find-links folders, if any."""
    for folder in map(Path, map(local_path, find_links.split())):
        wheels = sorted(folder.glob("torch-*+cpu-cp311-*linux*x86_64.whl")) if folder.is_dir() else []
        if wheels:
            return wheels[-1].name.split("-")[1]
    return None


def storage(tool: str) -> Path | None:
    """Where the engine keeps its images on this machine (None: not here, e.g. a remote docker daemon)."""
    if tool == "docker":
        root = sh(["docker", "info", "-f", "{{.DockerRootDir}}"], check=False, capture_output=True).stdout.strip()
    else:
        root = BUILDAH_STORAGE
    return Path(root) if root and Path(root).exists() else None


def check_disk(tool: str, need_gb: float = GPU_DISK_GB) -> None:
    """Refuse a GPU build, before any download, where its wheels would not fit the engine's storage."""
    path = storage(tool)
    free = shutil.disk_usage(path).free / 1e9 if path else None
    if free is not None and free < need_gb:
        raise ContainerError(
            f"the GPU image needs about {need_gb:.0f} GB free in {path} ({tool}'s storage), {free:.0f} GB free: "
            "build it where CUDA torch's wheels fit (Cloud Build: python -m scripts.deploy serve --gpu)"
        )


def build(
    target: str = "runtime",
    tag: str | None = None,
    model_name: str | None = None,
    models_dir: Path | None = None,
    engine_name: str = "auto",
    torch_version: str = "auto",
    host_pip_settings: bool = True,
    log: Path | None = None,
    torch_index: str | None = None,
) -> str:
    """Build `target` (runtime, gpu or train); return the tag. `models_dir` replaces the `models` stage (a folder
    with <name>.mar); `torch_index` is the index torch comes from ("" for pip's own, default: the Dockerfile's)."""
    if target not in TARGETS:
        raise ContainerError(f"unknown target {target!r}: one of {', '.join(TARGETS)}")
    name, default_tag = image_tag(target=target)
    model_name = model_name or name
    tag = tag or default_tag
    mar = (Path(models_dir) if models_dir else ROOT / "model_store") / f"{model_name}.mar"
    if target != "train" and not mar.is_file():
        raise ContainerError(f"no archive {mar}: run `make archive` (or `dvc repro`) first")
    tool = engine(engine_name)
    if target == "gpu":
        check_disk(tool)
    args = {"MODEL_NAME": model_name}
    volumes: list[str] = []
    settings = pip_settings() if tool == "buildah" and host_pip_settings else {}
    if tool == "buildah":
        print(f"base image {dockerfile_arg('BASE_IMAGE')}: {ensure_base()}", flush=True)
        pip_args, volumes = pip_build_args(settings)
        args.update(pip_args)
    index_arg = "GPU_TORCH_INDEX_URL" if target == "gpu" else "TORCH_INDEX_URL"
    if torch_version == "auto":
        torch_version = pins(REQUIREMENTS)["torch"]
        local = local_cpu_torch(settings.get("find-links", "")) if target == "runtime" else None
        if local and torch_index is None:
            print(f"using the local CPU wheel torch=={local} (requirements.txt pins {torch_version})", flush=True)
            torch_version, torch_index = local, ""
    if torch_index is not None:
        args[index_arg] = torch_index
    args["TORCH_VERSION"] = torch_version
    if target == "gpu":
        source = args.get(index_arg) or dockerfile_arg(index_arg) or "pip's index (PyPI: its CUDA build)"
        print(f"GPU image: CUDA torch=={torch_version} from {source}, several GB of wheels", flush=True)
    if tool == "docker":
        cmd = ["docker", "build"]
    else:
        cmd = [*as_root(), "buildah", "build", "--layers", "--jobs", "2", "--isolation", "chroot"]  # stages in parallel
    cmd += ["-f", str(DOCKERFILE), "--target", target, "-t", tag]
    cmd += [f"--build-arg={k}={v}" for k, v in args.items()]
    cmd += [f"--volume={v}" for v in volumes]
    if models_dir is not None:
        cmd += [f"--build-context=models={Path(models_dir).resolve()}"]
    cmd.append(str(ROOT))
    out = open(log, "w") if log else None
    try:
        run = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT if out else None, text=True)
    finally:
        if out:
            out.close()
    if run.returncode != 0:
        raise ContainerError(f"{tool} build failed with code {run.returncode}" + (f": see {log}" if log else ""))
    return tag


def image_size(tag: str, engine_name: str = "auto") -> int:
    """Bytes of the image's layers, uncompressed."""
    if engine(engine_name) == "docker":
        return int(sh(["docker", "image", "inspect", "-f", "{{.Size}}", tag], capture_output=True).stdout)
    human = json.loads(sh([*as_root(), "buildah", "images", "--json", tag], capture_output=True).stdout)[0]["size"]
    number, unit = human.split()  # buildah prints SI units only: "1.24 GB"
    return int(float(number) * 1000 ** ["B", "KB", "MB", "GB", "TB"].index(unit.upper()))
