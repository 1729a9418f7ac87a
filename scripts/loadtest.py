"""Load-test TorchServe with Locust (loadtest/locustfile.py), headless, and check the SLOs of configs/loadtest.yaml.

    python -m scripts.loadtest                               # make loadtest
    python -m scripts.loadtest --users 32 --run-time 60      # heavier, longer
    python -m scripts.loadtest --host http://127.0.0.1:8080  # a server you started (token: --key-file/--token)
    python -m scripts.loadtest model=resnet18 loadtest.slo.p99_ms=200   # Hydra overrides

Without --host it targets the server on config.properties' inference port if one is running there
(`make serve`, whose key file it reads), else starts TorchServe with model_store/<name>.mar on free
ports and stops it afterwards. Writes Locust's CSV and HTML report and summary.json (exact
latencies) under loadtest.out, prints the result, and exits non-zero with a one-line reason when
an objective is missed: unexpected failures, p95, p99, minimum throughput.
"""

import argparse
import os

from common.cli import one_line_errors
from common.config import load_config
from loadtest.slo import load_test


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=resnet18 loadtest.slo.p99_ms=200")
    parser.add_argument("--host", help="target this server (e.g. http://127.0.0.1:8080) instead of starting one")
    parser.add_argument("--users", type=int, help="Locust users (default loadtest.users)")
    parser.add_argument("--spawn-rate", type=float, help="users started per second (default loadtest.spawn_rate)")
    parser.add_argument("--run-time", type=float, help="seconds (default loadtest.run_time_s)")
    parser.add_argument("--out", help="report directory (default loadtest.out)")
    parser.add_argument("--key-file", help="key_file.json of the target server (default loadtest.key_file)")
    parser.add_argument("--token", default=os.environ.get("LOCUST_TOKEN", ""), help="inference token (LOCUST_TOKEN)")
    args = parser.parse_args(argv)
    with one_line_errors():
        cfg = load_config(args.overrides, config_name="loadtest")
        missed = load_test(
            cfg, args.host, args.token, args.key_file, args.users, args.spawn_rate, args.run_time, args.out
        )
    if missed:
        raise SystemExit("SLO missed: " + "; ".join(missed))


if __name__ == "__main__":
    main()
