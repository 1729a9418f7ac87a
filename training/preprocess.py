"""The one preprocessing function: training, export and (through the exported graph) serving use it.

Kornia's functional resize and colour ops and plain tensor arithmetic, so `torch.jit.trace` records them into
the TorchScript graph. Constants live in buffers and nothing moves a tensor to a device, so the traced file holds
no device and runs on whichever one it is loaded to (training/variants.py refuses a graph that holds one).
"""

import torch
from kornia.color import grayscale_to_rgb
from kornia.geometry.transform import resize
from torch import Tensor, nn

# ITU-R BT.601 luma, the weights PIL's convert("L") uses.
RGB_TO_GRAY = (0.299, 0.587, 0.114)


def gray(x: Tensor, rgb_weights: Tensor) -> Tensor:
    """kornia.color.rgb_to_grayscale's arithmetic without its .to(x.device) of the weights, which a trace records."""
    r, g, b = x.unbind(dim=1)
    w_r, w_g, w_b = rgb_weights.unbind()
    return torch.addcmul(torch.addcmul(r * w_r, g, w_g), b, w_b).unsqueeze(1)


def resize_to(x: Tensor, size: int, channels: int, rgb_weights: Tensor) -> Tensor:
    """float images [B, 1|3, H, W] in [0, 1] -> [B, channels, size, size].

    "area" resizing averages pixels when shrinking (no aliasing from large uploads) and
    traces without shape-dependent constants, so one graph serves any input size.
    """
    x = resize(x, (size, size), interpolation="area")
    if x.shape[1] == 3 and channels == 1:
        x = gray(x, rgb_weights)
    elif x.shape[1] == 1 and channels == 3:
        x = grayscale_to_rgb(x)
    return x


def preprocess(images: Tensor, size: int, mean: Tensor, std: Tensor, rgb_weights: Tensor) -> Tensor:
    """uint8 (or float in [0, 1]) images [B, 1|3, H, W] -> normalised float [B, len(mean), size, size]."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images
    x = resize_to(x, size, mean.shape[0], rgb_weights)
    # kornia.enhance.normalize would move mean/std with .to(x.device): a trace records that device in the graph
    return (x - mean[:, None, None]) / std[:, None, None]


def canonical(images: Tensor, size: int, channels: int) -> Tensor:
    """uint8 images [B, 1|3, H, W] -> uint8 [B, channels, size, size] by the graph's own resize and conversion.

    Datasets store images in this form; the graph maps it to what it maps the original to, up to rounding.
    """
    x = resize_to(images.float() / 255, size, channels, torch.tensor(RGB_TO_GRAY))
    return (x * 255).round().clamp(0, 255).to(torch.uint8)


class Preprocess(nn.Module):
    """`preprocess` with the training statistics as buffers (they follow `.to(device)`)."""

    def __init__(self, size: int, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
        self.register_buffer("rgb_weights", torch.tensor(RGB_TO_GRAY, dtype=torch.float32))

    def forward(self, images: Tensor) -> Tensor:
        return preprocess(images, self.size, self.mean, self.std, self.rgb_weights)
