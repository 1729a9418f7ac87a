"""Request payloads -> images: the first stage of serving, and the one decoder every tool uses.

Accepted: raw image bytes, or JSON (parsed by TorchServe, or still bytes from a multipart field)
{"data": "<base64>"} or {"instances": [{"b64": "<base64>"}, ...]}. Images become uint8 RGB
tensors [3, H, W]; the pixel count is checked before any pixel is decoded.
"""

import base64
import binascii
import io
import json

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP")
ORIENTATION = 0x0112  # the EXIF tag exif_transpose acts on


def suffixes() -> set[str]:
    """File name endings of the accepted formats (".png", ".jpg", ".jpeg", ...), as Pillow registers them."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in FORMATS}


class InputError(ValueError):
    """A request the model cannot answer; `status` is the HTTP code to send back."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, max_pixels: int) -> torch.Tensor:
    """Image bytes -> uint8 RGB tensor [3, H, W], EXIF orientation applied."""
    if not data:
        raise InputError("empty body: send an image")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputError(f"not an image, or not one of {sorted(FORMATS)}", 415) from None
    except Image.DecompressionBombError as err:
        raise InputError(f"image over the pixel limit: {err}", 413) from None
    except Exception as err:  # a malformed header can raise anything inside PIL's parsers
        raise InputError(f"cannot read the image header: {err}") from None
    if img.format not in FORMATS:
        raise InputError(f"unsupported image format {img.format}: send one of {sorted(FORMATS)}", 415)
    width, height = img.size
    if width * height > max_pixels:
        raise InputError(f"image is {width}x{height} pixels, over the limit of {max_pixels}", 413)
    try:
        if img.getexif().get(ORIENTATION, 1) != 1:  # most images have no orientation tag: no transposed copy
            img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I"):  # 16-bit gray: keep the high byte; PIL's convert would clip at 255
            img = Image.fromarray((np.asarray(img, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8))
        rgb = img.convert("RGB")  # also decodes the first frame of an animation
        pixels = bytearray(rgb.tobytes())  # one copy, writable: no NumPy round trip
    except Image.DecompressionBombError as err:
        raise InputError(f"image over the pixel limit: {err}", 413) from None
    except Exception as err:  # truncated or corrupt data: OSError, ValueError, SyntaxError, ...
        raise InputError(f"corrupt or truncated {img.format} image: {err}") from None
    return torch.frombuffer(pixels, dtype=torch.uint8).view(rgb.height, rgb.width, 3).permute(2, 0, 1)


def images_in(payload: object) -> tuple[list[bytes], bool]:
    """The encoded images in one request, and whether it asked for a list of predictions."""
    if isinstance(payload, (bytes, bytearray)):
        if payload[:1] in (b"{", b"["):
            try:
                payload = json.loads(payload)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise InputError("body starts like JSON but is not valid JSON") from None
        else:
            return [bytes(payload)], False
    if isinstance(payload, str):
        return [b64(payload)], False
    if isinstance(payload, dict):
        if "instances" in payload:
            instances = payload["instances"]
            if not isinstance(instances, list) or not instances:
                raise InputError('"instances" must be a non-empty list of {"b64": "..."}')
            return [b64(i.get("b64") if isinstance(i, dict) else i) for i in instances], True
        if "data" in payload:
            return [b64(payload["data"])], False
    raise InputError('JSON body must be {"data": "<base64>"} or {"instances": [{"b64": "<base64>"}, ...]}')


def b64(value: object) -> bytes:
    """Standard base64; line breaks and a data-URI prefix ("data:image/png;base64,") are accepted."""
    if not isinstance(value, str):
        raise InputError("expected a base64 string")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError("invalid base64") from None


def decode_request(payload: object, max_pixels: int) -> tuple[list[torch.Tensor], bool]:
    """One request -> its decoded images and whether it asked for a list; InputError when it is bad."""
    blobs, many = images_in(payload)
    return [decode_image(blob, max_pixels) for blob in blobs], many
