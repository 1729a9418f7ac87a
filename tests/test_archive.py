import os
import shutil
import tempfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import training.archive as archive_module
from common.config import load_config
from handlers import files
from handlers.archive import BadArchive, ModelConfig, read_manifest, read_model_config
from servers.torchserve import CONFIG_PROPERTIES, read_properties
from training.archive import (
    HANDLER,
    ArchiveError,
    archive,
    check,
    handler_files,
    model_config,
)


def test_mar_holds_model_handler_labels_and_config(cfg, mar, model_dir):
    assert mar.name == f"{cfg.name}.mar"
    manifest = read_manifest(mar)
    assert manifest["model"]["modelName"] == cfg.name
    assert manifest["model"]["modelVersion"] == str(cfg.version)
    assert manifest["model"]["handler"] == "handler.py"
    shipped = files.VARIANTS[cfg.export.variant]
    assert manifest["model"]["serializedFile"] == shipped
    assert manifest["model"]["configFile"] == files.MODEL_CONFIG
    packed = {"handlers/__init__.py", "handlers/classifier.py", "handlers/decode.py", "handlers/drift.py"}
    assert packed <= {str(path) for path in handler_files()}
    for name in (shipped, HANDLER.name, files.LABELS, files.REFERENCE, *packed):
        assert (model_dir / name).is_file(), name
    config = read_model_config(mar)
    assert config == model_config(cfg)
    assert config.batch_size == cfg.serve.batch_size
    assert config.handler["top_k"] == cfg.serve.handler.top_k


def test_check_rejects_a_wrong_archive(cfg, mar):
    with pytest.raises(ArchiveError, match="manifest names"):
        check(mar, "other", "9", files.VARIANTS[cfg.export.variant], set())
    with pytest.raises(ArchiveError, match="manifest handler/model"):
        check(mar, cfg.name, str(cfg.version), "other.pt", set())
    with pytest.raises(ArchiveError, match="missing files"):
        check(mar, cfg.name, str(cfg.version), files.VARIANTS[cfg.export.variant], {"extra.bin"})


def test_archive_without_export_fails_before_writing(tmp_path):
    cfg = load_config([f"paths.artifacts={tmp_path}/none", f"paths.model_store={tmp_path}/store"])
    with pytest.raises(ArchiveError, match="run `python -m training.export export.variant=.*` first"):
        archive(cfg)
    with pytest.raises(ArchiveError, match="unknown export.variant 'tensorrt'"):
        archive(OmegaConf.merge(cfg, {"export": {"variant": "tensorrt"}}))
    with pytest.raises(ArchiveError, match="max_batch_delay_ms=0: use 1 or more"):
        archive(OmegaConf.merge(cfg, {"serve": {"max_batch_delay_ms": 0}}))
    for workers in (0, "all", 1.5):
        with pytest.raises(ArchiveError, match=f"serve.workers={workers}: a number of workers .1 or more. or auto"):
            archive(OmegaConf.merge(cfg, {"serve": {"workers": workers}}))
    assert not (tmp_path / "store").exists()


def test_workers_auto_leaves_the_count_to_torchserve():
    """No minWorkers in model-config.yaml: TorchServe starts default_workers_per_model, which config.properties
    leaves unset (a worker per core); a number is written as it is."""
    auto, two = (model_config(load_config([f"serve.workers={w}"])) for w in ("auto", 2))
    assert auto.workers is None and not {"minWorkers", "maxWorkers"} & set(auto.to_dict())
    assert (two.to_dict()["minWorkers"], two.to_dict()["maxWorkers"]) == (2, 2)
    assert "default_workers_per_model" not in read_properties(CONFIG_PROPERTIES)


def test_archiving_leaves_the_shared_temp_folder_alone(cfg, mar, tmp_path):
    """torch-model-archiver stages in <temp dir>/<model name> and deletes that folder first, so two builds of one
    model at once deleted each other's files (two CI runs side by side failed so). Each build has its own."""
    name = f"{cfg.name}-{os.getpid()}"
    shared = Path(tempfile.gettempdir()) / name
    (shared / "handlers").mkdir(parents=True, exist_ok=True)
    (shared / "handlers" / "other_build.py").write_text("# another build's staging\n")
    try:
        paths = {"artifacts": str(cfg.paths.artifacts), "model_store": str(tmp_path)}
        built = archive(OmegaConf.merge(cfg, {"name": name, "paths": paths}))
        assert read_manifest(built)["model"]["modelName"] == name
        assert (shared / "handlers" / "other_build.py").is_file()
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_a_write_that_fails_midway_leaves_the_previous_archive_intact(cfg, mar, tmp_path, monkeypatch):
    """The copy into the model store breaks after half the bytes: the served .mar stays as it was."""
    store = tmp_path / "store"
    store.mkdir()
    target = store / mar.name
    shutil.copyfile(mar, target)
    before = target.read_bytes()

    real_copyfile = shutil.copyfile

    def half_then_fail(src, dst, **kwargs):
        if Path(dst).parent != store:  # staging copies (handlers, labels) go on as usual
            return real_copyfile(src, dst, **kwargs)
        Path(dst).write_bytes(Path(src).read_bytes()[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(archive_module.shutil, "copyfile", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        archive(OmegaConf.merge(cfg, {"paths": {"model_store": str(store)}}))
    assert target.read_bytes() == before
    assert sorted(p.name for p in store.iterdir()) == [mar.name]


def test_model_config_round_trips_and_fills_in_torchserve_defaults():
    written = {"minWorkers": 2, "maxWorkers": 2, "batchSize": 8, "maxBatchDelay": 5, "responseTimeout": 30}
    written |= {"handler": {"top_k": 3}, "deviceType": "gpu"}
    config = ModelConfig.from_dict(written)
    assert (config.workers, config.batch_size, config.max_batch_delay_ms) == (2, 8, 5)
    assert config.other == {"deviceType": "gpu"} and config.to_dict() == written
    bare = ModelConfig.from_dict({"handler": {"top_k": 1}})
    assert (bare.workers, bare.batch_size, bare.max_batch_delay_ms, bare.response_timeout_s) == (None, 1, 100, 120)
    assert "minWorkers" not in bare.to_dict()
    assert config.changed(batch_size=1, handler={"threads": 2}).handler == {"top_k": 3, "threads": 2}


def test_reading_a_file_that_is_no_archive_says_so(tmp_path):
    bad = tmp_path / "x.mar"
    bad.write_bytes(b"not a zip")
    with pytest.raises(BadArchive, match="x.mar is not a model archive"):
        read_manifest(bad)
