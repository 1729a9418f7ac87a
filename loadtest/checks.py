"""What a load test sends (request forms, PNG test images, the token) and how it judges an answer."""

import json
from pathlib import Path

FORMS = ("raw", "multipart", "json", "instances")


def parse_mix(text: str) -> dict[str, float]:
    """'raw=7,json=1' -> {'raw': 7.0, 'json': 1.0}; only the handler's request forms."""
    mix = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        name, _, weight = part.partition("=")
        if name.strip() not in FORMS:
            raise ValueError(f"unknown request form {name.strip()!r} in mix {text!r}: use {', '.join(FORMS)}")
        mix[name.strip()] = float(weight or 1)
    mix = {k: v for k, v in mix.items() if v > 0}
    if not mix:
        raise ValueError(f"mix {text!r} has no form with a positive weight")
    return mix


def read_token(path: Path | str) -> str:
    """The inference token in TorchServe's key_file.json, or '' when there is no such file."""
    try:
        return json.loads(Path(path).read_text())["inference"]["key"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        return ""


def check_answer(status: int, text: str | None, form: str, model: str, classes: set[str], instances: int = 1) -> str:
    """Why this answer to a well-formed request is wrong, or "" when it is right."""
    if status != 200:
        return f"status {status}: {(text or '')[:200]}"
    try:
        body = json.loads(text or "")
    except json.JSONDecodeError:
        return f"not JSON: {(text or '')[:200]}"
    if not isinstance(body, dict) or body.get("model") != model or "version" not in body:
        return f"no model/version for {model}: {str(body)[:200]}"
    answers = body.get("predictions") if form == "instances" else [body]
    if not isinstance(answers, list) or len(answers) != (instances if form == "instances" else 1):
        return f"expected {instances} predictions: {str(body)[:200]}"
    for answer in answers:
        top = answer.get("top_k") if isinstance(answer, dict) else None
        if not top or not isinstance(top, list) or not all(isinstance(t, dict) for t in top):
            return f"no top_k list: {str(answer)[:200]}"
        if answer.get("label") not in classes or any(t.get("label") not in classes for t in top):
            return f"label not among the dataset's classes: {str(answer)[:200]}"
        probability = answer.get("probability")
        if not isinstance(probability, float | int) or not 0 <= probability <= 1 or top[0]["label"] != answer["label"]:
            return f"bad probability or top_k order: {str(answer)[:200]}"
    return ""
