"""Small Lightning fixtures shared by the callback tests."""

import re
from collections import defaultdict

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import Logger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyModule(pl.LightningModule):
    """8 → 16 → 3 classifier with optional BatchNorm and dropout; SGD with momentum."""

    def __init__(
        self, dropout=0.0, batchnorm=False, lr=0.1, momentum=0.9, weight_decay=0.0, curvature_loss=False
    ):
        super().__init__()
        layers = [nn.Linear(8, 16)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(16))
        layers += [nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 3)]
        self.net = nn.Sequential(*layers)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        if curvature_loss:
            self.curvature_loss = self._loss

    def _loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )


def loader(n=64, batch_size=16, shuffle=True, seed=0, features=8, classes=3):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, features, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle)


class MemoryLogger(Logger):
    """Keeps every logged metric as {name: {step: value}}."""

    def __init__(self):
        super().__init__()
        self.metrics = defaultdict(dict)

    @property
    def name(self):
        return "memory"

    @property
    def version(self):
        return 0

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_metrics(self, metrics, step=None):
        for k, v in metrics.items():
            self.metrics[k][step] = float(v)

    def chaos(self):
        return {k: v for k, v in self.metrics.items() if k.startswith("chaos/")}


def trainer(callbacks=(), logger=None, **kwargs):
    defaults = dict(
        accelerator="cpu",
        devices=1,
        max_steps=6,
        logger=logger if logger is not None else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=list(callbacks), **defaults)


def layouts(logdir):
    """The custom-scalars layouts written to the event files of one TensorBoard run directory."""
    found = []
    for file in logdir.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(file), size_guidance={"tensors": 0})
        acc.Reload()
        if "custom_scalars__config__" in acc.Tags()["tensors"]:
            for event in acc.Tensors("custom_scalars__config__"):
                layout = layout_pb2.Layout()
                layout.ParseFromString(event.tensor_proto.string_val[0])
                found.append(layout)
    return found


def charts(layout):
    """``{category title: {chart title: [tag regexes]}}`` of a custom-scalars layout."""
    return {cat.title: {c.title: list(c.multiline.tag) for c in cat.chart} for cat in layout.category}


def matching(regexes, tags):
    """The tags that TensorBoard's custom-scalars chart with these regexes would show."""
    return {t for t in tags for rx in regexes if re.match(rx, t)}


class QuadraticModule(pl.LightningModule):
    """L(θ) = ½ θᵀAθ + bᵀθ with a planted spectrum h (A = U diag(h) Uᵀ, U = I with ``diagonal``), float64.

    The Hessian is A on every batch (the batch is ignored), so every LLE, count and tangent map is known
    in closed form. Trained with ``torch.optim.SGD(lr, momentum, dampening, weight_decay)``.
    """

    def __init__(
        self, eigenvalues, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, diagonal=False, seed=0
    ):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        h = torch.as_tensor(eigenvalues, dtype=torch.float64)
        n = h.numel()
        if diagonal:
            u = torch.eye(n, dtype=torch.float64)
        else:
            q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
            u = q * torch.sign(torch.diagonal(r))
        self.eigenvalues, self.eigenvectors = h, u
        self.register_buffer("A", (u * h) @ u.T)
        self.register_buffer("b", torch.randn(n, generator=gen, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64) * 0.1)
        self.hparams_sgd = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay)

    def curvature_loss(self, batch):
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta

    def training_step(self, batch, batch_idx):
        return self.curvature_loss(batch)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), **self.hparams_sgd)


class Exploding(TinyModule):
    """A quartic loss at a huge learning rate: weights overflow to inf and the Hessian to inf/NaN."""

    def __init__(self):
        super().__init__(lr=10.0, momentum=0.0)

    def _loss(self, batch):
        x, _ = batch
        return self.net(x).pow(4).mean()
