"""Roll a new model version into the running TorchServe without losing a request, or back (docs/rollout.md).

    python -m scripts.rollout new version=1.1 seed=7   # make rollout: train, export, archive 1.1 in its own folder
                                                       # (rollout.folder), then roll it into the running server
    python -m scripts.rollout new version=1.2 --mar model_store/digits_cnn.mar   # an archive built already, e.g. by
                                                       # make archive ARGS='archive.from_alias=champion version=1.2'
    python -m scripts.rollout back                     # make rollback: the previous version is the default again
    python -m scripts.rollout bench version=1.1 seed=7 # make rollout-bench: 64 clients through a rollout and a
                                                       # rollback -> reports/rollout/

The server is `make serve`'s (config.properties' addresses, the keys in logs/torchserve/key_file.json) unless
--inference/--management, --inference-key/--management-key and --model-store (the folder that server registers
archives from) name another, e.g. the container's. After a rollout or rollback the MLflow registry alias
(rollout.alias, `champion`) names the registry version the server now serves. The library is servers/rollout.py.
"""

import argparse
import logging
import tempfile
from pathlib import Path

from bench.rollout import measure
from common.cli import one_line_errors
from common.config import load_config
from servers.rollout import preflight, roll_back, roll_out
from servers.torchserve import CONFIG_PROPERTIES, WORKDIR, Api
from training import registry, release


def server(args: argparse.Namespace) -> Api:
    api = Api.running(args.config, args.workdir)
    urls = {"inference": args.inference, "management": args.management}
    keys = {"inference": args.inference_key, "management": args.management_key}
    api.urls.update({k: v for k, v in urls.items() if v})
    api.keys.update({k: v for k, v in keys.items() if v is not None})
    return api


def follow(api: Api, name: str, alias: str) -> None:
    """Point the registry alias at the version the server now serves."""
    version = registry.promote(api.describe(name).get("lineage"), alias)
    if version:
        print(f"registry: {name}@{alias} is version {version}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["new", "back", "bench"], help="roll a new version in, roll back, benchmark")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the new version (version=1.1 seed=7 ...)")
    parser.add_argument("--mar", help="new: roll in this archive instead of building one")
    parser.add_argument("--config", default=str(CONFIG_PROPERTIES), help="the server's config.properties (addresses)")
    parser.add_argument("--workdir", default=str(WORKDIR), help="the server's working folder (its key_file.json)")
    parser.add_argument("--inference", help="the inference API's URL (default: from --config)")
    parser.add_argument("--management", help="the management API's URL (default: from --config)")
    parser.add_argument("--inference-key", help="the inference token ('' when token authorization is off)")
    parser.add_argument("--management-key", help="the management token ('' when token authorization is off)")
    parser.add_argument("--model-store", help="new: the folder the server registers archives from (paths.model_store)")
    parser.add_argument("--clients", type=int, default=64, help="bench: concurrent keep-alive connections")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    with one_line_errors():
        cfg = load_config(args.overrides)
        if args.what == "bench":
            command = " ".join(["python -m scripts.rollout bench", *args.overrides, f"--clients {args.clients}"])
            with tempfile.TemporaryDirectory() as tmp:
                result = measure(cfg, args.clients, Path(tmp), command)
            print(f"{result['load']} rollout {result['rollout']['to_default_s']} s to the new default", flush=True)
            return
        api = server(args)
        if args.what == "new":
            if not args.mar:
                preflight(api, cfg.name, str(cfg.version))  # before training: the server is there, 1.1 is new
            mar = Path(args.mar) if args.mar else release.build(cfg)
            images = release.held_out(cfg, cfg.rollout.gate_images)
            roll_out(api, mar, args.model_store or cfg.paths.model_store, images)
        else:
            roll_back(api, cfg.name)
        follow(api, cfg.name, cfg.rollout.alias)


if __name__ == "__main__":
    main()
