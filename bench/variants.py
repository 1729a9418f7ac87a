"""Every export variant of one trained model, measured: `make variants` -> reports/variants/<name>/.

Per variant: the file, its format and size, export and load time, test accuracy and top-1 agreement with
the eager model, in-process images/s at batch 1, 8 and 32 with one torch thread (the model call alone:
uint8 RGB in, probabilities out), and requests/s through a real TorchServe with the shipped `serve:`
settings, driven by wrk. A variant whose check fails is listed as refused, with the reason.
"""

import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from bench import wrk
from common.config import ROOT
from common.images import encode
from common.io import atomic_dir, write_json
from handlers import files, runtime
from servers.torchserve import TorchServe
from training import variants
from training.archive import archive
from training.data import load_split
from training.export import inference_module
from training.model import Classifier
from training.photos import PHOTO_SIZE, PHOTOS
from training.pipeline import run
from training.train import CHECKPOINT

BATCHES = (1, 8, 32)
REPORTS = ROOT / "reports" / "variants"
# ResNet-18 on 224x224 RGB "photos" made from the digits (make variants ARGS=--photos)
PHOTO_OVERRIDES = [
    "data=folder",
    f"data.root={PHOTOS}",
    "data.name=photos",
    f"data.image_size={PHOTO_SIZE}",
    "model=resnet18",
    f"model.input_size={PHOTO_SIZE}",
    "trainer.max_epochs=10",
]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def images_per_second(model: runtime.Model, images: torch.Tensor, batch: int, seconds: float) -> float:
    """Calls of `batch` images for about `seconds` (at least 3 after a warm-up); images/s."""
    x = images[:batch] if len(images) >= batch else images[torch.arange(batch) % len(images)]
    with torch.inference_mode():
        model(x)
        calls, start = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - start < seconds:
            model(x)
            calls += 1
        return calls * batch / (time.perf_counter() - start)


def served(cfg: DictConfig, name: str, bodies: list[bytes], workdir: Path, seconds: float, connections: int) -> dict:
    """Archive the variant with the shipped `serve:` settings, serve it, drive it with wrk."""
    variant_cfg = copy.deepcopy(cfg)
    OmegaConf.update(variant_cfg, "export.variant", name)
    OmegaConf.update(variant_cfg, "paths.model_store", str(workdir / "model_store"))
    OmegaConf.update(variant_cfg, "archive.require_lineage", False)  # a throwaway archive of a measured file
    mar = archive(variant_cfg)
    with TorchServe(mar.parent, {cfg.name: mar.name}, workdir / "torchserve", ports={}) as ts:
        ready_s = ts.wait_ready(timeout=300)
        url = f"{ts.url('inference')}/predictions/{cfg.name}"
        result = wrk.run(url, ts.headers(), bodies, connections, seconds)
    return {"ready_s": ready_s, **{k: result[k] for k in ("rps", "p50_ms", "p99_ms", "errors", "client_cpu")}}


def measure(
    cfg: DictConfig, names: list[str], seconds: float = 3.0, serve_seconds: float = 10.0, connections: int = 16
) -> list[dict]:
    """One row per variant; the variant files are written to `paths.artifacts` (what `make archive` packs)."""
    out = Path(cfg.paths.artifacts)
    done = {
        "data": (Path(cfg.paths.data) / "meta.json").is_file(),
        "train": (out / CHECKPOINT).is_file(),
        "export": (out / files.LABELS).is_file() and (out / files.REFERENCE).is_file(),
    }
    if missing := [stage for stage, ready in done.items() if not ready]:
        log(f"{cfg.name}: running the pipeline's {', '.join(missing)} first")
        run(OmegaConf.merge(cfg, {"export": {"variant": "torchscript"}}), only=missing)  # each variant is made below
    eager = inference_module(Classifier.load_from_checkpoint(out / CHECKPOINT, map_location="cpu"))
    images, labels = load_split(cfg.paths.data, "test")
    calibration, _ = load_split(cfg.paths.data, "train", limit=variants.CALIBRATION_IMAGES)
    rgb = variants.as_rgb(images)
    bodies = [encode(image.numpy()) for image in images[:64]]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        with torch.inference_mode():
            eager_top = variants.run(eager, rgb).argmax(1)
        for name in names:
            log(f"{cfg.name}: {name}")
            row: dict = {"variant": name, "file": files.VARIANTS[name], "format": Path(files.VARIANTS[name]).suffix}
            start = time.perf_counter()
            try:
                torch.set_num_threads(threads)  # compiling uses every core
                path, check = variants.export(name, eager, (images, labels), out, calibration)
            except variants.VariantError as err:
                rows.append({**row, "status": "refused", "reason": str(err), "export_s": time.perf_counter() - start})
                log(f"  refused: {err}")
                continue
            finally:
                torch.set_num_threads(1)
            row.update(status="ok", export_s=time.perf_counter() - start, path=str(path), bytes=path.stat().st_size)
            start = time.perf_counter()
            model = runtime.load(path)
            with torch.inference_mode():
                model(rgb[:1])
            row["load_s"] = time.perf_counter() - start  # load and answer the first image
            with torch.inference_mode():
                top = variants.run(model, rgb).argmax(1)
            row.update(
                accuracy=(top == labels).float().mean().item(),
                eager_accuracy=(eager_top == labels).float().mean().item(),
                agreement=(top == eager_top).float().mean().item(),
                max_abs_diff=check.max_abs_diff,
            )
            for batch in BATCHES:
                row[f"images_s_batch{batch}"] = images_per_second(model, rgb, batch, seconds)
            if serve_seconds > 0:
                with tempfile.TemporaryDirectory(prefix="variant-") as tmp:
                    row["served"] = served(cfg, name, bodies, Path(tmp), serve_seconds, connections)
            log("  " + ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
            rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["variant"] == "torchscript" and r["status"] == "ok"), None)
    head = (
        "| variant | file | MB | load s | test acc | agreement | img/s b1 | img/s b8 | img/s b32 | vs torchscript b32 |"
    )
    lines = [head + " served req/s | p99 ms |", "|" + " --- |" * 12]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['variant']} | refused: {r['reason'][:160]} |" + " |" * 10)
            continue
        speedup = r["images_s_batch32"] / base["images_s_batch32"] if base else float("nan")
        serve = r.get("served", {})
        lines.append(
            f"| {r['variant']} | `{r['file']}` | {r['bytes'] / 1e6:.1f} | {r['load_s']:.2f} | {r['accuracy']:.2%} "
            f"| {r['agreement']:.2%} | {r['images_s_batch1']:.0f} | {r['images_s_batch8']:.0f} "
            f"| {r['images_s_batch32']:.0f} | {speedup:.2f}× | {serve.get('rps', float('nan')):.0f} "
            f"| {serve.get('p99_ms', float('nan')):.1f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(BATCHES)
    for k, batch in enumerate(BATCHES):
        xs = [i + k * width for i in range(len(ok))]
        left.bar(xs, [r[f"images_s_batch{batch}"] for r in ok], width, label=f"batch {batch}")
    left.set_xticks([i + width for i in range(len(ok))], [r["variant"] for r in ok], rotation=20)
    left.set_ylabel("images/s, in-process, 1 thread")
    left.legend()
    right.bar([r["variant"] for r in ok], [r.get("served", {}).get("rps", 0) for r in ok], color="tab:green")
    right.set_ylabel("requests/s through TorchServe (wrk)")
    right.tick_params(axis="x", rotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(cfg: DictConfig, rows: list[dict], folder: Path, context: dict) -> Path:
    """reports/variants/<name>/: variants.json, README.md (the table), variants.png."""
    context = {**context, "load_after": load_average()}
    with atomic_dir(folder) as tmp:
        write_json(tmp / "variants.json", {**context, "rows": rows})
        plot(rows, f"{cfg.name}: export variants ({context['machine']})", tmp / "variants.png")
        text = [
            f"# Export variants: {cfg.name}",
            "",
            f"`{context['command']}` on {context['date']}, {context['machine']}, load average before the run "
            f"{context['load_before']}, after {context['load_after']}. In-process: the model call alone, one torch "
            f"thread, the test images at their stored size. Served: TorchServe with the shipped `serve:` settings, "
            f"wrk at {context['connections']} connections for {context['serve_seconds']:g} s, raw PNG bodies.",
            "",
            table(rows),
            "",
            "![variants](variants.png)",
            "",
        ]
        (tmp / "README.md").write_text("\n".join(text))
    return folder


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def context(command: str, connections: int, serve_seconds: float) -> dict:
    """What the report says about the run; taken before it (report() adds the load after)."""
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch {torch.__version__}",
        "load_before": load_average(),
        "connections": connections,
        "serve_seconds": serve_seconds,
    }


def main(cfg: DictConfig, names: list[str], seconds: float, serve_seconds: float, connections: int, command: str):
    ctx = context(command, connections, serve_seconds)
    rows = measure(cfg, names, seconds, serve_seconds, connections)
    folder = report(cfg, rows, REPORTS / str(cfg.name), ctx)
    print(table(rows))
    print(json.dumps({"report": str(folder)}))
    return folder
