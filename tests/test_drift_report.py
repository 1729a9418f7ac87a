"""Offline drift report (scripts/drift_report.py): folders of PNGs against the session model's reference."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from handlers.drift import FEATURES
from scripts.drift_report import drift_report
from tests.conftest import png
from training.config import load_config
from training.export import as_rgb
from training.robustness import shift

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


def report(mcfg, folder: Path, out: Path, mar: Path | None = None) -> dict:
    dc = mcfg.drift_report
    return drift_report(
        folder, Path(dc.reference), Path(dc.model), mar, Path(dc.mar), out, float(dc.threshold), mcfg.name
    )


def test_threshold_is_the_serving_one(monitoring_cfg, cfg):
    assert monitoring_cfg.drift_report.threshold == cfg.serve.handler.drift.threshold


def test_in_distribution_images_score_below_the_threshold(monitoring_cfg, folders, tmp_path):
    summary = report(monitoring_cfg, folders["in_distribution"], tmp_path)
    assert set(summary["scores"]) == {*FEATURES, "confidence", "classes"}
    assert summary["drifted"] == [], summary["scores"]
    assert max(summary["scores"].values()) < summary["threshold"]
    assert "no drift" in (tmp_path / "report.html").read_text()


@pytest.mark.parametrize("name", list(SHIFTED))
def test_shifted_images_score_above_the_threshold(monitoring_cfg, folders, tmp_path, name):
    summary = report(monitoring_cfg, folders[name], tmp_path)
    feature = SHIFTED[name][2]
    assert summary["scores"][feature] > summary["threshold"], summary["scores"]
    assert feature in summary["drifted"]
    page = (tmp_path / "report.html").read_text()
    assert page.startswith("<!doctype html>") and f"DRIFT in {', '.join(summary['drifted'])}" in page
    assert page.count("data:image/png;base64,") == len(FEATURES) + 2  # histograms, confidence, classes
    assert json.loads((tmp_path / "scores.json").read_text())["scores"] == summary["scores"]


def test_reference_and_model_from_the_archive(monitoring_cfg, folders, mar, tmp_path):
    from_artifacts = report(monitoring_cfg, folders["inverted"], tmp_path / "a")
    from_mar = report(monitoring_cfg, folders["inverted"], tmp_path / "b", mar=mar)
    assert from_mar["reference_from"] == str(mar)
    assert from_mar["scores"] == from_artifacts["scores"]


def test_command_line(monitoring_cfg, folders, tmp_path):
    paths = [f"paths.{key}={monitoring_cfg.paths[key]}" for key in ("data", "artifacts", "model_store")]
    cmd = [sys.executable, "-m", "scripts.drift_report"]
    run = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0 and "usage" in run.stdout
    out = tmp_path / "report"
    args = [str(folders["inverted"]), *paths, f"drift_report.out={out}", "--fail-on-drift"]
    run = subprocess.run([*cmd, *args], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 1, run.stderr
    assert "drift in brightness" in run.stdout and (out / "report.html").is_file()
    run = subprocess.run([*cmd, str(tmp_path / "nowhere"), *paths], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode != 0
    assert run.stderr.strip().splitlines()[-1] == f"error: image folder not found: {tmp_path / 'nowhere'}"
