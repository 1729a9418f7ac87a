import zipfile

import pytest
import yaml

from scripts.archive import ArchiveError, archive, check, read_manifest
from training.config import load_config


def test_mar_holds_model_handler_labels_and_config(cfg, mar):
    assert mar.name == f"{cfg.name}.mar"
    manifest = read_manifest(mar)
    assert manifest["model"]["modelName"] == cfg.name
    assert manifest["model"]["modelVersion"] == str(cfg.version)
    assert manifest["model"]["handler"] == "handler.py"
    assert manifest["model"]["serializedFile"] == "model.pt"
    assert manifest["model"]["configFile"] == "model-config.yaml"
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        config = yaml.safe_load(z.read("model-config.yaml"))
    assert {"model.pt", "handler.py", "serving.py", "index_to_name.json"} <= names
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
