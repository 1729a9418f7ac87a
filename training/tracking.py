"""Experiment tracking: the Lightning logger that the `logger` config group picks (mlflow, wandb, csv, none),
what every run logs beside Lightning's per-epoch metrics (the resolved config as parameters, the lineage as
tags, plots), and the artifacts that later stages add to a finished run (export: model.pt; robustness: its plot).

MLflow also keeps a model registry: every finished training run becomes a new version of the registered model
`<name>`, tagged with its data hash and commit (training/registry.py reads it back).

One Tracker per backend says how it does each of these; the functions below pick the run's tracker. The
backends' libraries are imported only when a run uses them, so `--help` and `logger=none` stay fast.
"""

import logging
import netrc
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

from common.cli import BundleError
from handlers import files
from training import lineage

log = logging.getLogger(__name__)

SQLITE = "sqlite:///"
URI_VARIABLE = "MLFLOW_TRACKING_URI"  # the team server's address, when set (configs/logger/mlflow.yaml)
SKIPPED = ("hydra",)  # config sections that describe the launcher, not the run
REGISTRY_TAGS = ("data_hash", "git_commit", "git_dirty")  # lineage keys each registry version carries as tags


class TrackingError(BundleError):
    """The tracker cannot be reached or does not know the run; the message says which."""


class History(Callback):
    """Every epoch's train and validation metrics, for the training curves."""

    def __init__(self) -> None:
        self.epochs: list[dict] = []

    def on_train_epoch_end(self, trainer, module) -> None:  # after the epoch's validation
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train_", "val_"))}
        self.epochs.append({"epoch": trainer.current_epoch, **metrics})


def local_store(uri: str) -> Path | None:
    """The SQLite file of a local MLflow store, or None for a server."""
    return Path(uri.removeprefix(SQLITE)) if uri.startswith(SQLITE) else None


def wandb_has_key() -> bool:
    """An API key in WANDB_API_KEY or in the netrc file that `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_mode(setting: str) -> str:
    """`auto`: WANDB_MODE when set, else online with an API key and offline without one."""
    if setting != "auto":
        return setting
    env = os.environ.get("WANDB_MODE", "")
    if env in ("offline", "dryrun", "disabled"):
        return "disabled" if env == "disabled" else "offline"
    return "online" if wandb_has_key() else "offline"


def store_uri(uri: str) -> str:
    """The tracking URI with a local store's path made absolute, so later stages find it from any folder."""
    store = local_store(uri)
    return SQLITE + str(store.resolve()) if store is not None else uri


def first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def copy_into(paths: list[Path], target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copy2(path, target / path.name)


class Tracker:
    """A backend: its Lightning logger, and what it does beside Lightning's metrics. This base tracks nothing
    (`logger=none`)."""

    kind = "none"
    logger_class = ""  # the class name of its Lightning logger

    def logger(self, cfg: DictConfig, run_name, tags, group, experiment, run_id):
        return None

    def tag(self, logger, origin: dict) -> None:
        """Record the code and data the run starts from."""

    def info(self, logger, cfg: DictConfig) -> dict:
        """How to find the run again: the tracker, its address and the run's id."""
        return {"tracker": self.kind, "run_id": None}

    def upload(self, logger, paths: list[Path], folder: str) -> None:
        """Add files to the open run."""

    def finish(self, logger) -> None:
        """After the last upload of a run that `finish` ends."""

    def close(self, logger, state: str) -> None:
        """End a search trial's run with its state (COMPLETE, PRUNED, FAIL)."""

    def attach(self, record: dict, paths: list[Path], folder: str) -> None:
        """Add files to the finished run that the lineage `record` names."""

    def register(self, logger, record: dict) -> dict | None:
        """Add the run's model to the model registry as a new version: {"model", "version"}; None: no registry."""
        log.info("logger=%s has no model registry: this run is not registered (logger=mlflow has one)", self.kind)
        return None


class MLflow(Tracker):
    kind, logger_class = "mlflow", "MLFlowLogger"

    def logger(self, cfg: DictConfig, run_name, tags, group, experiment, run_id):
        from lightning.pytorch.loggers import MLFlowLogger

        settings = cfg.logger
        uri = settings.tracking_uri
        if not uri:
            raise TrackingError("logger.tracking_uri (or MLFLOW_TRACKING_URI) is empty")
        store = local_store(uri)
        if store is not None:
            store.parent.mkdir(parents=True, exist_ok=True)
            uri = store_uri(uri)
        location = str(Path(settings.artifact_location).resolve()) if store is not None else None
        logger = MLFlowLogger(
            experiment or settings.experiment,
            run_name,
            uri,
            tags,
            save_dir=None,
            artifact_location=location,
            log_model=False,
            run_id=run_id,
        )
        previous = os.environ.get(URI_VARIABLE)
        try:
            logger.experiment  # noqa: B018 (creates the run, and MLflow exports its URI to the environment...)
        finally:  # ... where the next config of this process would read it as the user's team server
            if previous is None:
                os.environ.pop(URI_VARIABLE, None)
            else:
                os.environ[URI_VARIABLE] = previous
        return logger

    def tag(self, logger, origin: dict) -> None:
        from mlflow.entities import RunTag

        tags = {k: str(v) for k, v in origin.items()}
        tags["mlflow.source.git.commit"] = tags["git_commit"]  # what the MLflow UI shows as the run's commit
        logger.experiment.log_batch(logger.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def info(self, logger, cfg: DictConfig) -> dict:
        uri, experiment = logger._tracking_uri, logger.experiment_id
        url = f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{logger.run_id}" if uri.startswith("http") else None
        return {
            "tracker": self.kind,
            "run_id": logger.run_id,
            "experiment": cfg.logger.experiment,
            "experiment_id": experiment,
            "tracking_uri": uri,
            "run_url": url,
        }

    def upload(self, logger, paths: list[Path], folder: str) -> None:
        for path in paths:
            logger.experiment.log_artifact(logger.run_id, str(path), folder or None)

    def close(self, logger, state: str) -> None:
        logger.experiment.set_tag(logger.run_id, "optuna.state", state)
        if state == "PRUNED":  # Lightning marked it FAILED when the pruner stopped it
            logger.experiment.set_terminated(logger.run_id, "KILLED")

    def attach(self, record: dict, paths: list[Path], folder: str) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        run_id, client = record["run_id"], MlflowClient(record["tracking_uri"])
        try:
            client.get_run(run_id)
            for path in paths:
                client.log_artifact(run_id, str(path), folder or None)
        except MlflowException as err:
            raise TrackingError(
                f"cannot log to MLflow run {run_id} at {record['tracking_uri']}: {first_line(err)}"
            ) from None

    def register(self, logger, record: dict) -> dict:
        """A new version of the registered model `<name>` (created on first use) whose source is the run, tagged
        with REGISTRY_TAGS; the run gets lineage.json with the version in it, which `fetch` hands the archive."""
        from mlflow.exceptions import MlflowException

        client, name = logger.experiment, record["name"]
        try:
            client.create_registered_model(name, description="Registered by training/tracking.py on every run.")
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {key: str(record.get(key)) for key in REGISTRY_TAGS}
        version = client.create_model_version(name, f"runs:/{logger.run_id}", run_id=logger.run_id, tags=tags)
        entry = {"model": name, "version": str(version.version)}
        client.log_dict(logger.run_id, {**record, "registry": entry}, files.LINEAGE)
        return entry


class Wandb(Tracker):
    kind, logger_class = "wandb", "WandbLogger"

    def logger(self, cfg: DictConfig, run_name, tags, group, experiment, run_id):
        from lightning.pytorch.loggers import WandbLogger

        settings = cfg.logger
        mode = wandb_mode(settings.mode)
        Path(settings.save_dir).mkdir(parents=True, exist_ok=True)
        return WandbLogger(  # Lightning refuses log_model offline: checkpoints then go with the run's files
            name=run_name,
            save_dir=settings.save_dir,
            project=settings.project,
            offline=mode == "offline",
            log_model=bool(settings.log_model) and mode == "online",
            group=group,
            mode=mode,
        )

    def tag(self, logger, origin: dict) -> None:
        logger.experiment.config.update({"lineage": origin}, allow_val_change=True)

    def info(self, logger, cfg: DictConfig) -> dict:
        run = logger.experiment
        mode = wandb_mode(cfg.logger.mode)
        return {
            "tracker": self.kind,
            "run_id": run.id,
            "project": cfg.logger.project,
            "mode": mode,
            "save_dir": str(Path(cfg.logger.save_dir).resolve()),
            "run_dir": str(Path(run.dir).parent),
            "run_url": run.url if mode == "online" else None,
        }

    def upload(self, logger, paths: list[Path], folder: str) -> None:
        import wandb

        run = logger.experiment
        for path in paths:
            run.save(str(path), base_path=str(path.parent), policy="now")
            if path.suffix == ".png":
                run.log({f"plots/{path.stem}": wandb.Image(str(path))})

    def finish(self, logger) -> None:
        logger.experiment.finish()

    def close(self, logger, state: str) -> None:
        logger.experiment.summary["optuna.state"] = state
        logger.experiment.finish(exit_code=0 if state != "FAIL" else 1)

    def attach(self, record: dict, paths: list[Path], folder: str) -> None:
        import wandb

        run = wandb.init(
            id=record["run_id"], project=record["project"], dir=record["save_dir"], mode=record["mode"], resume="allow"
        )
        for path in paths:
            run.save(str(path), base_path=str(path.parent), policy="now")
        run.finish()


class CSV(Tracker):
    kind, logger_class = "csv", "CSVLogger"

    def logger(self, cfg: DictConfig, run_name, tags, group, experiment, run_id):
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(cfg.logger.save_dir, name=cfg.name, version=run_name)

    def tag(self, logger, origin: dict) -> None:
        logger.log_hyperparams({f"lineage.{k}": str(v) for k, v in origin.items()})

    def info(self, logger, cfg: DictConfig) -> dict:
        run_id = f"{logger.name}/{logger.log_dir.rsplit('/', 1)[-1]}"
        return {"tracker": self.kind, "run_id": run_id, "run_dir": logger.log_dir}

    def upload(self, logger, paths: list[Path], folder: str) -> None:
        copy_into(paths, Path(logger.log_dir) / folder)

    def attach(self, record: dict, paths: list[Path], folder: str) -> None:
        copy_into(paths, Path(record["run_dir"]) / folder)


TRACKERS = {t.kind: t for t in (MLflow(), Wandb(), CSV(), Tracker())}
KINDS = tuple(TRACKERS)


def tracker(logger) -> Tracker:
    """The tracker of a Lightning logger (None: none)."""
    by_class = {t.logger_class: t for t in TRACKERS.values()}
    return by_class.get(type(logger).__name__, TRACKERS["none"])


def make_logger(
    cfg: DictConfig,
    run_name: str | None = None,
    tags: dict | None = None,
    group: str | None = None,
    experiment: str | None = None,
    run_id: str | None = None,
):
    """The Lightning logger of `cfg.logger`, or None for `logger=none`. The hyperparameter search nests its
    trials under the study's run: MLflow `tags` (mlflow.parentRunId) in the study's `experiment`, a W&B `group`;
    `run_id` continues an MLflow run."""
    if cfg.logger.kind not in TRACKERS:
        raise TrackingError(f"unknown logger.kind {cfg.logger.kind!r}: one of {', '.join(KINDS)}")
    return TRACKERS[cfg.logger.kind].logger(cfg, run_name, tags, group, experiment, run_id)


def kind(logger) -> str:
    return tracker(logger).kind


def params(cfg: DictConfig) -> dict[str, str]:
    """The fully resolved config, flat, keyed as Hydra overrides are written (`model.lr`)."""
    flat: dict[str, str] = {}

    def walk(node: object, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            flat[prefix[:-1]] = str(node)

    tree = OmegaConf.to_container(cfg, resolve=True)
    walk({k: v for k, v in tree.items() if k not in SKIPPED}, "")
    return flat


def start(logger, cfg: DictConfig, origin: dict) -> None:
    """Log the resolved config as parameters and the code and data the run starts from as tags."""
    if logger is None:
        return
    logger.log_hyperparams(params(cfg))
    tracker(logger).tag(logger, origin)


def run_info(logger, cfg: DictConfig) -> dict:
    """How to find the run again: the tracker, its address and the run's id."""
    return tracker(logger).info(logger, cfg)


def upload(logger, paths: list[Path], folder: str = "") -> None:
    """Add files to the open run."""
    if paths:
        tracker(logger).upload(logger, paths, folder)


def finish(logger, cfg: DictConfig, origin: dict, paths: list[Path]) -> dict:
    """Upload the run's files, close it, and return its lineage record."""
    record = {"name": cfg.name, "version": str(cfg.version), **run_info(logger, cfg), **origin}
    record["trained_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    upload(logger, paths)
    if registered := tracker(logger).register(logger, record):
        record["registry"] = registered
        log.info("registered %s version %s in %s", registered["model"], registered["version"], record["tracking_uri"])
    tracker(logger).finish(logger)
    return record


def close(logger, state: str) -> None:
    """End a run that `finish` does not (a search trial): its state (COMPLETE, PRUNED, FAIL) as a tag or summary."""
    tracker(logger).close(logger, state)


def attach(artifacts: Path | str, paths: list[Path], folder: str = "") -> dict | None:
    """Add files to the finished run that `<artifacts>/lineage.json` names; returns that record (None: no run)."""
    record = lineage.read(artifacts)
    if not record or not record.get("run_id"):
        log.info("no tracked run in %s: %s not logged", artifacts, [p.name for p in paths])
        return record
    if record["tracker"] not in TRACKERS:
        raise TrackingError(f"{artifacts}: lineage names an unknown tracker {record['tracker']!r}")
    TRACKERS[record["tracker"]].attach(record, paths, folder)
    log.info("logged %s to %s run %s", [p.name for p in paths], record["tracker"], record["run_id"])
    return record
