"""Offline drift check: a folder of images (e.g. what clients sent last week) against the training reference.

The serving core does the work: handlers.decode reads the files as the handler reads a request,
handlers.classifier.ImageClassifier predicts, and handlers/drift.py (`features`, `scores`) scores
the images and the model's answers, so the numbers are the ones the `DriftScore` metric shows.
Model, labels and reference come from paths.artifacts (the export's), else from the .mar. Writes a
self-contained HTML report (histograms reference vs current, scores, what is over the threshold)
and scores.json to `drift_report.out`.
"""

import base64
import html
import io
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from common.cli import BundleError
from common.io import write_json, write_text
from handlers import files
from handlers.archive import BadArchive, members, read_manifest, read_model_config, unpack
from handlers.classifier import ImageClassifier, Settings
from handlers.decode import suffixes
from handlers.drift import FEATURES, features, scores

MIN_IMAGES = 30  # fewer images make the KS statistics noisy; the report says so
NEEDED = (files.MODEL, files.LABELS, files.REFERENCE)
METHOD = {name: "Kolmogorov-Smirnov statistic (0 = same distribution, 1 = disjoint)" for name in FEATURES}
METHOD["confidence"] = "Kolmogorov-Smirnov statistic of the model's top-1 probability"
METHOD["classes"] = "Jensen-Shannon divergence (base 2) of the predicted class shares"


class DriftReportError(BundleError):
    """The report cannot be made; the message says why."""


def image_files(folder: Path) -> list[Path]:
    """Every file under `folder` (recursively) named like an image format the server accepts."""
    if not folder.is_dir():
        raise DriftReportError(f"image folder not found: {folder}")
    accepted = suffixes()
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in accepted and p.is_file())


def locate(artifacts: Path, mar: Path | None, fallback: Path, workdir: Path) -> tuple[Path, dict | None, str]:
    """The folder holding model, labels and reference: the artifacts, else `mar` (or `fallback`) unpacked.

    Also the archive's handler settings (None for the artifacts) and where it all came from.
    """
    if mar is None and all((artifacts / name).is_file() for name in NEEDED):
        return artifacts, None, str(artifacts)
    archive = mar or fallback
    if not archive.is_file():
        where = f"archive {archive}" if mar else f"{' + '.join(NEEDED)} in {artifacts}, nor {archive}"
        raise DriftReportError(f"no {where}: run `make export` and `make archive`, or pass --mar")
    try:
        needed = {read_manifest(archive)["model"]["serializedFile"], files.LABELS, files.REFERENCE}
        missing = needed - members(archive)
        handler = read_model_config(archive).handler
    except BadArchive as err:
        raise DriftReportError(f"{err}: rebuild it with `make archive`") from None
    if missing:
        raise DriftReportError(f"{archive} has no {sorted(missing)}: rebuild it with `make archive`")
    return unpack(archive, workdir), handler, str(archive)


def predict(classifier: ImageClassifier, images: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    """Class probabilities [N, classes], `batch_size` images at a time."""
    if not images:
        return torch.empty(0, len(classifier.labels))
    return torch.cat([classifier.predict(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def drift_report(cfg: DictConfig, images_dir: Path, mar: Path | None = None, out: Path | None = None) -> dict:
    """Score the images against the reference, write report.html and scores.json; return the summary.

    `cfg` is configs/monitoring.yaml; `out` defaults to its drift_report.out.
    """
    dc = cfg.drift_report
    images_dir, out = Path(images_dir), Path(out or dc.out)
    paths = image_files(images_dir)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, handler, source = locate(Path(dc.artifacts), mar, Path(dc.mar), Path(tmp))
        try:
            settings = Settings.from_dict(handler or OmegaConf.to_container(cfg.serve.handler, resolve=True))
            classifier = ImageClassifier.from_dir(model_dir, settings, cfg.name)
        except (RuntimeError, ValueError, TypeError, KeyError) as err:
            raise DriftReportError(f"cannot load the model or reference from {source}: {err}") from None
    decoded = classifier.decode([path.read_bytes() for path in paths])
    skipped = [str(paths[r].relative_to(images_dir)) for r in sorted(decoded.errors)]
    images = decoded.images
    if not images:
        raise DriftReportError(f"no readable images under {images_dir} ({len(skipped)} unreadable)")
    ref = classifier.drift.ref
    probs = predict(classifier, images, dc.batch_size)
    if probs.shape[1] != len(ref.class_shares):
        raise DriftReportError(f"model has {probs.shape[1]} classes, the reference {len(ref.class_shares)}")
    values = features(images)
    classes, confidence = probs.argmax(1).numpy(), probs.max(1).values.numpy()
    threshold = float(dc.threshold)
    result = scores(ref, values, classes, confidence)
    summary = {
        "model": cfg.name,
        "images_dir": str(images_dir),
        "images": len(images),
        "skipped": skipped,
        "reference_from": source,
        "reference_images": len(ref.confidence),
        "threshold": threshold,
        "scores": {k: round(v, 6) for k, v in result.items()},
        "drifted": [k for k, v in result.items() if v > threshold],
    }
    plots = {
        name: histogram(name, np.asarray(ref.features[name]), values[:, j], result[name], threshold)
        for j, name in enumerate(FEATURES)
    }
    plots["confidence"] = histogram(
        "confidence", np.asarray(ref.confidence), confidence, result["confidence"], threshold
    )
    shares = np.bincount(classes, minlength=len(ref.class_shares)) / len(classes)
    plots["classes"] = class_bars(np.asarray(ref.class_shares), shares, classifier.labels, result["classes"], threshold)
    write_text(out / "report.html", render(summary, plots))
    write_json(out / "scores.json", summary)
    return summary


def figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return base64.b64encode(buf.getvalue()).decode()


def titled(ax, name: str, score: float, threshold: float) -> None:
    drift = score > threshold
    ax.set_title(f"{name}: {score:.3f}" + (" DRIFT" if drift else ""), color="C3" if drift else "k", parse_math=False)
    ax.legend(fontsize="x-small")


def histogram(name: str, ref: np.ndarray, cur: np.ndarray, score: float, threshold: float) -> str:
    from matplotlib.figure import Figure

    low, high = float(min(ref.min(), cur.min())), float(max(ref.max(), cur.max()))
    if high - low < 1e-9:  # a constant feature (e.g. every image the same width)
        low, high = low - 0.5, high + 0.5
    bins = np.linspace(low, high, 31)
    fig = Figure(figsize=(4.2, 2.8), layout="constrained")
    ax = fig.subplots()
    ax.hist(ref, bins=bins, density=True, alpha=0.55, label=f"reference ({len(ref)})")
    ax.hist(cur, bins=bins, density=True, alpha=0.55, label=f"current ({len(cur)})")
    titled(ax, name, score, threshold)
    return figure_png(fig)


def class_bars(ref: np.ndarray, cur: np.ndarray, labels: list[str], score: float, threshold: float) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 2.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(labels))
    ax.bar(x - 0.2, ref, width=0.4, label="reference")
    ax.bar(x + 0.2, cur, width=0.4, label="current")
    ax.set_xticks(x, labels, fontsize="x-small", rotation=90 if len(labels) > 12 else 0)
    titled(ax, "classes", score, threshold)
    return figure_png(fig)


def render(summary: dict, plots: dict[str, str]) -> str:
    threshold = summary["threshold"]
    rows = "".join(
        f"<tr class='{'drift' if s > threshold else 'ok'}'><td>{html.escape(name)}</td><td>{s:.3f}</td>"
        f"<td>{'over the threshold' if s > threshold else 'ok'}</td><td>{METHOD[name]}</td></tr>"
        for name, s in summary["scores"].items()
    )
    drifted = summary["drifted"]
    verdict = f"DRIFT in {', '.join(drifted)}" if drifted else "no drift"
    notes = []
    if summary["images"] < MIN_IMAGES:
        notes.append(f"Only {summary['images']} images: the scores are noisy below {MIN_IMAGES}.")
    if summary["skipped"]:
        shown = ", ".join(html.escape(s) for s in summary["skipped"][:5])
        notes.append(f"{len(summary['skipped'])} unreadable files skipped (e.g. {shown}).")
    images = "".join(
        f"<figure><img src='data:image/png;base64,{png}' alt='{name}'></figure>" for name, png in plots.items()
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Drift report: {html.escape(summary["model"])}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 10px; text-align: left; }}
tr.drift {{ background: #fdd; }} tr.ok {{ background: #efe; }}
.verdict {{ font-size: 1.3em; font-weight: bold; color: {"#b00" if drifted else "#070"}; }}
figure {{ display: inline-block; margin: 4px; }}
</style></head><body>
<h1>Drift report: {html.escape(summary["model"])}</h1>
<p class="verdict">{html.escape(verdict)}</p>
<p>{summary["images"]} images from <code>{html.escape(summary["images_dir"])}</code> against the reference from
<code>{html.escape(summary["reference_from"])}</code> ({summary["reference_images"]} images).
Threshold {threshold} (<code>serve.handler.drift.threshold</code>), the same as the serving handler's
<code>DriftScore</code> metric and the Prometheus alert.</p>
{"".join(f"<p><em>{n}</em></p>" for n in notes)}
<table><tr><th>score</th><th>value</th><th>status</th><th>method</th></tr>{rows}</table>
<h2>Reference vs current</h2>
{images}
</body></html>
"""
