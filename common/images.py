"""uint8 image arrays [C, H, W] as Pillow images and encoded files: one conversion for the data stage, the
load generators and the tests."""

import io

import numpy as np
from PIL import Image


def to_pil(image) -> Image.Image:
    """uint8 [C, H, W] (numpy or torch) -> Pillow image (L for one channel, else RGB)."""
    array = np.asarray(image)
    return Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))


def encode(image, fmt: str = "PNG", **save) -> bytes:
    """uint8 [C, H, W] -> the bytes of an image file (PNG: lossless); `save`: Pillow's options for `fmt`."""
    buffer = io.BytesIO()
    to_pil(image).save(buffer, format=fmt, **save)
    return buffer.getvalue()
