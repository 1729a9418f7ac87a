"""Profile serving: the serving core on the archived model and real test images at batch 1, 8 and 32
(torch.profiler: top operators, Chrome traces), then a live TorchServe worker under Locust load (py-spy:
flame graph SVG and the functions on CPU). experiments/profile.py; training is profiled with
`make train ARGS='trainer.profiler=pytorch'`.

    python -m scripts.profile                        # make profile: reports/profile/<name>/serving/
    python -m scripts.profile --seconds 0            # the serving core only, no server
    python -m scripts.profile --users 32 model=resnet18
"""

import argparse
import logging
from pathlib import Path

from common.cli import one_line_errors
from common.config import load_config
from experiments.profile import profile


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=resnet18")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="batch sizes for the core")
    parser.add_argument("--calls", type=int, default=200, help="profiled calls of the core per batch size")
    parser.add_argument("--seconds", type=float, default=20, help="py-spy seconds per sample (0: no live server)")
    parser.add_argument("--users", type=int, default=16, help="Locust users loading the live server")
    parser.add_argument("--out", type=Path, help="default: reports/profile/<name>/serving")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    with one_line_errors():
        cfg = load_config(args.overrides)
        out = args.out or Path("reports/profile") / cfg.name / "serving"
        report = profile(cfg, out, args.batches, args.calls, args.seconds, args.users)
    print(report.read_text())
    print(f"report: {report}")


if __name__ == "__main__":
    main()
