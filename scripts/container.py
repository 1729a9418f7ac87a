"""Build and run the serving image: docker where an engine answers, else buildah (chroot isolation).

    python -m scripts.container build                 # <name>:<version> from the Hydra config
    python -m scripts.container build --target train  # the Vertex AI training image
    python -m scripts.container run                   # serve it on PORT (default 8080) until Ctrl-C
    python -m scripts.container tag                   # print the image tag

Without a docker daemon, buildah and debootstrap are installed when missing (root, or sudo).
The library is servers/container.py.
"""

import argparse
import signal
import sys
import time
from pathlib import Path

from common.cli import one_line_errors
from servers.container import Container, ContainerError, build, image_size, image_tag


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the image (tag <name>:<version> from the Hydra config)")
    b.add_argument("--target", default="runtime", choices=["runtime", "train"], help="Dockerfile stage")
    b.add_argument("--tag", help="image tag (default <name>:<version>)")
    b.add_argument("--models", type=Path, help="folder holding <name>.mar (default: model_store/ in the context)")
    b.add_argument("--torch-version", default="auto", help="CPU torch version (auto: the pin, or a local CPU wheel)")
    b.add_argument("--no-host-pip", action="store_true", help="do not pass this machine's pip settings to buildah")
    r = sub.add_parser("run", help="run the image's entrypoint on the host network until Ctrl-C")
    r.add_argument("--tag", help="image tag (default <name>:<version>)")
    r.add_argument("--port", type=int, default=8080, help="PORT, the inference port")
    sub.add_parser("tag", help="print the image tag")
    for p in (b, r):
        p.add_argument("--engine", default="auto", choices=["auto", "docker", "buildah"], help="container engine")
    args = parser.parse_args(argv)
    with one_line_errors():
        if args.command == "tag":
            print(image_tag()[1])
        elif args.command == "build":
            if args.models and not args.models.is_dir():
                raise ContainerError(f"--models {args.models} is not a folder")
            start = time.monotonic()
            tag = build(args.target, args.tag, None, args.models, args.engine, args.torch_version, not args.no_host_pip)
            size = image_size(tag, args.engine) / 1e9
            print(f"built {tag} ({size:.2f} GB) in {time.monotonic() - start:.0f} s")
        else:
            tag = args.tag or image_tag()[1]
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            with Container(tag, {"PORT": str(args.port)}, Path("/dev/stdout"), args.engine) as ctr:
                print(f"serving {tag} on http://127.0.0.1:{args.port} (Ctrl-C stops it)", flush=True)
                try:
                    ctr.proc.wait()
                except KeyboardInterrupt:
                    print("\nstopping ...", flush=True)


if __name__ == "__main__":
    main()
