"""Deploy to Google Cloud with gcloud; --dry-run prints every command instead of running it.

    python -m scripts.deploy serve --project my-proj --region europe-west1 --dry-run   # Cloud Run
    python -m scripts.deploy serve --project my-proj --skip-build                      # redeploy the pushed image
    python -m scripts.deploy train --project my-proj --bucket my-bucket --dry-run      # Vertex AI custom job
    python -m scripts.deploy train --bucket my-bucket --replicas 3 --dry-run           # DDP: chief + 2 workers
    python -m scripts.deploy serve --dry-run model=resnet18                            # Hydra overrides last
    python -m scripts.deploy serve --gpu --dry-run          # Cloud Run on an NVIDIA L4: the gpu image, serve=gpu
    python -m scripts.deploy train --gpu --bucket my-bucket --dry-run   # Vertex AI on g2-standard-8 with an L4
    python -m scripts.deploy rollout --dry-run version=1.1   # 1.1's pushed image: a revision with 10% of the traffic
    python -m scripts.deploy rollout --stage promote --dry-run version=1.1            # then all of it
    python -m scripts.deploy rollout --stage rollback --previous REVISION --dry-run   # or all back to REVISION
    python -m scripts.deploy kserve --bucket my-bucket --dry-run  # KServe: storage folder + InferenceService (v2)
    python -m scripts.deploy kserve --gpu --dry-run               # ... one GPU per replica, settings from serve=gpu

Model name and version come from the Hydra config, the port from docker/config.properties, the
Cloud Run concurrency and CPU from the `serve:` section; project and region from the flags or
GOOGLE_CLOUD_PROJECT / GOOGLE_CLOUD_REGION. `serve` builds, smoke-tests, pushes and deploys
through Cloud Build (cloud/cloudbuild.yaml), whose `gcloud run deploy` is the one printed here.
The library is cloud/deploy.py; `kserve` (cloud/kserve.py) writes the storage folder KServe's TorchServe runtime
mounts and the InferenceService under logs/deploy/kserve/, validates it with the kserve SDK's models, and prints
(without --dry-run: runs) the upload to gs://BUCKET/kserve/<name>/<version> and the `kubectl apply`.
"""

import argparse
import os
from pathlib import Path

from cloud import kserve
from cloud.deploy import CLOUD_RUN_GPU, DEFAULTS, GPU_MEMORY, ROLLOUT_STAGES, VERTEX_GPU, deploy
from common.cli import one_line_errors
from common.config import load_config
from handlers.archive import mar_file


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "what",
        choices=["serve", "train", "rollout", "kserve"],
        help="serve: Cloud Run; train: Vertex AI job; rollout: gradual Cloud Run rollout; kserve: KServe",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (model=resnet18 ...); for train, the job's too")
    env = os.environ.get
    parser.add_argument("--project", default=env("GOOGLE_CLOUD_PROJECT"), help="GCP project (GOOGLE_CLOUD_PROJECT)")
    parser.add_argument("--region", default=env("GOOGLE_CLOUD_REGION", DEFAULTS["region"]), help="GCP region")
    parser.add_argument("--repository", default=DEFAULTS["repository"], help="Artifact Registry docker repository")
    parser.add_argument("--service", help="Cloud Run service (default: the model name with dashes)")
    parser.add_argument(
        "--memory", help=f"Cloud Run memory per instance (default {DEFAULTS['memory']}; with --gpu {GPU_MEMORY})"
    )
    parser.add_argument("--min-instances", type=int, default=DEFAULTS["min_instances"], help="0 scales to zero")
    parser.add_argument("--max-instances", type=int, default=DEFAULTS["max_instances"], help="caps the cost")
    parser.add_argument("--skip-build", action="store_true", help="serve: deploy the pushed image, no Cloud Build")
    parser.add_argument("--bucket", help="train: GCS bucket for the job's outputs; kserve: for the storage folder")
    parser.add_argument(
        "--machine-type",
        help=f"train: Vertex AI machine type (default {DEFAULTS['machine']}; with --gpu {VERTEX_GPU['machine']})",
    )
    parser.add_argument("--replicas", type=int, default=1, help="train: machines; >1 = DDP, a chief and N-1 workers")
    parser.add_argument(
        "--gpu",
        action="store_true",
        help=f"serve: the gpu image on Cloud Run with an {CLOUD_RUN_GPU['type']}, settings from serve=gpu; "
        f"train: one {VERTEX_GPU['acceleratorType']} per machine; kserve: one GPU per replica, serve=gpu",
    )
    parser.add_argument("--stage", choices=ROLLOUT_STAGES, default="canary", help="rollout: canary, promote, rollback")
    parser.add_argument("--percent", type=int, default=10, help="rollout canary: its share of the traffic")
    parser.add_argument("--previous", help="rollout rollback: the revision to send all traffic back to")
    parser.add_argument("--protocol", default="v2", choices=kserve.PROTOCOLS, help="kserve: the InferenceService's")
    parser.add_argument("--archive", type=Path, help="kserve: the .mar (default: the config's model store)")
    parser.add_argument("--out", type=Path, default=kserve.RENDERED, help="kserve: where the folder and YAML go")
    parser.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
    args = parser.parse_intermixed_args(argv)

    if args.what == "kserve":
        with one_line_errors():
            cfg = load_config((["serve=gpu"] if args.gpu else []) + args.overrides)
            mar = args.archive or Path(cfg.paths.model_store) / mar_file(cfg.name)
            folder, manifest, commands = kserve.prepare(
                cfg, mar, args.bucket or ("BUCKET" if args.dry_run else None), args.out, protocol=args.protocol,
                gpu=args.gpu, memory=args.memory or (GPU_MEMORY if args.gpu else DEFAULTS["memory"]),
                replicas=(args.min_instances, args.max_instances),
            )  # fmt: skip
            print(f"# wrote {folder}/ (config/config.properties, model-store/) and {manifest} (validated)", flush=True)
            kserve.execute(commands, args.dry_run)
        return

    with one_line_errors():
        deploy(
            args.what,
            load_config((["serve=gpu"] if args.gpu and args.what != "train" else []) + args.overrides),
            args.project,
            region=args.region,
            repository=args.repository,
            service=args.service,
            memory=args.memory,
            instances=(args.min_instances, args.max_instances),
            skip_build=args.skip_build,
            bucket=args.bucket,
            machine=args.machine_type,
            overrides=tuple(args.overrides),
            dry_run=args.dry_run,
            replicas=args.replicas,
            gpu=args.gpu,
            stage=args.stage,
            percent=args.percent,
            previous=args.previous,
        )


if __name__ == "__main__":
    main()
