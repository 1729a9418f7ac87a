"""Names of the files an archive holds beside the handler: the export writes them, the archive packs them."""

MODEL = "model.pt"  # TorchScript: preprocessing + backbone + softmax
LABELS = "index_to_name.json"  # {"0": "<class name>", ...}
REFERENCE = "drift_reference.json"  # what the training inputs and answers looked like
LINEAGE = "lineage.json"  # the training run, data hash and git commit the model comes from
MODEL_CONFIG = "model-config.yaml"  # TorchServe's per-model settings and the handler's `handler:` section
MANIFEST = "MAR-INF/MANIFEST.json"
