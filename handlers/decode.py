"""Request payloads -> images: the first stage of serving, and the one decoder every tool uses.

Accepted: raw image bytes, or JSON (parsed by TorchServe, or still bytes from a multipart field)
{"data": "<base64>"} or {"instances": [{"b64": "<base64>"}, ...]} ({"data": ...} instances too, as KServe's
TorchServe examples send), or `Pixels` a caller decoded already. Images become uint8 RGB tensors [3, H, W].
Every file's header (format, pixel count, EXIF orientation) is checked on the CPU before any pixel is decoded;
then Pillow decodes on the CPU, or, for a worker on a GPU, nvJPEG decodes its JPEGs there.
"""

import base64
import binascii
import io
import json
import warnings
from dataclasses import dataclass

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


@dataclass
class Pixels:
    """Images that arrive as pixels, not files (a protocol's UINT8 tensor): uint8 RGB tensors [3, H, W]."""

    images: list[torch.Tensor]

    def checked(self, max_pixels: int) -> list[torch.Tensor]:
        for img in self.images:
            height, width = img.shape[-2:]
            if height * width > max_pixels:
                raise InputError(f"image is {width}x{height} pixels, over the limit of {max_pixels}", 413)
        return self.images


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The header checks, before any pixel is decoded: an image, of an accepted format, within the pixel limit."""
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
    return img


def rotated(img: Image.Image) -> bool:
    """Whether the EXIF orientation asks for a turn or a flip (most images have no orientation tag)."""
    try:
        return img.getexif().get(ORIENTATION, 1) != 1
    except Exception as err:  # a corrupt EXIF block
        raise InputError(f"corrupt {img.format} metadata: {err}") from None


def pixels(img: Image.Image) -> torch.Tensor:
    """An opened image -> uint8 RGB tensor [3, H, W], EXIF orientation applied, decoded by Pillow on the CPU."""
    try:
        if rotated(img):  # no transposed copy for the usual image
            img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I"):  # 16-bit gray: keep the high byte; PIL's convert would clip at 255
            img = Image.fromarray((np.asarray(img, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8))
        rgb = img.convert("RGB")  # also decodes the first frame of an animation
        pixels = bytearray(rgb.tobytes())  # one copy, writable: no NumPy round trip
    except InputError:
        raise
    except Image.DecompressionBombError as err:
        raise InputError(f"image over the pixel limit: {err}", 413) from None
    except Exception as err:  # truncated or corrupt data: OSError, ValueError, SyntaxError, ...
        raise InputError(f"corrupt or truncated {img.format} image: {err}") from None
    return torch.frombuffer(pixels, dtype=torch.uint8).view(rgb.height, rgb.width, 3).permute(2, 0, 1)


def decode_image(data: bytes, max_pixels: int) -> torch.Tensor:
    """Image bytes -> uint8 RGB tensor [3, H, W], EXIF orientation applied."""
    return pixels(open_image(data, max_pixels))


def nvjpeg_can(img: Image.Image) -> bool:
    """Whether nvJPEG gives what `pixels` gives: a JPEG in RGB or gray, not to be turned (nvJPEG ignores EXIF)."""
    return img.format == "JPEG" and img.mode in ("RGB", "L") and not rotated(img)


def decode_jpegs(blobs: list[bytes], device: torch.device) -> list[torch.Tensor | InputError]:
    """JPEG files -> uint8 RGB tensors [3, H, W] on `device`, decoded as one batch (nvJPEG on a GPU). The batch
    call answers all or nothing, so when it fails each file is decoded alone and a corrupt one fails alone."""
    if not blobs:  # a batch without plain JPEGs (PNGs, pixels): decode_jpeg refuses an empty list
        return []
    from torchvision.io import ImageReadMode, decode_jpeg  # deprecated in torchvision 0.29 for TorchCodec

    data = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            pass
        found: list[torch.Tensor | InputError] = []
        for one in data:
            try:
                found.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as err:
                found.append(InputError(f"corrupt or truncated JPEG image: {str(err).splitlines()[0]}"))
    return found


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
            return [b64(i.get("b64", i.get("data")) if isinstance(i, dict) else i) for i in instances], True
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
    if isinstance(payload, Pixels):
        return payload.checked(max_pixels), True
    blobs, many = images_in(payload)
    return [decode_image(blob, max_pixels) for blob in blobs], many


def decode_batch(
    payloads: list[object], max_pixels: int, jpeg_device: torch.device | None = None
) -> list[tuple[list, bool] | InputError]:
    """Every request's images and whether it asked for a list, or its InputError. With `jpeg_device` (a worker's
    GPU), headers are checked first and the batch's plain JPEGs decode together onto it; the rest with Pillow."""
    if jpeg_device is None:
        out: list = []
        for payload in payloads:
            try:
                out.append(decode_request(payload, max_pixels))
            except InputError as err:
                out.append(err)
        return out
    opened: list = []
    jpegs: list[tuple[int, int, bytes]] = []  # (request, image, file) for nvJPEG
    for r, payload in enumerate(payloads):
        if isinstance(payload, Pixels):
            try:
                opened.append((payload.checked(max_pixels), True))
            except InputError as err:
                opened.append(err)
            continue
        try:
            blobs, many = images_in(payload)
            images = [open_image(blob, max_pixels) for blob in blobs]
            decoded = [None if nvjpeg_can(img) else pixels(img) for img in images]
        except InputError as err:
            opened.append(err)
            continue
        jpegs += [(r, i, blob) for i, (blob, done) in enumerate(zip(blobs, decoded, strict=True)) if done is None]
        opened.append((decoded, many))
    for (r, i, _), image in zip(jpegs, decode_jpegs([blob for *_, blob in jpegs], jpeg_device), strict=True):
        if isinstance(opened[r], InputError):
            continue  # another image of the same request failed first
        if isinstance(image, InputError):
            opened[r] = image
        else:
            opened[r][0][i] = image
    return opened
