"""TorchServe adapter over the serving core (serving.py, packed beside it in the .mar)."""

import json
import logging

import torch
from serving import ImageClassifier, Settings

log = logging.getLogger(__name__)


class Handler:
    """TorchServe calls initialize(context) once per worker, then handle(batch, context)."""

    def __init__(self) -> None:
        self.classifier: ImageClassifier | None = None

    def initialize(self, context) -> None:
        props = context.system_properties
        settings = Settings.from_dict((context.model_yaml_config or {}).get("handler"))
        gpu = props.get("gpu_id")
        if gpu is not None and torch.cuda.is_available():
            settings.device = f"cuda:{gpu}"
        model = context.manifest["model"]
        self.classifier = ImageClassifier.from_dir(
            props["model_dir"], model["serializedFile"], settings, model["modelName"], model.get("modelVersion", "")
        )
        self.classifier.warm_up()
        log.info("loaded %s on %s with %s", model["modelName"], settings.device, settings)

    def handle(self, data: list[dict], context) -> list[str]:
        payloads = [row.get("data") if row.get("data") is not None else row.get("body") for row in data]
        results = self.classifier.handle(payloads)
        for idx, result in enumerate(results):
            if result.status != 200:
                context.set_response_status(result.status, result.body["error"], idx)
        return [json.dumps(r.body) for r in results]
