"""The models of the per-step h0 benchmark suite (``benchmarks/suite.py``), each with its data and its loss.

Every case is a small LightningModule trained with plain SGD through a Lightning ``Trainer``, without
dropout, so that the loss of a batch is a deterministic function of θ (BatchNorm in training mode makes it
depend on the batch statistics, which is what the monitor probes as well). Apart from the digits MLPs and
the small ResNet, which use ``lightning_chaos.models``, the modules are written here the way a user would
write them: a ``training_step`` that logs its loss and no ``curvature_loss``, so the monitor goes through
``training_step``; the exact reference evaluates each case's own :attr:`Case.loss` instead (a separate
function of the module and the batch that computes the same number).

Cases (``key``: what it is):

* ``digits_relu``, ``digits_tanh``: ``Classifier(MLP(64, (32,), 10))`` on the embedded 8×8 digits,
  batch 128, SGD lr 0.1 (the digits MLP of ``benchmarks/timing.py``);
* ``bn_cnn``: two 3×3 convolutions with train-mode BatchNorm, ReLU and 2×2 max-pooling, then a linear
  layer; random 3×16×16 images whose 10 labels come from a fixed random linear teacher; batch 64;
* ``transformer``: a one-layer ``nn.TransformerEncoderLayer`` language model (embedding, sinusoidal
  positions, causal self-attention through ``nn.MultiheadAttention``, ``dropout=0``, linear decoder) on
  token sequences of a fixed sparse random Markov chain; vocabulary 128, d_model 32, sequence 24, batch 16;
* ``transformer_gelu``: the same layer pre-norm with a GELU feed-forward (a loss without kinks), vocabulary
  64, sequence 16;
* ``lstm``: embedding, one ``nn.LSTM`` (hidden 32) and a linear decoder on the same kind of tokens, trained
  with Adam (the monitor does not assume SGD);
* ``boring_linear``: ``nn.Linear(32, 2)`` with MSE against ones as Lightning's ``BoringModel``, fresh
  ``randn`` inputs in every batch (no sample is seen twice), batch 4; its Hessian is the same
  input Gram matrix for both outputs, so every eigenvalue, h0 included, is double;
* ``small_resnet``: ``Classifier(SmallResNet(width=8))`` on CIFAR-shaped (3×32×32) random images with
  random labels, batch 8.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_chaos.data import DigitsDataModule, SyntheticDataModule
from lightning_chaos.models import MLP, Classifier, SmallResNet

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss(module, batch)``: the scalar training loss of ``batch`` computed by calling ``module``."""


def _loader(tensors: tuple[Tensor, ...], batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """A DataLoader over fixed tensors with its own shuffling generator (never the global one)."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle, drop_last=True, generator=generator
    )


# --------------------------------------------------------------------------------------------- BN CNN


class BatchNormCNN(pl.LightningModule):
    """``[Conv3×3 → BatchNorm2d → ReLU → MaxPool2] × 2 → Linear``, cross-entropy, SGD."""

    def __init__(self, channels: tuple[int, int] = (8, 16), side: int = 16, lr: float = 0.1) -> None:
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1, bias=False),
            nn.BatchNorm2d(c1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1, bias=False),
            nn.BatchNorm2d(c2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Linear(c2 * (side // 4) ** 2, 10)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def cnn_loss(module: nn.Module, batch: Any) -> Tensor:
    """Cross-entropy of the BatchNorm CNN on ``(images, labels)``."""
    x, y = batch
    return F.cross_entropy(module.head(module.features(x).flatten(1)), y)


def teacher_images(n: int, side: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random 3×side×side images labelled by a fixed random linear teacher (a learnable task)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, side, side, generator=generator)
    teacher = torch.randn(3 * side * side, 10, generator=generator)
    return x, (x.flatten(1) @ teacher).argmax(1)


# ---------------------------------------------------------------------------------------- transformer


class _LanguageModel(pl.LightningModule):
    """Next-token cross-entropy on ``(inputs, targets)`` token batches, logged as a user would."""

    vocab: int

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, targets = batch
        loss = F.cross_entropy(self(inputs).reshape(-1, self.vocab), targets.reshape(-1))
        self.log("train/loss", loss)
        return loss


def sinusoidal_positions(length: int, dim: int) -> Tensor:
    """The fixed sinusoidal position encoding ``(length, dim)`` of "Attention is all you need"."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe


class TinyTransformerLM(_LanguageModel):
    """One-layer causal ``nn.TransformerEncoderLayer`` language model, next-token cross-entropy, SGD.

    Like the encoder half of Lightning's demo ``Transformer``: scaled token embedding plus sinusoidal
    positions, one encoder layer (``nn.MultiheadAttention``, a ReLU or GELU feed-forward, post-norm or
    pre-norm, ``dropout=0``) with a causal mask, a linear decoder to the vocabulary.
    """

    def __init__(
        self,
        vocab: int = 128,
        d_model: int = 32,
        nhead: int = 2,
        dim_feedforward: int = 64,
        seq_len: int = 24,
        lr: float = 0.1,
        activation: str = "relu",
        norm_first: bool = False,
    ) -> None:
        super().__init__()
        self.vocab, self.d_model, self.lr = vocab, d_model, lr
        self.embedding = nn.Embedding(vocab, d_model)
        self.encoder = nn.TransformerEncoderLayer(
            d_model,
            nhead,
            dim_feedforward,
            dropout=0.0,
            activation=activation,
            batch_first=True,
            norm_first=norm_first,
        )
        self.decoder = nn.Linear(d_model, vocab)
        self.register_buffer("positions", sinusoidal_positions(seq_len, d_model), persistent=False)
        causal = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal_mask", causal, persistent=False)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(B, T, vocab)`` of the next token at every position."""
        t = tokens.shape[1]
        x = self.embedding(tokens) * math.sqrt(self.d_model) + self.positions[:t]
        x = self.encoder(x, src_mask=self.causal_mask[:t, :t], is_causal=True)
        return self.decoder(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def lm_loss(module: nn.Module, batch: Any) -> Tensor:
    """Mean next-token cross-entropy of the language model on ``(inputs, targets)``."""
    inputs, targets = batch
    logits = module(inputs)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def markov_tokens(n: int, seq_len: int, vocab: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` sequences of a fixed random Markov chain in which each token has 3 likely successors.

    Returns ``(inputs, targets)`` of shape ``(n, seq_len)``, targets shifted by one token.
    """
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 3), generator=generator)
    probs = torch.tensor([0.6, 0.25, 0.15])
    tokens = torch.empty(n, seq_len + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (n,), generator=generator)
    for t in range(seq_len):
        choice = torch.multinomial(probs, n, replacement=True, generator=generator)
        tokens[:, t + 1] = successors[tokens[:, t], choice]
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


# ---------------------------------------------------------------------------------------------- LSTM


class LSTMLM(_LanguageModel):
    """Embedding → one-layer ``nn.LSTM`` → linear decoder, next-token cross-entropy, trained with Adam."""

    def __init__(self, vocab: int = 64, hidden: int = 32, lr: float = 3e-3) -> None:
        super().__init__()
        self.vocab, self.lr = vocab, lr
        self.embedding = nn.Embedding(vocab, hidden)
        self.rnn = nn.LSTM(hidden, hidden, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(B, T, vocab)`` of the next token at every position."""
        return self.decoder(self.rnn(self.embedding(tokens))[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# ------------------------------------------------------------------------------------- boring linear


class BoringLinear(pl.LightningModule):
    """Lightning's ``BoringModel``: ``nn.Linear(32, 2)``, MSE of its output against ones, SGD lr 0.1."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.layer = nn.Linear(32, 2)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x,) = batch
        out = self(x)
        loss = F.mse_loss(out, torch.ones_like(out))
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def boring_loss(module: nn.Module, batch: Any) -> Tensor:
    """``mean((W x + b − 1)²)`` over the batch and both outputs."""
    (x,) = batch
    out = module.layer(x)
    return ((out - 1.0) ** 2).mean()


# ---------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    """One model of the suite: how to build it and its data, its own loss, and its sizes.

    Attributes:
        key: short name used on the command line.
        label: name in the tables.
        build: ``(smoke, steps, seed) -> (module, datamodule or train dataloader)``.
        loss: the reference's own loss function; ``None`` uses the module's ``curvature_loss(batch)``.
        steps: default training steps of a full run.
        every: default reference interval of a full run.
        fresh_batches: each batch's top eigenvector is unrelated to the previous one (the Done criterion
            on the share of converged steps does not apply; the flag must be honest instead).
        description: one line for the documentation.
    """

    key: str
    label: str
    build: Callable[[bool, int, int], tuple[pl.LightningModule, Any]]
    loss: LossFn | None
    steps: int
    every: int
    fresh_batches: bool = False
    description: str = ""


def _digits(activation: str) -> Callable[[bool, int, int], tuple[pl.LightningModule, Any]]:
    def build(smoke: bool, steps: int, seed: int) -> tuple[pl.LightningModule, Any]:
        hidden = (8,) if smoke else (32,)
        model = Classifier(MLP(64, hidden, 10, activation=activation), lr=0.1)
        return model, DigitsDataModule(batch_size=128, seed=seed, drop_last=True)

    return build


def _bn_cnn(smoke: bool, steps: int, seed: int) -> tuple[pl.LightningModule, Any]:
    side, channels = (8, (2, 4)) if smoke else (16, (8, 16))
    model = BatchNormCNN(channels, side=side, lr=0.1)
    x, y = teacher_images(64 * 16, side, seed + 1)
    return model, _loader((x, y), 64, True, seed)


def _transformer(smoke: bool, steps: int, seed: int) -> tuple[pl.LightningModule, Any]:
    vocab, d_model, ff, seq = (16, 8, 16, 6) if smoke else (128, 32, 64, 24)
    model = TinyTransformerLM(vocab, d_model, 2, ff, seq, lr=0.1)
    inputs, targets = markov_tokens(16 * 64, seq, vocab, seed + 1)
    return model, _loader((inputs, targets), 16, True, seed)


def _transformer_gelu(smoke: bool, steps: int, seed: int) -> tuple[pl.LightningModule, Any]:
    vocab, d_model, ff, seq = (16, 8, 16, 6) if smoke else (64, 32, 64, 16)
    model = TinyTransformerLM(vocab, d_model, 2, ff, seq, lr=0.1, activation="gelu", norm_first=True)
    inputs, targets = markov_tokens(16 * 64, seq, vocab, seed + 1)
    return model, _loader((inputs, targets), 16, True, seed)


def _lstm(smoke: bool, steps: int, seed: int) -> tuple[pl.LightningModule, Any]:
    vocab, hidden, seq = (16, 8, 6) if smoke else (64, 32, 16)
    model = LSTMLM(vocab, hidden)
    inputs, targets = markov_tokens(16 * 64, seq, vocab, seed + 1)
    return model, _loader((inputs, targets), 16, True, seed)


def _boring(smoke: bool, steps: int, seed: int) -> tuple[pl.LightningModule, Any]:
    model = BoringLinear(lr=0.1)
    batch = 4
    x = torch.randn(batch * max(steps, 1), 32, generator=torch.Generator().manual_seed(seed + 1))
    return model, _loader((x,), batch, False, seed)  # in order: every batch is fresh


def _small_resnet(smoke: bool, steps: int, seed: int) -> tuple[pl.LightningModule, Any]:
    width, side = (2, 8) if smoke else (8, 32)
    model = Classifier(SmallResNet(width=width), lr=0.1)
    data = SyntheticDataModule((3, side, side), 10, num_samples=512, batch_size=8, seed=seed, drop_last=True)
    return model, data


CASES: dict[str, Case] = {
    case.key: case
    for case in (
        Case(
            "digits_relu",
            "digits MLP 64-32-10 ReLU",
            _digits("relu"),
            None,
            steps=200,
            every=1,
            description="`Classifier(MLP(64, (32,), 10, activation='relu'))`, embedded digits, batch 128",
        ),
        Case(
            "digits_tanh",
            "digits MLP 64-32-10 tanh",
            _digits("tanh"),
            None,
            steps=200,
            every=1,
            description="the same with tanh",
        ),
        Case(
            "bn_cnn",
            "BatchNorm CNN (random images)",
            _bn_cnn,
            cnn_loss,
            steps=100,
            every=1,
            description="conv 3→8→16 with train-mode BatchNorm, ReLU, max-pool, linear head; 3×16×16 random "
            "images, teacher labels, batch 64",
        ),
        Case(
            "transformer",
            "1-layer transformer LM",
            _transformer,
            lm_loss,
            steps=100,
            every=1,
            description="`nn.TransformerEncoderLayer` (d_model 32, 2 heads, ff 64, dropout 0, causal) LM, "
            "vocab 128, sequence 24, Markov-chain tokens, batch 16",
        ),
        Case(
            "transformer_gelu",
            "1-layer pre-norm GELU transformer LM",
            _transformer_gelu,
            lm_loss,
            steps=60,
            every=1,
            description="the same layer pre-norm (`norm_first=True`) with a GELU feed-forward (no kinks), "
            "vocab 64, sequence 16, batch 16",
        ),
        Case(
            "lstm",
            "LSTM LM, Adam",
            _lstm,
            lm_loss,
            steps=60,
            every=1,
            description="embedding, one `nn.LSTM` (hidden 32), linear decoder, vocab 64, sequence 16, "
            "Markov-chain tokens, batch 16, Adam lr 3e-3",
        ),
        Case(
            "boring_linear",
            "linear, MSE, fresh random batches",
            _boring,
            boring_loss,
            steps=100,
            every=1,
            fresh_batches=True,
            description="`nn.Linear(32, 2)`, MSE against ones, new `randn` inputs every batch, batch 4",
        ),
        Case(
            "small_resnet",
            "small ResNet (width 8, CIFAR-shaped)",
            _small_resnet,
            None,
            steps=60,
            every=3,
            description="`Classifier(SmallResNet(width=8))`, 3×32×32 random images and labels, batch 8",
        ),
    )
}
