"""The load test: Locust scenarios against a real TorchServe (short headless runs of the real locust
process), the answer checks and the SLO checker. Proof that the scenarios work, not a performance gate."""

import csv
import json

import pytest

from common.config import load_config
from loadtest.checks import check_answer, parse_mix
from loadtest.locust_process import run_locust
from loadtest.summary import check_slo, summarize
from scripts.loadtest import main
from training.data import make_dataset

CLASSES = {str(i) for i in range(10)}
SLO = {"max_failures": 0, "p95_ms": 50, "p99_ms": 100, "min_rps": 10}


def answer(label: str = "3", probability: float = 0.9, model: str = "digits_cnn") -> dict:
    top = [
        {"label": label, "index": int(label), "probability": probability},
        {"label": "1", "index": 1, "probability": 0.05},
    ]
    return {"model": model, "version": "1.0", "label": label, "probability": probability, "top_k": top}


def options(cfg, **changes) -> dict:
    base = {
        "model": cfg.name,
        "data": cfg.paths.data,
        "mix": "raw=1,multipart=1,json=1,instances=1",
        "instances": 2,
        "malformed_share": 0.3,
        "wait_min": 0,
        "wait_max": 0.01,
    }
    return {**base, **changes}


# ------------------------------------------------------------------ SLO checker and answer checks


def test_slo_met_by_a_fast_clean_run():
    summary = summarize({"raw": [(10.0, True)] * 200, "malformed:empty": [(2.0, True)] * 5}, seconds=2.0)
    assert summary["wellformed"]["rps"] == 100
    assert check_slo(summary, SLO) == []


@pytest.mark.parametrize(
    ("rows", "seconds", "missed"),
    [
        ({"raw": [(10.0, True)] * 199 + [(10.0, False)]}, 2.0, "1 unexpected failures"),
        ({"raw": [(10.0, True)] * 200, "malformed:empty": [(3.0, False)]}, 2.0, "1 unexpected failures"),
        ({"raw": [(10.0, True)] * 180 + [(80.0, True)] * 20}, 2.0, "p95 80.0 ms > 50 ms"),
        ({"raw": [(10.0, True)] * 196 + [(150.0, True)] * 4}, 2.0, "p99 150.0 ms > 100 ms"),
        ({"raw": [(10.0, True)] * 200}, 40.0, "throughput 5.0 req/s < 10 req/s"),
        ({"malformed:empty": [(3.0, True)]}, 1.0, "no well-formed request"),
    ],
    ids=["failure", "malformed-not-4xx", "p95", "p99", "throughput", "nothing-sent"],
)
def test_slo_checker_reports_each_missed_objective(rows, seconds, missed):
    problems = check_slo(summarize(rows, seconds), SLO)
    assert any(missed in p for p in problems), problems


def test_slo_failure_names_the_first_error():
    summary = summarize({"raw": [(10.0, False)] * 3}, 1.0, {"raw: status 503": 3})
    assert "first: raw: status 503" in check_slo(summary, SLO)[0]


def test_answer_check_accepts_the_handler_schema_and_rejects_wrong_answers():
    good = json.dumps(answer())
    assert check_answer(200, good, "raw", "digits_cnn", CLASSES) == ""
    listed = json.dumps({"model": "digits_cnn", "version": "1.0", "predictions": [answer(), answer("7")]})
    assert check_answer(200, listed, "instances", "digits_cnn", CLASSES, instances=2) == ""
    assert "status 500" in check_answer(500, '{"error": "x"}', "raw", "digits_cnn", CLASSES)
    assert "not JSON" in check_answer(200, "<html>", "raw", "digits_cnn", CLASSES)
    assert "model/version" in check_answer(200, json.dumps(answer(model="other")), "raw", "digits_cnn", CLASSES)
    assert "classes" in check_answer(200, json.dumps(answer(label="42")), "raw", "digits_cnn", CLASSES)
    assert "probability" in check_answer(200, json.dumps(answer(probability=1.5)), "raw", "digits_cnn", CLASSES)
    assert "predictions" in check_answer(200, listed, "instances", "digits_cnn", CLASSES, instances=3)


def test_parse_mix():
    assert parse_mix("raw=7, multipart=2,json") == {"raw": 7.0, "multipart": 2.0, "json": 1.0}
    with pytest.raises(ValueError, match="unknown request form"):
        parse_mix("raw=1,grpc=2")
    with pytest.raises(ValueError, match="positive weight"):
        parse_mix("raw=0")


# ------------------------------------------------------------------ real Locust against a real TorchServe


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """The digits as WebDataset shards: the Locust users read a split as training does, whatever its form."""
    out = tmp_path_factory.mktemp("shards") / "digits"
    return make_dataset(load_config([f"paths.data={out}", "data.format=shards"]))


def test_locust_scenarios_against_torchserve(server, cfg, sharded, tmp_path):
    """Every request form is answered and passes the checks; every malformed request gets a 4xx. The images come
    from the sharded dataset (the other runs read the session's npz)."""
    opts = options(cfg, data=sharded)
    summary = run_locust(server.url("inference"), 6, 6, 5, tmp_path, server.key() or "", opts, reset_stats=False)
    good, bad = summary["wellformed"], summary["malformed"]
    assert good["count"] > 0 and good["failures"] == 0, summary["errors"]
    for form in ("raw", "multipart", "json", "instances"):
        assert summary["by_name"][form]["count"] > 0, form
    assert bad["count"] > 0 and bad["failures"] == 0, summary["errors"]
    with open(tmp_path / "locust_stats.csv") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    malformed = [row for name, row in rows.items() if name.startswith("malformed:")]
    assert malformed and all(row["Failure Count"] == "0" for row in malformed)
    # Locust writes its CSV every second: it may miss the last second of what summary.json has
    assert 0 < int(rows["Aggregated"]["Request Count"]) <= good["count"] + bad["count"]
    assert (tmp_path / "locust.html").stat().st_size > 1000


def test_locust_counts_wrong_answers_as_failures(server, cfg, tmp_path):
    """A model name the server does not have: every well-formed request must fail the checks."""
    opts = options(cfg, model="no_such_model", malformed_share=0)
    summary = run_locust(server.url("inference"), 2, 2, 2, None, server.key() or "", opts)
    good = summary["wellformed"]
    assert good["count"] > 0 and good["failures"] == good["count"]
    assert any("status 404" in e for e in summary["errors"]), summary["errors"]


def test_loadtest_cli_exits_nonzero_when_an_slo_is_missed(server, cfg, tmp_path, capsys):
    args = ["--host", server.url("inference"), f"--token={server.key() or ''}", "--users", "4", "--run-time", "3"]
    args += ["--out", str(tmp_path), f"paths.data={cfg.paths.data}", "loadtest.slo.p95_ms=60000"]
    args += ["loadtest.slo.p99_ms=60000"]  # latency on a shared CPU is not what this test is about
    main([*args, "loadtest.slo.min_rps=1"])  # met: returns normally
    assert "SLOs met" in capsys.readouterr().out
    assert (tmp_path / "locust_stats.csv").is_file() and (tmp_path / "summary.json").is_file()
    with pytest.raises(SystemExit, match=r"^SLO missed: throughput .* < 100000 req/s$"):
        main([*args, "loadtest.slo.min_rps=100000"])
