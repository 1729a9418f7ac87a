"""Time the DataLoader by number of workers; write reports/loaders/ (loaders.md, loaders.png, loaders.json).

    python -m scripts.loaders                          # make loaders: 0/1/2/4 workers, 100 batches x 5 repeats
    python -m scripts.loaders --folder my_images --workers 0 2 data.image_size=128
    python -m scripts.loaders --batches 10 --repeats 2 # a quick look

Without --folder it measures a generated folder of --images JPEGs (--image-px square, textured) in
data/raw/loader-bench. Images are decoded and resized at run time as the data stage does it, then the
training augmentation runs on each batch. Hydra overrides (last) pick data.batch_size, data.image_size, augment.
The library is bench/loaders.py.
"""

import argparse
from pathlib import Path

from bench.loaders import make_folder, run
from common.cli import one_line_errors
from common.config import load_config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. data.batch_size=64")
    parser.add_argument("--folder", type=Path, help="an image folder (root/<class>/<image>); default: generated")
    parser.add_argument("--images", type=int, default=1000, help="images in the generated folder")
    parser.add_argument("--image-px", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4], help="num_workers values")
    parser.add_argument("--batches", type=int, default=100, help="batches per measurement")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per setting")
    parser.add_argument("--out", type=Path, default=Path("reports/loaders"), help="report folder")
    args = parser.parse_intermixed_args(argv)
    with one_line_errors():
        root = args.folder
        if root is None:
            root = Path("data/raw/loader-bench") / f"{args.images}x{args.image_px}"
            if not root.is_dir():
                make_folder(root, args.images, args.image_px)
        cfg = load_config(["data=folder", f"data.root={root}", *args.overrides])
        for path in run(cfg, root, args.out, args.workers, args.batches, args.repeats):
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
