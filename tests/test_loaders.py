"""`make loaders` on a tiny folder: every setting measured, the report written."""

import json

from bench.loaders import make_folder, settings
from scripts.loaders import main


def test_loader_benchmark_on_a_tiny_folder(tmp_path):
    folder = make_folder(tmp_path / "imgs", count=12, size=40, classes=2)
    out = tmp_path / "report"
    args = ["--folder", str(folder), "--workers", "0", "1", "--batches", "3", "--repeats", "2", "--out", str(out)]
    main([*args, "data.batch_size=4", "data.image_size=16"])
    report = json.loads((out / "loaders.json").read_text())
    assert [(r["workers"], r["persistent"]) for r in report["results"]] == [(0, False), (1, False), (1, True)]
    assert all(len(r["seconds"]) == 2 and min(r["seconds"]) > 0 for r in report["results"])
    assert report["images"] == 12 and report["batch_size"] == 4 and len(report["load_before"]) == 3
    table = (out / "loaders.md").read_text()
    assert "| 1 workers (persistent) |" in table and "Fastest:" in table
    assert (out / "loaders.png").read_bytes()[:4] == b"\x89PNG"


def test_settings_measure_persistence_only_with_workers():
    measured = settings([0, 2])
    assert (0, True, False) not in measured and (2, True, False) in measured and (0, False, False) in measured
