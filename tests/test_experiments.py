"""Experiments: tracking (MLflow into a temporary SQLite store, W&B offline), lineage from training through the
archive to TorchServe's describe call, the resumable Optuna search with pruning, and the profilers."""

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from common.config import ROOT, load_config
from experiments.profile import core, live, py_spy, top_frames
from experiments.tune import open_study, tune
from handlers import files
from handlers.archive import read_lineage, unpack
from servers.fastapi import load_classifier
from tests import client
from training import lineage, tracking
from training.archive import ArchiveError, archive
from training.profiler import training_profiler
from training.train import train

SHORT = ["trainer.max_epochs=2", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]


def overrides(cfg, tmp_path: Path, *extra: str) -> list[str]:
    """A config on the session's dataset with everything it writes under tmp_path."""
    return [
        f"paths.data={cfg.paths.data}",
        f"paths.artifacts={tmp_path}/artifacts",
        f"paths.model_store={tmp_path}/model_store",
        f"paths.runs={tmp_path}/runs",
        *SHORT,
        *extra,
    ]


def test_data_hash_is_the_one_dvc_computes(dataset):
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    _, _, tree = build(HashFileDB(fs, str(dataset / ".." / "odb")), str(dataset), fs, "md5")
    assert lineage.data_hash(dataset) == tree.hash_info.value
    assert lineage.data_hash(dataset).endswith(".dir")


def test_git_state_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    assert lineage.git_state(tmp_path) == (lineage.UNKNOWN, None)
    monkeypatch.setenv("GIT_COMMIT", "abc123")
    assert lineage.git_state(tmp_path) == ("abc123", None)
    assert lineage.problems({"run_id": "r", "git_commit": "unknown", "data_hash": "h"}) == [
        "unknown git commit (no git here: set GIT_COMMIT)"
    ]
    assert lineage.problems({"tracker": "none", "run_id": None, "git_commit": "c", "data_hash": "h"})[0].startswith(
        "no run id"
    )


def test_wandb_is_offline_without_an_api_key(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert tracking.wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert tracking.wandb_mode("auto") == "offline"
    assert tracking.wandb_mode("online") == "online"


def test_training_run_is_tracked_in_mlflow(cfg, metrics, model_file):
    """The session's pipeline trained with the default logger, MLflow, into a temporary SQLite store."""
    record = lineage.read(cfg.paths.artifacts)
    assert record["tracker"] == "mlflow" and record["tracking_uri"].startswith("sqlite:///")
    assert record["tracking_uri"].endswith(f"{cfg.paths.runs}/mlflow.db")
    mlflow = MlflowClient(record["tracking_uri"])
    run = mlflow.get_run(record["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.lr"] == str(cfg.model.lr) and params["trainer.max_epochs"] == str(cfg.trainer.max_epochs)
    assert params["paths.data"] == str(cfg.paths.data) and params["logger.kind"] == "mlflow"
    history = mlflow.get_metric_history(run.info.run_id, "val_acc")
    assert len(history) == metrics["epochs"] and max(m.value for m in history) == pytest.approx(metrics["val_acc"])
    assert len(mlflow.get_metric_history(run.info.run_id, "train_loss")) == metrics["epochs"]
    assert run.data.metrics["test_acc"] == pytest.approx(metrics["test_acc"])
    tags = run.data.tags
    assert tags["git_commit"] == lineage.git_state()[0] == record["git_commit"]
    assert tags["data_hash"] == lineage.data_hash(cfg.paths.data) == record["data_hash"]
    assert tags["git_dirty"] in ("True", "False")
    logged = {a.path for a in mlflow.list_artifacts(run.info.run_id)}
    assert {files.MODEL, "confusion.png", "curves.png", "metrics.json"} <= logged
    local = mlflow.download_artifacts(run.info.run_id, files.MODEL, str(Path(cfg.paths.runs) / "download"))
    assert Path(local).read_bytes() == model_file.read_bytes()  # the exported model, not a stale one


def test_archive_carries_the_lineage_and_refuses_without_it(cfg, mar, tmp_path):
    record = lineage.read(cfg.paths.artifacts)
    assert read_lineage(mar) == record
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    for name in (files.VARIANTS[cfg.export.variant], files.MODEL, files.LABELS, files.REFERENCE):
        (artifacts / name).write_bytes((Path(cfg.paths.artifacts) / name).read_bytes())
    other = load_config(overrides(cfg, tmp_path))
    with pytest.raises(ArchiveError, match="cannot identify the run") as err:
        archive(other)
    assert "\n" not in str(err.value) and "archive.require_lineage=false" in str(err.value)
    (artifacts / files.LINEAGE).write_text(json.dumps({**record, "git_commit": lineage.UNKNOWN}))
    with pytest.raises(ArchiveError, match="unknown git commit"):
        archive(other)
    packed = read_lineage(archive(load_config(overrides(cfg, tmp_path, "archive.require_lineage=false"))))
    assert packed["run_id"] == record["run_id"] and packed["problems"] == [
        "unknown git commit (no git here: set GIT_COMMIT)"
    ]


def test_describe_call_leads_from_an_answer_to_its_run(server, post, cfg, dataset):
    """Step 1: the answer names the model and version; step 2: describe names the run, data and code."""
    sample = sorted((dataset / "samples").glob("*.png"))[0]
    status, answer = post(sample.read_bytes(), "image/png")
    assert status == 200 and (answer["model"], answer["version"]) == (cfg.name, str(cfg.version))
    status, raw = client.call(
        f"{server.url('management')}/models/{answer['model']}/{answer['version']}?customized=true",
        headers=server.headers("management"),
    )
    assert status == 200, raw
    meta = json.loads(raw)[0]["customizedMetadata"]
    described = (json.loads(meta) if isinstance(meta, str) else meta)["lineage"]
    record = lineage.read(cfg.paths.artifacts)
    for key in ("run_id", "tracking_uri", "data_hash", "git_commit", "git_dirty", "name", "version"):
        assert described[key] == record[key], key
    run = MlflowClient(described["tracking_uri"]).get_run(described["run_id"])
    assert run.data.tags["data_hash"] == described["data_hash"] == lineage.data_hash(dataset)
    assert run.data.tags["git_commit"] == described["git_commit"]


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (LevelDB log format: 32 KiB blocks, 7-byte headers, protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    data, records, chunks = path.read_bytes(), [], b""
    assert data[:4] == b":W&B"
    pos = 7
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # the block's tail is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def test_wandb_offline_run_writes_its_history(cfg, dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # restored after the test: Lightning sets it for offline runs
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_cfg = load_config(overrides(cfg, tmp_path, "logger=wandb"))
    metrics = train(run_cfg)
    record = lineage.read(run_cfg.paths.artifacts)
    assert record["tracker"] == "wandb" and record["mode"] == "offline" and record["run_url"] is None
    [folder] = (tmp_path / "runs" / "wandb").glob(f"offline-run-*-{record['run_id']}")
    records = wandb_records(folder / f"run-{record['run_id']}.wandb")
    deadline = time.monotonic() + 60  # wandb's service writes the file behind the run's finish()
    while not any(r.WhichOneof("record_type") == "exit" for r in records):
        assert time.monotonic() < deadline, "the offline run file has no exit record"
        time.sleep(0.5)
        records = wandb_records(folder / f"run-{record['run_id']}.wandb")
    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.history.item
    ]
    val = [row["val_acc"] for row in history if "val_acc" in row]
    assert len(val) == metrics["epochs"] == 2 and max(val) == pytest.approx(metrics["val_acc"])
    assert any("test_acc" in row for row in history)
    saved = {Path(f.path).name for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert {"confusion.png", "curves.png", "metrics.json"} <= saved


def tune_args(cfg, tmp_path: Path, *extra: str) -> list[str]:
    return [
        *overrides(cfg, tmp_path, "+trainer.limit_train_batches=4", "+trainer.limit_val_batches=2"),
        f"tune.out={tmp_path}/reports",
        f"tune.best={tmp_path}/tuned/best.yaml",
        *extra,
    ]


def test_tune_finishes_and_a_second_invocation_resumes_the_study(cfg, dataset, tmp_path):
    args = tune_args(cfg, tmp_path, "tune.n_trials=3")
    first = tune(args)
    assert first["trials"] == first["COMPLETE"] == 3
    assert first["baseline"]["number"] == 0 and first["baseline"]["params"]["model.lr"] == cfg.model.lr
    study_id = open_study(load_config(args, "tune"))._study_id
    cmd = [sys.executable, "-m", "scripts.tune", *args[:-1], "tune.n_trials=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    study = open_study(load_config(args, "tune"))
    assert study._study_id == study_id and len(study.trials) == 4
    assert len({tuple(sorted(t.params.items())) for t in study.trials}) == 4  # the resumed sampler moved on
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert summary["trials"] == 4 and summary["best"]["value"] == pytest.approx(study.best_value)
    for name in ("history.png", "importances.png", "trials.csv"):
        assert (tmp_path / "reports" / name).stat().st_size > 0, name
    best = (tmp_path / "tuned" / "best.yaml").read_text()
    assert best.startswith("# @package _global_") and "+tuned=best" in best
    composed = load_config([*args, *summary["best"]["overrides"]], "tune")
    assert composed.model.lr == pytest.approx(study.best_params["model.lr"])
    mlflow = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    parent = study.user_attrs["mlflow_run_id"]
    children = mlflow.search_runs([mlflow.get_run(parent).info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.data.tags["optuna.trial"] for r in children) == ["0", "1", "2", "3"]
    assert {r.info.run_id for r in children} == {t.user_attrs["run_id"] for t in study.trials}


def test_a_hopeless_trial_is_pruned(cfg, dataset, tmp_path):
    """The median pruner, fed val_acc every epoch: a learning rate of 1e-7 cannot reach the first trial's
    epoch-0 accuracy, and with one finished trial and no warm-up it is stopped at epoch 0."""
    args = tune_args(cfg, tmp_path, "tune.n_trials=2", "tune.pruner.n_startup_trials=1", "tune.pruner.n_warmup_steps=0")
    args = [a for a in args if "limit_" not in a] + ["trainer.max_epochs=1"]  # one whole epoch: enough to learn
    study = open_study(load_config(args, "tune"))
    base = {"model.weight_decay": 1e-4, "model.width": 32, "data.batch_size": 64, "augment.strength": 1.0}
    study.enqueue_trial({**base, "model.lr": 0.01})
    study.enqueue_trial({**base, "model.lr": 1e-7})
    result = tune(args)
    good, hopeless = open_study(load_config(args, "tune")).trials
    assert good.state == optuna.trial.TrialState.COMPLETE and hopeless.state == optuna.trial.TrialState.PRUNED
    assert list(hopeless.intermediate_values) == [0] and result["PRUNED"] == 1
    run = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db").get_run(hopeless.user_attrs["run_id"])
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "PRUNED"


def test_pytorch_profiler_writes_a_trace(cfg, dataset, tmp_path):
    profiler = f"trainer.profiler_dir={tmp_path}/profile"
    run_cfg = load_config(overrides(cfg, tmp_path, "logger=none", "trainer.profiler=pytorch", profiler))
    run_cfg.trainer.max_epochs = 1
    train(run_cfg, report=False)
    traces = list((tmp_path / "profile").glob("*.pt.trace.json"))
    assert traces and all(json.loads(t.read_text())["traceEvents"] for t in traces)
    assert training_profiler("simple", tmp_path).__class__.__name__ == "SimpleProfiler"
    assert training_profiler(None, tmp_path) is None


def test_serving_core_profile_names_its_steps(mar, dataset, tmp_path):
    from common.images import encode
    from training.data import load_split

    images, _ = load_split(dataset, "test")
    bodies = [encode(image) for image in images[:64].numpy()]
    classifier = load_classifier(mar, unpack(mar, tmp_path / "model"))
    [row] = core(classifier, bodies, tmp_path, [8], calls=4)
    assert set(row["stage_ms"]) == {"decode", "predict", "track", "answer", "encode"}
    assert row["images_per_s"] > 0 and row["top_ops"]
    trace = json.loads((tmp_path / "core_batch8.trace.json").read_text())
    assert {"decode", "predict"} <= {e.get("name") for e in trace["traceEvents"]}
    assert "Self CPU" in (tmp_path / "core_batch8_operators.txt").read_text()


@pytest.mark.slow  # samples for 2 s
def test_py_spy_samples_a_live_python_process(tmp_path):
    busy = "import time\ndef spin():\n    while True:\n        sum(range(1000))\nspin()\n"
    proc = subprocess.Popen([sys.executable, "-c", busy])
    try:
        time.sleep(0.5)
        stacks = py_spy(proc.pid, 2, tmp_path / "stacks.txt", "raw")
    finally:
        proc.kill()
        proc.wait()
    frames = top_frames(stacks)
    assert frames["samples"] > 0
    assert any("spin" in row["frame"] for row in frames["total"])


def test_the_live_profile_samples_the_worker_under_load(cfg, mar, tmp_path):
    """live(): its own TorchServe, Locust's users waited for on the server's request counter, then py-spy on the
    worker, which records busy samples only: none means it sampled before the load came."""
    worker = live(mar, cfg, tmp_path, seconds=2, users=2)
    assert worker["samples"] > 0 and worker["rps"] > 0
    assert (tmp_path / "worker_flame.svg").stat().st_size > 0
