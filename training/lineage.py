"""Where a model comes from: its code (git commit, dirty tree), its data (DVC's hash of the dataset folder)
and its training run (tracker, run id).

Training writes the record to `<paths.artifacts>/lineage.json`, the archive packs it into the .mar, and the
handler's describe call (`GET /models/<name>?customized=true`) returns it.
"""

import hashlib
import json
import os
import subprocess
from pathlib import Path

from common.cli import BundleError
from common.config import ROOT
from common.io import write_json
from handlers import files

UNKNOWN = "unknown"
CHUNK = 1 << 20


class LineageError(BundleError):
    """A model's lineage is missing or incomplete; the message says how to get it."""


def git_state(root: Path | str = ROOT) -> tuple[str, bool | None]:
    """(commit, dirty) from `git rev-parse HEAD` and `git status --porcelain` (untracked files count as dirty).

    Without git (a container), GIT_COMMIT from the environment (a build argument), else "unknown";
    dirty is then None: nobody can tell.
    """
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30)
        if head.returncode == 0:
            status = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True)
            return head.stdout.strip(), bool(status.stdout.strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.environ.get("GIT_COMMIT") or UNKNOWN, None


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def data_hash(folder: Path | str) -> str:
    """DVC 3's md5 of a directory, the value `dvc.lock` records for it: the md5 of the JSON listing of
    {"md5": <file md5>, "relpath": <posix path>} for every file, sorted by path, plus ".dir"."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LineageError(f"no dataset folder {folder}: run `python -m training.data` first")
    entries = [
        {"md5": file_md5(path), "relpath": path.relative_to(folder).as_posix()}
        for path in folder.rglob("*")
        if path.is_file()
    ]
    listing = json.dumps(sorted(entries, key=lambda e: e["relpath"]), sort_keys=True)
    return hashlib.md5(listing.encode()).hexdigest() + ".dir"


def source(data_dir: Path | str) -> dict:
    """The code and the data a training run starts from."""
    commit, dirty = git_state()
    return {"git_commit": commit, "git_dirty": dirty, "data_path": str(data_dir), "data_hash": data_hash(data_dir)}


def write(folder: Path | str, record: dict) -> Path:
    path = Path(folder) / files.LINEAGE
    write_json(path, record)
    return path


def read(folder: Path | str) -> dict | None:
    path = Path(folder) / files.LINEAGE
    return json.loads(path.read_text()) if path.is_file() else None


def problems(record: dict | None) -> list[str]:
    """Why this record does not identify its run, its data and its code (empty when it does)."""
    if record is None:
        return [f"no {files.LINEAGE} (train with `python -m training.train`, which writes it)"]
    found = []
    if not record.get("run_id"):
        found.append(f"no run id (trained with logger={record.get('tracker', 'none')}: use mlflow, wandb or csv)")
    if record.get("git_commit", UNKNOWN) == UNKNOWN:
        found.append("unknown git commit (no git here: set GIT_COMMIT)")
    if not record.get("data_hash"):
        found.append("no data hash")
    return found
