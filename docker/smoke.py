"""Smoke-check a running serving container over its inference port; exit 1 with the reason if it fails.

    python docker/smoke.py URL MODEL [--timeout 180]     # as cloud/cloudbuild.yaml's smoke step runs it

Waits for /ping, then for a real prediction of a generated image (TorchServe queues requests
while the worker loads), then expects a 4xx JSON error for a body that is not an image.
Standard library plus Pillow: it runs with the image's own Python (Cloud Build) or the project's.
"""

import argparse
import io
import json
import sys
import time
import urllib.error
import urllib.request

from PIL import Image


def call(url: str, body: bytes | None = None, content_type: str = "") -> tuple[int, bytes]:
    headers = {"Content-Type": content_type} if content_type else {}
    request = urllib.request.Request(url, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def digit_png() -> bytes:
    """A white vertical bar on black, 32x32: any classifier of the bundle accepts it."""
    image = Image.new("L", (32, 32))
    image.paste(255, (14, 4, 18, 28))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def smoke(base: str, model: str, timeout: float = 180) -> dict:
    """The prediction's JSON; raises RuntimeError saying what went wrong."""
    deadline, last = time.monotonic() + timeout, "no answer"
    predict = f"{base}/predictions/{model}"
    while time.monotonic() < deadline:
        try:
            status, body = call(f"{base}/ping")
            if status == 200:
                status, body = call(predict, digit_png(), "image/png")
                if status == 200:
                    break
            last = f"{status} {body[:200]!r}"
        except OSError as err:
            last = str(err)
        time.sleep(1)
    else:
        raise RuntimeError(f"no prediction from {predict} within {timeout:.0f} s: {last}")
    answer = json.loads(body)
    if answer.get("model") != model or "label" not in answer or not answer.get("top_k"):
        raise RuntimeError(f"unexpected answer: {answer}")
    status, body = call(predict, b"not an image", "application/octet-stream")
    if not 400 <= status < 500 or "error" not in json.loads(body):
        raise RuntimeError(f"a malformed request got {status} {body[:200]!r}, expected a 4xx JSON error")
    return answer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", help="the container's inference base URL, http://HOST:PORT")
    parser.add_argument("model", help="the served model's name")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for the first prediction")
    args = parser.parse_args(argv)
    try:
        answer = smoke(args.url.rstrip("/"), args.model, args.timeout)
    except (RuntimeError, ValueError) as err:
        sys.exit(f"smoke: FAILED: {err}")
    print(f"smoke: OK: {args.model} answered {answer['label']} ({answer['probability']:.3f}); malformed -> 4xx")


if __name__ == "__main__":
    main()
