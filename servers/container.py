"""Build and run the serving image: docker where an engine answers, else buildah (chroot isolation).

Where no docker daemon answers, buildah and debootstrap are installed when missing (common/apt.py).
Where the base image cannot be pulled (no registry access), buildah gets a local stand-in for it:
`debootstrap --variant=minbase bookworm`, committed once under the base image's name and kept.
The machine's own pip settings (index, find-links, CA bundle, constraints) are passed to buildah
builds as read-only mounts, and a CPU-only torch wheel found in its find-links is used as is.
"""

import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import psutil

from common import apt
from common.cli import BundleError
from common.config import ROOT, load_config
from servers.process import Process

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
BUILDAH = {"buildah": "buildah", "debootstrap": "debootstrap"}  # command -> Debian package


class ContainerError(BundleError):
    """A build or run step failed; the message says which and what to do."""


@functools.cache
def as_root() -> list[str]:
    """buildah and debootstrap run as root (its image store, chroots, mounts): directly, or through `sudo -n`."""
    prefix = apt.as_root()
    if prefix is None:
        raise ContainerError("building without docker needs root: run as root, or give this user passwordless sudo")
    return prefix


def write_as_root(path: Path, text: str) -> None:
    """Write a file inside a root-owned tree (a mounted container)."""
    sh([*as_root(), "mkdir", "-p", str(path.parent)], capture_output=True)
    sh([*as_root(), "tee", str(path)], input=text, capture_output=True)


def signal_as_root(process: psutil.Process, sig: signal.Signals) -> None:
    """Signal a process the container engine started, which may belong to root when we are not."""
    try:
        process.send_signal(sig)
    except psutil.AccessDenied:
        sh([*as_root(), "kill", f"-{sig.name}", str(process.pid)], check=False, capture_output=True)
    except psutil.Error:  # gone already
        pass


def sh(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    try:
        run = subprocess.run(cmd, text=True, **kw)
    except subprocess.TimeoutExpired:
        raise ContainerError(f"`{shlex.join(cmd[:4])} ...` did not finish within {kw['timeout']} s") from None
    if check and run.returncode != 0:
        tail = (run.stderr or run.stdout or "").strip().splitlines()[-3:] if kw.get("capture_output") else []
        raise ContainerError(f"`{shlex.join(cmd[:4])} ...` failed with code {run.returncode}: {' | '.join(tail)}")
    return run


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


def image_tag(overrides: list[str] | None = None) -> tuple[str, str]:
    """(model name, `<name>:<version>`) from the Hydra config."""
    cfg = load_config(overrides)
    return cfg.name, f"{cfg.name}:{cfg.version}"


def docker_works() -> bool:
    if not shutil.which("docker"):
        return False
    return sh(["docker", "info"], check=False, capture_output=True, timeout=30).returncode == 0


def engine(name: str = "auto") -> str:
    """docker if its daemon answers, else buildah (with debootstrap, installed when missing); `name` forces one."""
    if name == "docker" or (name == "auto" and docker_works()):
        return "docker"
    apt.ensure(BUILDAH, recommends=True)
    return "buildah"


def buildah_image(ref: str) -> dict | None:
    run = sh([*as_root(), "buildah", "inspect", "--type", "image", ref], check=False, capture_output=True)
    return json.loads(run.stdout) if run.returncode == 0 else None


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


def build(
    target: str = "runtime",
    tag: str | None = None,
    model_name: str | None = None,
    models_dir: Path | None = None,
    engine_name: str = "auto",
    torch_version: str = "auto",
    host_pip_settings: bool = True,
    log: Path | None = None,
) -> str:
    """Build `target`; return the tag. `models_dir` replaces the `models` stage (a folder with <name>.mar)."""
    name, default_tag = image_tag()
    model_name = model_name or name
    tag = tag or (default_tag if target == "runtime" else default_tag.replace(":", "-train:", 1))
    mar = (Path(models_dir) if models_dir else ROOT / "model_store") / f"{model_name}.mar"
    if target == "runtime" and not mar.is_file():
        raise ContainerError(f"no archive {mar}: run `make archive` (or `dvc repro`) first")
    tool = engine(engine_name)
    args = {"MODEL_NAME": model_name}
    volumes: list[str] = []
    settings = pip_settings() if tool == "buildah" and host_pip_settings else {}
    if tool == "buildah":
        print(f"base image {dockerfile_arg('BASE_IMAGE')}: {ensure_base()}", flush=True)
        pip_args, volumes = pip_build_args(settings)
        args.update(pip_args)
    if torch_version == "auto":
        torch_version = pins(REQUIREMENTS)["torch"]
        local = local_cpu_torch(settings.get("find-links", ""))
        if local:
            print(f"using the local CPU wheel torch=={local} (requirements.txt pins {torch_version})", flush=True)
            torch_version, args["TORCH_INDEX_URL"] = local, ""
    args["TORCH_VERSION"] = torch_version
    if tool == "docker":
        cmd = ["docker", "build"]
    else:
        cmd = [*as_root(), "buildah", "build", "--layers", "--jobs", "2", "--isolation", "chroot"]  # builder || runtime
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


class Container(Process):
    """The image's own entrypoint on the host network (docker --network host, or buildah run).

    shutdown() does what an engine's `stop` does: SIGTERM to the container's first process;
    Process.stop() then waits and kills what is left, and the container is removed.
    """

    name = "container"

    def __init__(self, tag: str, variables: dict[str, str], log: Path | str, engine_name: str = "auto") -> None:
        self.tag, self.variables = tag, variables
        self.engine = engine(engine_name)
        self.container = f"ctr-{os.getpid()}-{int(time.time() * 1000)}"
        self.ctr: str | None = None  # buildah's working container
        self.grace = 10.0
        super().__init__([], log)

    def start(self) -> "Container":
        env_flags = [f"--env={k}={v}" for k, v in self.variables.items()]
        if self.engine == "docker":
            self.cmd = ["docker", "run", "--name", self.container, "--network", "host", *env_flags, self.tag]
        else:
            image = buildah_image(self.tag)
            if image is None:
                raise ContainerError(f"no image {self.tag}: build it with `python -m scripts.container build`")
            config = image["OCIv1"]["config"]
            entrypoint = (config.get("Entrypoint") or []) + (config.get("Cmd") or [])
            ctr = sh(
                [*as_root(), "buildah", "from", "--pull-never", "--name", self.container, self.tag], capture_output=True
            )
            self.ctr = ctr.stdout.strip()
            self.cmd = [*as_root(), "buildah", "run", "--isolation", "chroot", *env_flags, self.ctr, "--", *entrypoint]
        super().start()
        return self

    def first_process(self) -> psutil.Process | None:
        """The container's PID 1 as the host sees it (buildah's chroot runs it below buildah-chroot-exec)."""
        if self.engine == "docker":
            pid = sh(["docker", "inspect", "-f", "{{.State.Pid}}", self.container], check=False, capture_output=True)
            return psutil.Process(int(pid.stdout)) if pid.returncode == 0 and int(pid.stdout or 0) else None
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                if child.name() == "buildah-chroot-exec" or "buildah-chroot-exec" in child.cmdline()[:1]:
                    return next(iter(child.children()), None)
        except psutil.Error:
            pass
        return None

    def shutdown(self) -> None:
        if self.engine == "docker":  # the daemon signals PID 1, whoever owns it
            subprocess.run(["docker", "stop", f"--time={self.grace:.0f}", self.container], capture_output=True)
        elif (first := self.first_process()) is not None:
            signal_as_root(first, signal.SIGTERM)

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM the first process, SIGKILL after `timeout` s; remove the container; return the exit code."""
        self.grace = timeout
        try:
            left = psutil.Process(self.proc.pid).children(recursive=True) if self.running() else []
        except psutil.Error:
            left = []
        super().stop(timeout)
        for process in left:  # anything that left the process group
            signal_as_root(process, signal.SIGKILL)
        if self.engine == "docker":
            sh(["docker", "rm", "-f", self.container], check=False, capture_output=True)
        elif self.ctr:
            sh([*as_root(), "buildah", "rm", self.ctr], check=False, capture_output=True)
            self.ctr = None
        return self.proc.returncode if self.proc else None
