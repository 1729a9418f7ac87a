"""The GPU path: files that carry no device, the file and device each worker picks, JPEGs decoded as a batch.

The first tests run everywhere: what makes a file fail on a GPU (a device recorded by the trace) is a property of
the graph, and the batched JPEG path runs on the CPU with torchvision's decoder. Tests marked `gpu` run the same
parts on a CUDA device and skip, saying so, where there is none.
"""

import base64
import io
import json
import logging

import numpy as np
import pytest
import torch
from kornia.enhance import normalize
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from handlers import files, runtime
from handlers.archive import unpack
from handlers.classifier import ImageClassifier, pick
from handlers.decode import InputError, decode_batch, decode_image, decode_jpegs, nvjpeg_can, open_image, pixels
from handlers.handler import Handler
from tests import client
from training import variants
from training.export import inference_module
from training.variants import VariantError, build_torchscript, device_bound

CUDA = "cuda:0"


def jpeg(array: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, "JPEG", **save)
    return buf.getvalue()


def blocks(seed: int, channels: int = 3) -> np.ndarray:
    """A 64x80 image of 8x8 blocks of random colour: what JPEG keeps well."""
    rng = np.random.default_rng(seed)
    shape = (8, 10, channels) if channels > 1 else (8, 10)
    return np.kron(rng.integers(0, 256, shape), np.ones((8, 8, 1) if channels > 1 else (8, 8))).astype(np.uint8)


def rotated_jpeg(array: np.ndarray) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    return jpeg(array, exif=exif)


class KorniaNormalize(nn.Module):
    """The preprocessing as it was: kornia.enhance.normalize moves mean/std with .to(device) inside forward."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]))
        self.register_buffer("std", torch.tensor([0.25, 0.25, 0.25]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(normalize(images.float() / 255, self.mean, self.std).mean(dim=(2, 3)), dim=1)


def test_a_graph_that_recorded_a_device_is_refused_and_not_written(tmp_path):
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    found = device_bound(variants.trace(KorniaNormalize().eval(), images))
    assert any("Device" in line and '"cpu"' in line for line in found)
    target = tmp_path / files.MODEL
    with pytest.raises(VariantError, match="bound to the device it was traced on"):
        build_torchscript(KorniaNormalize().eval(), images, target)
    assert not target.exists()


@pytest.mark.parametrize(("model", "channels"), [("cnn", 1), ("cnn", 3), ("resnet18", 3)])
def test_the_bundles_models_trace_without_a_device(new_classifier, model, channels):
    """Gray models convert RGB uploads to gray inside the graph, RGB models do not: both paths are traced."""
    eager = inference_module(new_classifier(model, channels, augment=False, overrides=("model.input_size=32",)))
    images = torch.randint(0, 256, (2, channels, 24, 24), dtype=torch.uint8)
    assert device_bound(variants.trace(eager, images)) == []


def test_a_refused_gpu_precision_leaves_gpus_on_fp32(new_classifier, tmp_path, monkeypatch):
    """The bf16 parity check refuses (here: a bar no model passes); the portable file is still written, for CPUs
    and for GPUs in fp32, and the refusal keeps its numbers."""
    monkeypatch.setattr(variants, "GPU_AGREEMENT", 1.01)
    eager = inference_module(new_classifier("cnn", 1, augment=False))
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path, check = variants.export(files.PORTABLE, eager, (images, torch.arange(40) % 10), tmp_path)
    assert check.gpu["precision"] == "fp32" and "bf16 refused" in check.gpu["refused"]
    assert "top-1 agreement with eager fp32" in check.gpu["refused"]
    assert (runtime.precision(path, "cuda"), runtime.precision(path, "cpu")) == ("fp32", "fp32")


def test_the_trained_models_gpu_precision_is_bf16(model_file):
    """The session's model passed the bf16 parity check at export (on this machine's GPU, or on the CPU)."""
    assert runtime.precision(model_file, "cuda") == "bf16"


def test_each_variant_declares_its_devices():
    assert files.REGISTRY[files.PORTABLE].precision == {"cpu": "fp32", "cuda": "bf16"}
    for name in ("torchscript-frozen", "aoti", "int8", "onnx"):
        assert files.REGISTRY[name].devices == ("cpu",)
    assert files.for_device("int8", "cpu") == "int8"
    assert files.for_device("int8", "cuda") == files.PORTABLE
    assert files.for_device("torchscript", "cuda") == "torchscript"
    assert files.for_device("onnx", "mps") is None


class MeanColour(nn.Module):
    """uint8 RGB [B, 3, H, W] -> softmax over the channels' means: a model file that loads anywhere, in a blink."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(images.float().mean(dim=(2, 3)), dim=1)


@pytest.fixture
def cpu_only_dir(tmp_path):
    """An archive's model_dir whose shipped file runs on CPUs only (a TorchScript file that says it is int8)."""
    torch.jit.save(torch.jit.script(MeanColour()), str(tmp_path / files.VARIANTS["int8"]), _extra_files={
        runtime.KIND: runtime.INT8})  # fmt: skip
    (tmp_path / files.LABELS).write_text(json.dumps({"0": "a", "1": "b", "2": "c"}))
    return tmp_path


def test_a_cpu_only_variant_is_not_loaded_onto_a_gpu(cpu_only_dir):
    with pytest.raises(runtime.LoadError, match="int8 variant, which runs on cpu only"):
        runtime.load(cpu_only_dir / files.VARIANTS["int8"], CUDA)  # refused before any CUDA call


def test_a_worker_says_why_it_is_not_on_the_gpu_it_was_given(cpu_only_dir, settings):
    shipped = files.VARIANTS["int8"]
    assert pick(cpu_only_dir, shipped, "cpu") == (cpu_only_dir / shipped, torch.device("cpu"), "")
    path, device, why = pick(cpu_only_dir, shipped, CUDA)
    assert (path.name, device.type) == (shipped, "cpu")
    assert why.startswith(f"given {CUDA}") and why.endswith("serving on cpu")
    core = ImageClassifier.from_dir(cpu_only_dir, settings(device=CUDA), "m", "1", shipped)
    served = {"file": shipped, "variant": "int8", "device": "cpu", "precision": "int8", "decoder": "pillow on cpu"}
    assert core.served() == {**served, "note": why}


def test_a_torchserve_worker_given_a_gpu_id_logs_where_it_serves(cpu_only_dir, make_context, cfg, caplog):
    manifest = {"model": {"modelName": "m", "modelVersion": "1", "serializedFile": files.VARIANTS["int8"]}}
    context = make_context(cpu_only_dir, manifest, {"handler": OmegaConf.to_container(cfg.serve.handler)})
    context.system_properties["gpu_id"] = 0
    with caplog.at_level(logging.INFO, logger="handlers.handler"):
        Handler().initialize(context)
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving m 1")]
    assert line.startswith("serving m 1: model.int8.pt (int8) on cpu, int8 (given cuda:0, but ")
    assert line.endswith("serving on cpu)")


def test_given_a_gpu_a_worker_takes_the_portable_file_when_the_archive_has_it(cpu_only_dir):
    torch.jit.save(torch.jit.script(MeanColour()), str(cpu_only_dir / files.MODEL))
    path, device, why = pick(cpu_only_dir, files.VARIANTS["int8"], CUDA)
    if torch.cuda.is_available():
        assert (path.name, str(device), why) == (files.MODEL, CUDA, "")
    else:  # the choice of file is made; the device is not there, and the worker says so
        assert device.type == "cpu" and "no CUDA device" in why


def test_headers_are_checked_before_any_pixel_is_decoded():
    data = jpeg(blocks(0))
    truncated = data[: len(data) * 3 // 4]  # past the header, into the scan
    img = open_image(truncated, 10**6)  # the header is whole: accepted
    assert (img.format, img.size) == ("JPEG", (80, 64))
    with pytest.raises(InputError, match="corrupt or truncated JPEG"):
        pixels(img)
    with pytest.raises(InputError) as over:
        open_image(data, 79 * 64)
    assert over.value.status == 413


def test_which_images_nvjpeg_decodes():
    png = io.BytesIO()
    Image.fromarray(blocks(1)).save(png, "PNG")
    cmyk = io.BytesIO()
    Image.fromarray(blocks(1)).convert("CMYK").save(cmyk, "JPEG")
    cases = {
        "rgb jpeg": (jpeg(blocks(1)), True),
        "gray jpeg": (jpeg(blocks(1, channels=1)), True),
        "jpeg turned by EXIF": (rotated_jpeg(blocks(1)), False),
        "cmyk jpeg": (cmyk.getvalue(), False),
        "png": (png.getvalue(), False),
    }
    for name, (data, expected) in cases.items():
        assert nvjpeg_can(open_image(data, 10**6)) is expected, name


def batched(payloads: list[object], device: torch.device) -> list:
    """decode_batch's answer per request: the images on the CPU, or the InputError's status."""
    out = []
    for found in decode_batch(payloads, 10**6, device):
        out.append(found.status if isinstance(found, InputError) else ([img.cpu() for img in found[0]], found[1]))
    return out


def batch_decodes_like_pillow(device: torch.device, digit, tolerance: int) -> None:
    """Good images, the hostile corpus and a rotated JPEG in one batch: each request gets what it gets alone from
    Pillow (pixels within `tolerance`), a bad request fails alone."""
    good = [jpeg(blocks(s)) for s in range(3)] + [jpeg(blocks(3, channels=1)), rotated_jpeg(blocks(4))]
    listed = {"instances": [{"b64": base64.b64encode(g).decode()} for g in good]}
    cases = [(f"good {i}", g, 200) for i, g in enumerate(good)] + [("a list of them", listed, 200)]
    cases += client.hostile_corpus(digit, 10**6)
    payloads = [payload for _, payload, _ in cases]
    for (name, _, status), got, want in zip(cases, batched(payloads, device), batched(payloads, None), strict=True):
        if status != 200:
            assert got == want == status, name
            continue
        assert got[1] == want[1] and len(got[0]) == len(want[0]), name
        for a, b in zip(got[0], want[0], strict=True):
            assert a.shape == b.shape and a.dtype == torch.uint8, name
            assert (a.int() - b.int()).abs().max().item() <= tolerance, name
    assert decode_image(good[4], 10**6).shape == (3, 80, 64)  # turned by its EXIF tag, as Pillow does


def test_a_batch_of_jpegs_decodes_together_and_a_bad_one_fails_alone(digit):
    batch_decodes_like_pillow(torch.device("cpu"), digit, tolerance=0)  # torchvision's libjpeg: Pillow's pixels


def test_a_corrupt_jpeg_in_a_batch_fails_alone():
    good = [jpeg(blocks(s)) for s in range(3)]
    bad = good[1][: len(good[1]) * 3 // 4]
    found = decode_jpegs([good[0], bad, good[2]], torch.device("cpu"))
    assert isinstance(found[1], InputError) and "truncated" in str(found[1])
    assert torch.equal(found[0], decode_image(good[0], 10**6))
    assert torch.equal(found[2], decode_image(good[2], 10**6))


# -- on a CUDA GPU ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(("model", "channels"), [("cnn", 1), ("resnet18", 3)])
def test_a_file_exported_on_the_cpu_answers_on_the_gpu_as_on_the_cpu(new_classifier, model, channels, tmp_path):
    eager = inference_module(new_classifier(model, channels, augment=False, overrides=("model.input_size=64",)))
    images = torch.randint(0, 256, (8, 3, 96, 80), dtype=torch.uint8)
    build_torchscript(eager, images, tmp_path / files.MODEL)
    on_cpu = runtime.load(tmp_path / files.MODEL, "cpu")(images)
    on_gpu = runtime.load(tmp_path / files.MODEL, CUDA, at="fp32")(images)
    assert on_gpu.device.type == "cuda"
    assert (on_gpu.float().cpu() - on_cpu).abs().max().item() <= 1e-3  # TF32 convolutions on the GPU
    half = runtime.load(tmp_path / files.MODEL, CUDA)
    assert half.precision == "bf16"
    assert (half(images).float().cpu() - on_cpu).abs().max().item() <= 5e-2


@pytest.mark.gpu
def test_the_gpu_precision_keeps_the_trained_models_answers(model_file, eager, test_split):
    found = variants.check_gpu(model_file, files.PORTABLE, eager, *test_split)
    assert found["precision"] == "bf16" and found["checked_on"] == torch.cuda.get_device_name()
    assert found["agreement"] >= variants.GPU_AGREEMENT


@pytest.mark.gpu
def test_nvjpeg_decodes_as_pillow_within_jpeg_rounding(digit):
    batch_decodes_like_pillow(torch.device(CUDA), digit, tolerance=8)


@pytest.mark.gpu
def test_the_archive_served_on_a_gpu_answers_as_on_the_cpu(model_dir, settings, digit):
    on_cpu = ImageClassifier.from_dir(model_dir, settings())
    on_gpu = ImageClassifier.from_dir(model_dir, settings(device=CUDA))
    served = on_gpu.served()
    assert (served["device"], served["file"], served["decoder"]) == (CUDA, files.MODEL, f"nvjpeg on {CUDA}")
    rgb = np.asarray(digit.convert("RGB"))
    payloads = [jpeg(rgb), client.png(rgb.transpose(2, 0, 1))] * 4
    cpu_top = [r.body["label"] for r in on_cpu.handle(payloads)]
    assert [r.body["label"] for r in on_gpu.handle(payloads)] == cpu_top
    corpus = client.hostile_corpus(digit, on_gpu.settings.max_pixels)
    results = on_gpu.handle([payload for _, payload, _ in corpus])
    assert [(name, r.status) for (name, _, _), r in zip(corpus, results, strict=True)] == [
        (name, status) for name, _, status in corpus
    ]


@pytest.mark.server
def test_describe_says_where_each_worker_serves(server, post, cfg, digit):
    """The shared server's worker answers on the GPU where TorchServe gave it one, else on the CPU, and says which."""
    status, body = post(client.png(np.asarray(digit)[None]), "image/png")
    assert status == 200 and body["label"] in {str(i) for i in range(10)}
    served = server.describe(cfg.name)["served"]
    if torch.cuda.is_available():
        assert served["device"].startswith("cuda:") and served["file"] == files.MODEL
    else:
        assert served == {
            "file": files.VARIANTS[cfg.export.variant],
            "variant": cfg.export.variant,
            "device": "cpu",
            "precision": files.REGISTRY[cfg.export.variant].precision["cpu"],
            "decoder": "pillow on cpu",
        }


def test_the_gpu_benchmark_runs_its_layers(tmp_path):
    """bench/gpu.py on the CPU, tiny: the archive it builds serves the portable file, every layer measures and the
    report renders (on a GPU, `make bench` runs the same code at full size)."""
    from bench import gpu

    path, mar = gpu.build(tmp_path)
    model_dir = unpack(mar, tmp_path / "unpacked")
    manifest = json.loads((model_dir / files.MANIFEST).read_text())
    assert manifest["model"]["serializedFile"] == files.MODEL
    cpu = torch.device("cpu")
    payloads = gpu.jpegs(2)
    results = {
        "limits": gpu.limits(path, cpu, batch=2, seconds=0.05, compiled=False),
        "core": gpu.core(model_dir, cpu, batch=2, seconds=0.05, payloads=payloads),
        "served": [],
        "meta": {"date": "now", "minutes": 0.0, "gpu": "none", "cores": 2, "torch": torch.__version__, "batch": 2},
    }
    assert set(results["limits"]) == {"eager fp32", "served file, bf16"}
    assert set(results["core"]) == {"predict, host-decoded uint8", "run, JPEG, Pillow decode"}
    for row in (*results["limits"].values(), *results["core"].values()):
        assert row["images_per_s"] > 0 and row["calls"] >= 3
    assert "| run, JPEG, Pillow decode |" in gpu.report(results)
