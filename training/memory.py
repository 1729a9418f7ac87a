"""Peak memory of the data stage: `python -m training.memory [Hydra overrides]` prints what it added.

Linux only: resets the process's high-water mark (/proc/self/clear_refs) after the imports, runs
`make_dataset`, and reads VmHWM back, so the figure is what preparing the data added on top of
Python, torch and the libraries.
"""

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from common.cli import BundleError, one_line_errors
from training.data import make_dataset

STATUS = Path("/proc/self/status")


def rss_kib(field: str) -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise BundleError(f"no {field} in {STATUS}: peak memory is measured on Linux only")


def measure(fn, *args) -> tuple[object, float]:
    """Run fn(*args); return its result and the peak resident memory it added, in MiB."""
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = rss_kib("VmRSS")
    result = fn(*args)
    return result, (rss_kib("VmHWM") - before) / 1024


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        out, peak = measure(make_dataset, cfg)
    print(json.dumps({"data": str(out), "format": cfg.data.format, "peak_added_mib": round(peak, 1)}))


if __name__ == "__main__":
    main()
