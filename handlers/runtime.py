"""Load an exported model by what the file is: TorchScript (.pt), AOTInductor package (.pt2) or ONNX (.onnx).

Every variant maps uint8 RGB images [B, 3, H, W] to class probabilities [B, classes]; `load` returns it as a
callable with the device its inputs go to and the precision it runs at there. A variant runs only on the
devices it declares (handlers/files.py REGISTRY): asked for another, `load` refuses rather than quietly
running somewhere else.
"""

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from handlers.files import REGISTRY

KIND = "variant"  # a TorchScript file's extra file naming what kind it is
GPU_PRECISION = "gpu_precision"  # one saying the precision GPUs run it at, where the export refused the declared one
FROZEN = "torchscript-frozen"
INT8 = "int8"


class LoadError(RuntimeError):
    """The model file cannot be loaded by any runtime the handler knows, or not on the device asked for."""


@dataclass
class Model:
    forward: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    variant: str
    precision: str = "fp32"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device).contiguous()  # compiled code assumes dense strides
        if self.precision != "bf16":
            return self.forward(images)
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            return self.forward(images)


def extras(path: Path) -> dict[str, str]:
    """A TorchScript file's extra files (a zip: <name>/extra/<key>), read without loading the model."""
    if path.suffix != ".pt":
        return {}
    with zipfile.ZipFile(path) as z:
        return {n.rsplit("/", 1)[1]: z.read(n).decode() for n in z.namelist() if n.split("/")[-2:-1] == ["extra"]}


def variant(path: Path) -> str:
    """Which variant a model file is: a TorchScript file says so in an extra file, the others by their suffix."""
    if path.suffix == ".pt":
        return extras(path).get(KIND) or "torchscript"
    by_suffix = {".pt2": "aoti", ".onnx": "onnx"}
    if path.suffix not in by_suffix:
        raise LoadError(f"{path.name}: no runtime for '{path.suffix}' files (known: .pt, .pt2, .onnx)")
    return by_suffix[path.suffix]


def precision(path: Path, device_type: str) -> str:
    """The precision the file runs at on a device type: its variant's, or on GPUs what its export allowed."""
    declared = REGISTRY[variant(path)].precision[device_type]
    return extras(path).get(GPU_PRECISION, declared) if device_type == "cuda" else declared


def load(path: Path | str, device: str | torch.device = "cpu", at: str | None = None) -> Model:
    """The model in `path` on `device`, at the precision it runs at there (`precision`), or `at`."""
    path, device = Path(path), torch.device(device)
    name = variant(path)
    declared = REGISTRY[name].precision
    if device.type not in declared:
        raise LoadError(f"{path.name} is the {name} variant, which runs on {', '.join(declared)} only, not {device}")
    at = at or precision(path, device.type)
    if path.suffix == ".pt":
        model = torch.jit.load(str(path), map_location=device).eval()
        if name == FROZEN:  # oneDNN weight layouts, made at load
            model = torch.jit.optimize_for_inference(model)
        elif device.type == "cuda":  # convolutions in NHWC: what tensor cores want
            model = model.to(memory_format=torch.channels_last)
        return Model(model, device, name, at)
    if path.suffix == ".pt2":
        from torch._inductor import aoti_load_package

        return Model(aoti_load_package(str(path)), device, name, at)
    return onnx(path)


def onnx(path: Path) -> Model:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the worker's thread budget, as torch has it
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def forward(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: images.numpy()})[0])

    return Model(forward, torch.device("cpu"), "onnx")
