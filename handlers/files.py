"""Names of the files an archive holds beside the handler: the export writes them, the archive packs them."""

# The model file of each export variant (training/variants.py builds them; handlers/runtime.py loads them by suffix).
# Each holds preprocessing + backbone + softmax: uint8 RGB [B, 3, H, W] in, class probabilities out.
VARIANTS = {
    "torchscript": "model.pt",  # traced TorchScript: portable, runs on any device
    "torchscript-frozen": "model.frozen.pt",  # frozen + optimized for inference (oneDNN): CPU
    "aoti": "model.aoti.pt2",  # torch.export + AOTInductor, dynamic batch and image size: CPU
    "int8": "model.int8.pt",  # static int8 backbone (FX graph mode, x86 backend) in frozen TorchScript: CPU
    "onnx": "model.onnx",  # ONNX, run with ONNX Runtime
}
MODEL = VARIANTS["torchscript"]  # the portable file every offline tool reads (robustness, drift report)
LABELS = "index_to_name.json"  # {"0": "<class name>", ...}
REFERENCE = "drift_reference.json"  # what the training inputs and answers looked like
LINEAGE = "lineage.json"  # the training run, data hash and git commit the model comes from
MODEL_CONFIG = "model-config.yaml"  # TorchServe's per-model settings and the handler's `handler:` section
MANIFEST = "MAR-INF/MANIFEST.json"
