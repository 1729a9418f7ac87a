"""Train the classifier: `python -m training.train [Hydra overrides]`.

Writes to `paths.artifacts`: model.ckpt (best by val accuracy), metrics.json and lineage.json (the tracked
run, the data hash, the git commit: training/lineage.py). The `logger` config group picks the tracker
(training/tracking.py); `trainer.profiler=simple|advanced|pytorch` profiles the run.
"""

import logging
import os
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from common.cli import one_line_errors
from common.io import write_json
from training import lineage, plots, tracking
from training.data import ImageDataModule, load_split
from training.model import Classifier
from training.profiler import training_profiler

log = logging.getLogger(__name__)

CHECKPOINT = "model.ckpt"  # the best checkpoint, in paths.artifacts
METRICS = "metrics.json"


def train(cfg: DictConfig, callbacks: tuple = (), logger: object = None, report: bool = True) -> dict:
    """Fit, keep the best checkpoint, test it; return the metrics that were written.

    `logger`: a Lightning logger (the hyperparameter search passes its trial's), else the `logger` config's.
    `report`: log the curves and the confusion matrix to the run and write lineage.json.
    """
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.artifacts)
    origin = lineage.source(cfg.paths.data)  # before training: the code and data it starts from
    logger = logger if logger is not None else tracking.make_logger(cfg)
    tracking.start(logger, cfg, origin)
    history = tracking.History()
    data = ImageDataModule(
        cfg.paths.data, cfg.data.batch_size, cfg.data.num_workers, cfg.data.shuffle_buffer, seed=cfg.seed
    )
    meta = data.meta
    model = Classifier(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        augment=OmegaConf.to_container(cfg.augment, resolve=True),
        classes=meta["classes"],
        mean=meta["mean"],
        std=meta["std"],
    )
    trainer_cfg = dict(cfg.trainer)
    patience = trainer_cfg.pop("early_stopping_patience")
    threads = set_threads(trainer_cfg.pop("threads"), trainer_cfg.get("devices"))
    profiler = training_profiler(trainer_cfg.pop("profiler"), trainer_cfg.pop("profiler_dir"))
    checkpoint = ModelCheckpoint(
        dirpath=out,
        filename=Path(CHECKPOINT).stem,
        monitor="val_acc",
        mode="max",
        save_top_k=1,
        enable_version_counter=False,
    )
    trainer = L.Trainer(
        **trainer_cfg,
        default_root_dir=out,
        logger=logger if logger is not None else False,
        profiler=profiler,
        callbacks=[checkpoint, EarlyStopping(monitor="val_loss", patience=patience), history, *callbacks],
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    [test] = trainer.test(model, datamodule=data, ckpt_path=checkpoint.best_model_path, verbose=False)
    metrics = {
        "val_acc": float(checkpoint.best_model_score),
        "test_acc": test["test_acc"],
        "test_loss": test["test_loss"],
        "epochs": trainer.current_epoch,
        "train_seconds": round(seconds, 2),
        "world_size": trainer.world_size,
        "threads_per_process": threads,
    }
    if not trainer.is_global_zero:  # DDP: the other processes trained and tested; rank 0 writes
        return metrics
    write_json(out / METRICS, metrics)
    log.info("best checkpoint %s: %s", checkpoint.best_model_path, metrics)
    if report:
        record = tracking.finish(logger, cfg, origin, run_files(model, history, cfg, out))
        log.info("lineage %s: %s run %s", lineage.write(out, record), record["tracker"], record["run_id"])
    return metrics


def set_threads(threads: int | None, devices: object) -> int:
    """torch threads per process: `threads`, else this machine's cores shared by its training processes."""
    local = devices if isinstance(devices, int) and devices > 0 else 1
    threads = threads or max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1) // local)
    torch.set_num_threads(threads)
    return threads


def run_files(model: Classifier, history: tracking.History, cfg: DictConfig, out: Path) -> list[Path]:
    """The files every run logs: metrics, training curves, the best model's confusion matrix on the test split."""
    images, labels = load_split(cfg.paths.data, "test")
    counts = plots.confusion_matrix(labels, plots.predictions(model, images), len(model.hparams.classes))
    accuracy = counts.diag().sum().item() / max(1, counts.sum().item())
    reports = out / "reports"
    return [
        out / METRICS,
        plots.curves(history.epochs, reports / "curves.png"),
        plots.confusion(
            counts, model.hparams.classes, reports / "confusion.png", f"{cfg.name} test, acc {accuracy:.3f}"
        ),
    ]


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        train(cfg)


if __name__ == "__main__":
    main()
