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
  random labels, batch 8;
* ``plain_cnn``: the BatchNorm CNN's layers without BatchNorm (ReLU and max-pool kinks only), SGD with
  momentum 0.9;
* ``gru``: the LSTM language model with an ``nn.GRU``, plain SGD;
* ``vit``: a tiny vision transformer (4×4 patches, learned positions, one pre-norm GELU encoder layer,
  mean-pooled) on the BatchNorm CNN's images, AdamW;
* ``digits_silu``: a 64-64-64-10 SiLU MLP on the digits, batch 64, AdamW with weight decay.

The last four were written after the defaults were tuned on the others, as a check on models the tuning
did not see.
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


def make_optimizer(
    params: Any, name: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """The optimizer of a suite model: ``"sgd"`` (with ``momentum``), ``"adam"`` or ``"adamw"``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


class _ImageClassifier(pl.LightningModule):
    """Cross-entropy on ``(inputs, labels)`` batches, logged as a user would; SGD (momentum) or AdamW."""

    def __init__(
        self, lr: float = 0.1, optimizer: str = "sgd", momentum: float = 0.0, weight_decay: float = 0.0
    ) -> None:
        super().__init__()
        self.lr, self.optimizer, self.momentum, self.weight_decay = lr, optimizer, momentum, weight_decay

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), self.optimizer, self.lr, self.momentum, self.weight_decay)


def _conv_features(channels: tuple[int, int], batch_norm: bool) -> nn.Sequential:
    """``[Conv3×3 → (BatchNorm2d) → ReLU → MaxPool2] × 2`` from 3 input channels."""
    layers: list[nn.Module] = []
    for c_in, c_out in zip((3, channels[0]), channels):
        layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm))
        layers += [nn.BatchNorm2d(c_out)] if batch_norm else []
        layers += [nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


class BatchNormCNN(_ImageClassifier):
    """``[Conv3×3 → BatchNorm2d → ReLU → MaxPool2] × 2 → Linear``, cross-entropy, SGD.

    ``batch_norm=False`` drops the BatchNorm layers (and gives the convolutions a bias); keyword arguments
    beyond it go to the optimizer (:class:`_ImageClassifier`).
    """

    def __init__(
        self,
        channels: tuple[int, int] = (8, 16),
        side: int = 16,
        lr: float = 0.1,
        batch_norm: bool = True,
        **optimizer: Any,
    ) -> None:
        super().__init__(lr, **optimizer)
        self.features = _conv_features(channels, batch_norm)
        self.head = nn.Linear(channels[1] * (side // 4) ** 2, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).flatten(1))


def teacher_images(n: int, side: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random 3×side×side images labelled by a fixed random linear teacher (a learnable task)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, side, side, generator=generator)
    teacher = torch.randn(3 * side * side, 10, generator=generator)
    return x, (x.flatten(1) @ teacher).argmax(1)


class TinyViT(_ImageClassifier):
    """A one-layer vision transformer: 4×4 patches, learned positions, pre-norm GELU encoder, mean pool."""

    def __init__(
        self, side: int = 16, dim: int = 32, nhead: int = 4, dim_feedforward: int = 64, **optimizer: Any
    ) -> None:
        super().__init__(**optimizer)
        self.patches = nn.Conv2d(3, dim, 4, stride=4)
        self.positions = nn.Parameter(0.02 * torch.randn(1, (side // 4) ** 2, dim))
        self.encoder = nn.TransformerEncoderLayer(
            dim, nhead, dim_feedforward, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patches(x).flatten(2).transpose(1, 2) + self.positions
        return self.head(self.norm(self.encoder(tokens)).mean(1))


class SiLUMLP(_ImageClassifier):
    """``64 → hidden → hidden → 10`` with SiLU, on flattened 8×8 digits."""

    def __init__(self, hidden: int = 64, **optimizer: Any) -> None:
        super().__init__(**optimizer)
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 10)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))


def classifier_loss(module: nn.Module, batch: Any) -> Tensor:
    """Cross-entropy of a classifier's ``forward`` on ``(inputs, labels)`` (no logging, no metrics)."""
    x, y = batch
    return F.cross_entropy(module(x), y)


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


class RecurrentLM(_LanguageModel):
    """Embedding → one-layer ``nn.LSTM`` or ``nn.GRU`` → linear decoder, next-token cross-entropy.

    Trained with Adam (``optimizer="adam"``) or plain SGD (``"sgd"``).
    """

    def __init__(
        self, vocab: int = 64, hidden: int = 32, lr: float = 3e-3, cell: str = "lstm", optimizer: str = "adam"
    ) -> None:
        super().__init__()
        self.vocab, self.lr, self.optimizer = vocab, lr, optimizer
        self.embedding = nn.Embedding(vocab, hidden)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(hidden, hidden, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        """Logits ``(B, T, vocab)`` of the next token at every position."""
        return self.decoder(self.rnn(self.embedding(tokens))[0])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters(), self.optimizer, self.lr)


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


def _recurrent(
    cell: str, optimizer: str, lr: float
) -> Callable[[bool, int, int], tuple[pl.LightningModule, Any]]:
    def build(smoke: bool, steps: int, seed: int) -> tuple[pl.LightningModule, Any]:
        vocab, hidden, seq = (16, 8, 6) if smoke else (64, 32, 16)
        model = RecurrentLM(vocab, hidden, lr=lr, cell=cell, optimizer=optimizer)
        inputs, targets = markov_tokens(16 * 64, seq, vocab, seed + 1)
        return model, _loader((inputs, targets), 16, True, seed)

    return build


def _plain_cnn(smoke: bool, steps: int, seed: int) -> tuple[pl.LightningModule, Any]:
    side, channels = (8, (2, 4)) if smoke else (16, (8, 16))
    model = BatchNormCNN(channels, side=side, lr=0.05, batch_norm=False, momentum=0.9)
    x, y = teacher_images(64 * 16, side, seed + 1)
    return model, _loader((x, y), 64, True, seed)


def _vit(smoke: bool, steps: int, seed: int) -> tuple[pl.LightningModule, Any]:
    side, dim, ff = (8, 8, 16) if smoke else (16, 32, 64)
    model = TinyViT(side, dim, 4 if not smoke else 2, ff, lr=1e-3, optimizer="adamw")
    x, y = teacher_images(32 * 32, side, seed + 1)
    return model, _loader((x, y), 32, True, seed)


def _digits_silu(smoke: bool, steps: int, seed: int) -> tuple[pl.LightningModule, Any]:
    model = SiLUMLP(8 if smoke else 64, lr=3e-3, optimizer="adamw", weight_decay=1e-2)
    return model, DigitsDataModule(batch_size=64, seed=seed, drop_last=True)


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
            classifier_loss,
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
            _recurrent("lstm", "adam", 3e-3),
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
        Case(
            "plain_cnn",
            "CNN without BatchNorm, momentum",
            _plain_cnn,
            classifier_loss,
            steps=60,
            every=1,
            description="the BatchNorm CNN's convolutions (with bias), ReLU and max-pool, no BatchNorm; "
            "SGD lr 0.05, momentum 0.9",
        ),
        Case(
            "gru",
            "GRU LM, SGD",
            _recurrent("gru", "sgd", 0.5),
            lm_loss,
            steps=60,
            every=1,
            description="the LSTM LM with an `nn.GRU` (hidden 32), plain SGD lr 0.5",
        ),
        Case(
            "vit",
            "tiny ViT, AdamW",
            _vit,
            classifier_loss,
            steps=60,
            every=1,
            description="4×4 patches of the BatchNorm CNN's 3×16×16 images, learned positions, one pre-norm "
            "GELU encoder layer (d 32, 4 heads, ff 64), mean pool; batch 32, AdamW lr 1e-3",
        ),
        Case(
            "digits_silu",
            "digits MLP 64-64-64-10 SiLU, AdamW",
            _digits_silu,
            classifier_loss,
            steps=100,
            every=1,
            description="two SiLU hidden layers on the embedded digits, batch 64, AdamW lr 3e-3, weight "
            "decay 1e-2",
        ),
    )
}
