"""Offline drift report (monitoring/drift_report.py): folders of PNGs against the session model's reference."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.config import load_config
from handlers.drift import FEATURES
from monitoring.drift_report import DriftReportError, drift_report
from monitoring.shifts import shift
from tests.client import png
from training.export import as_rgb

ROOT = Path(__file__).resolve().parent.parent
# Clearly shifted traffic, and the score that must show it.
SHIFTED = {"brightened": ("brightness", 0.3, "brightness"), "inverted": ("inversion", 1.0, "brightness")}
SHIFTED["noisy"] = ("noise", 0.15, "contrast")  # on 8x8 digits noise barely moves the (already high) sharpness


def write_pngs(folder: Path, images: torch.Tensor) -> Path:
    folder.mkdir(parents=True)
    for i, image in enumerate(images):
        (folder / f"{i:04d}.png").write_bytes(png(image))
    return folder


@pytest.fixture(scope="module")
def folders(test_split, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("incoming")
    images = as_rgb(test_split[0])
    out = {"in_distribution": write_pngs(root / "in_distribution", images)}
    for name, (kind, param, _) in SHIFTED.items():
        out[name] = write_pngs(root / name, shift(images, kind, param, torch.Generator().manual_seed(1)))
    return out


@pytest.fixture(scope="module")
def monitoring_cfg(cfg, model_file):
    """configs/monitoring.yaml with the session pipeline's paths (the export wrote drift_reference.json)."""
    return load_config([f"paths.{key}={cfg.paths[key]}" for key in ("data", "artifacts", "model_store")], "monitoring")


def test_threshold_is_the_serving_one(monitoring_cfg, cfg):
    assert monitoring_cfg.drift_report.threshold == cfg.serve.handler.drift.threshold


def test_in_distribution_images_score_below_the_threshold(monitoring_cfg, folders, tmp_path):
    summary = drift_report(monitoring_cfg, folders["in_distribution"], out=tmp_path)
    assert set(summary["scores"]) == {*FEATURES, "confidence", "classes"}
    assert summary["drifted"] == [], summary["scores"]
    assert max(summary["scores"].values()) < summary["threshold"]
    assert "no drift" in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("name", list(SHIFTED))
def test_shifted_images_score_above_the_threshold(monitoring_cfg, folders, tmp_path, name):
    summary = drift_report(monitoring_cfg, folders[name], out=tmp_path)
    feature = SHIFTED[name][2]
    assert summary["scores"][feature] > summary["threshold"], summary["scores"]
    assert feature in summary["drifted"]
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!doctype html>") and f"DRIFT in {', '.join(summary['drifted'])}" in page
    assert page.count("data:image/png;base64,") == len(FEATURES) + 2  # histograms, confidence, classes
    assert json.loads((tmp_path / "scores.json").read_text())["scores"] == summary["scores"]


def test_reference_and_model_from_the_archive(monitoring_cfg, folders, mar, tmp_path):
    from_artifacts = drift_report(monitoring_cfg, folders["inverted"], out=tmp_path / "a")
    from_mar = drift_report(monitoring_cfg, folders["inverted"], mar, tmp_path / "b")
    assert from_mar["reference_from"] == str(mar)
    # the inputs' features score the same; the answers' (confidence, classes) come from the archive's model
    # file (int8 by default) instead of the portable model.pt, so they agree within the int8 check's margin
    got, want = from_mar["scores"], from_artifacts["scores"]
    assert {k: got[k] for k in FEATURES} == {k: want[k] for k in FEATURES}
    assert got == pytest.approx(want, abs=0.05)


def test_command_line(monitoring_cfg, folders, tmp_path):
    paths = [f"paths.{key}={monitoring_cfg.paths[key]}" for key in ("data", "artifacts", "model_store")]
    cmd = [sys.executable, "-m", "scripts.drift_report"]
    out = tmp_path / "report"
    args = [str(folders["inverted"]), *paths, f"drift_report.out={out}", "--fail-on-drift"]
    run = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1, run.stderr
    assert "drift in brightness" in run.stdout and (out / "report.html").is_file()
    run = subprocess.run([*cmd, str(tmp_path / "nowhere"), *paths], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == f"error: image folder not found: {tmp_path / 'nowhere'}"


def test_files_are_decoded_as_the_server_decodes_them(monitoring_cfg, folders, test_split, tmp_path):
    """16-bit PNGs (high byte kept, as the handler does), other formats, and unreadable files skipped."""
    deep = tmp_path / "incoming"
    deep.mkdir()
    for i, image in enumerate(test_split[0]):  # gray [1, H, W] -> 16-bit gray PNG with the same high byte
        Image.fromarray(image[0].numpy().astype(np.uint16) * 257).save(deep / f"{i:04d}.png")
    assert Image.open(deep / "0000.png").mode.startswith("I")
    (deep / "extra.webp").write_bytes(png(as_rgb(test_split[0][:1])[0], "WEBP", lossless=True))
    (deep / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (deep / "notes.txt").write_text("not an image, not even looked at")
    summary = drift_report(monitoring_cfg, deep, out=tmp_path / "out")
    assert summary["images"] == len(test_split[0]) + 1 and summary["skipped"] == ["broken.png"]
    eight_bit = drift_report(monitoring_cfg, folders["in_distribution"], out=tmp_path / "8bit")
    for name, score in summary["scores"].items():
        assert score == pytest.approx(eight_bit["scores"][name], abs=0.02), name
    assert summary["drifted"] == []


def test_bad_folders_and_archives_are_one_line_errors(monitoring_cfg, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(DriftReportError, match=r"^no readable images under .*empty \(1 unreadable\)$"):
        drift_report(monitoring_cfg, empty, out=tmp_path / "out")
    missing = tmp_path / "missing.mar"
    with pytest.raises(DriftReportError, match="no archive .*missing.mar: run `make export` and `make archive`"):
        drift_report(monitoring_cfg, empty, missing, tmp_path / "out")
    not_zip = tmp_path / "not.mar"
    not_zip.write_bytes(b"not a zip file")
    with pytest.raises(DriftReportError, match="not.mar is not a model archive"):
        drift_report(monitoring_cfg, empty, not_zip, tmp_path / "out")
    assert not (tmp_path / "out").exists()
