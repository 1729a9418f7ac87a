"""A new version from training to live: the MLflow registry as the hand-off (every run a version, an alias to
archive from), then a real TorchServe under concurrent keep-alive clients through a failed rollout, a rollout and
a rollback (servers/rollout.py), nothing lost."""

import shutil
import time

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from bench.rollout import Answer, Load, summary, versions_in_order
from handlers.archive import read_lineage, read_manifest, read_model_config, repack, unpack
from scripts.rollout import main as rollout_main
from servers.rollout import RolloutError, roll_back, roll_out, version_key
from servers.torchserve import TorchServe
from training import lineage, registry, release, tracking
from training.archive import ArchiveError, archive

CLIENTS = 16
ALIAS = "champion"


def until(check, timeout: float = 120, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} not within {timeout} s"
        time.sleep(0.1)


def workers(api, name: str) -> dict[str, int]:
    return {d["modelVersion"]: len(d["workers"]) for d in api.versions(name)}


def test_every_training_run_is_a_registry_version_tagged_with_its_lineage(cfg, metrics):
    record = lineage.read(cfg.paths.artifacts)
    entry = record["registry"]
    assert entry["model"] == cfg.name
    version = MlflowClient(record["tracking_uri"]).get_model_version(cfg.name, entry["version"])
    assert version.run_id == record["run_id"]
    assert {k: version.tags[k] for k in tracking.REGISTRY_TAGS} == {k: str(record[k]) for k in tracking.REGISTRY_TAGS}


def test_archive_from_an_alias_packs_that_registered_version(cfg, mar, tmp_path):
    record = read_lineage(mar)
    assert registry.promote(record, ALIAS) == record["registry"]["version"]
    paths = {"artifacts": str(tmp_path / "no-artifacts"), "model_store": str(tmp_path / "store")}
    built = archive(OmegaConf.merge(cfg, {"paths": paths, "version": "7.0", "archive": {"from_alias": ALIAS}}))
    assert read_manifest(built)["model"]["modelVersion"] == "7.0"
    assert read_lineage(built)["registry"] == record["registry"]  # the archive names the registered version
    shipped = read_manifest(mar)["model"]["serializedFile"]
    packed, pipeline = unpack(built, tmp_path / "alias"), unpack(mar, tmp_path / "pipeline")
    assert (packed / shipped).read_bytes() == (pipeline / shipped).read_bytes()
    with pytest.raises(tracking.TrackingError, match="no version of digits_cnn has the alias 'nope'"):
        archive(OmegaConf.merge(cfg, {"paths": paths, "archive": {"from_alias": "nope"}}))
    with pytest.raises(ArchiveError, match="archive.from_alias needs logger=mlflow: logger=csv has no model registry"):
        archive(OmegaConf.merge(cfg, {"logger": {"kind": "csv"}, "archive": {"from_alias": ALIAS}}))


def test_versions_sort_as_releases_and_sequences_collapse():
    assert sorted(["1.10", "1.9", "2.0", "1.0"], key=version_key) == ["1.0", "1.9", "1.10", "2.0"]
    answers = [Answer(0, t, 200, v) for t, v in enumerate(["1.0", "1.0", "1.1", "1.1", "1.0"])]
    assert versions_in_order(answers) == ["1.0", "1.1", "1.0"]
    flapping = [Answer(1, t, 200, v) for t, v in enumerate(["1.0", "1.1", "1.0", "1.1"])]
    failed = [Answer(2, 0, 0, None)]
    counted = summary([answers, flapping, failed], {"1.0", "1.1"}, ["1.0", "1.1", "1.0"])
    assert (counted["failed"], counted["unknown_version"], counted["clients_off_sequence"]) == (1, 1, 2)


def test_the_command_fails_in_one_line_without_a_server(tmp_path):
    with pytest.raises(SystemExit) as exc:
        rollout_main(["back", "--management", "http://127.0.0.1:9", "--workdir", str(tmp_path)])
    assert str(exc.value).startswith("error: digits_cnn is not served there, nothing rolled back: no answer")


@pytest.fixture(scope="module")
def release_cfg(cfg, tmp_path_factory):
    """Version 1.1: a cheap second training run (3 epochs, another seed) in a release folder of its own."""
    folder = tmp_path_factory.mktemp("releases")
    return OmegaConf.merge(
        cfg, {"version": "1.1", "seed": 7, "trainer": {"max_epochs": 3}, "rollout": {"folder": str(folder)}}
    )


@pytest.mark.server
def test_a_rollout_and_a_rollback_under_load_lose_nothing(cfg, mar, release_cfg, tmp_path):
    new_mar = release.build(release_cfg)
    new = read_lineage(new_mar)
    old = read_lineage(mar)
    assert new["run_id"] != old["run_id"] and new["registry"]["version"] != old["registry"]["version"]
    assert lineage.read(cfg.paths.artifacts)["run_id"] == old["run_id"]  # the pipeline's outputs are untouched
    store = tmp_path / "store"
    store.mkdir()
    shutil.copyfile(mar, store / mar.name)
    # a 1.1 that refuses every held-out image (a pixel limit of 16): the gate must stop it
    refusing = repack(
        new_mar, tmp_path / "refusing.mar", read_model_config(new_mar).changed(handler={"max_pixels": 16})
    )
    images = release.held_out(cfg, 64)
    window = cfg.serve.handler.drift.window
    with TorchServe(store, {cfg.name: mar.name}, tmp_path / "ts", ports={}) as server:
        server.wait_ready(180)
        api = server.api()
        n = workers(api, cfg.name)["1.0"]  # serve.workers: auto, a worker per core

        def load() -> Load:
            return Load(server.url("inference"), cfg.name, images, server.key(), CLIENTS)

        def answered_since(phase: Load, mark: float) -> bool:
            return all(any(a.sent > mark for a in list(per_client)) for per_client in phase.answers)

        with load() as phase:
            until(lambda: answered_since(phase, 0), what="a first answer for every client")
            with pytest.raises(RolloutError, match=r"1.1 not rolled out, 1.0 still serves: the gate: 64 of 64"):
                roll_out(api, refusing, store, images)
            assert workers(api, cfg.name) == {"1.0": n}  # the refused 1.1 is unregistered again
            rolled = roll_out(api, new_mar, store, images)
            switched = time.monotonic()
            until(lambda: answered_since(phase, switched), what="an answer from 1.1 for every client")
        answers = phase.stop()
        assert (rolled.version, rolled.previous) == ("1.1", "1.0") and rolled.to_default_s > 0
        counted = summary(answers, {"1.0", "1.1"}, ["1.0", "1.1"])
        assert (counted["failed"], counted["unknown_version"], counted["clients_off_sequence"]) == (0, 0, 0)
        served_by_new = sum(a.version == "1.1" for per_client in answers for a in per_client)
        described = api.describe(cfg.name)
        assert described["lineage"]["run_id"] == new["run_id"]
        assert described["lineage"]["registry"] == new["registry"]
        held, seen = described["drift"]["window"], min(window, len(images) + served_by_new)  # the gate's and the load's
        assert held == seen if n == 1 else 0 < held <= seen  # n workers share them; describe answers from one
        assert workers(api, cfg.name) == {"1.0": 0, "1.1": n}  # 1.0 retired
        pids = {worker["pid"] for d in api.versions(cfg.name) if d["modelVersion"] == "1.1" for worker in d["workers"]}
        assert described["worker"] in pids  # what the drain waits on: each worker's pid in its describe answer
        assert registry.promote(described["lineage"], ALIAS) == new["registry"]["version"]

        with load() as phase:
            until(lambda: answered_since(phase, 0), what="a first answer for every client")
            keys = ["--inference-key", server.key(), "--management-key", server.key("management")]
            urls = ["--inference", server.url("inference"), "--management", server.url("management")]
            rollout_main(["back", *urls, *keys, f"rollout.alias={ALIAS}"])
            back = time.monotonic()
            until(lambda: answered_since(phase, back), what="an answer from 1.0 again for every client")
        answers = phase.stop()
        counted = summary(answers, {"1.0", "1.1"}, ["1.1", "1.0"])
        assert (counted["failed"], counted["unknown_version"], counted["clients_off_sequence"]) == (0, 0, 0)
        assert api.describe(cfg.name)["lineage"]["run_id"] == old["run_id"]
        assert workers(api, cfg.name) == {"1.0": n, "1.1": 0}
        client = MlflowClient(old["tracking_uri"])
        assert str(client.get_model_version_by_alias(cfg.name, ALIAS).version) == old["registry"]["version"]
        with pytest.raises(RolloutError, match="no version of digits_cnn older than 1.0 is registered"):
            roll_back(api, cfg.name)
