"""What the benchmark's peers share: the serving core under another HTTP server, run as a child process on a
free loopback port with its own bearer token; the app finds the archive and the token in its environment."""

import functools
import json
import os
import secrets
import urllib.error
import urllib.request
from pathlib import Path

from common.config import ROOT
from handlers.archive import unpack
from servers.process import Process, free_port

MAR, MODEL_DIR, TOKEN = "PEER_MAR", "PEER_MODEL_DIR", "PEER_TOKEN"  # what the apps read


@functools.cache
def bearer() -> str:
    """The Authorization header this app accepts: its token is fixed for the life of the process."""
    return f"Bearer {os.environ[TOKEN]}"


def authorized(headers) -> bool:
    """The request carries this peer's token, as TorchServe's token authorization expects it."""
    return headers.get("authorization") == bearer()


def json_response(body: dict, status: int = 200):
    from starlette.responses import Response

    return Response(json.dumps(body), status_code=status, media_type="application/json")


def error(status: int, message: str):
    """An error as TorchServe and the serving core answer it."""
    return json_response({"error": message, "status": status}, status)


class Peer(Process):
    """The app for the archive `mar`, unpacked in <workdir>/model, on a free loopback port; the subclass says how
    to run it (`command`) and where it logs (`log_name`, in `workdir`)."""

    log_name = "peer.log"

    def __init__(self, mar: Path | str, workdir: Path | str, workers: int = 1) -> None:
        self.mar, self.workdir = Path(mar).resolve(), Path(workdir).resolve()
        self.port, self.token = free_port(), secrets.token_hex(8)
        env = dict(os.environ, **{MAR: str(self.mar), MODEL_DIR: str(self.workdir / "model"), TOKEN: self.token})
        super().__init__(self.command(workers), self.workdir / self.log_name, ROOT, env)

    def command(self, workers: int) -> list[str]:
        raise NotImplementedError

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> "Peer":
        unpack(self.mar, self.workdir / "model")
        super().start()
        return self

    def ready(self) -> bool:
        request = urllib.request.Request(f"{self.url()}/ping", headers=self.headers())
        try:
            with urllib.request.urlopen(request, timeout=2) as response:
                return response.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout: float = 120) -> float:
        return self.wait_until(self.ready, timeout, "answering /ping")
