"""The GPU section of `make bench` (reports/benchmark/gpu.md), run where torch sees a CUDA device.

ResNet-18 at input 224 (RGB, untrained: speed does not depend on the weights) from 256x256 JPEG payloads, the
workload of issue 21. Three layers, each against the one below:
- the card's in-process limit: the exported graph on uint8 images already on the GPU, in eager fp32, bf16
  autocast with channels_last (what the bundle serves), and torch.compile bf16 (the anchor);
- the serving core (handlers/classifier.py) in-process: `predict` on images decoded on the host, and `run` on JPEG
  payloads decoded by Pillow on one CPU thread or by nvJPEG on the GPU;
- TorchServe with the bundle's handler and the `serve=gpu` profile, driven by wrk at 1-256 connections.
"""

import io
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import wrk
from bench.models import log
from common.config import load_config
from common.io import write_json, write_text
from handlers import files
from handlers.archive import unpack
from handlers.classifier import ImageClassifier, Settings
from handlers.decode import decode_image
from handlers.drift import Reference
from training.archive import archive
from training.export import inference_module
from training.model import Classifier
from training.variants import build_torchscript

NAME = "gpu_resnet18"
INPUT = 224
SIDE = 256  # the JPEG payloads' side
CLASSES = [f"class{i}" for i in range(10)]
GOALS = {"served_rps": 15000, "served_p99_ms": 50, "core_share": 0.5}  # issue 21, on one H100/H200-class GPU


def jpegs(n: int, side: int = SIDE, seed: int = 0) -> list[bytes]:
    """Photo-like JPEGs: smooth colour fields with noise (what nvJPEG and Pillow see in production)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((side, side), Image.Resampling.BICUBIC)
        noisy = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (side, side, 3))
        buf = io.BytesIO()
        Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def model(input_size: int = INPUT) -> torch.nn.Module:
    """The bundle's ResNet-18 (training/model.py) for RGB images, as the export wraps it: uint8 in, softmax out."""
    cfg = load_config(["model=resnet18", f"model.input_size={input_size}", "augment.enabled=false"])
    classifier = Classifier(dict(cfg.model), dict(cfg.augment), CLASSES, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    return inference_module(classifier)


def rate(call: Callable[[], object], images: int, seconds: float, device: torch.device) -> dict:
    """Images per second of `call` (which handles `images` images) over `seconds`, after a warm-up."""
    for _ in range(3):
        call()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        begin = time.perf_counter()
        call()
        sync()
        times.append(time.perf_counter() - begin)
    ms = statistics.median(times) * 1e3
    return {"images_per_s": images / statistics.median(times), "p50_ms_per_call": ms, "calls": len(times)}


def limits(path: Path, device: torch.device, batch: int, seconds: float, compiled: bool = True) -> dict:
    """The exported graph on uint8 images already on `device`: fp32, bf16 + channels_last, and compiled bf16."""
    from handlers import runtime

    images = torch.randint(0, 256, (batch, 3, SIDE, SIDE), dtype=torch.uint8, device=device)
    rows = {}
    with torch.inference_mode():
        fp32 = runtime.load(path, device, at="fp32")
        rows["eager fp32"] = rate(lambda: fp32(images), batch, seconds, device)
        served = runtime.load(path, device) if device.type == "cuda" else runtime.load(path, device, "bf16")
        rows[f"served file, {served.precision}"] = rate(lambda: served(images), batch, seconds, device)
    if compiled:
        eager = model().to(device).to(memory_format=torch.channels_last)
        fast = torch.compile(eager, mode="max-autotune-no-cudagraphs")
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            rows["torch.compile bf16 (anchor)"] = rate(lambda: fast(images), batch, seconds, device)
    return rows


def core(model_dir: Path, device: torch.device, batch: int, seconds: float, payloads: list[bytes]) -> dict:
    """The serving core in-process: predict on host-decoded images, run on JPEGs with CPU or GPU decoding."""
    settings = Settings.from_dict({**load_config(["serve=gpu"]).serve.handler, "device": str(device)})
    classifier = ImageClassifier.from_dir(model_dir, settings, NAME, "1.0")
    chosen = (payloads * (batch // len(payloads) + 1))[:batch]
    host = [decode_image(p, settings.max_pixels) for p in chosen]
    rows = {"predict, host-decoded uint8": rate(lambda: classifier.predict(host), batch, seconds, device)}
    gpu_decoder = classifier.jpeg_device
    classifier.jpeg_device = None
    rows["run, JPEG, Pillow decode"] = rate(lambda: classifier.run(chosen), batch, seconds, device)
    if gpu_decoder is not None:
        classifier.jpeg_device = gpu_decoder
        rows["run, JPEG, nvJPEG decode"] = rate(lambda: classifier.run(chosen), batch, seconds, device)
    return rows


def build(workdir: Path) -> tuple[Path, Path]:
    """model.pt of the ResNet-18 traced on the CPU, and its archive with the `serve=gpu` profile."""
    artifacts, store = workdir / "artifacts", workdir / "model_store"
    artifacts.mkdir(parents=True, exist_ok=True)
    eager = model().eval()
    sample = torch.stack([decode_image(p, 10**8) for p in jpegs(8, seed=1)])
    build_torchscript(eager, sample, artifacts / files.MODEL)
    (artifacts / files.LABELS).write_text(json.dumps({str(i): c for i, c in enumerate(CLASSES)}))
    with torch.no_grad():
        write_json(artifacts / files.REFERENCE, Reference.build(list(sample), eager(sample)).to_json())
    cfg = load_config(
        [
            "serve=gpu", f"name={NAME}", "export.variant=torchscript", "archive.require_lineage=false",
            f"paths.artifacts={artifacts}", f"paths.model_store={store}",
        ]
    )  # fmt: skip
    return artifacts / files.MODEL, archive(cfg)


def served(mar: Path, workdir: Path, connections: list[int], seconds: float, payloads: list[bytes]) -> list[dict]:
    """TorchServe with the bundle's handler on the GPU: wrk closed loop at each connection count."""
    from servers.torchserve import TorchServe

    rows = []
    with TorchServe(mar.parent, {NAME: mar.name}, workdir / "torchserve", ports={}) as ts:
        ts.wait_ready(timeout=600)
        url = f"{ts.url('inference')}/predictions/{NAME}"
        headers = {**ts.headers(), "Content-Type": "image/jpeg"}
        wrk.run(url, headers, payloads, max(connections), seconds)  # warm-up, discarded
        for n in connections:
            rows.append(wrk.run(url, headers, payloads, n, seconds))
            log(f"GPU TorchServe, {n} connections: {rows[-1]['rps']:.0f} req/s, p99 {rows[-1]['p99_ms']:.1f} ms")
    return rows


def table(rows: dict) -> str:
    lines = ["| what | images/s | p50 ms per call |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {r['images_per_s']:.0f} | {r['p50_ms_per_call']:.2f} |" for name, r in rows.items()]
    return "\n".join(lines)


def report(results: dict) -> str:
    meta, anchor = results["meta"], results["limits"].get("torch.compile bf16 (anchor)")
    host = results["core"]["predict, host-decoded uint8"]["images_per_s"]
    lines = [
        "# GPU benchmark",
        "",
        f"Written by `python -m scripts.bench --gpu` on {meta['date']}, {meta['minutes']:.1f} minutes. Machine: "
        f"{meta['gpu']}, {meta['cores']} CPU cores; torch {meta['torch']}. ResNet-18 at {INPUT} (RGB), "
        f"{SIDE}x{SIDE} JPEG payloads, batch {meta['batch']} in process.",
        "",
        "## The card's limit (input already on the GPU)",
        "",
        table(results["limits"]),
        "",
        "## The serving core in process",
        "",
        table(results["core"]),
        "",
    ]
    if anchor:
        share = host / anchor["images_per_s"]
        lines += [f"`predict` on host-decoded images reaches {share:.0%} of the compiled anchor (goal: "
                  f"{GOALS['core_share']:.0%}).", ""]  # fmt: skip
    if results["served"]:
        lines += [
            "## TorchServe, the bundle's handler, `serve=gpu`",
            "",
            "| connections | requests/s | p50 ms | p99 ms | errors | wrk CPU |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {r['connections']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['errors']} | "
            f"{r['client_cpu']:.2f} |"
            for r in results["served"]
        ]
        lines += [
            "",
            f"Goal: {GOALS['served_rps']:,} requests/s at 256 connections, p99 <= {GOALS['served_p99_ms']} ms.",
        ]
    return "\n".join(lines) + "\n"


def bench(out: Path, workdir: Path, seconds: float = 5, batch: int = 256, connections=(1, 16, 64, 256)) -> Path:
    """Every layer on the first CUDA device; writes <out>/gpu.md and gpu.json."""
    if not torch.cuda.is_available():
        raise RuntimeError("the GPU section needs a CUDA device: torch.cuda.is_available() is False")
    started, device = time.monotonic(), torch.device("cuda:0")
    path, mar = build(workdir)
    payloads = jpegs(64)
    model_dir = unpack(mar, workdir / "unpacked")
    results = {
        "limits": limits(path, device, batch, seconds),
        "core": core(model_dir, device, batch, seconds, payloads),
    }
    results["served"] = served(mar, workdir, list(connections), seconds, payloads)
    results["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "minutes": (time.monotonic() - started) / 60,
        "gpu": torch.cuda.get_device_name(device),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "batch": batch,
        "goals": GOALS,
    }
    write_json(out / "gpu.json", results)
    write_text(out / "gpu.md", report(results))
    return out / "gpu.md"
