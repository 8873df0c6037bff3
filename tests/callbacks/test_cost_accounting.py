"""Cost accounting that cannot drift: forward and backward passes of the probe per step, counted (not timed).

Three independent readings per training step (the window ``on_train_batch_start`` → ``on_train_batch_end``):

* forward passes of the network: calls of a counting wrapper around ``module.net``, minus the training step's
  own forward (a ``vmap``-batched call computes ``k`` gradients in one pass and counts once);
* backward passes of the probe: calls of ``torch.autograd.grad`` (the training backward is
  ``loss.backward()``, which does not go through it);
* the library's own bookkeeping: ``FunctionalLoss.num_gradients`` summed over the step's probes.

Per computed step after the warm-up step, the documented cost is
``n_iter × (top_k + most_negative)`` gradients, plus one for ``g(θ)`` whenever the training gradient
cannot be reused (``probe_fraction < 1``, gradient accumulation, ``reuse_gradient=False``).
A skipped (non-finite) step costs what was evaluated up to and including the first non-finite result and
nothing more: no pass at all when the training gradient itself is non-finite, the failed iteration's
gradients otherwise, never a retry on that step.
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
    """First in the callback list: per-step probe forward passes, probe backward passes, library count."""

    def __init__(self, net, backward_calls):
        self.net, self.backward_calls = net, backward_calls
        self.forwards, self.backwards, self.gradients = [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._forward, self._backward = self.net.calls, self.backward_calls["n"]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.forwards.append(self.net.calls - self._forward - 1)  # minus the training forward
        self.backwards.append(self.backward_calls["n"] - self._backward)
        record = getattr(trainer, _RECORD, None)
        probes = record.curvatures.values() if record is not None and record.batch is batch else []
        self.gradients.append(sum(p.loss.num_gradients for p in probes))


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
        ({}, 1),  # n_iter 1, top_k 1, g(θ) = p.grad: one extra gradient
        ({"n_iter": 2}, 2),
        ({"most_negative": True}, 2),
        ({"top_k": 4}, 4),
        ({"n_iter": 2, "top_k": 2, "most_negative": True}, 6),
        ({"probe_fraction": 0.5}, 2),  # + g(θ) on the sub-batch
        ({"reuse_gradient": False}, 2),  # + g(θ) recomputed
    ],
)
def test_gradients_per_step_of_each_configuration(backward_calls, kwargs, per_step):
    # BatchNorm: the k gradients of top_k > 1 run as a loop (vmap cannot batch training-mode BatchNorm),
    # so every gradient is one forward and one backward pass
    monitor = HessianEigenvalueMonitor(warmup_iters=3, **kwargs)
    counter = counted(backward_calls, [monitor], module=TinyModule(batchnorm=True))
    after_warmup = slice(1, None)
    assert counter.forwards[after_warmup] == [per_step] * 5
    assert counter.backwards[after_warmup] == [per_step] * 5
    assert counter.gradients[after_warmup] == [per_step] * 5
    assert monitor.latest.num_gradients == per_step
    # the warm-up step: the bounded warm-up iterations come on top, each costing the same as an iteration
    k = kwargs.get("top_k", 1) + kwargs.get("most_negative", False)
    warmup = monitor.warmup_iterations * k
    vmap_attempt = 1 if k > 1 and "top_k" in kwargs else 0  # the one failed vmapped forward, step 0 only
    assert counter.gradients[0] == per_step + warmup
    assert counter.forwards[0] == per_step + warmup + vmap_attempt


def test_top_k_gradients_are_one_batched_pass_with_vmap(backward_calls):
    monitor = HessianEigenvalueMonitor(top_k=4, warmup_iters=3)
    counter = counted(backward_calls, [monitor])  # no BatchNorm: vmap batches the 4 gradients
    assert counter.gradients[1:] == [4] * 5  # four gradients ...
    assert counter.forwards[1:] == counter.backwards[1:] == [1] * 5  # ... in one batched pass each way
    assert monitor.latest.num_gradients == 4


def test_every_n_steps_costs_nothing_on_left_out_steps(backward_calls):
    monitor = HessianEigenvalueMonitor(every_n_steps=3, warmup_iters=3)
    counter = counted(backward_calls, [monitor])
    assert counter.forwards[1:] == [0, 0, 1, 0, 0]  # computed at global steps 0 and 3
    assert counter.backwards[1:] == [0, 0, 1, 0, 0]
    assert counter.gradients[1:] == [0, 0, 1, 0, 0]


def test_gradient_accumulation_adds_g0_on_the_last_micro_batch(backward_calls):
    monitor = HessianEigenvalueMonitor(warmup_iters=3)
    counter = counted(backward_calls, [monitor], max_steps=3, accumulate_grad_batches=2)
    # batches (micro-steps) 0..5 make optimizer steps 0..2; the probe runs once per optimizer step
    assert counter.forwards[2:] == [0, 2, 0, 2]
    assert counter.backwards[2:] == [0, 2, 0, 2]
    assert counter.gradients[2:] == [0, 2, 0, 2]


@pytest.mark.parametrize("with_monitor", [True, False])
def test_inverse_curvature_lr_shares_the_monitors_probe(backward_calls, with_monitor):
    callbacks = [InverseCurvatureLR(warmup_iters=3)]
    if with_monitor:
        callbacks.insert(0, HessianEigenvalueMonitor(warmup_iters=3))
    counter = counted(backward_calls, callbacks)
    assert counter.forwards[1:] == counter.backwards[1:] == counter.gradients[1:] == [1] * 5


def test_two_monitors_share_g0_but_not_their_iterations(backward_calls):
    monitors = [HessianEigenvalueMonitor(warmup_iters=3), HessianEigenvalueMonitor(seed=1, log_prefix="b/")]
    counter = counted(backward_calls, monitors)
    assert counter.forwards[1:] == counter.gradients[1:] == [2] * 5  # one iteration each, p.grad reused


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
    monitor = HessianEigenvalueMonitor(n_iter=3, warmup_iters=3)
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
    monitor = HessianEigenvalueMonitor(n_iter=3, warmup_iters=3)
    counter = counted(backward_calls, [monitor], module=PoisonedProbe(poisoned_step=2))
    assert monitor.skipped_steps == 1
    # step 2: the first iteration's gradient is NaN → skipped, no further iteration and no retry
    assert counter.forwards[1:] == counter.backwards[1:] == counter.gradients[1:] == [3, 1, 3, 3, 3]
    assert monitor.latest.valid  # later steps estimate again
