"""Robustness report (training/robustness.py): the session's exported model under shifted inputs."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from training.config import load_config
from training.export import as_rgb
from training.robustness import SHIFTS, robustness, shift, write_report

ROOT = Path(__file__).resolve().parent.parent
STRONG = ("inversion", "noise", "rotation")
REPORT_FILES = ("robustness.md", "robustness.png", "robustness.json", "robustness_plot.csv")


def monitoring_config(cfg, *overrides: str):
    """configs/monitoring.yaml with the session pipeline's paths."""
    paths = [f"paths.{key}={cfg.paths[key]}" for key in ("data", "artifacts", "model_store")]
    return load_config([*paths, *overrides], "monitoring")


@pytest.fixture(scope="module")
def report(cfg, model_file, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("robustness")
    return robustness(monitoring_config(cfg, f"robustness.out={out}")), out


def test_severity_zero_is_the_accuracy_of_the_unshifted_model(report, model_file, test_split):
    result, out = report
    images, labels = test_split
    model = torch.jit.load(str(model_file)).eval()
    with torch.no_grad():
        expected = (model(as_rgb(images)).argmax(1) == labels).float().mean().item()
    assert result["clean"] == expected
    assert {name: r["accuracy"][0] for name, r in result["shifts"].items()} == dict.fromkeys(SHIFTS, expected)
    assert json.loads((out / "robustness.json").read_text())["clean"] == round(expected, 4)


@pytest.mark.parametrize("name", STRONG)
def test_accuracy_falls_as_the_strong_shifts_grow(report, name):
    accuracy = report[0]["shifts"][name]["accuracy"]
    assert accuracy[-1] < accuracy[0] - 0.2, accuracy
    for weaker, stronger in zip(accuracy, accuracy[1:], strict=False):
        assert stronger <= weaker + 0.03, accuracy  # small sampling wiggles only, no recovery


def test_every_shift_changes_the_images_and_keeps_the_serving_form(test_split):
    images = as_rgb(test_split[0][:16])
    params = load_config([], "monitoring").robustness.shifts
    for name in SHIFTS:
        shifted = shift(images, name, float(params[name][-1]), torch.Generator().manual_seed(0))
        assert shifted.dtype == torch.uint8 and shifted.shape == images.shape, name
        assert not torch.equal(shifted, images), f"{name} at its strongest left the images unchanged"


def test_report_files_are_written(report):
    result, out = report
    md = (out / "robustness.md").read_text()
    assert all(f"| {name} |" in md for name in SHIFTS)
    with Image.open(out / "robustness.png") as png:
        assert png.format == "PNG" and png.width > 300
    metrics = json.loads((out / "robustness.json").read_text())
    assert set(metrics["mean_by_shift"]) == set(SHIFTS)
    assert 0 <= metrics["mean_shifted"] < metrics["clean"]
    rows = list(csv.DictReader((out / "robustness_plot.csv").open()))
    assert [row["severity"] for row in rows] == [str(s) for s in range(len(result["shifts"]["noise"]["accuracy"]))]
    assert float(rows[-1]["inversion"]) == pytest.approx(result["shifts"]["inversion"]["accuracy"][-1], abs=1e-4)
    assert not list(out.glob(".*")), "temporary files left behind"


def test_dvc_stage_metrics_and_plots(report, tmp_path):
    """The dvc.yaml stage's paths follow the config, and real DVC reads its metrics and plots."""
    cfg = load_config([], "monitoring")
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stage = dvc_yaml["stages"]["robustness"]
    out = cfg.robustness.out
    assert f"{cfg.paths.artifacts}/model.pt" in stage["deps"]
    assert [next(iter(m)) for m in stage["metrics"]] == [f"{out}/robustness.json"]
    plot = dvc_yaml["plots"][0]["robustness"]
    assert plot["y"] == {f"{out}/robustness_plot.csv": list(cfg.robustness.shifts)}
    assert f"{out}/robustness_plot.csv" in [next(iter(o)) for o in stage["outs"]]

    repo = tmp_path / "repo"  # a minimal repository holding only this stage and the session's report
    (repo / out).mkdir(parents=True)
    write_report(report[0], repo / out, "digits_cnn", 10)
    minimal = {"stages": {"robustness": {**stage, "deps": []}}, "plots": dvc_yaml["plots"]}
    (repo / "dvc.yaml").write_text(yaml.safe_dump(minimal))
    dvc = str(Path(sys.executable).parent / "dvc")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(repo), "DVC_NO_ANALYTICS": "1"}
    for cmd in (["git", "init", "-q"], [dvc, "init", "-q"]):
        subprocess.run(cmd, cwd=repo, check=True, env=env, capture_output=True)
    shown = subprocess.run([dvc, "metrics", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    metrics = json.loads(shown.stdout)[""]["data"][f"{out}/robustness.json"]["data"]
    assert metrics["clean"] == round(report[0]["clean"], 4)
    plots = subprocess.run([dvc, "plots", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True)
    assert plots.returncode == 0, plots.stderr
    rendered = json.loads(plots.stdout)["data"]
    assert list(rendered) == ["robustness"]  # one plot, not a second default one for the CSV
    assert "inversion" in plots.stdout and "severity" in plots.stdout
    shutil.rmtree(repo)


def test_command_line_help_and_one_line_errors(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "training.robustness", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert run.returncode == 0 and "robustness" in run.stdout
    missing = tmp_path / "missing.pt"
    run = subprocess.run(
        [sys.executable, "-m", "training.robustness", f"robustness.model={missing}", f"robustness.out={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode != 0
    assert (
        run.stderr.strip().splitlines()[-1]
        == f"error: no TorchScript model at {missing}: run `make export` (or `dvc repro export`)"
    )
    assert not list(tmp_path.iterdir())
