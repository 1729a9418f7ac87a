"""TorchServe adapter over the serving core (handlers/classifier.py, packed beside it in the .mar); the Open Inference
Protocol's requests are told by their body and mapped by handlers/protocol.py."""

import json
import logging
import os
import time
from collections import Counter
from dataclasses import replace

import torch
import ts
from ts.metrics.dimension import Dimension
from ts.metrics.metric_type_enum import MetricTypes

from handlers import protocol, wire
from handlers.classifier import Batch, ImageClassifier, Result, Settings
from handlers.decode import InputError

log = logging.getLogger(__name__)
GAUGE_EVERY_S = 1.0  # the timing gauges' sampling period: a gauge keeps only its last value between scrapes


def payload(row: dict) -> object:
    """The request's content: the body, or the multipart field `data` (else the first field)."""
    for key in ("data", "body"):
        if row.get(key) is not None:
            return row[key]
    return next(iter(row.values()), None)


class Handler:
    """TorchServe calls initialize(context) once per worker, then handle(batch, context)."""

    def __init__(self) -> None:
        self.classifier: ImageClassifier | None = None
        self.drift_emitted_at = -1  # the drift window's `scored_at` when DriftScore was last emitted
        self.gauges_at = -float("inf")  # time.monotonic() when the timing gauges were last emitted

    def initialize(self, context) -> None:
        props = context.system_properties
        settings = Settings.from_dict((context.model_yaml_config or {}).get("handler"))
        if props.get("gpu_id") is not None:  # TorchServe's choice; the classifier says if it cannot use it
            settings.device = f"cuda:{props['gpu_id']}"
        torch.set_num_threads(settings.threads)  # this worker process only
        if wire.applies():
            wire.buffered_reads()
            wire.quiet_batch_log()
        else:
            log.warning("TorchServe %s: handlers/wire.py is for %s, left out", ts.__version__, wire.VERSION)
        model = context.manifest["model"]
        self.classifier = ImageClassifier.from_dir(
            props["model_dir"], settings, model["modelName"], model.get("modelVersion", ""), model["serializedFile"]
        )
        self.classifier.warm_up()
        served = self.classifier.served()
        log.info(
            "serving %s %s: %s (%s) on %s, %s%s",
            model["modelName"], model.get("modelVersion", ""), served["file"], served["variant"], served["device"],
            served["precision"], f" ({served['note']})" if "note" in served else "",
        )  # fmt: skip

    def handle(self, data: list[dict], context) -> list[str]:
        if context.get_request_header(0, "describe") == "True":  # GET /models/<name>?customized=true
            described = {
                "worker": os.getpid(),
                "served": self.classifier.served(),
                "drift": self.classifier.drift_summary(),
                "lineage": self.classifier.lineage,
            }
            return [json.dumps(described)]
        bodies = [payload(row) for row in data]
        requests = [self.parse(body, idx, context) for idx, body in enumerate(bodies)]  # v2 Request, None or refused
        ran = [idx for idx, request in enumerate(requests) if not isinstance(request, InputError)]
        batch = self.classifier.run([requests[idx].payload if requests[idx] else bodies[idx] for idx in ran])
        found = dict(zip(ran, batch.results, strict=True))
        results = [
            Result(r.status, {"error": str(r)}) if isinstance(r, InputError) else found[idx]
            for idx, r in enumerate(requests)
        ]
        self.record(context.metrics, replace(batch, results=results))
        answers, served = [], (self.classifier.name, self.classifier.version)
        for idx, (request, result) in enumerate(zip(requests, results, strict=True)):
            if result.status != 200:
                context.set_response_status(result.status, result.body["error"], idx)
            if isinstance(request, protocol.Request):
                answers.append(json.dumps(protocol.answer(request, result, *served)))
            else:
                answers.append(json.dumps(result.body))
        return answers

    @staticmethod
    def parse(body: object, idx: int, context) -> protocol.Request | InputError | None:
        """The Open Inference Protocol request in a body (handlers/protocol.py), None for the bundle's own forms."""
        try:
            binary = any(context.get_request_header(idx, h) is not None for h in protocol.BINARY_HEADERS)
            return protocol.parse(body, binary)
        except InputError as err:
            return err

    def record(self, metrics, batch: Batch) -> None:
        """Custom metrics, declared in the bundle's metrics.yaml so that Prometheus exports them.

        Once per batch, not per image: every metric is a log line the worker writes and the frontend parses,
        tagged with the batch's first request id (TorchServe's default tags each line with all of them).
        Counters and histograms count every batch; the timing gauges (last value wins) are sampled: at most
        one line each per GAUGE_EVERY_S. DriftScore goes out when the scores were recomputed (every 16 images)."""
        if metrics is None:
            return
        dims = [Dimension("ModelName", self.classifier.name), Dimension("Level", "Model")]

        def emit(name: str, value: float, unit: str, kind: MetricTypes, extra: list[Dimension] = ()) -> None:
            metrics.add_metric(name, value, unit, idx=0, dimensions=[*dims, *extra], metric_type=kind)

        now = time.monotonic()
        gauges = now - self.gauges_at >= GAUGE_EVERY_S
        if gauges:
            self.gauges_at = now
            emit("DecodeTime", batch.decode_ms, "ms", MetricTypes.GAUGE)
            emit("InferenceTime", batch.inference_ms, "ms", MetricTypes.GAUGE)
        emit("BatchSize", len(batch.results), "count", MetricTypes.HISTOGRAM)
        for label, count in Counter(label for label, _ in batch.top).items():
            emit("Predictions", count, "count", MetricTypes.COUNTER, [Dimension("Label", label)])
        for status, count in Counter(r.status for r in batch.results if r.status != 200).items():
            emit("RejectedRequests", count, "count", MetricTypes.COUNTER, [Dimension("Status", str(status))])
        if not batch.top:
            return
        emit("TopConfidence", sum(p for _, p in batch.top) / len(batch.top), "ratio", MetricTypes.HISTOGRAM)
        if gauges:
            emit("DriftTime", batch.drift_ms, "ms", MetricTypes.GAUGE)
        drift = self.classifier.drift
        scores = drift.scores() if drift else None
        if scores and drift.scored_at != self.drift_emitted_at:
            self.drift_emitted_at = drift.scored_at
            for feature, score in scores.items():
                emit("DriftScore", score, "score", MetricTypes.GAUGE, [Dimension("Feature", feature)])
