"""Load an exported model by what the file is: TorchScript (.pt), AOTInductor package (.pt2) or ONNX (.onnx).

Every variant maps uint8 RGB images [B, 3, H, W] to class probabilities [B, classes]; `load` returns it
as a callable with the device its inputs go to. The compiled variants (.pt2, frozen .pt) are built for the CPU.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

KIND = "variant"  # a TorchScript file's extra file naming what kind it is
FROZEN = "torchscript-frozen"


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
        kind = {KIND: ""}
        model = torch.jit.load(str(path), map_location=device, _extra_files=kind).eval()
        if kind[KIND] in (FROZEN, FROZEN.encode()) and device.type == "cpu":  # oneDNN weight layouts, made at load
            return Model(torch.jit.optimize_for_inference(model), device, "torchscript-frozen")
        return Model(model, device, "torchscript")
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
