"""Export every model variant of the current config, measure each, write reports/variants/<name>/.

    python -m scripts.variants                      # make variants: the default config's model (digits CNN)
    python -m scripts.variants --photos             # ResNet-18 on a generated 224x224 RGB folder (data/raw/photos)
    python -m scripts.variants --only torchscript aoti --no-serve model.width=16

Variants (training/variants.py): torchscript, torchscript-frozen, aoti, int8, onnx. Each is checked against the
eager model before it is written to paths.artifacts; one that fails its check is listed as refused, with why.
The table, variants.json and a plot go to reports/variants/<name>/. `export.variant` in configs/config.yaml
picks the one the archive ships (docs/variants.md).
"""

import argparse
import logging
import shlex
import sys

from bench import variants
from common.cli import one_line_errors
from common.config import load_config
from handlers import files
from training.photos import make_photos


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=resnet18")
    parser.add_argument("--photos", action="store_true", help="ResNet-18 on generated 224x224 RGB photos")
    parser.add_argument("--only", nargs="+", choices=list(files.VARIANTS), default=list(files.VARIANTS))
    parser.add_argument("--seconds", type=float, default=3.0, help="in-process timing per batch size")
    parser.add_argument("--serve-seconds", type=float, default=10.0, help="wrk run per variant through TorchServe")
    parser.add_argument("--connections", type=int, default=16, help="wrk connections")
    parser.add_argument("--no-serve", action="store_true", help="skip the TorchServe measurement")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    with one_line_errors():
        overrides = list(args.overrides)
        if args.photos:
            make_photos()
            overrides = [*variants.PHOTO_OVERRIDES, *overrides]
        cfg = load_config(overrides)
        command = shlex.join(["python", "-m", "scripts.variants", *(argv if argv is not None else sys.argv[1:])])
        serve = 0.0 if args.no_serve else args.serve_seconds
        variants.main(cfg, args.only, args.seconds, serve, args.connections, command)


if __name__ == "__main__":
    main()
