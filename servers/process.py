"""A server as a child process: its own process group and log file, a readiness wait, a sure stop."""

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from common.cli import BundleError


class ServerError(BundleError):
    """A server could not be started or did not become ready; the message says what to do."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class Process:
    """Popen in a new session, output to `log`; `stop()` ends the whole group. Use it as a context manager."""

    name = "server"

    def __init__(self, cmd: list[str], log: Path | str, cwd: Path | str | None = None, env: dict | None = None):
        self.cmd, self.log, self.cwd, self.env = cmd, Path(log), cwd, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Process":
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.is_file() else ""

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str = "ready") -> float:
        """Poll `ready()` until it is true; raise with the log's tail if the process exits or time runs out."""
        start = time.monotonic()
        while True:
            if not self.running():
                code = self.proc.returncode if self.proc else None
                raise ServerError(f"{self.name} exited with code {code}:\n{self.log_tail()}")
            if ready():
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise ServerError(f"{self.name} not {what} after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.2)

    def shutdown(self) -> None:
        """Ask the server to stop (SIGTERM to its group); stop() waits, then kills."""
        os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self, timeout: float = 30) -> None:
        """shutdown(), wait up to `timeout` seconds, then SIGKILL whatever is left of the group."""
        if self.proc is None:
            return
        if self.running():
            try:
                self.shutdown()
                self.proc.wait(timeout=timeout)
            except (OSError, subprocess.SubprocessError):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:  # the group is gone already
            pass
        self.proc.wait()

    def __enter__(self) -> "Process":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
