"""The docs (README.md, docs/): every command they show is real, every repository path they name exists,
every figure comes from reports/, and the site builds with `mkdocs build --strict`."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCED = re.compile(r"```[^\n]*\n(.*?)```", re.DOTALL)
INLINE = re.compile(r"`([^`\n]+)`")
MAKE = re.compile(r"(?:^|[;&|(]\s*)make ([a-z][\w-]*)", re.MULTILINE)  # make as the command, not an argument
MODULE = re.compile(r"python3? -m ([A-Za-z_]\w*(?:\.\w+)*)(?![.\w<])")  # not scripts.<name>
SOURCES = (
    "configs|tests|handlers|training|servers|scripts|monitoring|cloud|docker|bench|loadtest|experiments|common|docs"
)
PATH = re.compile(rf"(?<![\w./$<{{-])((?:{SOURCES}|\.ci|\.github|\.dvc)/[\w./-]*[\w-])")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)")


def code(page: Path) -> str:
    """The page's code: fenced blocks and inline spans, where commands and paths are written."""
    text = page.read_text()
    blocks = FENCED.findall(text)
    return "\n".join(blocks + INLINE.findall(FENCED.sub("", text)))


def shown(pattern: re.Pattern) -> dict[str, list[str]]:
    """What the pattern finds in the pages' code -> the pages that show it."""
    found: dict[str, list[str]] = {}
    for page in PAGES:
        for name in set(pattern.findall(code(page))):
            found.setdefault(name, []).append(page.relative_to(ROOT).as_posix())
    return found


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):(?!=)", (ROOT / "Makefile").read_text(), re.MULTILINE))


def test_the_pages_show_the_front_door_commands():
    """The extraction finds what the README must show, so the checks below cannot pass on nothing."""
    readme = code(ROOT / "README.md")
    assert {"serve", "test", "docs"} <= set(MAKE.findall(readme))
    assert "scripts.deploy" in MODULE.findall(readme)


def test_every_make_target_shown_exists():
    targets = makefile_targets()
    missing = {t: pages for t, pages in shown(MAKE).items() if t not in targets}
    assert not missing, f"make targets the docs show but the Makefile lacks: {missing}"


# The commands that are Hydra apps, not in scripts/ (every module in scripts/ is an entry point too).
HYDRA_COMMANDS = ["training.data", "training.train", "training.export", "training.memory", "monitoring.robustness"]


@pytest.mark.slow  # a Python per command (forked after one import of torch): seconds
def test_every_command_answers_help():
    """Each entry point, and each `python -m <module>` of this repository the docs show, once: the one place a
    command's --help is checked (tests/helps.py runs them)."""
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    entry_points = [f"scripts.{p.stem}" for p in (ROOT / "scripts").glob("*.py") if p.stem != "__init__"]
    modules = sorted({m for m in shown(MODULE) if m.split(".")[0] in packages} | {*entry_points, *HYDRA_COMMANDS})
    assert "scripts.deploy" in modules and "training.train" in modules
    run = subprocess.run(
        [sys.executable, "-m", "tests.helps", *modules], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    failed = json.loads(run.stdout.splitlines()[-1])
    assert not failed, f"`python -m <module> --help` failed: {failed}"


def test_every_repository_path_shown_exists():
    """Paths into the source folders, as the docs write them in code; generated ones (`<name>`, `*`) skipped."""
    missing = {}
    for page in PAGES:
        text = code(page)
        for m in PATH.finditer(text):
            if text[m.end() :].lstrip("/")[:1] in ("<", "*", "$", "{"):
                continue
            if not (ROOT / m.group(1)).exists():
                missing.setdefault(m.group(1), []).append(page.relative_to(ROOT).as_posix())
    assert not missing, f"paths the docs name that do not exist: {missing}"


def test_every_figure_comes_from_reports():
    """Images in the pages are files their commands wrote under reports/, never copies kept in docs/."""
    strays = {}
    for page in PAGES:
        for target in IMAGE.findall(page.read_text()):
            if not re.fullmatch(r"(\.\./)*reports/.+", target):
                strays.setdefault(page.relative_to(ROOT).as_posix(), []).append(target)
    assert not strays, f"figures not taken from reports/: {strays}"


def test_readme_fits_on_one_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; the front door keeps to 150"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stderr[-3000:]}"
    return out


def test_site_builds_strictly_with_the_readme_as_home(site):
    home = (site / "index.html").read_text()
    assert "TorchServe vision bundle" in home
    assert 'href="quickstart/"' in home  # the README's docs/ links, made links of the site


def test_site_shows_every_committed_report_with_its_source(site):
    committed = subprocess.run(
        ["git", "ls-files", "reports/*.md", "reports/**/*.md"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    assert committed, "no committed report"
    for report in committed:
        rel = Path(report).relative_to("reports")
        page = rel.parent if rel.name == "README.md" else rel.with_suffix("")
        html = (site / "reports" / page / "index.html").read_text()
        assert f"{report}</code>, written by <code>make " in html, report
