"""The DVC pipeline and the command-line entry points, as a user runs them."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from common.config import ROOT, load_config
from handlers import files
from handlers.archive import mar_file, read_manifest
from tests.conftest import EPOCHS
from training.pipeline import COMMANDS, stages

DVC = str(Path(sys.executable).parent / "dvc")
REPORTS = {"robustness"}  # dvc.yaml stages that report on the model and feed nothing downstream


def test_dvc_yaml_paths_follow_the_default_config():
    cfg = load_config()
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["data"]["outs"] == [cfg.paths.data]
    assert f"{cfg.paths.artifacts}/model.ckpt" in stages["train"]["outs"]
    shipped = f"{cfg.paths.artifacts}/{files.VARIANTS[cfg.export.variant]}"
    assert {f"{cfg.paths.artifacts}/{files.MODEL}", shipped} <= set(stages["export"]["outs"])
    assert shipped in stages["archive"]["deps"]
    assert stages["archive"]["outs"] == [f"{cfg.paths.model_store}/{cfg.name}.mar"]
    for stage in stages.values():
        for dep in stage["deps"]:
            produced = any(dep in map(str, s.get("outs", [])) for s in stages.values())
            assert produced or (ROOT / dep).exists(), dep


def test_dvc_yaml_runs_the_pipeline_stages_in_order():
    """training.pipeline is the stage order's one source: dvc.yaml runs the same stages, in order, by its commands."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(stages()) == list(COMMANDS)
    assert [name for name in dvc if name not in REPORTS] == list(COMMANDS)
    for name, command in COMMANDS.items():
        assert dvc[name]["cmd"] == command, name


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(cwd), "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.slow  # runs every stage in a copy of the repository
def test_dvc_repro_push_and_pull(tmp_path):
    """`make pipeline` on a fresh copy: `dvc repro` runs every stage and writes the archive, a second `dvc repro`
    has nothing to do; then the data stage's output goes to the local remote and comes back."""
    repo = tmp_path / "repo"
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]  # what `git add -A` would commit
    files = subprocess.run(listed, cwd=ROOT, capture_output=True, text=True).stdout.split()
    files = [name for name in files if (ROOT / name).is_file()]  # not files deleted but not yet committed
    if not files:
        pytest.skip("not a git checkout with tracked files: the DVC test copies the tracked tree")
    for name in files:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    # the stages are under test, not the model: the copy trains as the session pipeline does (tests/conftest.py)
    trainer = repo / "configs" / "trainer" / "default.yaml"
    OmegaConf.save(OmegaConf.merge(OmegaConf.load(trainer), {"max_epochs": EPOCHS, "threads": 1}), trainer)
    commit = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", "commit", "-qm", "copy"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], commit):  # a clone: the archive records the commit
        run(cmd, repo)
    cfg = load_config()
    first = run([DVC, "repro"], repo).stdout
    dvc = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    assert [stage for stage in dvc if f"Running stage '{stage}'" not in first] == [], first
    assert read_manifest(repo / cfg.paths.model_store / mar_file(cfg.name))["model"]["modelName"] == cfg.name
    second = run([DVC, "repro"], repo).stdout
    unchanged = all(f"Stage '{stage}' didn't change" in second for stage in dvc)
    assert "Running stage" not in second and ("Data and pipelines are up to date" in second or unchanged), second
    meta = repo / "data/processed/digits/meta.json"
    assert meta.is_file()
    run([DVC, "push", "data"], repo)
    assert any((repo / "dvc-remote").rglob("*"))
    original = meta.read_bytes()
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    run([DVC, "pull", "data"], repo)
    assert meta.read_bytes() == original


def test_code_passes_ruff():
    ruff = str(Path(sys.executable).parent / "ruff")
    for cmd in ([ruff, "check", "."], [ruff, "format", "--check", "."]):
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stdout


def python_files(*folders: str) -> list[Path]:
    """The project's Python files (in `folders`, or everywhere but hidden and generated folders)."""
    skip = {"data", "artifacts", "logs", "model_store", "reports"}
    found = [path for folder in folders for path in (ROOT / folder).rglob("*.py")] if folders else ROOT.rglob("*.py")
    return sorted(
        path
        for path in found
        if not any(part.startswith(".") or part in skip for part in path.relative_to(ROOT).parts[:-1])
    )


def imported(path: Path) -> set[str]:
    """Every module that a file imports (absolute names; relative imports stay within their package)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_nothing_outside_scripts_and_tests_imports_scripts():
    """scripts/ holds entry points only: libraries never depend on them."""
    offenders = {
        str(path.relative_to(ROOT)): sorted(name for name in imported(path) if name.split(".")[0] == "scripts")
        for path in python_files()
        if path.relative_to(ROOT).parts[0] not in ("scripts", "tests")
    }
    assert python_files("training", "handlers", "servers", "common")  # the walk sees the libraries
    assert {path: names for path, names in offenders.items() if names} == {}


# The folders bottom to top: each imports only from the layers below it, so no import points up and none
# makes a cycle. handlers/ is packed into the .mar and imports nothing of the bundle's.
LAYERS = [["common"], ["handlers"], ["training", "servers"], ["loadtest", "monitoring"], ["bench", "cloud"]]
LAYERS += [["experiments"], ["scripts"]]  # the search and the serving profile drive everything below them


def test_every_folder_imports_only_from_the_layers_below():
    level = {folder: n for n, folders in enumerate(LAYERS) for folder in folders}
    upward = []
    for path in python_files(*level):
        folder = path.relative_to(ROOT).parts[0]
        tops = {name.split(".")[0] for name in imported(path)} & set(level)
        upward += [
            f"{path.relative_to(ROOT)} imports {top}" for top in sorted(tops - {folder}) if level[top] >= level[folder]
        ]
    assert upward == []


def test_scripts_define_no_classes():
    """An entry point parses arguments and calls a library; classes belong in the libraries."""
    classes = {
        str(path.relative_to(ROOT)): [
            node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)
        ]
        for path in python_files("scripts")
    }
    assert "scripts/serve.py" in classes
    assert {path: names for path, names in classes.items() if names} == {}
