"""Export variants of one trained model, each checked against the eager model before it is written.

Every variant holds the whole inference graph (Kornia preprocessing + backbone + softmax) and takes
uint8 RGB images [B, 3, H, W] of any batch size and image size; handlers/files.py names their files and
handlers/runtime.py loads them. A variant is written only after the file itself, loaded back, passes:
- fp32 variants: within FP32_TOLERANCE of eager and the same argmax, at several batch and image sizes;
- int8: top-1 agreement with eager >= INT8_AGREEMENT and test accuracy within INT8_ACCURACY_DROP of eager's;
- a variant that declares a GPU (handlers/files.py REGISTRY): no device in its graph, and at its GPU precision top-1
  agreement >= GPU_AGREEMENT and accuracy within GPU_ACCURACY_DROP, on a GPU where one exists, else on the CPU at the
  same precision (the check says which).
"""

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from common.cli import BundleError
from common.io import atomic_path
from handlers import files, runtime

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-4
INT8_AGREEMENT = 0.99
INT8_ACCURACY_DROP = 0.005  # half a point of test accuracy
GPU_AGREEMENT = 0.995
GPU_ACCURACY_DROP = 0.003  # 0.3 points of test accuracy
BATCH_SIZES = (1, 7, 32)
CALIBRATION_IMAGES = 256  # training images the int8 observers see
MAX_SIDE = 4096  # the largest image side the compiled variants accept (the handler caps pixels before this)


class VariantError(BundleError):
    """A variant does not reproduce the eager model within its limits: it is refused, not written."""


@dataclass
class Check:
    """How a written variant compares with the eager model."""

    max_abs_diff: float = 0.0
    agreement: float = 1.0  # top-1 agreement with eager on the test images
    accuracy: float | None = None  # test accuracy of the variant
    eager_accuracy: float | None = None
    shapes: list[tuple] = field(default_factory=list)
    gpu: dict | None = None  # the GPU precision's parity, and where it was checked


def as_rgb(images: Tensor) -> Tensor:
    """The handler always hands the graph 3-channel RGB; gray images become three equal channels."""
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


def upscaled(images: Tensor, factor: int) -> Tensor:
    return images.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def example(images: Tensor) -> Tensor:
    """What exporters trace with: 2 images at a size the model does not use, so no size shortcut is baked in."""
    return upscaled(as_rgb(images[:2]), 3)


def cases(images: Tensor) -> list[Tensor]:
    """Batch sizes 1, 7 and 32 at the stored size, an odd-sized larger upload, and a batch of 2 at 3x."""
    rgb = as_rgb(images)
    odd = upscaled(rgb[:7], 4)[:, :, 1:, 3:]  # sizes that divide by nothing the model uses
    return [*(rgb[:n] for n in BATCH_SIZES), odd, example(images)]


# -- builders: eager module + example images -> a file at `path` -----------------------------------------------


def trace(module: nn.Module, images: Tensor) -> torch.jit.ScriptModule:
    with torch.no_grad():
        return torch.jit.trace(module, example(images))


def device_bound(scripted: torch.jit.ScriptModule) -> list[str]:
    """What in the graph is tied to the device the trace ran on: device constants (a `.to(device)` the trace saw)
    and non-scalar tensor constants. 0-dim constants (the 255 in x / 255) are fine: PyTorch mixes CPU scalars with
    any device."""
    found = []
    for node in scripted.inlined_graph.nodes():
        if node.kind() != "prim::Constant" or node.outputsSize() != 1:
            continue
        kind = node.output().type().kind()
        if kind == "DeviceObjType" or (kind == "TensorType" and node.t("value").dim() > 0):
            found.append(str(node).strip())
    return found


def build_torchscript(eager: nn.Module, images: Tensor, path: Path) -> None:
    scripted = trace(eager, images)
    if found := device_bound(scripted):
        raise VariantError(f"graph is bound to the device it was traced on: {found[:3]}")
    torch.jit.save(scripted, str(path))


def build_frozen(eager: nn.Module, images: Tensor, path: Path) -> None:
    """Weights folded in as constants and BatchNorm into the convolutions; the file says it is frozen, so the
    runtime lays the weights out for oneDNN at load (those layouts cannot be saved)."""
    frozen = torch.jit.freeze(trace(eager, images).eval())
    torch.jit.save(frozen, str(path), _extra_files={runtime.KIND: runtime.FROZEN})


def dynamic_shapes() -> dict:
    """Any batch size and image size: clients send what they have."""
    side = {"min": 8, "max": MAX_SIDE}
    dims = torch.export.Dim("batch", min=1, max=1024), torch.export.Dim("h", **side), torch.export.Dim("w", **side)
    return {"input": {0: dims[0], 2: dims[1], 3: dims[2]}}


@contextlib.contextmanager
def inductor_for_any_size() -> Iterator[None]:
    """Compile with freezing (constant weights: what int8 fusion needs), adaptive average pooling left to ATen.

    Kornia's "area" resize is adaptive average pooling. Inductor's decomposition and lowering of it fix
    the image size the graph was compiled at, and AOTInductor does not check that at run time: every
    other size got wrong answers (errors up to 1.0 in probability, torch 2.14). ATen's kernel takes any size.
    """
    from torch._inductor import config, decomposition, lowering

    pool = torch.ops.aten._adaptive_avg_pool2d
    ops = (pool, pool.default)
    lowered = {op: lowering.lowerings.get(op) for op in ops}
    decomposed = {op: decomposition.decompositions.pop(op) for op in ops if op in decomposition.decompositions}
    try:
        for op in ops:
            lowering.lowerings[op] = lowering.fallback_adaptive_avg_pool2d
        with config.patch(freezing=True), torch.no_grad():
            yield
    finally:
        decomposition.decompositions.update(decomposed)
        for op, lower in lowered.items():
            if lower is None:
                lowering.lowerings.pop(op, None)
            else:
                lowering.lowerings[op] = lower


def build_aoti(eager: nn.Module, images: Tensor, path: Path) -> None:
    """torch.export with dynamic batch and image size, AOTInductor-compiled into a .pt2 package."""
    from torch._inductor import aoti_compile_and_package

    with inductor_for_any_size():
        program = torch.export.export(eager, (example(images),), dynamic_shapes=dynamic_shapes())
        aoti_compile_and_package(program, package_path=str(path))


def build_int8(eager: nn.Module, images: Tensor, path: Path, calibration: Tensor) -> None:
    """Static post-training int8 of the backbone (FX graph mode, x86 backend: int8 convolutions and linears on
    VNNI), observers calibrated on training images; preprocessing and softmax stay float. Traced and frozen
    to TorchScript, so it takes any batch and image size. (torchao's PT2E flow compiled by AOTInductor with a
    dynamic batch size answered wrongly on torch 2.14: 9 % agreement with eager on the digits.)"""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    preprocess, backbone, softmax = eager
    with torch.no_grad():
        calibrating = prepare_fx(
            copy.deepcopy(backbone).eval(), get_default_qconfig_mapping("x86"), (preprocess(images[:2]),)
        )
        for batch in as_rgb(calibration).split(32):
            calibrating(preprocess(batch))
        quantized = nn.Sequential(preprocess, convert_fx(calibrating), softmax).eval()
    frozen = torch.jit.freeze(trace(quantized, images))
    torch.jit.save(frozen, str(path), _extra_files={runtime.KIND: runtime.INT8})


def build_onnx(eager: nn.Module, images: Tensor, path: Path) -> None:
    with torch.no_grad():
        program = torch.onnx.export(
            eager, (example(images),), dynamo=True, dynamic_shapes=dynamic_shapes(), verbose=False
        )
    program.save(str(path))


# -- checks ------------------------------------------------------------------------------------------------------


def run(model: Callable[[Tensor], Tensor], images: Tensor, batch: int = 256) -> Tensor:
    with torch.inference_mode():
        return torch.cat([model(chunk) for chunk in images.split(batch)])


def check_fp32(model: Callable[[Tensor], Tensor], eager: nn.Module, images: Tensor) -> Check:
    check = Check()
    for batch in cases(images):
        got, want = run(model, batch), run(eager, batch)
        diff = (got - want).abs().max().item()
        if diff > FP32_TOLERANCE or not torch.equal(got.argmax(1), want.argmax(1)):
            raise VariantError(
                f"differs from eager on input {tuple(batch.shape)}: max abs diff {diff:.1e} "
                f"(limit {FP32_TOLERANCE:.0e}) or a different argmax"
            )
        check.max_abs_diff = max(check.max_abs_diff, diff)
        check.shapes.append(tuple(batch.shape))
    return check


def compare(model: Callable[[Tensor], Tensor], eager: nn.Module, images: Tensor, labels: Tensor) -> Check:
    """Accuracy on the test images; top-1 agreement with eager on them and on every shape of `cases`."""
    rgb = as_rgb(images)
    got, want = run(model, rgb).float().cpu(), run(eager, rgb)
    accuracy = (got.argmax(1) == labels).float().mean().item()
    eager_accuracy = (want.argmax(1) == labels).float().mean().item()
    same = [got.argmax(1) == want.argmax(1)]
    for batch in cases(images):
        same.append(run(model, batch).cpu().argmax(1) == run(eager, batch).argmax(1))
    agreement = torch.cat(same).float().mean().item()
    return Check((got - want).abs().max().item(), agreement, accuracy, eager_accuracy, [tuple(rgb.shape)])


def check_int8(model: Callable[[Tensor], Tensor], eager: nn.Module, images: Tensor, labels: Tensor) -> Check:
    check = compare(model, eager, images, labels)
    if check.agreement < INT8_AGREEMENT or check.accuracy < check.eager_accuracy - INT8_ACCURACY_DROP:
        raise VariantError(
            f"int8 top-1 agreement with eager {check.agreement:.2%} (limit {INT8_AGREEMENT:.0%}), test accuracy "
            f"{check.accuracy:.2%} vs eager {check.eager_accuracy:.2%} (limit {INT8_ACCURACY_DROP:.1%} lower)"
        )
    return check


def check_gpu(path: Path, name: str, eager: nn.Module, images: Tensor, labels: Tensor) -> dict:
    """The variant at its GPU precision against eager fp32: on a GPU where this machine has one, else on the CPU
    at that precision (bf16 kernels differ between the two, so a GPU check is the stronger one)."""
    precision = files.REGISTRY[name].precision["cuda"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check = compare(runtime.load(path, device, precision), eager, images, labels)
    if check.agreement < GPU_AGREEMENT or check.accuracy < check.eager_accuracy - GPU_ACCURACY_DROP:
        raise VariantError(
            f"{precision} on {device}: top-1 agreement with eager fp32 {check.agreement:.2%} (limit "
            f"{GPU_AGREEMENT:.1%}), test accuracy {check.accuracy:.2%} vs eager {check.eager_accuracy:.2%} "
            f"(limit {GPU_ACCURACY_DROP:.1%} lower)"
        )
    where = torch.cuda.get_device_name() if device == "cuda" else "cpu (no GPU where it was exported)"
    return {"precision": precision, "checked_on": where, "agreement": check.agreement, "accuracy": check.accuracy}


def gpu_precision(path: Path, name: str, eager: nn.Module, images: Tensor, labels: Tensor) -> dict:
    """check_gpu; where it refuses the lower precision, the file is saved again saying that GPUs run it in fp32
    (the fp32 check already passed), and the refusal is kept with its numbers."""
    try:
        return check_gpu(path, name, eager, images, labels)
    except VariantError as err:
        torch.jit.save(torch.jit.load(str(path)), str(path), _extra_files={runtime.GPU_PRECISION: "fp32"})
        return {"precision": "fp32", "refused": f"{files.REGISTRY[name].precision['cuda']} refused: {err}"}


# -- the variants ------------------------------------------------------------------------------------------------

BUILDERS = {
    "torchscript": build_torchscript,
    "torchscript-frozen": build_frozen,
    "aoti": build_aoti,
    "int8": build_int8,
    "onnx": build_onnx,
}


def export(
    name: str, eager: nn.Module, test: tuple[Tensor, Tensor], folder: Path, calibration: Tensor | None = None
) -> tuple[Path, Check]:
    """Build variant `name` into `folder`, load the file back, check it; write it only if it passes."""
    if name not in BUILDERS:
        raise VariantError(f"unknown export variant {name!r}: one of {', '.join(BUILDERS)}")
    images, labels = test
    if len(images) < max(BATCH_SIZES):
        images = images.repeat((max(BATCH_SIZES) + len(images) - 1) // len(images), 1, 1, 1)
        labels = labels.repeat((max(BATCH_SIZES) + len(labels) - 1) // len(labels))
    eager = eager.eval()
    target = folder / files.VARIANTS[name]
    with atomic_path(target) as tmp:
        try:
            quantizing = {"calibration": images if calibration is None else calibration} if name == "int8" else {}
            BUILDERS[name](eager, images, tmp, **quantizing)
            model = runtime.load(tmp)
            check = check_int8(model, eager, images, labels) if name == "int8" else check_fp32(model, eager, images)
            if "cuda" in files.REGISTRY[name].precision:
                check.gpu = gpu_precision(tmp, name, eager, images, labels)
        except VariantError as err:
            raise VariantError(f"variant {name} refused: {err}") from err
        except Exception as err:  # an exporter that cannot handle the graph: say which and why, in one line
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise VariantError(f"variant {name} failed: {type(err).__name__}: {first[:300]}") from err
    log.info("wrote %s (%s; max abs diff vs eager %.1e)", target, name, check.max_abs_diff)
    if check.gpu and "refused" in check.gpu:
        log.warning("%s for GPUs: %s; GPUs run it in fp32", name, check.gpu["refused"])
    elif check.gpu:
        log.info("%s for GPUs: %s, top-1 agreement %.2f%%, checked on %s", name, check.gpu["precision"],
                 100 * check.gpu["agreement"], check.gpu["checked_on"])  # fmt: skip
    return target, check
