"""A real Prometheus for TorchServe's metrics: install it, check monitoring/, run it.

python -m scripts.prometheus install   # Debian's prometheus package (root or sudo), no system service started
python -m scripts.prometheus check     # promtool check config + rules (make monitoring-check)
python -m scripts.prometheus run       # Prometheus on :9090 for the local TorchServe (make monitoring)
"""

import argparse
import signal
import sys

from common.cli import one_line_errors
from common.config import ROOT
from monitoring.prometheus_config import ALERTS_YML, PROMETHEUS_YML, derived_config, install, metrics_target, promtool
from servers.process import ServerError
from servers.prometheus import Prometheus
from servers.torchserve import CONFIG_PROPERTIES


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["install", "check", "run"])
    parser.add_argument("--port", type=int, default=9090, help="run: Prometheus' own port (default 9090)")
    parser.add_argument("--config", default=str(CONFIG_PROPERTIES), help="run: TorchServe config.properties to scrape")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with one_line_errors():
        if args.command == "install":
            prometheus, tool = install()
            print(f"prometheus: {prometheus}\npromtool:   {tool}")
        elif args.command == "check":
            print(promtool("check", "config", str(PROMETHEUS_YML)).strip())
            print(promtool("check", "rules", str(ALERTS_YML)).strip())
        else:
            workdir = ROOT / "logs" / "prometheus"
            target = metrics_target(args.config)
            try:
                with Prometheus(derived_config(workdir, target), workdir, args.port) as prom:
                    print(f"Prometheus on {prom.url} scraping {target} (data in {workdir})")
                    print("Ctrl-C stops it.", flush=True)
                    prom.proc.wait()
                    raise ServerError(f"Prometheus exited with code {prom.proc.returncode}:\n{prom.log_tail()}")
            except KeyboardInterrupt:
                print("\nstopped.")


if __name__ == "__main__":
    main()
