"""SLQ spectral counts of ``LyapunovSpectrumMonitor(method="lanczos")``: error and cost.

(d) **N of a few thousand, against the exact counts.** One Lightning run per network (digits, batch 128,
plain SGD) carries one Lanczos monitor per edge tolerance (same seed, so the same probes) and, last,
:class:`ExactCounts`, which at every computed step takes ``eigvalsh`` of the float64 dense Hessian of
the same batch at the same θ and counts with each tolerance; the error of a point is the worst of the six
counts (chaotic, edge, stable, negative, positive, zero), in % of N. It also runs the monitor's SLQ
(10 probes × 80 steps, same probes) without reorthogonalisation, which :func:`slq` switches to for bases
above 256 MiB.

(e) **N ≈ 1.1M, against a long-run reference.** A 64-1024-1024-10 MLP on the digits: the monitor with its
defaults (10 probes × 80 steps, no reorthogonalisation at this size, tolerance 2e-2), against SLQ with
4 probes × 400 steps at the same tolerance (its own convergence: the change from 200 to 400 steps). Probe
noise is negligible at this N (``√(2c/P)`` ≈ 0.02 % of N), so the difference is quadrature error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer

from benchmarks.common import (
    StepTimer,
    fmt,
    make_trainer,
    markdown_table,
    median,
    pct,
    progress,
    timed,
)
from lightning_chaos import LyapunovSpectrumMonitor
from lightning_chaos.callbacks._batch import step_curvature
from lightning_chaos.core.counts import slq_spectral_counts, spectral_counts
from lightning_chaos.core.slq import slq
from lightning_chaos.core.stability import EDGE_TOLERANCE, EXACT_EDGE_TOLERANCE
from lightning_chaos.data import DigitsDataModule
from lightning_chaos.models import MLP, Classifier, SmallCNN

EVERY = 25  # computed steps of part (d): every 25th training step
TOLERANCES = (EXACT_EDGE_TOLERANCE, 1e-3, 1e-2, EDGE_TOLERANCE)
COUNTS = ("n_chaotic", "n_edge", "n_stable", "n_negative", "n_positive", "n_zero")
EXACT_CAPTION = (
    "Worst of the six counts (chaotic, edge, stable, negative, positive, zero), |SLQ − exact| in % of N, "
    "median / max over the computed steps (every 25 steps from step 0): `LyapunovSpectrumMonitor"
    '(method="lanczos")` with its defaults (10 probes × 80 steps, reorthogonalised at this size) at each '
    "edge tolerance, against `eigvalsh` of the float64 dense Hessian of the same batch; next to it the same "
    "probes without reorthogonalisation (what `slq` does for bases above 256 MiB), and the seconds per "
    "computed step of the exact spectrum (dense Hessian + `eigvalsh`) and of the Lanczos monitor."
)


def worst_error(estimate: dict[str, float], exact: dict[str, float], dim: int) -> float:
    """Largest ``|estimate − exact|`` over the six counts, as a fraction of N."""
    return max(abs(estimate[k] - exact[k]) for k in COUNTS) / dim


class TimedSpectrumMonitor(LyapunovSpectrumMonitor):
    """The monitor, recording the wall time of each computed step (CUDA-synchronised)."""

    def __init__(self, device: torch.device, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.device = device
        self.seconds: list[float] = []

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if trainer.global_step % self.every_n_steps != 0:
            return
        step = super().on_before_optimizer_step
        self.seconds.append(timed(lambda: step(trainer, pl_module, optimizer), self.device)[1])


def spectrum_monitors(device: torch.device, every: int, seed: int) -> dict[float, TimedSpectrumMonitor]:
    """One Lanczos monitor per tolerance of :data:`TOLERANCES`, all drawing the same probes."""
    return {
        tol: TimedSpectrumMonitor(
            device,
            every_n_steps=every,
            method="lanczos",
            tolerance=tol,
            overlaps=False,
            seed=seed,
            log_prefix=f"tol{tol:g}/",
        )
        for tol in TOLERANCES
    }


@dataclass
class ExactPoint:
    """Errors of the SLQ counts at one computed step."""

    step: int
    errors: dict[float, float]  # tolerance -> worst count error / N of the monitor
    plain_error: float  # the same SLQ without reorthogonalisation, at EDGE_TOLERANCE
    exact_seconds: float
    counts: dict[str, float]  # exact counts at EDGE_TOLERANCE


class ExactCounts(Callback):
    """Exact counts of the step's Hessian at every tolerance, against the monitors placed before it."""

    def __init__(self, monitors: dict[float, TimedSpectrumMonitor], device: torch.device, seed: int) -> None:
        self.monitors = monitors
        self.first = next(iter(monitors.values()))  # every_n_steps and SGD reading shared by all
        self.device = device
        self.seed = seed
        self.points: list[ExactPoint] = []
        self.num_params = 0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if trainer.global_step % self.first.every_n_steps != 0:
            return
        probe = step_curvature(trainer, pl_module)
        dim = self.num_params = probe.loss.dim
        sgd = self.first._hyperparameters(optimizer)  # what the monitors classify with
        eigenvalues, seconds = timed(lambda: torch.linalg.eigvalsh(probe.dense().double()), self.device)
        exact = {tol: spectral_counts(eigenvalues, sgd, tolerance=tol) for tol in TOLERANCES}
        errors = {tol: worst_error(m.latest, exact[tol], dim) for tol, m in self.monitors.items()}
        nodes, weights = slq(
            probe.hessian(), dim, 10, 80, torch.Generator().manual_seed(self.seed), reorthogonalize=False
        )
        scale = float(eigenvalues.abs().max())
        plain = slq_spectral_counts(nodes, weights, dim, sgd, tolerance=EDGE_TOLERANCE, scale=scale)
        point = ExactPoint(
            trainer.global_step,
            errors,
            worst_error(plain, exact[EDGE_TOLERANCE], dim),
            seconds,
            {k: float(v) for k, v in exact[EDGE_TOLERANCE].items()},
        )
        self.points.append(point)
        progress(
            f"slq step {point.step} (N = {dim}): worst count error "
            + ", ".join(f"{tol:g}: {100 * e:.1f} %" for tol, e in errors.items())
        )


@dataclass
class ExactCase:
    """One network of part (d)."""

    label: str
    make_net: Any
    flatten: bool
    lr: float
    steps: int
    every: int


def exact_cases(smoke: bool) -> list[ExactCase]:
    """Networks of part (d): ReLU and tanh MLPs (N = 3,466) at two rates, a bottleneck ReLU MLP (N = 3,602),
    a small ReLU CNN (N = 1,898)."""
    if smoke:
        return [ExactCase("digits MLP 64-8-10 relu", lambda: MLP(64, (8,), 10), True, 0.1, 4, 2)]
    mlp = "digits MLP 64-32-32-10"
    return [
        ExactCase(f"{mlp} relu", lambda: MLP(64, (32, 32), 10, activation="relu"), True, 0.1, 601, EVERY),
        ExactCase(f"{mlp} tanh", lambda: MLP(64, (32, 32), 10, activation="tanh"), True, 0.1, 601, EVERY),
        ExactCase(f"{mlp} relu", lambda: MLP(64, (32, 32), 10, activation="relu"), True, 1.0, 401, EVERY),
        ExactCase(f"{mlp} tanh", lambda: MLP(64, (32, 32), 10, activation="tanh"), True, 1.0, 401, EVERY),
        ExactCase("digits MLP 64-48-8-10 relu", lambda: MLP(64, (48, 8), 10), True, 0.1, 601, EVERY),
        ExactCase("digits SmallCNN relu", lambda: SmallCNN(), False, 0.1, 601, EVERY),
    ]


@dataclass
class ExactRun:
    """Result of one network of part (d)."""

    case: ExactCase
    num_params: int
    points: list[ExactPoint]
    slq_seconds: float  # median seconds of a computed step of the monitor (tolerance 2e-2)


def run_exact_case(case: ExactCase, device: torch.device, seed: int = 0) -> ExactRun:
    """Train ``case`` with the Lanczos monitors and the exact counts."""
    pl.seed_everything(seed, verbose=False)
    monitors = spectrum_monitors(device, case.every, seed)
    reference = ExactCounts(monitors, device, seed)
    model = Classifier(case.make_net(), lr=case.lr)
    data = DigitsDataModule(batch_size=128, seed=seed, drop_last=True, flatten=case.flatten)
    make_trainer([*monitors.values(), reference], case.steps, device).fit(model, data)
    slq_seconds = median(monitors[EDGE_TOLERANCE].seconds)
    return ExactRun(case, reference.num_params, reference.points, slq_seconds)


def exact_table(runs: list[ExactRun]) -> str:
    """Markdown table (d): worst count error of the monitor's SLQ against the exact counts per tolerance."""
    header = ["network", "lr", "N", "points"]
    header += [f"tolerance {tol:g}: median / max" for tol in TOLERANCES]
    header += [f"no reorth., {EDGE_TOLERANCE:g}: median / max", "exact step (s)", "SLQ monitor step (s)"]
    rows = []
    for run in runs:
        row = [run.case.label, fmt(run.case.lr, "g"), f"{run.num_params:,}", str(len(run.points))]
        for tol in TOLERANCES:
            errors = [p.errors[tol] for p in run.points]
            row.append(f"{pct(median(errors))} / {pct(max(errors))}")
        plain = [p.plain_error for p in run.points]
        row.append(f"{pct(median(plain))} / {pct(max(plain))}")
        row.append(fmt(median(p.exact_seconds for p in run.points), ".2f"))
        row.append(fmt(run.slq_seconds, ".2f"))
        rows.append(row)
    return markdown_table(header, rows)


@dataclass
class LargePoint:
    """The monitor's counts and the long-run reference at one computed step of part (e)."""

    step: int
    monitor: dict[str, float]
    reference: dict[int, dict[str, float]]  # Lanczos steps -> counts
    reference_seconds: dict[int, float]


@dataclass
class LargeRun:
    """Result of part (e)."""

    label: str
    num_params: int
    probes: int
    steps: tuple[int, int]
    points: list[LargePoint] = field(default_factory=list)
    monitor_seconds: list[float] = field(default_factory=list)
    plain_step: float = float("nan")


class LongReference(Callback):
    """Long-run SLQ (``probes`` × ``steps``) at the monitor's computed steps, placed after the monitor."""

    def __init__(
        self, monitor: TimedSpectrumMonitor, result: LargeRun, device: torch.device, seed: int
    ) -> None:
        self.monitor = monitor
        self.result = result
        self.device = device
        self.seed = seed

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        if trainer.global_step % self.monitor.every_n_steps != 0:
            return
        probe = step_curvature(trainer, pl_module)
        dim, sgd = probe.loss.dim, self.monitor._hyperparameters(optimizer)
        self.result.num_params = dim
        runs, seconds = {}, {}
        for m in sorted(self.result.steps, reverse=True):  # same probes: the shorter run is a prefix

            def run(m: int = m) -> tuple[torch.Tensor, torch.Tensor]:
                gen = torch.Generator().manual_seed(self.seed + 1)
                return slq(probe.hessian(), dim, self.result.probes, m, gen)

            runs[m], seconds[m] = timed(run, self.device)
        nodes, weights = runs[max(runs)]
        scale = float(nodes[weights > 0].abs().max())
        counts = {
            m: slq_spectral_counts(n, w, dim, sgd, tolerance=EDGE_TOLERANCE, scale=scale)
            for m, (n, w) in runs.items()
        }
        monitor = {k: self.monitor.latest[k] for k in COUNTS}
        self.result.points.append(LargePoint(trainer.global_step, monitor, counts, seconds))
        progress(
            f"slq 1M step {trainer.global_step}: monitor {self.monitor.seconds[-1]:.1f} s, worst error vs "
            f"reference {100 * worst_error(monitor, counts[max(counts)], dim):.2f} % of N"
        )


def run_large(device: torch.device, smoke: bool, seed: int = 0) -> LargeRun:
    """Part (e): the monitor on a ~1M-parameter MLP against the long-run reference, at steps 0 and 100."""
    hidden, every, probes, steps = ((64, 64), 2, 2, (20, 40)) if smoke else ((1024, 1024), 100, 4, (200, 400))
    label = f"digits MLP 64-{'-'.join(map(str, hidden))}-10 relu"
    result = LargeRun(label, 0, probes, steps)
    pl.seed_everything(seed, verbose=False)
    timer = StepTimer(device)
    monitor = TimedSpectrumMonitor(device, every_n_steps=every, method="lanczos", seed=seed)
    reference = LongReference(monitor, result, device, seed)
    model = Classifier(MLP(64, hidden, 10), lr=0.1)
    data = DigitsDataModule(batch_size=128, seed=seed, drop_last=True)
    make_trainer([timer, monitor, reference], every + 1, device).fit(model, data)
    computed = set(range(0, every + 1, every))
    result.plain_step = median(t for i, t in enumerate(timer.times) if i not in computed)
    result.monitor_seconds = monitor.seconds
    return result


def large_table(run: LargeRun) -> str:
    """Markdown table (e): the monitor's SLQ counts against the long-run reference."""
    short, long = run.steps
    rows = []
    for point, seconds in zip(run.points, run.monitor_seconds):
        reference = point.reference[long]
        rows.append(
            [
                run.label,
                f"{run.num_params:,}",
                str(point.step),
                fmt(seconds, ".1f"),
                fmt(seconds / run.plain_step, ".0f"),
                " / ".join(f"{point.monitor[k]:,.0f}" for k in ("n_chaotic", "n_edge", "n_stable")),
                " / ".join(f"{reference[k]:,.0f}" for k in ("n_chaotic", "n_edge", "n_stable")),
                pct(worst_error(point.monitor, reference, run.num_params), 2),
                pct(worst_error(point.reference[short], reference, run.num_params), 2),
                fmt(point.reference_seconds[long], ".1f"),
            ]
        )
    header = [
        "network",
        "N",
        "step",
        "monitor step (s)",
        "monitor (training steps)",
        "monitor: chaotic / edge / stable",
        f"reference {run.probes}×{long}: chaotic / edge / stable",
        "monitor: worst count error vs reference",
        f"reference {short} vs {long} steps",
        "reference (s)",
    ]
    return markdown_table(header, rows)


def plain_step_note(run: LargeRun) -> str:
    """One line on the plain step time that the training-step units refer to."""
    return f"Plain training step of the {run.label}: {1e3 * run.plain_step:.1f} ms (median)."
