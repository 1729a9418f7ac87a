"""Offline drift check: a folder of images (e.g. what clients sent last week) against the training reference.

    python -m scripts.drift_report IMAGES                      # make drift IMAGES=...
    python -m scripts.drift_report IMAGES --mar model_store/digits_cnn.mar
    python -m scripts.drift_report IMAGES --fail-on-drift      # exit 1 when a score is over the threshold
    python -m scripts.drift_report IMAGES model=resnet18       # Hydra overrides pick the model

Uses the serving handler's own drift code (handlers/drift.py: `features`, `scores`) on the images and
on the model's answers to them, so the numbers are the ones the `DriftScore` metric shows. The
reference is `drift_reference.json` next to the model in paths.artifacts (written by the export), else
the one inside the .mar. Writes a self-contained HTML report (histograms reference vs current, scores,
what is over `serve.handler.drift.threshold`) and scores.json to `drift_report.out`.
"""

import argparse
import base64
import html
import io
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from handlers.drift import FEATURES, Reference, features, scores
from training.io import atomic_path, write_json

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
MIN_IMAGES = 30  # fewer images make the KS statistics noisy; the report says so


class DriftReportError(RuntimeError):
    """The report cannot be made; the message says why."""


def read_images(folder: Path) -> tuple[list[torch.Tensor], list[str], list[str]]:
    """Every image under `folder` (recursively) as uint8 RGB [3, H, W], as the handler decodes it."""
    if not folder.is_dir():
        raise DriftReportError(f"image folder not found: {folder}")
    images, names, skipped = [], [], []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        try:
            with Image.open(path) as img:
                rgb = ImageOps.exif_transpose(img).convert("RGB")
        except (UnidentifiedImageError, OSError):
            skipped.append(str(path.relative_to(folder)))
            continue
        images.append(torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous())
        names.append(str(path.relative_to(folder)))
    if not images:
        raise DriftReportError(f"no readable PNG/JPEG images under {folder} ({len(skipped)} unreadable)")
    return images, names, skipped


def locate(reference: Path, model: Path, mar: Path | None, fallback: Path, workdir: Path) -> tuple[Path, Path, str]:
    """Reference and model: from `mar` if given, else the artifacts, else the `fallback` archive."""
    if mar is None and reference.is_file() and model.is_file():
        return reference, model, str(reference.parent)
    archive = mar or fallback
    if not archive.is_file():
        where = f"archive {archive}" if mar else f"{reference.name} + {model.name} in {reference.parent}, nor {archive}"
        raise DriftReportError(f"no {where}: run `make export` and `make archive`, or pass --mar")
    with zipfile.ZipFile(archive) as z:
        missing = {reference.name, model.name} - set(z.namelist())
        if missing:
            raise DriftReportError(f"{archive} has no {sorted(missing)}: rebuild it with `make archive`")
        z.extract(reference.name, workdir)
        z.extract(model.name, workdir)
    return workdir / reference.name, workdir / model.name, str(archive)


def predict(model: torch.jit.ScriptModule, images: list[torch.Tensor], batch_size: int) -> torch.Tensor:
    """Class probabilities for images of any sizes: one batch per size, as the graph takes any H, W."""
    probs = torch.zeros(len(images), 0)
    by_size: dict[tuple, list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault(tuple(img.shape), []).append(i)
    with torch.no_grad():
        for idx in by_size.values():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                out = model(torch.stack([images[i] for i in chunk]))
                if probs.shape[1] == 0:
                    probs = torch.zeros(len(images), out.shape[1])
                probs[chunk] = out
    return probs


def figure_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return base64.b64encode(buf.getvalue()).decode()


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
    ax.set_title(
        f"{name}: {score:.3f}" + (" DRIFT" if score > threshold else ""), color="C3" if score > threshold else "k"
    )
    ax.legend(fontsize="x-small")
    return figure_png(fig)


def class_bars(
    shares_ref: np.ndarray, shares_cur: np.ndarray, labels: list[str], score: float, threshold: float
) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 2.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(labels))
    ax.bar(x - 0.2, shares_ref, width=0.4, label="reference")
    ax.bar(x + 0.2, shares_cur, width=0.4, label="current")
    ax.set_xticks(x, labels, fontsize="x-small", rotation=90 if len(labels) > 12 else 0)
    ax.set_title(
        f"classes: {score:.3f}" + (" DRIFT" if score > threshold else ""), color="C3" if score > threshold else "k"
    )
    ax.legend(fontsize="x-small")
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


METHOD = {name: "Kolmogorov-Smirnov statistic (0 = same distribution, 1 = disjoint)" for name in FEATURES}
METHOD["confidence"] = "Kolmogorov-Smirnov statistic of the model's top-1 probability"
METHOD["classes"] = "Jensen-Shannon divergence (base 2) of the predicted class shares"


def drift_report(
    images_dir: Path,
    reference: Path,
    model: Path,
    mar: Path | None,
    fallback: Path,
    out: Path,
    threshold: float,
    name: str,
    batch_size: int = 256,
) -> dict:
    """Score the images against the reference, write report.html and scores.json; return the summary."""
    images, _, skipped = read_images(images_dir)
    with tempfile.TemporaryDirectory() as tmp:
        ref_path, model_path, source = locate(reference, model, mar, fallback, Path(tmp))
        try:
            ref = Reference.load(ref_path)
            net = torch.jit.load(str(model_path), map_location="cpu").eval()
        except (RuntimeError, ValueError, TypeError, KeyError) as err:
            raise DriftReportError(f"cannot load the reference or model from {source}: {err}") from None
    probs = predict(net, images, batch_size)
    if probs.shape[1] != len(ref.class_shares):
        raise DriftReportError(f"model has {probs.shape[1]} classes, the reference {len(ref.class_shares)}")
    values = features(images)
    classes, confidence = probs.argmax(1).numpy(), probs.max(1).values.numpy()
    result = scores(ref, values, classes, confidence)
    summary = {
        "model": name,
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
    labels = [str(i) for i in range(len(ref.class_shares))]
    plots["classes"] = class_bars(np.asarray(ref.class_shares), shares, labels, result["classes"], threshold)
    with atomic_path(out / "report.html") as tmp:
        tmp.write_text(render(summary, plots))
    write_json(out / "scores.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", help="folder of PNG/JPEG images (searched recursively)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=resnet18 drift_report.out=...")
    parser.add_argument("--mar", help="read model.pt and drift_reference.json from this archive")
    parser.add_argument("--fail-on-drift", action="store_true", help="exit 1 when a score is over the threshold")
    args = parser.parse_args(argv)

    from hydra.errors import HydraException

    from training.config import load_config

    try:
        cfg = load_config(args.overrides, "monitoring")
    except HydraException as err:
        raise SystemExit(f"error: {str(err).splitlines()[0]}") from None
    dc = cfg.drift_report
    try:
        summary = drift_report(
            Path(args.images),
            Path(dc.reference),
            Path(dc.model),
            Path(args.mar) if args.mar else None,
            Path(dc.mar),
            Path(dc.out),
            float(dc.threshold),
            cfg.name,
            dc.batch_size,
        )
    except DriftReportError as err:
        raise SystemExit(f"error: {err}") from None
    width = max(map(len, summary["scores"]))
    for name, score in summary["scores"].items():
        print(f"  {name:<{width}}  {score:.3f}{'  DRIFT' if name in summary['drifted'] else ''}")
    verdict = f"drift in {', '.join(summary['drifted'])}" if summary["drifted"] else "no drift"
    print(f"{summary['images']} images: {verdict} (threshold {summary['threshold']})")
    print(f"report: {Path(dc.out) / 'report.html'}")
    if args.fail_on_drift and summary["drifted"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
