"""The stage order, once: data -> train -> export -> archive.

dvc.yaml runs the same stages as commands (plus the robustness report between export and archive;
tests/test_pipeline.py checks that the two agree); the Vertex AI job, the benchmark's second model
and the tests run them in-process through `run`.
"""

from collections.abc import Callable

from omegaconf import DictConfig


def stages() -> dict[str, Callable[[DictConfig], object]]:
    from training.archive import archive
    from training.data import make_dataset
    from training.export import export
    from training.train import train

    return {"data": make_dataset, "train": train, "export": export, "archive": archive}


COMMANDS = {  # what dvc.yaml runs for each stage
    "data": "python -m training.data",
    "train": "python -m training.train",
    "export": "python -m training.export",
    "archive": "python -m scripts.archive",
}


def run(cfg: DictConfig, only: list[str] | None = None) -> dict[str, object]:
    """Run the stages in order (or only those named); return what each returned (the archive's path last)."""
    return {name: stage(cfg) for name, stage in stages().items() if only is None or name in only}
