"""Benchmark the serving stack on this machine and write reports/benchmark/ (README.md, results.json, PNG plots).

    python -m scripts.bench                  # make bench: both models, 1/4/16/64/128 connections, paced 200/1000 req/s
    python -m scripts.bench --quick          # 1, 4 and 64 connections, paced 500 req/s, shorter runs
    python -m scripts.bench --models digits --connections 1 64 --repeats 2
    python -m scripts.bench --sweep --models digits --connections 1 4 64   # tuning candidates (tuning.md)

For each model, from the same archive: the in-process limit (serving core: decode, TorchScript
forward, answer JSON; no HTTP) at batch sizes 1/8/32; TorchServe with stock settings (its defaults:
one worker per core, batch size 1, torch's default threads, default logging and metrics; only the
loopback addresses and the model store set); TorchServe as shipped (config.properties + `serve:`);
the shipped settings with batch size 1; a FastAPI app over the same serving core, one uvicorn
worker per core (servers/fastapi.py); the plain FastAPI app a user might write instead, without the
serving core (Pillow, the archive's model file, top-k; servers/plain.py), one uvicorn worker per core;
LitServe over the same serving core, batching as the archive says, one inference worker per core
(servers/litserve.py). Load: `wrk` (Debian's, installed through common/apt.py when missing),
identical for every server: raw PNG test-set images on keep-alive connections, closed loop at each
connection count, then paced (open loop) at fixed arrival rates; wrk's own CPU share is reported.
Each point is the median over the repeats, which run interleaved (repeat 1 of every server, then
repeat 2, ...). The models: the default config's
model_store/<name>.mar (`make pipeline`) and ResNet-18 (bench.heavy in configs/loadtest.yaml;
trained once for one epoch into logs/bench/, its archive rebuilt from the current handlers and
`serve:` section on every run). The report's goals are bench.goals in configs/loadtest.yaml; README
"Performance" explains the results. Locust stays for the scenario load test (`make loadtest`); the
report also shows it beside wrk against the shipped TorchServe at bench.locust_connections (those wrk
measured too: raw PNG bodies, no wait), with each client's CPU share (--no-locust leaves it out).
Where torch sees a CUDA device, a GPU section follows (bench/gpu.py -> gpu.md): ResNet-18 at 224 from JPEGs, the
card's in-process limit, the serving core with CPU and GPU decoding, TorchServe with `serve=gpu`; `--gpu` runs it alone.
"""

import argparse
import sys
from pathlib import Path

import torch

from bench import gpu
from bench.models import log
from bench.run import MODELS, benchmark
from bench.servers import FASTAPI, LITSERVE, PLAIN
from common.cli import one_line_errors
from common.config import load_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. bench.repeats=5")
    parser.add_argument("--quick", action="store_true", help="short run: bench.quick settings")
    parser.add_argument("--sweep", action="store_true", help="tuning candidates on the first model, writes tuning.md")
    parser.add_argument("--variants", nargs="+", help="with --sweep: only these candidates (labels in bench/sweep.py)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--connections", nargs="+", type=int, help="wrk connection counts (default bench.connections)")
    parser.add_argument("--repeats", type=int, help="measurements per point (default bench.repeats)")
    parser.add_argument("--no-fastapi", action="store_true", help="leave out the FastAPI comparison")
    parser.add_argument("--no-plain", action="store_true", help="leave out the plain FastAPI app (servers/plain.py)")
    parser.add_argument("--no-litserve", action="store_true", help="leave out the LitServe comparison")
    parser.add_argument("--no-locust", action="store_true", help="leave out Locust beside wrk (tuned TorchServe)")
    parser.add_argument("--retrain", action="store_true", help="train the heavy model again")
    parser.add_argument("--out", help="report directory (default bench.out)")
    parser.add_argument("--gpu", action="store_true", help="only the GPU section (needs a CUDA device): gpu.md")
    args = parser.parse_args(argv)
    left_out = {FASTAPI: args.no_fastapi, PLAIN: args.no_plain, LITSERVE: args.no_litserve}
    peers = tuple(name for name, off in left_out.items() if not off)
    with one_line_errors():
        cfg = load_config(args.overrides, config_name="loadtest")
        out, workdir = Path(args.out or cfg.bench.out), Path(cfg.bench.workdir) / gpu.NAME
        if args.gpu:
            log(f"wrote {gpu.bench(out, workdir)}")
            return
        benchmark(
            cfg, args.overrides, args.models, args.quick, args.sweep, args.variants, args.connections, args.repeats,
            peers=peers, retrain=args.retrain, out=args.out,
            command=" ".join(sys.argv[1:] if argv is None else argv), with_locust=not args.no_locust,
        )  # fmt: skip
        if torch.cuda.is_available():
            log(f"wrote {gpu.bench(out, workdir)}")


if __name__ == "__main__":
    main()
