"""Offline drift check: a folder of images (e.g. what clients sent last week) against the training reference.

    python -m scripts.drift_report IMAGES                      # make drift IMAGES=...
    python -m scripts.drift_report IMAGES --mar model_store/digits_cnn.mar
    python -m scripts.drift_report IMAGES --fail-on-drift      # exit 1 when a score is over the threshold
    python -m scripts.drift_report IMAGES model=resnet18       # Hydra overrides pick the model

The serving core decodes and predicts, handlers/drift.py scores (monitoring/drift_report.py): the
numbers are the ones the `DriftScore` metric shows. The model and reference come from
paths.artifacts, else the .mar. Writes report.html and scores.json to `drift_report.out`.
"""

import argparse
import sys
from pathlib import Path

from common.cli import one_line_errors
from common.config import load_config
from monitoring.drift_report import drift_report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", help="folder of PNG/JPEG/... images (searched recursively)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=resnet18 drift_report.out=...")
    parser.add_argument("--mar", type=Path, help="read the model and drift reference from this archive")
    parser.add_argument("--fail-on-drift", action="store_true", help="exit 1 when a score is over the threshold")
    args = parser.parse_args(argv)
    with one_line_errors():
        cfg = load_config(args.overrides, "monitoring")
        summary = drift_report(cfg, Path(args.images), args.mar)
    width = max(map(len, summary["scores"]))
    for name, score in summary["scores"].items():
        print(f"  {name:<{width}}  {score:.3f}{'  DRIFT' if name in summary['drifted'] else ''}")
    verdict = f"drift in {', '.join(summary['drifted'])}" if summary["drifted"] else "no drift"
    print(f"{summary['images']} images: {verdict} (threshold {summary['threshold']})")
    print(f"report: {Path(cfg.drift_report.out) / 'report.html'}")
    if args.fail_on_drift and summary["drifted"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
