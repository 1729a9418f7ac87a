"""LitServe with batching over the serving core (handlers.classifier): the benchmark's second peer.

LitServe batches requests up to the archive's batchSize, waiting at most its maxBatchDelay, in one inference
worker process per core (`--workers`), with as many uvicorn processes in front. POST /predictions/<model>
answers like TorchServe (same classifier, same JSON and statuses; a bad request in a batch fails alone) and
GET /ping is LitServe's health check (200 once every worker is set up), both behind the bearer token.
`LitServePeer` runs it as a child process: python -m servers.litserve --port P --workers N.
"""

import argparse
import os
import sys
from typing import Annotated

import litserve
from fastapi import Depends, HTTPException, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from handlers.archive import read_manifest, read_model_config
from handlers.classifier import Result
from servers.fastapi import serving_core, tcp_nodelay_everywhere
from servers.peer import MAR, Peer, authorized, error, json_response


async def raw_body(request: Request) -> bytes:
    return await request.body()


Body = Annotated[bytes, Depends(raw_body)]  # LitServe would parse a plain `Request` as JSON


class ServingCore(litserve.LitAPI):
    def setup(self, device: str) -> None:
        self.classifier = serving_core()

    def authorize(self, request: Request) -> None:
        if not authorized(request.headers):
            raise HTTPException(400, "missing or wrong token")

    def decode_request(self, request: Body) -> bytes:
        return request

    def predict(self, x: list[bytes] | bytes) -> list[Result] | Result:
        if self.max_batch_size == 1:  # LitServe's unbatched loop hands over one request
            return self.classifier.handle([x])[0]
        return self.classifier.handle(x)

    def encode_response(self, output: Result) -> Response:
        return json_response(output.body, output.status)


async def as_error(request: Request, exc: StarletteHTTPException) -> Response:
    return error(exc.status_code, str(exc.detail))


def server(mar: str, workers: int) -> litserve.LitServer:
    """The archive's model at /predictions/<name>, batched as its model-config says (TorchServe's defaults else)."""
    config, name = read_model_config(mar), read_manifest(mar)["model"]["modelName"]
    api = ServingCore(
        max_batch_size=config.batch_size,
        batch_timeout=config.max_batch_delay_ms / 1000,
        api_path=f"/predictions/{name}",
    )
    lit = litserve.LitServer(
        api, accelerator="cpu", workers_per_device=workers, healthcheck_path="/ping", disable_openapi_url=True
    )
    lit.app.add_exception_handler(StarletteHTTPException, as_error)
    return lit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes")
    args = parser.parse_args(argv)
    tcp_nodelay_everywhere()
    server(os.environ[MAR], args.workers).run(host="127.0.0.1", port=args.port, generate_client_file=False)


class LitServePeer(Peer):
    name = "the LitServe app"
    log_name = "litserve.log"

    def command(self, workers: int) -> list[str]:
        return [sys.executable, "-m", __name__, "--port", str(self.port), "--workers", str(workers)]


if __name__ == "__main__":
    main()
