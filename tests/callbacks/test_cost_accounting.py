"""Cost accounting that cannot drift: forward and backward passes of the probe per step, counted (not timed).

Three independent readings per training step (the window ``on_train_batch_start`` → ``on_train_batch_end``):

* forward passes of the network: calls of a counting wrapper around ``module.net``, minus the training step's
  own forward (a ``vmap``-batched call computes ``k`` gradients in one pass and counts once);
* backward passes of the probe: calls of ``torch.autograd.grad`` (the training backward is
  ``loss.backward()``, which does not go through it);
* the library's own bookkeeping of the step's curvature: ``FunctionalLoss.num_gradients`` and the exact
  operator's ``num_hvps`` / ``num_graphs``, and the monitor's ``CurvatureEstimate``.

Finite-difference products cost one gradient each (a forward and a backward pass); exact products build the
step's gradient graph once (a forward and a ``create_graph`` backward) and then cost one backward pass each
through it. With ``tol`` below reach every step spends its whole bound: ``k + n_iter − 1`` products for the
top-k block, ``n_iter`` for the most negative end, plus ``g(θ)`` whenever the training gradient cannot be
reused (``probe_fraction < 1``, gradient accumulation, ``reuse_gradient=False``). A skipped step costs what
was evaluated up to and including the first non-finite result and nothing more.
"""

import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, loader, trainer
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_chaos import HessianEigenvalueMonitor, InverseCurvatureLR
from lightning_chaos.callbacks._batch import _RECORD
from lightning_chaos.core.controlled_lyapunov import GRAPH_COST, HVP_COST

EVERY = {"tol": 1e-12, "budget": math.inf}  # no step converges: each spends its whole bound
PAPER = {"products": "finite_difference", **EVERY}


class Counting(nn.Module):
    """Counts its forward calls (a vmapped call counts once)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


@pytest.fixture
def backward_calls(monkeypatch):
    """Counts calls of torch.autograd.grad (every probe backward goes through it)."""
    count = {"n": 0}
    real = torch.autograd.grad

    def counting_grad(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting_grad)
    return count


class PassCounter(Callback):
    """First in the callback list: per-step probe forward and backward passes, and the library's counts."""

    def __init__(self, net, backward_calls):
        self.net, self.backward_calls = net, backward_calls
        self.forwards, self.backwards, self.gradients, self.hvps, self.graphs = [], [], [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._forward, self._backward = self.net.calls, self.backward_calls["n"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.forwards.append(self.net.calls - self._forward - 1)  # minus the training forward
        self.backwards.append(self.backward_calls["n"] - self._backward)
        record = getattr(trainer, _RECORD, None)
        curvatures = list(record.curvatures.values()) if record is not None and record.batch is batch else []
        operators = [c.cache["hessian"] for c in curvatures if "hessian" in c.cache]
        self.gradients.append(sum(c.loss.num_gradients for c in curvatures))
        self.hvps.append(sum(op.num_hvps for op in operators))
        self.graphs.append(sum(op.num_graphs for op in operators))


def counted(backward_calls, callbacks, module=None, max_steps=6, **trainer_kwargs):
    pl.seed_everything(0, verbose=False)
    module = module or TinyModule()
    module.net = Counting(module.net)
    counter = PassCounter(module.net, backward_calls)
    trainer([counter, *callbacks], max_steps=max_steps, **trainer_kwargs).fit(module, loader())
    return counter


def test_plain_training_has_no_probe_pass(backward_calls):
    counter = counted(backward_calls, [])
    assert counter.forwards == counter.backwards == counter.gradients == [0] * 6


@pytest.mark.parametrize(
    ("kwargs", "per_step"),
    [
        ({"n_iter": 1}, 1),  # the paper's mode: g(θ) = p.grad, one extra gradient
        ({"n_iter": 2}, 2),
        ({"n_iter": 1, "most_negative": True}, 2),
        ({"n_iter": 1, "top_k": 4}, 4),
        ({"n_iter": 2, "top_k": 2, "most_negative": True}, 5),  # top: 2 + 1, most negative: 2
        ({"n_iter": 1, "probe_fraction": 0.5}, 2),  # + g(θ) on the sub-batch
        ({"n_iter": 1, "reuse_gradient": False}, 2),  # + g(θ) recomputed
    ],
)
def test_finite_difference_gradients_per_step_of_each_configuration(backward_calls, kwargs, per_step):
    # BatchNorm: the k gradients of top_k > 1 run as a loop (vmap cannot batch training-mode BatchNorm),
    # so every gradient is one forward and one backward pass
    monitor = HessianEigenvalueMonitor(warmup_iters=3, **PAPER, **kwargs)
    counter = counted(backward_calls, [monitor], module=TinyModule(batchnorm=True))
    after_warmup = slice(1, None)
    assert counter.forwards[after_warmup] == [per_step] * 5
    assert counter.backwards[after_warmup] == [per_step] * 5
    assert counter.gradients[after_warmup] == [per_step] * 5
    assert monitor.latest.num_gradients == per_step and monitor.latest.cost == per_step
    assert counter.hvps == counter.graphs == [0] * 6
    # the warm-up step runs the bounded warm-up instead: max(k, 3) products for the top block and 3 for the
    # most negative end, each a gradient, plus g(θ) where it is not the training gradient
    k, most_negative, n_iter = kwargs.get("top_k", 1), kwargs.get("most_negative", False), kwargs["n_iter"]
    extra = per_step - (k + n_iter - 1) - n_iter * most_negative
    assert monitor.warmup_iterations == max(k, 3) + 3 * most_negative
    assert counter.gradients[0] == counter.backwards[0] == monitor.warmup_iterations + extra
    vmap_attempt = 1 if k > 1 else 0  # the one failed vmapped forward, step 0 only
    assert counter.forwards[0] == counter.gradients[0] + vmap_attempt


@pytest.mark.parametrize("n_iter", [1, 3])
def test_exact_products_build_one_graph_and_one_backward_each(backward_calls, n_iter):
    monitor = HessianEigenvalueMonitor(products="exact", n_iter=n_iter, warmup_iters=3, **EVERY)
    counter = counted(backward_calls, [monitor], module=TinyModule(batchnorm=True))
    after_warmup = slice(1, None)
    assert counter.graphs[after_warmup] == [1] * 5 and counter.hvps[after_warmup] == [n_iter] * 5
    assert counter.forwards[after_warmup] == [1] * 5  # the graph's forward; a product has none
    assert counter.backwards[after_warmup] == [1 + n_iter] * 5
    assert counter.gradients[after_warmup] == [0] * 5  # g(θ) is the training gradient
    assert monitor.latest.cost == GRAPH_COST + HVP_COST * n_iter
    assert (monitor.latest.num_hvps, monitor.latest.num_graphs) == (n_iter, 1)


def test_top_k_gradients_are_one_batched_pass_with_vmap(backward_calls):
    monitor = HessianEigenvalueMonitor(top_k=4, n_iter=1, warmup_iters=3, **PAPER)
    counter = counted(backward_calls, [monitor])  # no BatchNorm: vmap batches the 4 gradients
    assert counter.gradients[1:] == [4] * 5  # four gradients ...
    assert counter.forwards[1:] == counter.backwards[1:] == [1] * 5  # ... in one batched pass each way
    assert monitor.latest.num_gradients == 4


def test_every_n_steps_costs_nothing_on_left_out_steps(backward_calls):
    monitor = HessianEigenvalueMonitor(every_n_steps=3, n_iter=1, warmup_iters=3, **PAPER)
    counter = counted(backward_calls, [monitor])
    assert counter.forwards[1:] == [0, 0, 1, 0, 0]  # computed at global steps 0 and 3
    assert counter.backwards[1:] == [0, 0, 1, 0, 0]
    assert counter.gradients[1:] == [0, 0, 1, 0, 0]


def test_gradient_accumulation_adds_g0_on_the_last_micro_batch(backward_calls):
    monitor = HessianEigenvalueMonitor(n_iter=1, warmup_iters=3, **PAPER)
    counter = counted(backward_calls, [monitor], max_steps=3, accumulate_grad_batches=2)
    # batches (micro-steps) 0..5 make optimizer steps 0..2; the probe runs once per optimizer step
    assert counter.forwards[2:] == [0, 2, 0, 2]
    assert counter.backwards[2:] == [0, 2, 0, 2]
    assert counter.gradients[2:] == [0, 2, 0, 2]


@pytest.mark.parametrize("with_monitor", [True, False])
def test_inverse_curvature_lr_shares_the_monitors_probe(backward_calls, with_monitor):
    callbacks = [InverseCurvatureLR(n_iter=1, products="finite_difference", warmup_iters=3)]
    if with_monitor:
        callbacks.insert(0, HessianEigenvalueMonitor(n_iter=1, warmup_iters=3, **PAPER))
    counter = counted(backward_calls, callbacks)
    assert counter.forwards[1:] == counter.backwards[1:] == counter.gradients[1:] == [1] * 5


def test_two_monitors_share_g0_and_the_graph_but_not_their_products(backward_calls):
    monitors = [
        HessianEigenvalueMonitor(products="exact", n_iter=1, warmup_iters=3, **EVERY),
        HessianEigenvalueMonitor(
            products="exact", n_iter=2, warmup_iters=3, seed=1, log_prefix="b/", **EVERY
        ),
    ]
    counter = counted(backward_calls, monitors)
    assert counter.graphs[1:] == [1] * 5 and counter.hvps[1:] == [3] * 5  # one graph, 1 + 2 products
    assert monitors[0].latest.num_graphs == 1 and monitors[1].latest.num_graphs == 0  # the first pays
    assert monitors[1].latest.cost == 2 * HVP_COST


def test_mean_cost_of_the_defaults_stays_within_the_budget(backward_calls):
    """Counted, not timed: gradient-equivalents of the default monitor, averaged over the steps after the
    warm-up, by the passes the counters saw."""
    monitor = HessianEigenvalueMonitor(warmup_iters=20)
    counter = counted(backward_calls, [monitor], module=TinyModule(batchnorm=True), max_steps=16)
    passes = [
        g + HVP_COST * h + GRAPH_COST * r for g, h, r in zip(counter.gradients, counter.hvps, counter.graphs)
    ]
    after = passes[1:]
    assert sum(after) / len(after) <= 4.0 + GRAPH_COST + HVP_COST  # the budget, plus one forced product
    assert max(after) <= 3 * 4.0 + HVP_COST  # what a step can draw from savings


class PoisonGradient(Callback):
    """Before the monitor: p.grad is non-finite at ``step``; ``Restore`` (after it) puts it back."""

    def __init__(self, step):
        self.step, self.saved = step, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            self.saved = [p.grad.clone() for p in pl_module.parameters()]
            for p in pl_module.parameters():
                p.grad.fill_(math.nan)


class Restore(Callback):
    def __init__(self, poison):
        self.poison = poison

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.poison.saved is not None:
            for p, g in zip(pl_module.parameters(), self.poison.saved):
                p.grad.copy_(g)
            self.poison.saved = None


def test_skipped_step_with_non_finite_training_gradient_costs_nothing(backward_calls):
    poison = PoisonGradient(step=2)
    monitor = HessianEigenvalueMonitor(n_iter=3, warmup_iters=3, **PAPER)
    counter = counted(backward_calls, [poison, monitor, Restore(poison)])
    assert monitor.skipped_steps == 1
    assert counter.forwards[1:] == counter.backwards[1:] == counter.gradients[1:] == [3, 0, 3, 3, 3]


class PoisonedProbe(TinyModule):
    """Training is finite; the probe's ``curvature_loss`` is NaN on ``poisoned_step``."""

    def __init__(self, poisoned_step):
        super().__init__()
        self.poisoned_step = poisoned_step

    def curvature_loss(self, batch):
        loss = self._loss(batch)
        return loss * math.nan if self.trainer.global_step == self.poisoned_step else loss


def test_skipped_step_with_non_finite_probe_costs_only_the_failed_attempt(backward_calls):
    monitor = HessianEigenvalueMonitor(n_iter=3, warmup_iters=3, **PAPER)
    counter = counted(backward_calls, [monitor], module=PoisonedProbe(poisoned_step=2))
    assert monitor.skipped_steps == 1
    # step 2: the first product is NaN → skipped, no further product and no retry on that step; the
    # next step re-warms (3 products) from a fresh direction
    assert counter.forwards[1:] == counter.backwards[1:] == counter.gradients[1:] == [3, 1, 3, 3, 3]
    assert monitor.latest.valid  # later steps estimate again
