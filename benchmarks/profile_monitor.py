"""Where the monitor's time goes: per-component wall time inside one monitored Lightning training step.

    python benchmarks/profile_monitor.py [--model mlp|small_resnet|resnet18] [--batch 128] [--steps 400]

Wraps the library's functions with wall-clock accumulators (nested: a parent's time includes its children)
and trains a network of the timing table with ``HessianEigenvalueMonitor(every_n_steps=2, warmup_iters=0)``,
so monitored (even) and unmonitored (odd) steps alternate in one run. Prints a markdown table of the median
monitored and unmonitored step and of each component's time per monitored step, with its share of it.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

import lightning_chaos.callbacks.hessian_eigenvalue as monitor_module  # noqa: E402
import lightning_chaos.core.controlled_lyapunov as lyapunov_module  # noqa: E402
import lightning_chaos.core.functional_loss as probe_module  # noqa: E402
import lightning_chaos.core.step_curvature as curvature_module  # noqa: E402
from benchmarks.common import StepTimer, make_trainer, markdown_table, median, quiet, resolve_device  # noqa: E402
from lightning_chaos import HessianEigenvalueMonitor  # noqa: E402
from lightning_chaos.data import DigitsDataModule, SyntheticDataModule  # noqa: E402
from lightning_chaos.models import MLP, Classifier, ResNet18, SmallResNet  # noqa: E402

# (owner, attribute, label, indentation level): the call tree of one monitored step
COMPONENTS: list[tuple[Any, str, str, int]] = [
    (monitor_module.HessianEigenvalueMonitor, "estimate", "HessianEigenvalueMonitor.estimate (all)", 0),
    # step_curvature as the monitor's module looks it up (it imports the function from callbacks._batch)
    (monitor_module, "step_curvature", "step_curvature (build the step's curvature)", 1),
    (probe_module.FunctionalLoss, "__init__", "FunctionalLoss.__init__", 2),
    (curvature_module.StepCurvature, "g0", "StepCurvature.g0 (reuse p.grad)", 1),
    (lyapunov_module.HessianEigenEstimator, "step", "HessianEigenEstimator.step", 1),
    (lyapunov_module.ControlledLyapunov, "iterate", "ControlledLyapunov.iterate", 2),
    (probe_module.FunctionalLoss, "gradients", "FunctionalLoss.gradients (one gradient)", 3),
    (probe_module.FunctionalLoss, "__call__", "FunctionalLoss.__call__ (forward)", 4),
    (monitor_module, "log_values", "log_values", 1),
]


def instrument(owner: Any, name: str, sink: list[float]) -> Callable[[], None]:
    """Replace ``owner.name`` by a timed wrapper appending to ``sink``; returns the undo function."""
    original = owner.__dict__[name]
    func = original.__func__ if isinstance(original, classmethod) else original

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - start)

    setattr(owner, name, classmethod(wrapper) if isinstance(original, classmethod) else wrapper)
    return lambda: setattr(owner, name, original)


def build(model: str, batch: int) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """The networks of the timing table: ``mlp`` (digits 64-32-10), ``small_resnet``, ``resnet18``."""
    if model == "mlp":
        return Classifier(MLP(64, (32,), 10), lr=0.1), DigitsDataModule(batch_size=batch, drop_last=True)
    net = SmallResNet() if model == "small_resnet" else ResNet18()
    data = SyntheticDataModule(input_shape=(3, 32, 32), num_samples=4 * batch, batch_size=batch)
    return Classifier(net, lr=0.05), data


def fit(callbacks: list, steps: int, device: torch.device, model: str, batch: int) -> StepTimer:
    pl.seed_everything(0, verbose=False)
    timer = StepTimer(device)
    trainer = make_trainer([timer, *callbacks], steps, device)
    trainer.fit(*build(model, batch))
    return timer


def profile(steps: int, device: torch.device, model: str = "mlp", batch: int = 128, skip: int = 20) -> str:
    """Markdown table of the per-step time of each component (medians over steps ≥ ``skip``).

    One run with ``every_n_steps=2``: even steps are monitored, odd steps are not, so the monitored and the
    unmonitored step are measured in the same run, interleaved (robust to load from other processes).
    """
    sinks: dict[str, list[float]] = {}
    undo = [instrument(owner, attr, sinks.setdefault(label, [])) for owner, attr, label, _ in COMPONENTS]
    try:
        monitor = HessianEigenvalueMonitor(every_n_steps=2, warmup_iters=0)
        timer = fit([monitor], steps, device, model, batch)
    finally:
        for fn in undo:
            fn()
    steps_kept = range(skip, len(timer.times))
    monitored = median(timer.times[i] for i in steps_kept if i % 2 == 0)
    unmonitored = median(timer.times[i] for i in steps_kept if i % 2 == 1)

    def per_computed_step(label: str) -> float:
        calls = sinks[label]
        if len(calls) == len(timer.times):  # called on every step (returns at once on the others)
            calls = calls[::2]
        return median(calls[(skip + 1) // 2 :])

    def row(label: str, seconds: float) -> list[str]:
        return [label, f"{1e3 * seconds:.3f}", f"{100 * seconds / monitored:.0f} %"]

    estimate = per_computed_step(COMPONENTS[0][2])
    rows = [
        row("unmonitored step (odd steps of the same run)", unmonitored),
        row("monitored step (even steps)", monitored),
        row("difference: what the monitor adds", monitored - unmonitored),
    ]
    for _, _, label, level in COMPONENTS:
        rows.append(row("&nbsp;&nbsp;" * (level + 1) + label, per_computed_step(label)))
    rows.append(
        row(
            "&nbsp;&nbsp;rest of the step slower by (difference − estimate)",
            monitored - unmonitored - estimate,
        )
    )
    return markdown_table(["component (nested)", "ms / step (median)", "share of the monitored step"], rows)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="mlp", choices=["mlp", "small_resnet", "resnet18"])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--skip", type=int, default=20, help="first steps left out of the medians")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    quiet()
    torch.set_num_threads(args.threads)
    table = profile(args.steps, resolve_device(args.device), args.model, args.batch, args.skip)
    print(table)
    return table


if __name__ == "__main__":
    main()
