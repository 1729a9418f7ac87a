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


def variant(path: Path) -> str:
    """Which variant a model file is: a TorchScript file says so in an extra file, the others by their suffix."""
    if path.suffix == ".pt":  # a zip: <name>/extra/<KIND> holds the kind, read without loading the model
        with zipfile.ZipFile(path) as z:
            kinds = [z.read(n).decode() for n in z.namelist() if n.endswith(f"/extra/{KIND}")]
        return kinds[0] if kinds else "torchscript"
    by_suffix = {".pt2": "aoti", ".onnx": "onnx"}
    if path.suffix not in by_suffix:
        raise LoadError(f"{path.name}: no runtime for '{path.suffix}' files (known: .pt, .pt2, .onnx)")
    return by_suffix[path.suffix]


def load(path: Path | str, device: str | torch.device = "cpu", precision: str | None = None) -> Model:
    """The model in `path` on `device`, at the precision its variant declares there (or `precision`)."""
    path, device = Path(path), torch.device(device)
    name = variant(path)
    declared = REGISTRY[name].precision
    if device.type not in declared:
        raise LoadError(f"{path.name} is the {name} variant, which runs on {', '.join(declared)} only, not {device}")
    precision = precision or declared[device.type]
    if path.suffix == ".pt":
        model = torch.jit.load(str(path), map_location=device).eval()
        if name == FROZEN:  # oneDNN weight layouts, made at load
            model = torch.jit.optimize_for_inference(model)
        elif device.type == "cuda":  # convolutions in NHWC: what tensor cores want
            model = model.to(memory_format=torch.channels_last)
        return Model(model, device, name, precision)
    if path.suffix == ".pt2":
        from torch._inductor import aoti_load_package

        return Model(aoti_load_package(str(path)), device, name, precision)
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
