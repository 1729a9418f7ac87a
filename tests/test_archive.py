import pytest

from common.config import load_config
from handlers import files
from training.archive import (
    HANDLER,
    ArchiveError,
    archive,
    check,
    handler_files,
    model_config,
    read_manifest,
    read_model_config,
)


def test_mar_holds_model_handler_labels_and_config(cfg, mar, model_dir):
    assert mar.name == f"{cfg.name}.mar"
    manifest = read_manifest(mar)
    assert manifest["model"]["modelName"] == cfg.name
    assert manifest["model"]["modelVersion"] == str(cfg.version)
    assert manifest["model"]["handler"] == "handler.py"
    assert manifest["model"]["serializedFile"] == files.MODEL
    assert manifest["model"]["configFile"] == files.MODEL_CONFIG
    packed = {"handlers/__init__.py", "handlers/classifier.py", "handlers/decode.py", "handlers/drift.py"}
    assert packed <= {str(path) for path in handler_files()}
    for name in (files.MODEL, HANDLER.name, files.LABELS, files.REFERENCE, *packed):
        assert (model_dir / name).is_file(), name
    config = read_model_config(mar)
    assert config == model_config(cfg)
    assert config["batchSize"] == cfg.serve.batch_size
    assert config["handler"]["top_k"] == cfg.serve.handler.top_k


def test_check_rejects_a_wrong_archive(cfg, mar):
    with pytest.raises(ArchiveError, match="manifest names"):
        check(mar, "other", "9", set())
    with pytest.raises(ArchiveError, match="missing files"):
        check(mar, cfg.name, str(cfg.version), {"extra.bin"})


def test_archive_without_export_fails_before_writing(tmp_path):
    cfg = load_config([f"paths.artifacts={tmp_path}/none", f"paths.model_store={tmp_path}/store"])
    with pytest.raises(ArchiveError, match="run `python -m training.export` first"):
        archive(cfg)
    assert not (tmp_path / "store").exists()
