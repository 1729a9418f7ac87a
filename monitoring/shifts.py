"""Realistic input shifts, applied to images in the serving input form: uint8 RGB [N, 3, H, W].

Each operator takes the images, its parameter (one severity) and a seeded generator, and returns
images of the same shape and dtype. Intensities are shifted in [0, 1] (Kornia), then rounded back.
"""

import io
import math
from collections.abc import Callable
from typing import NamedTuple

import kornia
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from common.cli import BundleError


class ShiftError(BundleError):
    """An unknown shift, a parameter out of its range, or images not in the serving form."""


def to_float(images: Tensor) -> Tensor:
    return images.float() / 255


def to_uint8(images: Tensor) -> Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def blur(x: Tensor, sigma: float, _: torch.Generator) -> Tensor:
    """Gaussian blur; the kernel covers +-3 sigma, capped so that reflect padding fits the image."""
    size = 2 * math.ceil(3 * sigma) + 1
    size = min(size, 2 * min(x.shape[-2:]) - 1)
    sigmas = torch.tensor([[sigma, sigma]]).expand(len(x), 2)
    return kornia.filters.gaussian_blur2d(x, (size, size), sigmas)


def noise(x: Tensor, std: float, generator: torch.Generator) -> Tensor:
    return x + std * torch.randn(x.shape, generator=generator)


def rotation(x: Tensor, degrees: float, _: torch.Generator) -> Tensor:
    return kornia.geometry.transform.rotate(x, torch.full((len(x),), float(degrees)))


def scale(x: Tensor, factor: float, _: torch.Generator) -> Tensor:
    return kornia.geometry.transform.scale(x, torch.full((len(x), 2), float(factor)))


def translate(x: Tensor, share: float, _: torch.Generator) -> Tensor:
    offset = torch.tensor([[share * x.shape[-1], share * x.shape[-2]]])
    return kornia.geometry.transform.translate(x, offset.expand(len(x), 2))


def jpeg(images: Tensor, quality: float, _: torch.Generator) -> Tensor:
    """A real JPEG round trip through Pillow, as a client's camera or upload form would do."""
    out = []
    for image in images:
        buf = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=int(quality))
        decoded = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        out.append(torch.from_numpy(np.asarray(decoded).copy()))
    return torch.stack(out).permute(0, 3, 1, 2).contiguous()


def inversion(images: Tensor, share: float, generator: torch.Generator) -> Tensor:
    """A seeded subset inverted (dark ink on light); a larger share contains the smaller one."""
    chosen = torch.randperm(len(images), generator=generator)[: round(share * len(images))]
    out = images.clone()
    out[chosen] = 255 - out[chosen]
    return out


class Operator(NamedTuple):
    apply: Callable[[Tensor, float, torch.Generator], Tensor]
    accepts: Callable[[float], bool]
    accepted: str  # the accepted parameters, in words
    on_uint8: bool = False  # works on the uint8 images themselves, not on intensities in [0, 1]


OPERATORS = {  # configs/monitoring.yaml, `robustness.shifts`, says what each parameter means
    "brightness": Operator(
        lambda x, p, _: kornia.enhance.adjust_brightness(x, p), lambda p: -1 <= p <= 1, "in [-1, 1]"
    ),
    "contrast": Operator(lambda x, p, _: kornia.enhance.adjust_contrast(x, p), lambda p: 0 <= p < math.inf, ">= 0"),
    "blur": Operator(blur, lambda p: 0 < p < math.inf, "a sigma > 0"),
    "noise": Operator(noise, lambda p: 0 <= p < math.inf, "a std >= 0"),
    "rotation": Operator(rotation, math.isfinite, "finite degrees"),
    "scale": Operator(scale, lambda p: 0 < p < math.inf, "a factor > 0"),
    "translate": Operator(translate, lambda p: -1 <= p <= 1, "a share of the size in [-1, 1]"),
    "jpeg": Operator(jpeg, lambda p: 0 <= p <= 100 and p == int(p), "a quality, an integer in [0, 100]", True),
    "inversion": Operator(inversion, lambda p: 0 <= p <= 1, "a share of the images in [0, 1]", True),
}
SHIFTS = tuple(OPERATORS)


def check(name: str, param: object) -> float:
    """The parameter as a float; ShiftError for an unknown shift or a parameter it does not accept."""
    if name not in OPERATORS:
        raise ShiftError(f"unknown shift {name!r}: use {', '.join(SHIFTS)}")
    try:
        value = float(param)
    except (TypeError, ValueError):
        value = math.nan
    if not OPERATORS[name].accepts(value):
        raise ShiftError(f"{name}: parameter {param!r} out of range, expected {OPERATORS[name].accepted}")
    return value


def check_images(images: object) -> Tensor:
    if not isinstance(images, Tensor):
        raise ShiftError(f"images must be a torch.Tensor, not {type(images).__name__}")
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3 or 0 in images.shape:
        raise ShiftError(
            f"images must be uint8 RGB [N, 3, H, W] (the serving form), not {images.dtype} {list(images.shape)}"
        )
    return images


def shift(images: Tensor, name: str, param: float, generator: torch.Generator) -> Tensor:
    """uint8 RGB [N, 3, H, W] -> the same images under shift `name` with parameter `param`."""
    value, op = check(name, param), OPERATORS[name]
    images = check_images(images)
    if op.on_uint8:
        return op.apply(images, value, generator)
    return to_uint8(op.apply(to_float(images), value, generator))
