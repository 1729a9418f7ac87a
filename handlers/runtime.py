"""Load an exported model by what the file is: TorchScript (.pt), AOTInductor package (.pt2) or ONNX (.onnx).

Every variant maps uint8 RGB images [B, 3, H, W] to class probabilities [B, classes]; `load` returns it
as a callable with the device its inputs go to. All but the plain TorchScript file run on the CPU.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

KIND = "variant"  # a TorchScript file's extra file naming what kind it is
FROZEN = "torchscript-frozen"
INT8 = "int8"


class LoadError(RuntimeError):
    """The model file cannot be loaded by any runtime the handler knows."""


@dataclass
class Model:
    forward: Callable[[torch.Tensor], torch.Tensor]
    device: torch.device
    runtime: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images.to(self.device).contiguous())  # compiled code assumes dense strides


def load(path: Path | str, device: str | torch.device = "cpu") -> Model:
    path, device = Path(path), torch.device(device)
    if path.suffix == ".pt":
        extra = {KIND: ""}
        model = torch.jit.load(str(path), map_location="cpu", _extra_files=extra).eval()
        kind = extra[KIND].decode() if isinstance(extra[KIND], bytes) else extra[KIND]
        if kind == FROZEN:  # oneDNN weight layouts, made at load
            return Model(torch.jit.optimize_for_inference(model), torch.device("cpu"), kind)
        if kind == INT8:  # quantized kernels run on the CPU
            return Model(model, torch.device("cpu"), kind)
        return Model(model.to(device), device, "torchscript")
    if path.suffix == ".pt2":
        from torch._inductor import aoti_load_package

        return Model(aoti_load_package(str(path)), torch.device("cpu"), "aotinductor")
    if path.suffix == ".onnx":
        return onnx(path)
    raise LoadError(f"{path.name}: no runtime for '{path.suffix}' files (known: .pt, .pt2, .onnx)")


def onnx(path: Path) -> Model:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the worker's thread budget, as torch has it
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def forward(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: images.numpy()})[0])

    return Model(forward, torch.device("cpu"), "onnxruntime")
