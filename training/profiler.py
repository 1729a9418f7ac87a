"""The training profiler: Lightning's profilers from `trainer.profiler` (serving: experiments/profile.py)."""

from pathlib import Path

from common.cli import BundleError


class ProfilerError(BundleError):
    """`trainer.profiler` names no profiler."""


def training_profiler(kind: str | None, folder: str | Path):
    """Lightning's profiler for `trainer.profiler` (None: no profiling), writing into `folder`."""
    if kind in (None, "", "none"):
        return None
    from lightning.pytorch.profilers import AdvancedProfiler, PyTorchProfiler, SimpleProfiler

    Path(folder).mkdir(parents=True, exist_ok=True)
    if kind == "simple":
        return SimpleProfiler(dirpath=folder, filename="simple")
    if kind == "advanced":
        return AdvancedProfiler(dirpath=folder, filename="advanced")
    if kind == "pytorch":  # a Chrome trace per profiled stage (*.pt.trace.json) and a table of operators
        return PyTorchProfiler(dirpath=folder, filename="pytorch", row_limit=25)
    raise ProfilerError(f"unknown trainer.profiler {kind!r}: simple, advanced, pytorch or null")
