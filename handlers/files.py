"""Names of the files an archive holds beside the handler, and the model variants: the export writes them, the
archive packs them, handlers/runtime.py loads them."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    """One kind of exported model file: preprocessing + backbone + softmax, uint8 RGB [B, 3, H, W] in, class
    probabilities out. `precision` names the device types it runs on and the arithmetic it uses on each."""

    file: str
    precision: dict  # torch device type -> "fp32" | "bf16" | "int8"

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(self.precision)


# training/variants.py builds each (docs/variants.md says how); the portable file is the one a worker given a GPU
# runs (bf16 autocast there).
REGISTRY = {
    "torchscript": Variant("model.pt", {"cpu": "fp32", "cuda": "bf16"}),  # traced, no device in the graph
    "torchscript-frozen": Variant("model.frozen.pt", {"cpu": "fp32"}),  # frozen, oneDNN layouts made at load
    "aoti": Variant("model.aoti.pt2", {"cpu": "fp32"}),  # torch.export + AOTInductor
    "int8": Variant("model.int8.pt", {"cpu": "int8"}),  # static int8 backbone in frozen TorchScript
    "onnx": Variant("model.onnx", {"cpu": "fp32"}),  # run with ONNX Runtime
}
VARIANTS = {name: variant.file for name, variant in REGISTRY.items()}  # variant name -> its file
PORTABLE = "torchscript"
MODEL = VARIANTS[PORTABLE]  # the portable file every offline tool reads (robustness, drift report) and GPUs run
LABELS = "index_to_name.json"  # {"0": "<class name>", ...}
REFERENCE = "drift_reference.json"  # what the training inputs and answers looked like
LINEAGE = "lineage.json"  # the training run, data hash and git commit the model comes from
MODEL_CONFIG = "model-config.yaml"  # TorchServe's per-model settings and the handler's `handler:` section
MANIFEST = "MAR-INF/MANIFEST.json"


def for_device(shipped: str, device_type: str) -> str | None:
    """The variant a worker on `device_type` runs: the shipped one where it runs there, else the portable one where
    that does; None when no variant the archive can carry runs there."""
    for name in (shipped, PORTABLE):
        if device_type in REGISTRY[name].precision:
            return name
    return None
