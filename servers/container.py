"""Run a built serving image: its own entrypoint on the host network, as a server the tests and
`python -m scripts.container run` start and stop (docker where its daemon answers, else buildah run).

cloud/image.py builds the images; common/engine.py holds the engine helpers both share.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil

from common.engine import ContainerError, as_root, buildah_image, engine, sh
from servers.process import Process


def signal_as_root(process: psutil.Process, sig: signal.Signals) -> None:
    """Signal a process the container engine started, which may belong to root when we are not."""
    try:
        process.send_signal(sig)
    except psutil.AccessDenied:
        sh([*as_root(), "kill", f"-{sig.name}", str(process.pid)], check=False, capture_output=True)
    except psutil.Error:  # gone already
        pass


class Container(Process):
    """The image's own entrypoint on the host network (docker --network host, or buildah run).

    shutdown() does what an engine's `stop` does: SIGTERM to the container's first process;
    Process.stop() then waits and kills what is left, and the container is removed.
    """

    name = "container"

    def __init__(
        self, tag: str, variables: dict[str, str], log: Path | str, engine_name: str = "auto", gpus: bool = False
    ) -> None:
        self.tag, self.variables, self.gpus = tag, variables, gpus
        self.engine = engine(engine_name)
        if gpus and self.engine != "docker":
            raise ContainerError("passing the GPUs into a container needs docker (`docker run --gpus all`)")
        self.container = f"ctr-{os.getpid()}-{int(time.time() * 1000)}"
        self.ctr: str | None = None  # buildah's working container
        self.grace = 10.0
        super().__init__([], log)

    def start(self) -> "Container":
        env_flags = [f"--env={k}={v}" for k, v in self.variables.items()]
        if self.engine == "docker":
            gpus = ["--gpus", "all"] if self.gpus else []
            self.cmd = ["docker", "run", "--name", self.container, "--network", "host", *gpus, *env_flags, self.tag]
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
