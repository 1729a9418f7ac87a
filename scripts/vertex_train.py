"""Vertex AI custom job entrypoint (the training image, Dockerfile target `train`).

    python -m scripts.vertex_train [Hydra overrides]    # e.g. model=resnet18 trainer.max_epochs=20

Runs data -> train -> export -> archive in one process with the project's own stage functions,
then copies the .mar, model.pt, index_to_name.json and metrics.json to OUTPUT_DIR, by default
the job's AIP_MODEL_DIR (gs://bucket/path, set by Vertex from baseOutputDirectory) read through
Vertex's Cloud Storage mount /gcs/bucket/path (GCS_MOUNT). Without either they stay local.
The library is cloud/vertex.py.
"""

import argparse
import logging
import os

from cloud.vertex import run
from common.cli import one_line_errors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. trainer.max_epochs=20")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with one_line_errors():
        run(args.overrides, dict(os.environ))


if __name__ == "__main__":
    main()
