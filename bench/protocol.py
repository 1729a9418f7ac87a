"""What the Open Inference Protocol costs against /predictions: wrk against one TorchServe, the same images as raw
PNG POSTs to /predictions/<name> and as v2 JSON bodies (one BYTES element of base64) to /v2/models/<name>/infer,
at one connection count. The routes take turns for `rounds` rounds so that other load on the machine falls on both
alike; the machine's load average is written beside the figures.

    python -m bench.protocol --connections 64 --seconds 10 --rounds 2
"""

import argparse
import base64
import json
import os
import platform
import tempfile
from pathlib import Path

from bench import wrk
from common.cli import BundleError, one_line_errors
from common.config import ROOT, load_config
from common.io import write_text
from handlers.archive import mar_file
from servers.torchserve import TorchServe

OUT = ROOT / "reports" / "tmp" / "protocol"


def v2_body(png: bytes) -> bytes:
    data = [base64.b64encode(png).decode()]
    return json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": data}]}).encode()


def measure(server: TorchServe, name: str, images: list[bytes], connections: int, seconds: float, rounds: int) -> dict:
    """Per route: requests/s (mean over rounds) and each round's wrk result; v2's share of /predictions' rate."""
    base, auth = server.url("inference"), server.headers()
    json_type = {"Content-Type": "application/json", **auth}
    routes = {
        "predictions": (f"{base}/predictions/{name}", {"Content-Type": "image/png", **auth}, images),
        "v2": (f"{base}/v2/models/{name}/infer", json_type, [v2_body(png) for png in images]),
    }
    runs: dict[str, list[dict]] = {route: [] for route in routes}
    load = [os.getloadavg()[0]]
    for _ in range(rounds):
        for route, (url, headers, bodies) in routes.items():
            runs[route].append(wrk.run(url, headers, bodies, connections, seconds))
            load.append(os.getloadavg()[0])
    rps = {route: sum(r["rps"] for r in found) / len(found) for route, found in runs.items()}
    return {
        "connections": connections,
        "seconds": seconds,
        "rounds": rounds,
        "rps": rps,
        "v2_share": rps["v2"] / rps["predictions"],
        "p99_ms": {route: max(r["p99_ms"] for r in found) for route, found in runs.items()},
        "errors": {route: sum(r["errors"] for r in found) for route, found in runs.items()},
        "load_average_1m": load,
        "machine": f"{os.cpu_count()} cores, {platform.machine()}",
        "runs": runs,
    }


def summary(result: dict) -> str:
    rows = [
        f"| `{route}` | {result['rps'][route]:.0f} | {result['p99_ms'][route]:.1f} | {result['errors'][route]} |"
        for route in result["rps"]
    ]
    load = ", ".join(f"{x:.1f}" for x in result["load_average_1m"])
    return "\n".join(
        [
            "# The Open Inference Protocol against /predictions",
            "",
            f"wrk, {result['connections']} connections, {result['rounds']} rounds of {result['seconds']:g} s per route,"
            f" taking turns; machine: {result['machine']}; 1-minute load average before and after each run: {load}.",
            "",
            "| route | requests/s (mean) | p99 ms (worst round) | errors |",
            "| --- | --- | --- | --- |",
            *rows,
            "",
            f"v2 / predictions: {result['v2_share']:.0%}.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archive", type=Path, help="the .mar (default: the config's model store)")
    parser.add_argument("--images", type=Path, help="a folder of PNGs (default: the dataset's samples)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10, help="per run")
    parser.add_argument("--rounds", type=int, default=2, help="turns each route takes")
    parser.add_argument("--out", type=Path, default=OUT, help="where protocol.json and protocol.md go")
    args = parser.parse_args(argv)
    with one_line_errors():
        cfg = load_config()
        mar = args.archive or Path(cfg.paths.model_store) / mar_file(cfg.name)
        folder = args.images or Path(cfg.paths.data) / "samples"
        images = [p.read_bytes() for p in sorted(folder.glob("*.png"))]
        if not mar.is_file() or not images:
            raise BundleError(f"need an archive ({mar}) and PNGs in {folder}: run `make pipeline`")
        with tempfile.TemporaryDirectory(prefix="protocol") as tmp:
            server = TorchServe(mar.parent, {cfg.name: mar.name}, tmp, ports={})
            with server:
                server.wait_ready(timeout=180)
                result = measure(server, cfg.name, images, args.connections, args.seconds, args.rounds)
        write_text(args.out / "protocol.json", json.dumps(result, indent=1))
        write_text(args.out / "protocol.md", summary(result))
        print(summary(result))


if __name__ == "__main__":
    main()
