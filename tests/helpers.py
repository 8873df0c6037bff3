"""Shared test cases: planted spectra and small networks (core), Lightning modules and loggers (callbacks).

Everything a test compares against is known independently of the package: planted spectra
``A = U diag(h) Uᵀ``, closed forms, or ``torch.func`` on an explicitly written loss.
"""

import functools
import math
import re
from collections import defaultdict

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

F64 = torch.float64

# ------------------------------------------------------------------------------------------ planted spectra


def random_orthogonal(n, gen, dtype=F64):
    """A random orthogonal ``(n, n)`` matrix (QR of a Gaussian matrix, signs fixed by ``diag R > 0``)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype))
    return q * torch.sign(torch.diagonal(r))


def planted(eigenvalues, seed=0):
    """Symmetric ``A = U diag(h) Uᵀ`` with a random orthogonal U (seeded); returns ``(A, U)``."""
    u = random_orthogonal(eigenvalues.numel(), torch.Generator().manual_seed(seed))
    a = (u * eigenvalues) @ u.T
    return (a + a.T) / 2, u


def quadratic_loss(a, like):
    """Functional loss ``L(θ) = ½ θᵀ A θ`` over parameters shaped like ``like``."""
    from lightning_chaos.core.params import flatten

    return lambda ps: 0.5 * flatten(ps) @ (a @ flatten(ps))


def mlp_loss(sizes=(3, 6, 4), batch=9, act=torch.tanh, dtype=F64, seed=0):
    """Functional cross-entropy loss of a small MLP on a fixed batch, and its parameters."""
    gen = torch.Generator().manual_seed(seed)  # drawn in float64 so that every dtype sees the same network
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
        params.append((torch.randn(fan_out, fan_in, generator=gen, dtype=F64) / math.sqrt(fan_in)).to(dtype))
        params.append((0.1 * torch.randn(fan_out, generator=gen, dtype=F64)).to(dtype))
    x = torch.randn(batch, sizes[0], generator=gen, dtype=F64).to(dtype)
    y = torch.randint(0, sizes[-1], (batch,), generator=gen)

    def loss_fn(ps):
        h = x
        for i in range(0, len(ps), 2):
            h = h @ ps[i].T + ps[i + 1]
            if i < len(ps) - 2:
                h = act(h)
        return F.cross_entropy(h, y)

    return loss_fn, params


class Recorder:
    """Dense operator that records the blocks Lanczos starts from (the normalised SLQ probes)."""

    def __init__(self, a):
        self.a, self.shape, self.dtype, self.device = a, a.shape, a.dtype, a.device
        self.first_blocks = []
        self._calls = 0

    def matmat(self, block):
        if self._calls == 0:
            self.first_blocks.append(block.clone())
        self._calls += 1
        return self.a @ block

    def new_run(self):
        self._calls = 0


def sgd_classes(h, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0, eps=0.0):
    """Boolean masks of the chaos classes of ``h``, written out from their definitions.

    ``h̃ = h + wd``; the stability edge u is 2/γ (μ = 0), 2(1 + μ)/((1 − τ)γ) (heavy ball) or
    2(1 + μ)/((1 + 2μ)γ) (Nesterov); edge: within ``eps`` of 0 or u; chaotic: outside [0, u] and not edge.
    """
    if momentum == 0:
        upper = 2 / lr
    elif nesterov:
        upper = 2 * (1 + momentum) / ((1 + 2 * momentum) * lr)
    else:
        upper = 2 * (1 + momentum) / ((1 - dampening) * lr)
    s = h + weight_decay
    zero = s.abs() <= eps
    edge = zero | ((s - upper).abs() <= eps)
    return {
        "chaotic": ~edge & ((s < 0) | (s > upper)),
        "edge": edge,
        "stable": ~edge & (s > 0) & (s < upper),
        "negative": s < -eps,
        "positive": s > eps,
        "zero": zero,
    }


class Quadratic(nn.Module):
    """L(θ) = ½ θᵀAθ + bᵀθ with A = U diag(h) Uᵀ: every curvature quantity is known in closed form."""

    def __init__(self, eigenvalues, seed=0, dtype=torch.float64):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        h = torch.as_tensor(eigenvalues, dtype=dtype)
        n = h.numel()
        u = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=dtype)).Q
        self.register_buffer("A", u @ torch.diag(h) @ u.T)
        self.register_buffer("b", torch.randn(n, generator=gen, dtype=dtype))
        self.theta = nn.Parameter(torch.randn(n, generator=gen, dtype=dtype))
        self.eigenvalues = torch.sort(h, descending=True).values
        self.eigenvectors = u

    def forward(self):
        return 0.5 * self.theta @ self.A @ self.theta + self.b @ self.theta


def planted_spectrum(n=40, top=(10.0, 8.0, 7.0), bottom=-3.0, seed=0):
    """Eigenvalues with a known top-3, a known most negative one and the rest in (bottom, 5)."""
    gen = torch.Generator().manual_seed(seed + 100)
    rest = torch.rand(n - len(top) - 1, generator=gen, dtype=torch.float64) * 5.0 + bottom * 0.6
    return torch.cat(
        [torch.tensor(top, dtype=torch.float64), torch.tensor([bottom], dtype=torch.float64), rest]
    )


# ------------------------------------------------------------------------------------------ Lightning


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


class MetricModule(TinyModule):
    """TinyModule without ``curvature_loss`` whose ``training_step`` updates and logs a torchmetrics metric.

    A probe must re-evaluate ``training_step`` and leave the metric exactly as training left it.
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        from torchmetrics.classification import MulticlassAccuracy

        self.train_acc = MulticlassAccuracy(num_classes=3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = nn.functional.cross_entropy(logits, y)
        # forward: updates the accumulated state, caches and returns the batch value (logged as a tensor,
        # so that Lightning does not reset the metric at the epoch's end: its state covers every step)
        self.log("train/acc", self.train_acc(logits, y))
        self.log("train/loss", loss)
        return loss


def metric_states(module):
    """``{name: (state tensors, update count)}`` of every torchmetrics metric of the module."""
    from torchmetrics import Metric

    return {
        name: ({k: v.detach().clone() for k, v in m.metric_state.items()}, m._update_count)
        for name, m in module.named_modules()
        if isinstance(m, Metric)
    }


def fit_state(
    callbacks, precision="32-true", curvature_loss=False, max_steps=6, module_cls=None, **module_kwargs
):
    """A seeded 6-step fit of a TinyModule with dropout and BatchNorm; what training leaves behind.

    Returns ``(module state dict, momentum buffers, global RNG state, next random draw, metric states)``.
    """
    pl.seed_everything(0, verbose=False)
    module_cls = TinyModule if module_cls is None else module_cls
    model = module_cls(dropout=0.3, batchnorm=True, curvature_loss=curvature_loss, **module_kwargs)
    tr = trainer(callbacks, precision=precision, max_steps=max_steps)
    tr.fit(model, loader())
    opt = tr.optimizers[0].state_dict()
    momentum = [opt["state"][i]["momentum_buffer"] for i in sorted(opt["state"])]
    return model.state_dict(), momentum, torch.get_rng_state(), torch.randn(3), metric_states(model)


def assert_same_training(plain, watched):
    """Two :func:`fit_state` results are bit-identical: weights, buffers, optimizer, RNG, metrics."""
    for key in plain[0]:
        assert torch.equal(plain[0][key], watched[0][key]), key  # weights and BatchNorm buffers
    assert len(plain[1]) == len(watched[1])
    assert all(torch.equal(a, b) for a, b in zip(plain[1], watched[1]))  # optimizer state
    assert torch.equal(plain[2], watched[2])  # global RNG stream after training
    assert torch.equal(plain[3], watched[3])
    assert plain[4].keys() == watched[4].keys()
    for name, (states, count) in plain[4].items():
        watched_states, watched_count = watched[4][name]
        assert count == watched_count, name  # the probe's evaluations are not counted as batches
        assert states.keys() == watched_states.keys()
        assert all(torch.equal(states[k], watched_states[k]) for k in states), name


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


def resolvable_spectrum():
    """N = 2000: negative bulk, an atom of exact zeros, positive bulk, a few outliers beyond 2/γ = 20."""
    gen = torch.Generator().manual_seed(0)

    def uniform(n, lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=gen, dtype=F64)

    zeros = torch.zeros(400, dtype=F64)
    return torch.cat(
        [uniform(300, -4, -1), zeros, uniform(1250, 1, 12), uniform(40, 12, 18), uniform(10, 24, 60)]
    )


RESOLVABLE_COUNTS = {  # of resolvable_spectrum() at γ = 0.1, edge band 1e-5 (ε = 6e-4): by construction
    "n_chaotic": 310,
    "n_edge": 400,
    "n_stable": 1290,
    "n_negative": 300,
    "n_positive": 1300,
    "n_zero": 400,
}


@functools.cache
def resolvable_slq():
    """SLQ (10 Gaussian probes x 80 steps) of diag(resolvable_spectrum())."""
    from lightning_chaos.core.slq import slq

    # A diagonal operator with Gaussian probes is distributed exactly like any rotation U diag(h) Uᵀ.
    h = resolvable_spectrum()
    gen = torch.Generator().manual_seed(1)
    return slq(lambda v: h * v, h.numel(), 10, 80, gen, distribution="gaussian", dtype=F64)


# ------------------------------------------------------------------------------------------ SGD references

TINY_SIZES = (3, 4, 2)


def initial_params(seed=0):
    """Parameters of a 3-4-2 tanh MLP (float64)."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for fan_in, fan_out in zip(TINY_SIZES[:-1], TINY_SIZES[1:], strict=True):
        params.append(torch.randn(fan_out, fan_in, generator=gen, dtype=F64))
        params.append(0.3 * torch.randn(fan_out, generator=gen, dtype=F64))
    return params


def batch_loss(seed, batch=6):
    """Functional cross-entropy loss of the 3-4-2 tanh MLP on batch number ``seed``."""
    gen = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(batch, TINY_SIZES[0], generator=gen, dtype=F64)
    y = torch.randint(0, TINY_SIZES[-1], (batch,), generator=gen)

    def loss_fn(ps):
        h = torch.tanh(x @ ps[0].T + ps[1])
        return F.cross_entropy(h @ ps[2].T + ps[3], y)

    return loss_fn


def sgd_step(loss_fn, theta, buf, like, lr, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
    """The update of torch.optim.SGD (``_single_tensor_sgd``) on flat tensors; ``buf=None`` first."""
    from lightning_chaos.core.params import unflatten

    d_p = torch.func.grad(lambda flat: loss_fn(unflatten(flat, like)))(theta) + weight_decay * theta
    if momentum != 0:
        buf = d_p if buf is None else momentum * buf + (1 - dampening) * d_p
        d_p = d_p + momentum * buf if nesterov else buf
    return theta - lr * d_p, buf


SGD_VARIANTS = [
    {},
    {"weight_decay": 0.05},
    {"dampening": 0.5},  # torch ignores dampening without momentum
    {"momentum": 0.9},
    {"momentum": 0.8, "dampening": 0.3, "weight_decay": 0.01},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.7, "nesterov": True, "weight_decay": 0.02},
]


def orthonormal(n, k, seed):
    """``(n, k)`` orthonormal columns (QR of a seeded Gaussian matrix)."""
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q


# ------------------------------------------------------------------------------------------ CGD


def tanh_net(seed=0):
    """5 → 8 → 3 tanh MLP in float64."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)


def cgd_batch(seed=1, n=32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen, dtype=F64), torch.randint(0, 3, (n,), generator=gen)


def loss_of(net, x, y):
    return nn.functional.cross_entropy(net(x), y)


def cgd_step(opt, net, x, y):
    """One plain-PyTorch CGD step on the batch (x, y): backward, curvature, step."""
    from lightning_chaos.core.functional_loss import FunctionalLoss

    opt.zero_grad()
    loss_of(net, x, y).backward()
    opt.set_curvature(FunctionalLoss(net, lambda: loss_of(net, x, y)))
    opt.step()


class Skipping(TinyModule):
    """``training_step`` returns ``None`` on the batches in ``skip``: Lightning skips their backward pass."""

    def __init__(self, skip=(1, 2), **kwargs):
        super().__init__(**kwargs)
        self.skip = tuple(skip)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return None if batch_idx in self.skip else loss


# ------------------------------------------------------------------------------------------ second order


class _TanhDerivative(torch.autograd.Function):
    """``g · tanh'(x)`` whose own backward does not exist."""

    @staticmethod
    def forward(ctx, x, g):
        return g * (1 - torch.tanh(x) ** 2)

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError("_TanhDerivative has no backward")


class RaisingTanh(torch.autograd.Function):
    """tanh with a backward that cannot be differentiated again: double backward raises."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _TanhDerivative.apply(x, g)


class OnceTanh(torch.autograd.Function):
    """tanh with a ``@once_differentiable`` backward (autograd would drop its second derivatives silently)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)


class AttentionModule(TinyModule):
    """A transformer encoder layer over the 8 features read as 4 tokens of 2: fused attention in training."""

    def __init__(self, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        del self.net
        self.embed = nn.Linear(2, 4)
        self.encoder = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=dropout, batch_first=True)
        self.head = nn.Linear(4, 3)

    def logits(self, x):
        return self.head(self.encoder(self.embed(x.reshape(x.shape[0], 4, 2))).mean(1))

    def _loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.logits(x), y)


class CustomFunctionModule(TinyModule):
    """TinyModule whose hidden activation is a custom autograd.Function (``function``) instead of nn.Tanh."""

    def __init__(self, function, **kwargs):
        super().__init__(**kwargs)
        self.function = function

    def _loss(self, batch):
        x, y = batch
        return nn.functional.cross_entropy(self.net[3](self.function.apply(self.net[0](x))), y)
