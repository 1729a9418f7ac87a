"""The container engine both the image builder (cloud/image.py) and the running container (servers/container.py)
use: docker where its daemon answers, else buildah (installed through common/apt.py), and how to call it."""

import functools
import json
import shlex
import shutil
import subprocess

from common import apt
from common.cli import BundleError

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


def sh(cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
    try:
        run = subprocess.run(cmd, text=True, **kw)
    except subprocess.TimeoutExpired:
        raise ContainerError(f"`{shlex.join(cmd[:4])} ...` did not finish within {kw['timeout']} s") from None
    if check and run.returncode != 0:
        tail = (run.stderr or run.stdout or "").strip().splitlines()[-3:] if kw.get("capture_output") else []
        raise ContainerError(f"`{shlex.join(cmd[:4])} ...` failed with code {run.returncode}: {' | '.join(tail)}")
    return run


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
