"""Train the classifier: `python -m training.train [Hydra overrides]`.

Writes to `paths.artifacts`: model.ckpt (best by val accuracy) and metrics.json.
"""

import logging
import time
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from common.cli import one_line_errors
from common.io import write_json
from training.data import ImageDataModule
from training.model import Classifier

log = logging.getLogger(__name__)

CHECKPOINT = "model.ckpt"  # the best checkpoint, in paths.artifacts
METRICS = "metrics.json"


def train(cfg: DictConfig) -> dict:
    """Fit, keep the best checkpoint, test it; return the metrics that were written."""
    L.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.artifacts)
    data = ImageDataModule(cfg.paths.data, cfg.data.batch_size, cfg.data.num_workers)
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
        logger=CSVLogger(out, name="logs", version=""),
        callbacks=[checkpoint, EarlyStopping(monitor="val_loss", patience=patience)],
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
    }
    write_json(out / METRICS, metrics)
    log.info("best checkpoint %s: %s", checkpoint.best_model_path, metrics)
    return metrics


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with one_line_errors():
        train(cfg)


if __name__ == "__main__":
    main()
