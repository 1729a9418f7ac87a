"""`python -m training.train trainer=ddp`: two CPU processes over gloo, as a subprocess (Lightning's `ddp` starts
the second process by running the command again, which it cannot do from inside pytest)."""

import json
import os
import subprocess
import sys

from common.config import ROOT
from tests.conftest import EPOCHS


def test_two_process_ddp_reaches_the_single_process_accuracy(cfg, dataset, metrics, tmp_path):
    out = tmp_path / "artifacts"
    args = ["trainer=ddp", "logger=none", f"paths.data={dataset}", f"paths.artifacts={out}"]
    args += [f"trainer.max_epochs={EPOCHS}", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"]
    run = subprocess.run(
        [sys.executable, "-m", "training.train", *args], cwd=ROOT, capture_output=True, text=True, timeout=400
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = json.loads((out / "metrics.json").read_text())
    assert ddp["world_size"] == 2 and metrics["world_size"] == 1
    assert ddp["threads_per_process"] == max(1, len(os.sched_getaffinity(0)) // 2)  # 2 processes share the cores
    assert ddp["test_acc"] >= metrics["test_acc"] - 0.011, (ddp, metrics)  # within 1 point (or better)
    assert (out / "model.ckpt").is_file()
