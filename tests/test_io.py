"""common/io.py: atomic writes leave the permissions a plain write would (the umask's), not the temp file's."""

import os
import stat

import pytest

from common.io import atomic_dir, atomic_path


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_file_and_folder_get_the_umask_permissions(tmp_path, umask_022):
    with atomic_path(tmp_path / "model.pt") as tmp:
        tmp.write_bytes(b"x")
    with atomic_dir(tmp_path / "report") as tmp:
        (tmp / "README.md").write_text("x")
    assert mode(tmp_path / "model.pt") == 0o644
    assert mode(tmp_path / "report") == 0o755
    assert (tmp_path / "report" / "README.md").read_text() == "x"
