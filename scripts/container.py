"""Build and run the serving image: docker where an engine answers, else buildah (chroot isolation).

    python -m scripts.container build                 # <name>:<version> from the Hydra config (CPU torch)
    python -m scripts.container build --gpu           # <name>-gpu:<version>: CUDA torch (several GB of wheels)
    python -m scripts.container build --target train  # the Vertex AI training image
    python -m scripts.container run                   # serve it on the container's inference port until Ctrl-C
    python -m scripts.container run --gpu             # the GPU image, with the GPUs passed in (docker --gpus all)
    python -m scripts.container tag [--gpu]           # print the image tag

Both serving images start with the serving profile for what they find (configs/serve/): gpu where a GPU
is visible, cpu otherwise; SERVE_PROFILE=cpu|gpu in the container's environment forces one.
Without a docker daemon, buildah and debootstrap are installed when missing (root, or sudo).
The libraries are cloud/image.py (building) and servers/container.py (running).
"""

import argparse
import signal
import sys
import time
from pathlib import Path

from cloud.deploy import container_port
from cloud.image import TARGETS, ContainerError, build, image_size, image_tag
from common.cli import one_line_errors
from servers.container import Container


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the image (tag <name>:<version> from the Hydra config)")
    b.add_argument("--target", default="runtime", choices=list(TARGETS), help="Dockerfile stage")
    b.add_argument("--tag", help="image tag (default <name>[-gpu|-train]:<version>)")
    b.add_argument("--models", type=Path, help="folder holding <name>.mar (default: model_store/ in the context)")
    b.add_argument("--torch-version", default="auto", help="torch version (auto: the pin, or a local CPU wheel)")
    b.add_argument("--torch-index", help="index torch comes from ('' = pip's own; default: the Dockerfile's)")
    b.add_argument("--no-host-pip", action="store_true", help="do not pass this machine's pip settings to buildah")
    r = sub.add_parser("run", help="run the image's entrypoint on the host network until Ctrl-C")
    r.add_argument("--tag", help="image tag (default <name>[-gpu]:<version>)")
    r.add_argument("--port", type=int, default=container_port(), help="PORT, the inference port (default: %(default)s)")
    t = sub.add_parser("tag", help="print the image tag")
    for p in (b, r, t):
        p.add_argument("--gpu", action="store_true", help="the GPU image (target gpu); run: pass the GPUs in")
    for p in (b, r):
        p.add_argument("--engine", default="auto", choices=["auto", "docker", "buildah"], help="container engine")
    args = parser.parse_args(argv)
    target = "gpu" if args.gpu else getattr(args, "target", "runtime")
    with one_line_errors():
        if args.command == "tag":
            print(image_tag(target=target)[1])
        elif args.command == "build":
            if args.models and not args.models.is_dir():
                raise ContainerError(f"--models {args.models} is not a folder")
            if args.gpu and args.target not in ("runtime", "gpu"):
                raise ContainerError(f"--gpu builds the target gpu, not {args.target}")
            start = time.monotonic()
            tag = build(
                target,
                args.tag,
                None,
                args.models,
                args.engine,
                args.torch_version,
                not args.no_host_pip,
                torch_index=args.torch_index,
            )
            size = image_size(tag, args.engine) / 1e9
            print(f"built {tag} ({size:.2f} GB) in {time.monotonic() - start:.0f} s")
        else:
            tag = args.tag or image_tag(target=target)[1]
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            with Container(tag, {"PORT": str(args.port)}, Path("/dev/stdout"), args.engine, args.gpu) as ctr:
                print(f"serving {tag} on http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
                try:
                    ctr.proc.wait()
                except KeyboardInterrupt:
                    print("\nstopping ...", flush=True)


if __name__ == "__main__":
    main()
