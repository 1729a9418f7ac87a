"""The hyperparameter search: an Optuna study over the training function (`make tune`, configs/tune.yaml).

Each trial samples the `hparams_search` space, composes the config with those values as Hydra overrides and
trains (training.train.train) with a median pruner fed every epoch's validation metric through
optuna-integration's Lightning callback. The study lives in a SQLite file and is resumed by name, so an
interrupted search goes on where it stopped; each trial is a nested run under the study's run in the tracker.
It writes the best trial as a Hydra override file (`make train ARGS='+tuned=<study>'`) and the study's plots.
"""

import csv
import io
import logging
import shutil
import warnings
from datetime import UTC, datetime
from pathlib import Path

import optuna
import yaml
from omegaconf import DictConfig, OmegaConf

from common.cli import BundleError
from common.config import CONFIG_DIR, load_config
from common.io import write_json, write_text
from training import tracking
from training.plots import save
from training.train import train

log = logging.getLogger(__name__)

CONFIG = "tune"  # configs/tune.yaml
DONE = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


class TuneError(BundleError):
    """The search space or the study's settings are wrong; the message says which."""


def space(cfg: DictConfig) -> list[dict]:
    params = OmegaConf.to_container(cfg.hparams_search, resolve=True).get("params") or []
    for spec in params:
        if spec.get("type") not in ("float", "int", "categorical") or "key" not in spec:
            raise TuneError(f"search space entry {spec}: needs key and type float, int or categorical")
        if spec["type"] == "categorical" and not spec.get("choices"):
            raise TuneError(f"search space entry {spec['key']}: a categorical needs choices")
        if spec["type"] != "categorical" and not spec.get("low", 0) <= spec.get("high", -1):
            raise TuneError(f"search space entry {spec['key']}: needs low <= high")
    if not params:
        raise TuneError("the search space (hparams_search.params) is empty")
    return params


def is_group(key: str) -> bool:
    """`model` selects a config group (configs/model/); `model.lr` sets a value."""
    return "." not in key and (CONFIG_DIR / key).is_dir()


def suggest(trial: optuna.Trial, spec: dict) -> object:
    key, kind = spec["key"], spec["type"]
    if kind == "categorical":
        return trial.suggest_categorical(key, list(spec["choices"]))
    suggest_number = trial.suggest_float if kind == "float" else trial.suggest_int
    return suggest_number(key, spec["low"], spec["high"], log=bool(spec.get("log", False)))


def overrides(cfg: DictConfig, specs: list[dict], values: dict) -> list[str]:
    """The sampled values as Hydra overrides; a `scale` entry multiplies each listed key's configured value."""
    out = []
    for spec in specs:
        value = values[spec["key"]]
        if spec.get("scale"):
            out += [f"{key}={OmegaConf.select(cfg, key) * value!r}" for key in spec["scale"]]
        else:
            out.append(f"{spec['key']}={value}")
    return out


def baseline(cfg: DictConfig, specs: list[dict]) -> dict | None:
    """The config's own values in the search space's terms (None when one cannot be told)."""
    values = {}
    for spec in specs:
        value = spec.get("baseline", None if is_group(spec["key"]) else OmegaConf.select(cfg, spec["key"]))
        if value is None:
            return None
        values[spec["key"]] = value
    return values


def storage(settings: DictConfig) -> optuna.storages.RDBStorage:
    url = str(settings.storage)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            heartbeat_interval=settings.heartbeat_s,
            failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1),
        )


def open_study(cfg: DictConfig) -> optuna.Study:
    """The study of that name in the storage, created if new. The sampler's seed moves on with the trials
    already run, so a resumed study does not sample its first random points again."""
    settings = cfg.tune
    study = optuna.create_study(
        study_name=settings.study,
        storage=storage(settings),
        direction="maximize",
        pruner=optuna.pruners.MedianPruner(**settings.pruner),
        load_if_exists=True,
    )
    sampler = dict(settings.sampler)
    sampler["seed"] = None if sampler.get("seed") is None else sampler["seed"] + len(study.trials)
    study.sampler = optuna.samplers.TPESampler(**sampler)
    return study


def study_run(cfg: DictConfig, study: optuna.Study):
    """The study's own run in MLflow (created once, continued on resume): the trials nest under it."""
    if cfg.logger.kind != "mlflow":
        return None
    parent = tracking.make_logger(cfg, f"study {study.study_name}", run_id=study.user_attrs.get("mlflow_run_id"))
    if "mlflow_run_id" not in study.user_attrs:
        study.set_user_attr("mlflow_run_id", parent.run_id)
        parent.log_hyperparams({f"tune.{k}": v for k, v in tracking.params(cfg.tune).items()})
    return parent


def objective(trial: optuna.Trial, cfg: DictConfig, user: list[str], specs: list[dict], parent) -> float:
    from optuna_integration import PyTorchLightningPruningCallback

    settings = cfg.tune
    values = {spec["key"]: suggest(trial, spec) for spec in specs}
    sampled = overrides(cfg, specs, values)
    trial.set_user_attr("overrides", sampled)
    workdir = Path(settings.workdir) / f"trial_{trial.number}"
    trial_cfg = load_config([*user, *sampled, f"paths.artifacts={workdir}"], CONFIG)
    tags = {"optuna.study": study_name(cfg), "optuna.trial": str(trial.number)}
    if parent is not None:
        tags["mlflow.parentRunId"] = parent.run_id
    logger = tracking.make_logger(
        trial_cfg, f"trial {trial.number}", tags, group=study_name(cfg), experiment=cfg.logger.get("experiment")
    )
    if logger is not None:
        trial.set_user_attr("run_id", tracking.run_info(logger, trial_cfg)["run_id"])
    state = "FAIL"
    try:
        pruning = PyTorchLightningPruningCallback(trial, monitor=settings.metric)
        metrics = train(trial_cfg, callbacks=(pruning,), logger=logger, report=False)
        trial.set_user_attr("test_acc", metrics["test_acc"])
        state = "COMPLETE"
        return metrics[settings.metric]
    except optuna.TrialPruned:
        state = "PRUNED"
        raise
    finally:
        tracking.close(logger, state)
        shutil.rmtree(workdir, ignore_errors=True)


def study_name(cfg: DictConfig) -> str:
    return str(cfg.tune.study)


def best_file(cfg: DictConfig, study: optuna.Study, path: Path) -> Path:
    """The best trial's overrides as a Hydra config to add: `+tuned=<name>` (a `# @package _global_` file)."""
    best = study.best_trial
    body: dict = {}
    groups = []
    for override in best.user_attrs["overrides"]:
        key, value = override.split("=", 1)
        if is_group(key):
            groups.append({f"override /{key}": value})
            continue
        node = body
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    if groups:
        body = {"defaults": [*groups, "_self_"], **body}
    run = best.user_attrs.get("run_id")
    header = [
        "# @package _global_",
        f"# Best trial {best.number} of study {study.study_name}: {cfg.tune.metric} {best.value:.4f}"
        + (f", run {run}" if run else ""),
        f"# written by `make tune` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC. Train with it:",
        f"#   make train ARGS='+tuned={path.stem}'",
    ]
    write_text(path, "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False))
    return path


def trials_csv(study: optuna.Study) -> str:
    keys = sorted({k for t in study.trials for k in t.params})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["number", "state", "value", "test_acc", "epochs", "seconds", "run_id", *keys])
    for t in study.trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else ""
        row = [t.number, t.state.name, t.value, t.user_attrs.get("test_acc", ""), len(t.intermediate_values), seconds]
        row.append(t.user_attrs.get("run_id", ""))
        writer.writerow(row + [t.params.get(k, "") for k in keys])
    return buf.getvalue()


def plots(study: optuna.Study, out: Path) -> list[Path]:
    """Optimisation history, intermediate values (the pruned trials) and parameter importances, as PNG."""
    from optuna.visualization import matplotlib as vis

    written = []
    for name, draw in (
        ("history", vis.plot_optimization_history),
        ("intermediate", vis.plot_intermediate_values),
        ("importances", vis.plot_param_importances),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                ax = draw(study)
        except (ValueError, RuntimeError) as err:  # importances need two finished trials that differ
            log.info("no %s plot: %s", name, err)
            continue
        written.append(save(ax.figure, out / f"{name}.png"))
    return written


def summary(cfg: DictConfig, study: optuna.Study) -> dict:
    counts = {state.name: 0 for state in optuna.trial.TrialState}
    for t in study.trials:
        counts[t.state.name] += 1
    out = {"study": study.study_name, "storage": str(cfg.tune.storage), "trials": len(study.trials), **counts}
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if finished:
        best = study.best_trial
        out["best"] = {"number": best.number, "value": best.value, "test_acc": best.user_attrs.get("test_acc")}
        out["best"]["params"] = best.params
        out["best"].update(overrides=best.user_attrs["overrides"], run_id=best.user_attrs.get("run_id"))
    first = next((t for t in finished if t.user_attrs.get("baseline")), None)
    if first is not None:
        out["baseline"] = {"number": first.number, "value": first.value, "test_acc": first.user_attrs.get("test_acc")}
        out["baseline"]["params"] = first.params
    return out


def tune(user: list[str]) -> dict:
    """Run `tune.n_trials` more trials of the study named by the config composed from `user` overrides."""
    cfg = load_config(user, CONFIG)
    specs = space(cfg)
    settings = cfg.tune
    study = open_study(cfg)
    if not study.trials and settings.baseline and (values := baseline(cfg, specs)):
        study.enqueue_trial(values, user_attrs={"baseline": True})
    log.info("study %s in %s: %d trials so far", study.study_name, settings.storage, len(study.trials))
    parent = study_run(cfg, study)
    study.optimize(
        lambda trial: objective(trial, cfg, user, specs, parent),
        n_trials=settings.n_trials,
        timeout=settings.timeout_s,
        gc_after_trial=True,
    )
    out = Path(settings.out)
    result = summary(cfg, study)
    write_text(out / "trials.csv", trials_csv(study))
    files = [out / "trials.csv", *plots(study, out)]
    if "best" in result:
        result["best_file"] = str(best_file(cfg, study, Path(settings.best)))
        files.append(Path(result["best_file"]))
    write_json(out / "summary.json", result)
    if parent is not None:
        parent.log_metrics({"best_value": result.get("best", {}).get("value", float("nan"))}, step=len(study.trials))
        tracking.upload(parent, [out / "summary.json", *files])
        parent.finalize("success")
    return result
