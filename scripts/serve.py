"""Start TorchServe with the archived model, wait until its workers are READY, print a curl line.

python -m scripts.serve                 # serves model_store/<name>.mar in the foreground; Ctrl-C stops it
python -m scripts.serve model=resnet18  # Hydra overrides pick the model, as in training
"""

import argparse
import signal
import sys
from pathlib import Path

from common.cli import one_line_errors
from common.config import load_config
from handlers.archive import mar_file
from servers.process import ServerError
from servers.torchserve import CONFIG_PROPERTIES, WORKDIR, TorchServe


def serving(described: dict) -> str:
    """What a worker says it serves: file, variant, device and precision, and why not the GPU it was given."""
    served = described.get("served", {})
    line = f"{served.get('file')} ({served.get('variant')}) on {served.get('device')}, {served.get('precision')}"
    return f"{line}; {served['note']}" if served.get("note") else line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=resnet18")
    parser.add_argument("--config", default=str(CONFIG_PROPERTIES), help="TorchServe config.properties")
    parser.add_argument("--workdir", default=str(WORKDIR), help="logs, key file, pid file")
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for READY workers")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with one_line_errors():
        cfg = load_config(args.overrides)
        samples = sorted((Path(cfg.paths.data) / "samples").glob("*.png"))
        server = TorchServe(cfg.paths.model_store, {cfg.name: mar_file(cfg.name)}, args.workdir, args.config)
        try:
            with server:
                print(f"starting TorchServe for {cfg.name} (logs in {server.workdir}) ...", flush=True)
                seconds = server.wait_ready(args.timeout)
                curl = server.curl(cfg.name, str(samples[0]) if samples else "IMAGE.png")
                workers = len(server.workers(cfg.name))
                described = serving(server.describe(cfg.name))
                print(f"\n{cfg.name} is READY after {seconds:.1f} s: {workers} worker(s), {described}", flush=True)
                print(f"Try:\n\n  {curl}\n\nCtrl-C stops the server.", flush=True)
                server.proc.wait()
                raise ServerError(f"TorchServe exited with code {server.proc.returncode}:\n{server.log_tail()}")
        except KeyboardInterrupt:
            print("\nstopped.")


if __name__ == "__main__":
    main()
