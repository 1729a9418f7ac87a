"""Backbones and the Lightning module that trains them."""

import kornia.augmentation as K
import lightning as L
import torch
import torchvision
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn import functional as F

from training.preprocess import Preprocess


def small_cnn(channels: int, classes: int, width: int = 32, dropout: float = 0.2) -> nn.Module:
    """Two conv blocks and a global pool: works at any input size from 8x8 up."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(channels, width),
        *block(width, width),
        nn.MaxPool2d(2),
        *block(width, 2 * width),
        *block(2 * width, 2 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(dropout),
        nn.Linear(2 * width, classes),
    )


def resnet18(channels: int, classes: int, pretrained: bool = False) -> nn.Module:
    """torchvision's ResNet-18; a 1-channel stem sums the pretrained RGB filters."""
    weights = torchvision.models.ResNet18_Weights.DEFAULT if pretrained else None
    net = torchvision.models.resnet18(weights=weights)
    if channels != 3:
        rgb = net.conv1.weight.data
        net.conv1 = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        if pretrained:
            net.conv1.weight.data = rgb.sum(dim=1, keepdim=True).repeat(1, channels, 1, 1) / channels
    net.fc = nn.Linear(net.fc.in_features, classes)
    return net


def build_backbone(model: DictConfig, channels: int, classes: int) -> nn.Module:
    if model.backbone == "cnn":
        return small_cnn(channels, classes, model.width, model.dropout)
    if model.backbone == "resnet18":
        return resnet18(channels, classes, model.pretrained)
    raise ValueError(f"unknown model.backbone {model.backbone!r}: cnn or resnet18")


def build_augment(cfg: DictConfig) -> nn.Module:
    """Random shifts of geometry, light and noise; float [0, 1] images in and out."""
    return nn.Sequential(
        K.RandomAffine(degrees=cfg.degrees, translate=(cfg.translate, cfg.translate), scale=tuple(cfg.scale), p=cfg.p),
        K.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast, p=cfg.p),
        K.RandomGaussianNoise(std=cfg.noise_std, p=cfg.p),
    )


class Classifier(L.LightningModule):
    """uint8 images in, logits out. Preprocessing is part of the module, so export reuses it."""

    def __init__(self, model: dict, augment: dict, classes: list[str], mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run logs the whole resolved config instead
        model, augment = DictConfig(model), DictConfig(augment)
        self.preprocess = Preprocess(model.input_size, mean, std)
        self.backbone = build_backbone(model, len(mean), len(classes))
        self.augment = build_augment(augment) if augment.enabled else None

    def forward(self, images: Tensor) -> Tensor:
        return self.backbone(self.preprocess(images))

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        images, labels = batch
        if stage == "train" and self.augment is not None:
            images = self.augment(images.float() / 255).clamp(0, 1)
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        self.log_dict(
            {f"{stage}_loss": loss, f"{stage}_acc": acc},
            prog_bar=stage != "test",
            on_epoch=True,
            on_step=False,
            sync_dist=True,  # DDP: every process logs the mean over all of them (a no-op in one process)
        )
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> dict:
        hp = self.hparams.model
        opt = torch.optim.AdamW(self.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
        epochs = max(self.trainer.max_epochs or 1, 1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)}
