"""Your own training loop under the tuner: what `trainable: "my_loop:train"` names.

oialr-tune calls ``train(config, trial)`` once per trial (and per retrain seed). `config` is the
trainer config with this trial's searched values; `trial` gives the OIALR controller with the
searched knobs (a no-op in the full-rank baseline arm) and takes each epoch's metrics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from my_data import diabetes
from torch.utils.data import DataLoader, random_split


def train(config, trial) -> None:
    data_train, _, data_test = diabetes()
    generator = torch.Generator().manual_seed(config.data.split_seed)  # the same val examples every trial
    data_train, data_val = random_split(data_train, [0.85, 0.15], generator=generator)
    order = torch.Generator().manual_seed(trial.seed)  # the data order: saved and restored with the checkpoint
    loader = DataLoader(data_train, batch_size=config.schedule.batch_size, shuffle=True, generator=order)
    epochs = config.schedule.epochs

    model = trial.build_model(in_shape=(10,), num_outputs=1)  # config.model, saved by retrain
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optimizer.lr,
                                  weight_decay=config.optimizer.weight_decay)
    oialr = trial.oialr(model, optimizer, total_steps=epochs * len(loader))
    if trial.checkpoint is not None:  # a resumed trial: after trial.oialr, which restores the ranks
        model.load_state_dict(trial.checkpoint["model"])
        optimizer.load_state_dict(trial.checkpoint["optimizer"])
        trial.restore_rng_state(trial.checkpoint["rng"], order)  # the same random draws and batches as unbroken

    def score(dataset) -> dict[str, float]:
        x, y = (torch.stack(t) for t in zip(*(dataset[i] for i in range(len(dataset))), strict=True))
        model.eval()
        with torch.no_grad():
            out = model(x).squeeze(1)
        model.train()
        return {"loss": F.mse_loss(out, y).item(), "mae": (out - y).abs().mean().item()}

    for epoch in range(trial.start_epoch + 1, epochs + 1):
        total = 0.0
        for x, y in loader:
            loss = F.mse_loss(model(x).squeeze(1), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            oialr.step()
            total += loss.item()
        metrics = {f"val_{k}": v for k, v in score(data_val).items()}
        if trial.evaluate_test and epoch == epochs:  # retrain: the test split, never used for tuning
            metrics.update({f"test_{k}": v for k, v in score(data_test).items()})
        checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": trial.rng_state(order)}
        trial.report(epoch=epoch, train_loss=total / len(loader), checkpoint=checkpoint, **metrics)
