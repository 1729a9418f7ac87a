"""Hyperparameter search: an Optuna study over training (experiments/tune.py, configs/tune.yaml).

    python -m scripts.tune                                   # make tune: 20 more trials of the study
    python -m scripts.tune tune.n_trials=4                   # make tune ARGS='tune.n_trials=4'
    python -m scripts.tune hparams_search=backbone logger=csv

The study is kept in tune.storage (runs/optuna.db) and resumed by name: run it again to add trials, or after an
interruption. Writes the best trial as configs/tuned/<study>.yaml (make train ARGS='+tuned=<study>') and the
study's plots to reports/tune/<study>/. Look at it live: optuna-dashboard sqlite:///runs/optuna.db
"""

import argparse
import json
import logging

from common.cli import one_line_errors
from experiments.tune import tune


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of configs/tune.yaml, e.g. tune.n_trials=4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    with one_line_errors():
        result = tune(args.overrides)
    print(json.dumps({k: result[k] for k in ("study", "trials", "COMPLETE", "PRUNED", "FAIL")}))
    if "best" in result:
        best = result["best"]
        print(f"best trial {best['number']}: {best['value']:.4f} with {' '.join(best['overrides'])}")
        if "baseline" in result:
            print(f"the config's own values (trial {result['baseline']['number']}): {result['baseline']['value']:.4f}")
        print(f"override file: {result['best_file']}")


if __name__ == "__main__":
    main()
