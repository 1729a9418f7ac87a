"""The DVC pipeline and the command-line entry points, as a user runs them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.config import load_config

ROOT = Path(__file__).resolve().parent.parent
DVC = str(Path(sys.executable).parent / "dvc")


def test_dvc_yaml_paths_follow_the_default_config():
    cfg = load_config()
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["data"]["outs"] == [cfg.paths.data]
    assert f"{cfg.paths.artifacts}/model.ckpt" in stages["train"]["outs"]
    assert f"{cfg.paths.artifacts}/model.pt" in stages["export"]["outs"]
    assert stages["archive"]["outs"] == [f"{cfg.paths.model_store}/{cfg.name}.mar"]
    for stage in stages.values():
        for dep in stage["deps"]:
            produced = any(dep in map(str, s.get("outs", [])) for s in stages.values())
            assert produced or (ROOT / dep).exists(), dep


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(cwd), "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_dvc_repro_push_and_pull(tmp_path):
    """The data stage through real DVC, then push to the local remote and pull it back."""
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout with tracked files: the DVC test copies the tracked tree")
    for name in files:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, repo / name)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"]):
        run(cmd, repo)
    run([DVC, "repro", "data"], repo)
    meta = repo / "data/processed/digits/meta.json"
    assert meta.is_file()
    run([DVC, "push", "data"], repo)
    assert any((repo / "dvc-remote").rglob("*"))
    original = meta.read_bytes()
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    run([DVC, "pull", "data"], repo)
    assert meta.read_bytes() == original


COMMANDS = ["training.data", "training.train", "training.export", "scripts.archive", "scripts.serve"]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_has_help(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "override" in result.stdout.lower() or "usage" in result.stdout.lower()


def test_code_passes_ruff():
    ruff = str(Path(sys.executable).parent / "ruff")
    for cmd in ([ruff, "check", "."], [ruff, "format", "--check", "."]):
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, result.stdout
