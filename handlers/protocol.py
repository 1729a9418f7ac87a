"""The Open Inference Protocol (KServe v2) over the serving core: a request's input tensor -> what the core decodes,
the core's answer -> named output tensors. KServe v1 ({"instances": [...]}) needs no mapping: the core answers it.

TorchServe 0.12 hands POST /v2/models/<name>/infer and /v1/models/<name>:predict to the handler with the headers
of /predictions (less its `url_path`), so the body tells a v2 request: a JSON object with "inputs". Each request
stays one item of TorchServe's batch. Inputs: one tensor of images, BYTES (one base64 file per element, as KServe's
image examples send) or UINT8 [N, H, W, 3]; outputs: `probabilities` FP32 [N, classes] and `labels` BYTES [N].
"""

import json
import math
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from handlers.classifier import Result
from handlers.decode import InputError, Pixels

PROBABILITIES, LABELS = "probabilities", "labels"
OUTPUTS = (PROBABILITIES, LABELS)
# The binary tensor extension's header (tritonclient's binary_data=True); TorchServe keeps a header's spelling.
BINARY_HEADERS = ("Inference-Header-Content-Length", "inference-header-content-length")
FORMS = "send the images as one input tensor: BYTES [N] of base64 files, or UINT8 [N, H, W, 3]"


@dataclass
class Request:
    """One v2 inference request: its id, what the serving core decodes, and the outputs asked for."""

    id: str
    payload: object
    outputs: list[str]


def parse(body: object, binary: bool = False) -> Request | None:
    """The v2 request in `body`, or None when it is none (the core answers it as it is); InputError when the model
    cannot answer it. `binary`: the request carried the binary tensor extension's header."""
    if isinstance(body, (bytes, bytearray)) and body[:1] == b"{":
        if binary:
            raise InputError(f"binary tensor data ({BINARY_HEADERS[0]}) is not supported: send JSON data")
        try:
            body = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None  # the core says what is wrong with it
    if not isinstance(body, dict) or "inputs" not in body:
        return None
    inputs = body["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise InputError(f'"inputs" must hold exactly one tensor: {FORMS}')
    return Request(str(body.get("id") or uuid.uuid4()), images(inputs[0]), requested(body.get("outputs")))


def images(tensor: dict) -> object:
    """One input tensor -> the core's payload: {"instances": [base64, ...]} for BYTES, Pixels for UINT8."""
    datatype, shape, data = tensor.get("datatype"), tensor.get("shape"), tensor.get("data")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InputError('"shape" must be a list of integers')
    if not isinstance(data, list):
        raise InputError('"data" must be a JSON list (binary tensor data is not supported)')
    if datatype == "BYTES":
        return files(shape, data)
    if datatype == "UINT8":
        return pixels(shape, data)
    raise InputError(f"datatype {datatype!r}: {FORMS}")


def flat(data: list) -> list:
    """Row-major elements of a nested JSON list (the protocol allows nested or flat data)."""
    out, stack = [], [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def files(shape: list[int], data: list) -> dict:
    elements = flat(data)
    if len(shape) not in (1, 2) or shape[0] < 1 or shape[1:] not in ([], [1]):
        raise InputError(f"BYTES images have shape [N] or [N, 1] (one base64 file per element), not {shape}")
    if math.prod(shape) != len(elements):
        raise InputError(f"shape {shape} does not match the {len(elements)} elements of data")
    return {"instances": elements}


def pixels(shape: list[int], data: list) -> Pixels:
    if len(shape) != 4 or shape[3] != 3 or min(shape) < 1:
        raise InputError(f"UINT8 images have shape [N, H, W, 3] (RGB), not {shape}")
    try:
        array = np.asarray(data)
    except ValueError:  # ragged nesting
        raise InputError("UINT8 data must be a flat or evenly nested list of integers") from None
    if array.dtype.kind not in "iu":
        raise InputError("UINT8 data must be integers from 0 to 255")
    if array.size != math.prod(shape):
        raise InputError(f"shape {shape} does not match the {array.size} elements of data")
    if array.min() < 0 or array.max() > 255:
        raise InputError("UINT8 data must be integers from 0 to 255")
    batch = torch.from_numpy(array.reshape(shape).astype(np.uint8)).permute(0, 3, 1, 2)
    return Pixels(list(batch))


def requested(outputs: object) -> list[str]:
    """The output tensors asked for; all when the request names none."""
    if not outputs:
        return list(OUTPUTS)
    names = [o.get("name") if isinstance(o, dict) else None for o in outputs] if isinstance(outputs, list) else [None]
    if unknown := [n for n in names if n not in OUTPUTS]:
        raise InputError(f"unknown outputs {unknown}: this model has {list(OUTPUTS)}")
    return names


def answer(request: Request, result: Result, name: str, version: str) -> dict:
    """The core's Result for one request -> the v2 response body (or its error, in the protocol's form)."""
    if result.status != 200:
        return {"error": result.body["error"]}
    labels = [p["label"] for p in result.body["predictions"]]
    tensors = {
        PROBABILITIES: {
            "name": PROBABILITIES,
            "datatype": "FP32",
            "shape": list(result.probs.shape),
            "data": result.probs.flatten().tolist(),
        },
        LABELS: {"name": LABELS, "datatype": "BYTES", "shape": [len(labels)], "data": labels},
    }
    outputs = [tensors[n] for n in request.outputs]
    return {"model_name": name, "model_version": version, "id": request.id, "outputs": outputs}
