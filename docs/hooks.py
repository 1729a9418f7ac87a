"""MkDocs hooks: the site's home page is README.md, and every report under reports/ is a page of the site.

Figures and tables live once, in the files their commands write (reports/**); the docs show those files
as they are at build time, with a line saying which command wrote them and when. A report that does not
exist (robustness, drift, ... are generated and ignored by git) is listed with the command that makes it.
"""

import datetime
import re
import subprocess
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"
SHOWN = {".md", ".png", ".svg", ".html", ".json", ".csv"}
SKIPPED = {"tmp"}  # scratch space of running commands
FIGURE = re.compile(r"^!\[[^\]]*\]\(((?:\.\./)*)reports/([^)]+\.png)\)$", re.MULTILINE)  # a plot on its own line
MACHINE = re.compile(r"\b\d+ cores(, (x86_64|aarch64|arm64))?")  # how the reports name their machine

# reports/<folder>/ -> the command that writes it
COMMANDS = {
    "benchmark": "make bench",
    "variants": "make variants",
    "loaders": "make loaders",
    "robustness": "make robustness",
    "drift": "make drift IMAGES=<folder>",
    "profile": "make profile",
    "tune": "make tune",
    "loadtest": "make loadtest",
    "rollout": "make rollout-bench",
}


def on_files(files: Files, config) -> Files:
    files.append(File.generated(config, "index.md", content=home_page()))
    found = sorted(p for p in REPORTS.rglob("*") if p.is_file() and p.suffix in SHOWN and not skipped(p))
    for path in found:
        uri = "reports/" + path.relative_to(REPORTS).as_posix()
        if path.suffix == ".md":
            files.append(File.generated(config, uri, content=report_page(path)))
        else:
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    files.append(File.generated(config, "reports/index.md", content=reports_index(found)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    """Under every plot a page shows from reports/: the command that made it, when, and the machine."""
    if page.file.src_uri.startswith("reports/"):
        return markdown
    return FIGURE.sub(lambda m: m.group(0) + "\n\n" + caption(m.group(1), m.group(2)), markdown)


def caption(up: str, rel: str) -> str:
    plot = REPORTS / rel
    reports = sorted(plot.parent.glob("*.md"))
    if not plot.exists() or not reports:
        return ""  # MkDocs reports a broken image link itself
    link = f"[its report]({up}reports/{reports[0].relative_to(REPORTS).as_posix()})"
    command = COMMANDS.get(plot.relative_to(REPORTS).parts[0], "its command")
    return (
        f"*Plot written by `{command}`, {when(plot)}; machine: {machine(reports[0].read_text())}. The numbers: {link}.*"
    )


def skipped(path: Path) -> bool:
    return path.relative_to(REPORTS).parts[0] in SKIPPED


def home_page() -> str:
    """README.md, its links into docs/ and to reports/ made links of the site."""
    text = (ROOT / "README.md").read_text().replace("](reports/)", "](reports/index.md)")
    return re.sub(r"\]\(docs/", "](", text)


def report_page(path: Path) -> str:
    """The report as written, a provenance note under its title; the folder's first report also shows the folder's
    plots that no report of it shows (robustness.png, loaders.png)."""
    text = path.read_text()
    reports = sorted(path.parent.glob("*.md"))
    if path == reports[0]:
        shown = "".join(p.read_text() for p in reports)
        plots = [p.name for p in sorted(path.parent.glob("*.png")) if f"]({p.name})" not in shown]
        text += "".join(f"\n![{name}]({name})\n" for name in plots)
    title, _, body = text.partition("\n") if text.startswith("# ") else ("", "", text)
    return f"{title}\n\n{provenance(path)}\n\n{body}"


def provenance(path: Path) -> str:
    rel = path.relative_to(ROOT).as_posix()
    command = COMMANDS.get(path.relative_to(REPORTS).parts[0], "its command")
    where = machine(path.read_text())
    return f'!!! info "Source"\n    `{rel}`, written by `{command}`; {when(path)}; machine: {where}.'


def machine(report: str) -> str:
    found = MACHINE.search(report)
    return found.group(0) if found else "not named in the report"


def when(path: Path) -> str:
    """The commit date of a committed, unchanged report; else the date this machine wrote the file."""
    rel = path.relative_to(ROOT).as_posix()
    try:
        changed = git("status", "--porcelain", "--ignored", "--", rel)
        date = git("log", "-1", "--format=%cs %h", "--", rel)
    except (OSError, subprocess.CalledProcessError):
        changed, date = "?", ""
    if date and not changed:
        day, commit = date.split()
        return f"committed on {day} ({commit})"
    written = datetime.datetime.fromtimestamp(path.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    return f"written on this machine on {written}, not committed"


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def reports_index(found: list[Path]) -> str:
    lines = [
        "# Reports",
        "",
        "Every figure and measured table of these docs is one of these files, shown as its command last wrote it.",
        "Run the command again and rebuild the docs (`make docs`) to see new numbers.",
        "",
        "| folder | written by | in this build |",
        "| --- | --- | --- |",
    ]
    for folder, command in COMMANDS.items():
        links = ", ".join(
            f"[{rel}]({rel})" for rel in listed([p for p in found if p.relative_to(REPORTS).parts[0] == folder])
        )
        lines.append(f"| `reports/{folder}/` | `{command}` | {links or 'nothing yet: run the command'} |")
    return "\n".join(lines) + "\n"


def listed(mine: list[Path]) -> list[str]:
    """A folder's reports and HTML pages; its plots too where no report of that folder shows them."""
    shown = {p.parent for p in mine if p.suffix == ".md"}
    keep = [p for p in mine if p.suffix in {".md", ".html"} or (p.suffix in {".png", ".svg"} and p.parent not in shown)]
    return [p.relative_to(REPORTS).as_posix() for p in keep]
