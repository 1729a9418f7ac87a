"""Robustness report (monitoring/robustness.py) and its shift operators (monitoring/shifts.py)."""

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from common.config import load_config
from monitoring.robustness import REPORT, RobustnessError, robustness, write_report
from monitoring.shifts import OPERATORS, SHIFTS, ShiftError, check, shift
from training.export import as_rgb

ROOT = Path(__file__).resolve().parent.parent
STRONG = ("inversion", "noise", "rotation")


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


@pytest.mark.slow  # new Pythons importing torch
def test_command_line_one_line_errors(tmp_path):
    missing = tmp_path / "missing.pt"
    run = subprocess.run(
        [sys.executable, "-m", "monitoring.robustness", f"robustness.model={missing}", f"robustness.out={tmp_path}"],
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


def test_report_is_all_or_nothing_old_files_stay_if_one_is_in_the_way(report, tmp_path):
    """A report that cannot be written whole leaves the previous one as it was, and no temporary files."""
    result, out = report
    for name in REPORT:
        previous = tmp_path / name
        previous.mkdir()
        for other in REPORT:
            if other != name:
                shutil.copyfile(out / other, previous / other)
        (previous / name).mkdir()  # e.g. a folder of that name left behind
        before = {f.name: f.read_bytes() for f in previous.iterdir() if f.is_file()}
        with pytest.raises(RobustnessError, match=f"{name} is in the way of the report and not a file"):
            write_report({**result, "clean": 0.0}, previous, "digits_cnn", 10)
        assert {f.name: f.read_bytes() for f in previous.iterdir() if f.is_file()} == before, name
        assert not list(previous.glob(".*")), "temporary files left behind"


def test_a_name_with_dollars_is_plain_text_in_the_plot(report, tmp_path):
    written = write_report(report[0], tmp_path, r"a$\nosuch$b", 10)
    assert [p.name for p in written] == list(REPORT) and all(p.stat().st_size > 0 for p in written)


def test_a_bad_shift_parameter_fails_before_evaluating(cfg, model_file, tmp_path):
    expected = "jpeg: parameter 101 out of range, expected a quality, an integer in [0, 100]"
    with pytest.raises(ShiftError, match=re.escape(expected)):
        robustness(monitoring_config(cfg, f"robustness.out={tmp_path}", "robustness.shifts.jpeg=[50,101]"))
    assert not list(tmp_path.iterdir())


# The shift operators one by one, the way Kornia tests its own: smoke, shape and dtype, determinism,
# a neutral parameter, bad input.
NEUTRAL = {"brightness": 0, "contrast": 1, "noise": 0, "rotation": 0, "scale": 1, "translate": 0, "inversion": 0}
OUT_OF_RANGE = {
    "brightness": 1.5,
    "contrast": -0.5,
    "blur": 0,
    "noise": -0.1,
    "rotation": float("inf"),
    "scale": 0,
    "translate": 1.5,
    "jpeg": 101,
    "inversion": 1.5,
}


def images(n: int = 4, height: int = 12, width: int = 10, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=generator)


def strongest(name: str) -> float:
    return float(load_config([], "monitoring").robustness.shifts[name][-1])


def test_every_configured_parameter_is_accepted():
    shifts = load_config([], "monitoring").robustness.shifts
    assert list(shifts) == list(SHIFTS) == list(OPERATORS)
    for name, params in shifts.items():
        assert [check(name, p) for p in params] == [float(p) for p in params], name


@pytest.mark.parametrize("name", SHIFTS)
@pytest.mark.parametrize("shape", [(1, 8, 8), (4, 12, 10), (3, 32, 5)], ids=["one-8x8", "four-12x10", "three-32x5"])
def test_shift_smoke_shape_and_dtype(name, shape):
    x = images(*shape)
    out = shift(x, name, strongest(name), torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and out.shape == x.shape
    assert torch.equal(x, images(*shape)), "the input was changed in place"


@pytest.mark.parametrize("name", SHIFTS)
def test_shift_is_deterministic_for_a_seed(name):
    x, param = images(), strongest(name)
    first = shift(x, name, param, torch.Generator().manual_seed(3))
    assert torch.equal(first, shift(x, name, param, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("name", list(NEUTRAL))
def test_shift_with_a_neutral_parameter_keeps_the_images(name):
    x = images()
    out = shift(x, name, NEUTRAL[name], torch.Generator().manual_seed(0))
    assert (out.int() - x.int()).abs().max() <= 1, name  # interpolation may round a level off


@pytest.mark.parametrize("name", SHIFTS)
@pytest.mark.parametrize(
    "bad, what",
    [
        (images().float(), "torch.float32 [4, 3, 12, 10]"),
        (images()[0], "torch.uint8 [3, 12, 10]"),
        (images()[:, :1], "torch.uint8 [4, 1, 12, 10]"),
        (images()[:0], "torch.uint8 [0, 3, 12, 10]"),
    ],
    ids=["float", "3-d", "gray", "empty"],
)
def test_shift_refuses_images_not_in_the_serving_form(name, bad, what):
    expected = f"images must be uint8 RGB [N, 3, H, W] (the serving form), not {what}"
    with pytest.raises(ShiftError, match=re.escape(expected)):
        shift(bad, name, strongest(name), torch.Generator())


@pytest.mark.parametrize("name", SHIFTS)
def test_shift_refuses_a_parameter_out_of_range(name):
    for param in (OUT_OF_RANGE[name], float("nan"), "strong"):
        with pytest.raises(ShiftError, match=rf"^{name}: parameter .* out of range, expected "):
            shift(images(), name, param, torch.Generator())


def test_unknown_shifts_and_non_tensors_are_refused():
    with pytest.raises(ShiftError, match="unknown shift 'fog': use brightness, contrast"):
        shift(images(), "fog", 1.0, torch.Generator())
    with pytest.raises(ShiftError, match="images must be a torch.Tensor, not ndarray"):
        shift(images().numpy(), "noise", 0.1, torch.Generator())
