"""Every image format and mode the handler accepts, and a corpus of malformed or hostile inputs.

All inputs are generated here; nothing binary is kept in git."""

import base64
import io

import numpy as np
import pytest
import torch
from PIL import Image

from handlers.classifier import ImageClassifier
from handlers.decode import decode_image
from tests.client import close, hostile_corpus, png


@pytest.fixture(scope="module")
def core(model_dir, settings):
    return ImageClassifier.from_dir(model_dir, settings(top_k=10, max_pixels=4_000_000))


def encode(img: Image.Image, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def pixels(data: bytes) -> torch.Tensor:
    return decode_image(data, 10**8)


LOSSLESS = [
    ("PNG", "L", {}),
    ("PNG", "RGB", {}),
    ("PNG", "RGBA", {}),
    ("PNG", "P", {}),
    ("PNG", "LA", {}),
    ("BMP", "RGB", {}),
    ("BMP", "L", {}),
    ("GIF", "P", {}),
    ("WEBP", "RGB", {"lossless": True}),
]


@pytest.mark.parametrize(("fmt", "mode", "save"), LOSSLESS)
def test_lossless_formats_decode_to_the_same_pixels(digit, fmt, mode, save):
    want = pixels(encode(digit, "PNG"))
    img = digit.convert(mode)
    if mode in ("RGBA", "LA"):
        img.putalpha(Image.new("L", img.size, 128))  # alpha is dropped, colour kept
    got = pixels(encode(img, fmt, **save))
    assert got.shape == (3, 32, 32) and got.dtype == torch.uint8
    assert torch.equal(got, want)


def test_16_bit_png_keeps_the_high_byte(digit):
    wide = Image.fromarray(np.asarray(digit, dtype=np.uint16) * 257)
    data = encode(wide, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert torch.equal(pixels(data), pixels(encode(digit, "PNG")))


@pytest.mark.parametrize(("fmt", "mode"), [("JPEG", "L"), ("JPEG", "RGB"), ("JPEG", "CMYK"), ("WEBP", "RGB")])
def test_lossy_formats_decode_close_to_the_original(digit, fmt, mode):
    got = pixels(encode(digit.convert(mode), fmt, quality=95))
    want = pixels(encode(digit, "PNG"))
    assert got.shape == want.shape
    assert (got.float() - want.float()).abs().mean() < 12


def test_gif_animation_uses_the_first_frame(digit):
    frames = [digit.convert("P"), Image.new("P", digit.size, 0)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert torch.equal(pixels(data), pixels(encode(digit, "PNG")))


def test_exif_orientation_is_applied(digit):
    stored = digit.transpose(Image.Transpose.ROTATE_90)  # a camera that stored it sideways
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    got = pixels(encode(stored, "PNG", exif=exif))
    assert torch.equal(got, pixels(encode(digit, "PNG")))


def test_every_format_gets_the_same_answer(core, digit):
    answers = set()
    for fmt, mode, save in LOSSLESS:
        [result] = core.handle([encode(digit.convert(mode), fmt, **save)])
        assert result.status == 200
        answers.add(result.body["label"])
    assert len(answers) == 1


def test_hostile_corpus_gets_clear_4xx(core, digit):
    corpus = hostile_corpus(digit, core.settings.max_pixels)
    assert len(corpus) >= 20
    results = core.handle([payload for _, payload, _ in corpus])
    for (name, _, want), result in zip(corpus, results, strict=True):
        assert (name, result.status) == (name, want), result.body
        assert result.body["error"] and result.body["status"] == want
    [after] = core.handle([encode(digit, "PNG")])  # the same core keeps answering
    assert after.status == 200


def test_hostile_inputs_do_not_spoil_a_shared_batch(core, digit):
    good = encode(digit, "PNG")
    corpus = hostile_corpus(digit, core.settings.max_pixels)
    payloads = [good]
    for _, payload, _ in corpus:
        payloads += [payload, good]
    results = core.handle(payloads)
    assert [r.status for r in results[::2]] == [200] * (len(corpus) + 1)
    first = results[0].body
    for result in results[2::2]:
        assert close(result.body, first), (result.body, first)


def test_base64_with_line_breaks_and_data_uri(core, digit):
    raw = base64.b64encode(encode(digit, "PNG")).decode()
    wrapped = "\n".join(raw[i : i + 76] for i in range(0, len(raw), 76))
    results = core.handle([{"data": wrapped}, {"data": f"data:image/png;base64,{raw}"}, {"data": raw}])
    assert [r.status for r in results] == [200, 200, 200]
    assert close(results[0].body, results[1].body) and close(results[0].body, results[2].body)


def test_images_of_different_sizes_share_a_batch(core, digit, test_split):
    payloads = [png(test_split[0][i], scale=s) for i, s in [(0, 1), (1, 3), (2, 1), (3, 7)]]
    together = core.handle(payloads)
    alone = [core.handle([p])[0] for p in payloads]
    assert [r.status for r in together] == [r.status for r in alone] == [200] * 4
    for mixed, single in zip(together, alone, strict=True):
        # labels, indices and their order exactly; probabilities up to float rounding (batching changes the kernels)
        assert [c["index"] for c in mixed.body["top_k"]] == [c["index"] for c in single.body["top_k"]]
        assert mixed.body["label"] == single.body["label"]
        assert close(mixed.body, single.body, tol=1e-4), (mixed.body, single.body)
