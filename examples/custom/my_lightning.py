"""A LightningModule and a LightningDataModule under the tuner, with no training loop of yours.

`lightning.yaml` names them (``lightning: {module: "my_lightning:Classifier", datamodule:
"my_lightning:BreastCancer"}``). oialr-tune builds each as ``Class(config)``: `config` is the trainer
config with the trial's searched values, so the module takes its learning rate and weight decay from
``config.optimizer`` and the data module its batch size from ``config.schedule``. oialr-tune builds the
Trainer (``max_epochs`` = ``schedule.epochs``) with the OIALR callback, which reports every epoch's
``val_*`` metrics to the tuner; ``test_step``'s ``test_*`` metrics are retrain's scores.
Nothing here knows of OIALR or Ray.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from my_data import breast_cancer
from my_models import mlp
from torch.utils.data import DataLoader, random_split


class Classifier(pl.LightningModule):
    """my_models.mlp on the 30 tumour features, cross-entropy, AdamW with the searched settings."""

    def __init__(self, config) -> None:
        super().__init__()
        self.lr, self.weight_decay = config.optimizer.lr, config.optimizer.weight_decay
        self.net = mlp((30,), 2, hidden=128, depth=2)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def _score(self, batch, split: str) -> None:
        x, y = batch
        out = self.net(x)
        self.log(f"{split}_loss", F.cross_entropy(out, y), batch_size=len(y))
        self.log(f"{split}_acc", (out.argmax(1) == y).float().mean(), batch_size=len(y))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._score(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._score(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class BreastCancer(pl.LightningDataModule):
    """scikit-learn's breast cancer data (my_data.breast_cancer): 15 % of train held out for validation,
    the same examples in every trial (``data.split_seed``)."""

    def __init__(self, config) -> None:
        super().__init__()
        self.batch_size, self.split_seed = config.schedule.batch_size, config.data.split_seed

    def setup(self, stage: str) -> None:
        train, _, self.test = breast_cancer()
        generator = torch.Generator().manual_seed(self.split_seed)
        self.train, self.val = random_split(train, [0.85, 0.15], generator=generator)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, 256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test, 256)
