"""Debian packages the bundle needs (buildah and debootstrap for the image, prometheus for monitoring),
installed one way: apt-get as root, or through `sudo -n` where sudo needs no password."""

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from common.cli import BundleError

POLICY_RC = Path("/usr/sbin/policy-rc.d")
NO_SERVICES = "#!/bin/sh\nexit 101\n"  # dpkg asks policy-rc.d before starting a service; 101: do not
SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")  # where Debian puts root's tools (debootstrap): off a user's PATH
LOCK = Path(tempfile.gettempdir()) / "bundle-apt.lock"  # one install at a time: a second apt-get finds dpkg locked


class AptError(BundleError):
    """A package is missing and cannot be installed here, or apt-get failed."""


def as_root() -> list[str] | None:
    """The prefix that runs a command as root: nothing for root, `sudo -n` where it works, else None."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    return None


def which(command: str) -> str | None:
    return shutil.which(command, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def ensure(commands: dict[str, str], services: tuple[str, ...] = (), recommends: bool = False) -> dict[str, str]:
    """{command: path} for `commands` ({command: Debian package}), installing the packages of missing ones.

    `services`: systemd units the packages start, stopped and disabled if one starts despite policy-rc.d.
    """
    missing = sorted({package for command, package in commands.items() if not which(command)})
    if missing:
        with open(LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            missing = sorted({package for command, package in commands.items() if not which(command)})
            if missing:  # another process may have installed them while this one waited
                install(missing, services, recommends)
    paths = {command: which(command) for command in commands}
    if lost := [command for command, path in paths.items() if not path]:
        raise AptError(f"apt-get installed {' '.join(missing)} but {', '.join(lost)} is not on PATH")
    return paths


def install(packages: list[str], services: tuple[str, ...] = (), recommends: bool = False) -> None:
    """apt-get install `packages`, starting no service: a policy-rc.d that exits 101 (Debian's documented way)."""
    wanted = " ".join(packages)
    if not shutil.which("apt-get"):
        raise AptError(f"{wanted} missing and there is no apt-get here: install {wanted} yourself")
    root = as_root()
    if root is None:
        raise AptError(f"{wanted} missing and installing needs root: sudo apt-get install {wanted}")
    own_policy = not POLICY_RC.exists()
    if own_policy:
        with tempfile.NamedTemporaryFile("w", suffix=".sh") as policy:
            policy.write(NO_SERVICES)
            policy.flush()
            run([*root, "install", "-m", "755", policy.name, str(POLICY_RC)])
    apt = [*root, "env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]
    try:
        run([*apt, "update", "-qq"])
        run([*apt, "install", "-y", "-qq", *([] if recommends else ["--no-install-recommends"]), *packages])
    finally:
        if own_policy:
            subprocess.run([*root, "rm", "-f", str(POLICY_RC)], capture_output=True)
    if services and shutil.which("systemctl") and Path("/run/systemd/system").is_dir():
        for service in services:
            subprocess.run([*root, "systemctl", "disable", "--now", service], capture_output=True, timeout=60)


def run(cmd: list[str]) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise AptError(f"`{' '.join(cmd)}` did not finish within 15 min") from None
    if done.returncode != 0:
        last = ((done.stderr or done.stdout).strip().splitlines() or ["no message"])[-1]
        raise AptError(f"`{' '.join(cmd)}` failed with code {done.returncode}: {last}")
