"""Accuracy of the per-step estimates against the exact same-batch spectrum along a digits-MLP training run.

One Lightning training run per network (SGD, lr 0.1, batch 128 of the embedded 8×8 digits) carries one
:class:`~lightning_chaos.HessianEigenvalueMonitor` per configuration (n_iter 1/2/4, no warm-up,
``every_n_steps``, ``probe_fraction``, ``top_k=4``, ``most_negative``, other Δq) and, last in the callback
list, :class:`ExactReference`. Monitors never change training, so all of them watch the very same
trajectory. Every ``every`` steps, in ``on_before_optimizer_step`` (after every monitor has produced its
estimate at this θ and batch, before the update), the reference computes the exact Hessian of the same batch
at the same θ (the shared probe's dense Hessian, N exact Hessian-vector products), its eigenvalues
(``eigvalsh`` in float64) and top eigenvector, and:

* (a) the relative error of each monitor's estimates against the exact ``h0`` (``h_min`` for
  ``most_negative``, the exact top-4 for ``top_k=4``);
* (b) the finite-Δq bias: the finite-difference Rayleigh quotient ``v0ᵀ(g(θ + Δq v0) − g(θ))/Δq`` at the
  *exact* top eigenvector ``v0`` against ``h0`` — what remains of the error once the direction is perfectly
  aligned — and the same for the monitor's Lyapunov form ``(exp(λ) − 1)/β`` at the controlled
  ``β = (e − 1)/h0``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.optim import Optimizer

from benchmarks.common import fmt, make_trainer, markdown_table, median, pct, progress, quantile
from benchmarks.reference import exact_spectrum
from lightning_chaos import HessianEigenvalueMonitor
from lightning_chaos.callbacks._step import StepProbe
from lightning_chaos.data import DigitsDataModule
from lightning_chaos.models import MLP, Classifier

DELTA_QS = (1e-3, 1e-2, 5e-2, 1e-1, 5e-1)


MONITORS: dict[str, dict[str, Any]] = {
    "default": {},
    "n_iter=2": {"n_iter": 2},
    "n_iter=4": {"n_iter": 4},
    "cold": {"warmup_iters": 0},
    "every_n": {},  # every_n_steps is filled in by monitor_configs()
    "fraction=0.5": {"probe_fraction": 0.5},
    "fraction=0.25": {"probe_fraction": 0.25},
    "top_k=4": {"top_k": 4},
    "most_negative": {"most_negative": True},
    "delta_q=5e-3": {"delta_q": 5e-3},
    "delta_q=5e-1": {"delta_q": 5e-1},
}


def monitor_configs(every: int) -> dict[str, dict[str, Any]]:
    """Keyword arguments of every monitor in the accuracy run (``every`` is the reference interval)."""
    configs = {k: dict(v) for k, v in MONITORS.items()}
    configs["every_n"]["every_n_steps"] = every
    return configs


@dataclass
class Variant:
    """One row of the accuracy table: which monitor, which of its outputs, compared with what."""

    label: str
    monitor: str
    target: str = "h0"  # "h0", "h_min", "h_min/h0" (error relative to h0) or "top4"
    note: str = ""


def variants(every: int) -> list[Variant]:
    """The rows of the accuracy table."""
    return [
        Variant("n_iter=1 (default)", "default"),
        Variant("n_iter=2", "n_iter=2"),
        Variant("n_iter=4", "n_iter=4"),
        Variant("n_iter=1, no warm-up", "cold", note="random direction at step 0"),
        Variant(f"every_n_steps={every}", "every_n", note="at the computed steps"),
        Variant("probe_fraction=0.5", "fraction=0.5", note="vs the full-batch h0"),
        Variant("probe_fraction=0.25", "fraction=0.25", note="vs the full-batch h0"),
        Variant("top_k=4: h0", "top_k=4"),
        Variant("top_k=4: h0..h3", "top_k=4", target="top4", note="4 Ritz values vs exact top-4"),
        Variant("most_negative: h_min", "most_negative", target="h_min", note="error ÷ abs(h_min)"),
        Variant("most_negative: h_min", "most_negative", target="h_min/h0", note="error ÷ h0"),
        Variant("delta_q=5e-3", "delta_q=5e-3"),
        Variant("delta_q=5e-1", "delta_q=5e-1"),
    ]


@dataclass
class Point:
    """Exact spectrum and all estimates at one reference step."""

    step: int
    h0: float
    h_min: float
    top4: list[float]
    eigvec_residual: float
    estimates: dict[str, dict[str, Any]] = field(default_factory=dict)  # monitor key -> its values
    bias_rayleigh: dict[float, float] = field(default_factory=dict)  # Δq -> relative signed bias
    bias_lyapunov: dict[float, float] = field(default_factory=dict)


class ExactReference(Callback):
    """Exact same-batch spectrum every ``every`` steps; reads the monitors placed before it (see module doc).

    Args:
        monitors: ``{key: monitor}``; each must come before this callback in the Trainer.
        every: reference interval in optimizer steps (steps ``0, every, 2·every, …``).
        delta_qs: separations for the finite-Δq bias at the exact eigenvector.
    """

    def __init__(self, monitors: dict[str, HessianEigenvalueMonitor], every: int, delta_qs=DELTA_QS) -> None:
        self.monitors = monitors
        self.every = every
        self.delta_qs = tuple(delta_qs)
        self.points: list[Point] = []
        self.num_params = 0

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        step = trainer.global_step
        if step % self.every != 0:
            return
        probe = StepProbe.current(trainer, pl_module)  # the monitors' full-batch probe: same θ, batch, RNG
        loss = probe.loss
        self.num_params = loss.dim
        spectrum = exact_spectrum(probe.dense())
        point = Point(
            step=step,
            h0=spectrum.h0,
            h_min=spectrum.h_min,
            top4=[float(x) for x in spectrum.eigenvalues[:4]],
            eigvec_residual=spectrum.top_vector_residual,
        )
        for key, monitor in self.monitors.items():
            if step % monitor.every_n_steps != 0 or monitor.latest is None or not monitor.latest.valid:
                continue
            est = monitor.latest
            point.estimates[key] = {
                "h0": est.h0,
                "h0_rayleigh": est.h0_rayleigh,
                "h_min": est.h_min,
                "h_min_rayleigh": est.h_min_rayleigh,
                "top": list(est.top),
                "num_gradients": est.num_gradients,
            }
        g0 = probe.g0()
        v0 = spectrum.top_vector.to(dtype=g0.dtype, device=g0.device)
        beta = (math.e - 1) / point.h0
        for dq in self.delta_qs:
            y = loss.gradient(dq * v0) - g0
            rho = float(torch.dot(v0.double(), y.double())) / dq
            d = dq * v0.double() + beta * y.double()
            lyap = math.expm1(math.log(float(torch.linalg.vector_norm(d)) / dq)) / beta
            point.bias_rayleigh[dq] = (rho - point.h0) / point.h0
            point.bias_lyapunov[dq] = (lyap - point.h0) / point.h0
        self.points.append(point)
        progress(f"accuracy step {step}: exact h0 {point.h0:.4g} (N = {loss.dim})")


@dataclass
class AccuracyRun:
    """Result of one network's accuracy run."""

    name: str
    num_params: int
    steps: int
    every: int
    variants: list[Variant]
    points: list[Point]
    seconds: float


def run_accuracy(
    activation: str,
    hidden: tuple[int, ...],
    steps: int,
    every: int,
    device: torch.device,
    batch_size: int = 128,
    lr: float = 0.1,
    seed: int = 0,
) -> AccuracyRun:
    """Train a digits MLP for ``steps`` steps with every monitor configuration and the exact reference."""
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    monitors = {
        key: HessianEigenvalueMonitor(**{"seed": seed, **kwargs}, log_prefix=f"{key}/")
        for key, kwargs in monitor_configs(every).items()
    }
    reference = ExactReference(monitors, every)
    model = Classifier(MLP(64, hidden, 10, activation=activation), lr=lr)
    data = DigitsDataModule(batch_size=batch_size, seed=seed, drop_last=True)
    trainer = make_trainer([*monitors.values(), reference], steps, device)
    trainer.fit(model, data)
    name = f"digits MLP 64-{'-'.join(map(str, hidden))}-10 {activation}"
    return AccuracyRun(
        name,
        reference.num_params,
        steps,
        every,
        variants(every),
        reference.points,
        time.perf_counter() - start,
    )


def _errors(points: list[Point], variant: Variant, key: str, signed: bool = False) -> list[float]:
    """Relative errors of one output (``h0`` or ``h0_rayleigh``) of a variant's monitor at ``points``."""

    def err(value: float, exact: float) -> float:
        return (value - exact) / abs(exact) if signed else abs(value - exact) / abs(exact)

    out = []
    for p in points:
        est = p.estimates.get(variant.monitor)
        if est is None:
            continue
        if variant.target == "h0":
            out.append(err(est[key], p.h0))
        elif variant.target == "h_min":
            out.append(err(est[key.replace("h0", "h_min")], p.h_min))
        elif variant.target == "h_min/h0":
            value = est[key.replace("h0", "h_min")]
            out.append((value - p.h_min) / p.h0 if signed else abs(value - p.h_min) / p.h0)
        else:  # top4: Rayleigh–Ritz values against the exact top-4
            out += [err(value, exact) for value, exact in zip(est["top"], p.top4)]
    return out


def accuracy_table(runs: list[AccuracyRun]) -> str:
    """Markdown table (a): median / p90 relative error of every variant against the exact spectrum."""
    rows = []
    for run in runs:
        for v in run.variants:
            lyap = _errors(run.points, v, "h0") if v.target != "top4" else []
            ray = _errors(run.points, v, "h0_rayleigh")
            signed = _errors(run.points, v, "h0" if v.target != "top4" else "h0_rayleigh", signed=True)
            # gradients per computed step after the warm-up step
            grads = [
                p.estimates[v.monitor]["num_gradients"] for p in run.points[1:] if v.monitor in p.estimates
            ]
            rows.append(
                [
                    run.name,
                    v.label,
                    fmt(median(grads), ".0f") if grads else "–",
                    str(len(ray)),
                    pct(median(lyap)),
                    pct(quantile(lyap, 0.9)),
                    pct(median(ray)),
                    pct(quantile(ray, 0.9)),
                    pct(median(signed)),
                    v.note,
                ]
            )
    header = [
        "network",
        "monitor configuration",
        "gradients / step",
        "points",
        "median err (e^λ−1)/β",
        "p90 err (e^λ−1)/β",
        "median err Rayleigh",
        "p90 err Rayleigh",
        "median signed err",
        "note",
    ]
    return markdown_table(header, rows)


def cold_start_table(runs: list[AccuracyRun], after: int) -> str:
    """The no-warm-up variant before and after step ``after`` (the direction needs tens of steps to align)."""
    rows = []
    for run in runs:
        cold = next(v for v in run.variants if v.monitor == "cold")
        warm = next(v for v in run.variants if v.monitor == "default")
        for label, points in (
            (f"steps < {after}", [p for p in run.points if p.step < after]),
            (f"steps ≥ {after}", [p for p in run.points if p.step >= after]),
        ):
            c, w = _errors(points, cold, "h0"), _errors(points, warm, "h0")
            rows.append(
                [
                    run.name,
                    label,
                    str(len(c)),
                    pct(median(c)),
                    pct(quantile(c, 0.9)),
                    pct(median(w)),
                    pct(quantile(w, 0.9)),
                ]
            )
    header = [
        "network",
        "steps",
        "points",
        "no warm-up: median err",
        "no warm-up: p90 err",
        "with warm-up: median err",
        "with warm-up: p90 err",
    ]
    return markdown_table(header, rows)


def bias_table(runs: list[AccuracyRun]) -> str:
    """Markdown table (b): finite-Δq bias at the exact top eigenvector, per Δq."""
    rows = []
    for run in runs:
        dqs = sorted(run.points[0].bias_rayleigh) if run.points else []
        for dq in dqs:
            ray = [p.bias_rayleigh[dq] for p in run.points]
            lyap = [p.bias_lyapunov[dq] for p in run.points]
            rows.append(
                [
                    run.name,
                    fmt(dq, "g"),
                    pct(median(ray), 2),
                    pct(median([abs(x) for x in ray]), 2),
                    pct(quantile([abs(x) for x in ray], 0.9), 2),
                    pct(median(lyap), 2),
                    pct(quantile([abs(x) for x in lyap], 0.9), 2),
                ]
            )
    header = [
        "network",
        "Δq",
        "median signed bias, Rayleigh",
        "median abs bias, Rayleigh",
        "p90 abs bias, Rayleigh",
        "median signed bias, (e^λ−1)/β",
        "p90 abs bias, (e^λ−1)/β",
    ]
    return markdown_table(header, rows)


def summary_lines(runs: list[AccuracyRun]) -> list[str]:
    """One line per run: size, steps, points, exact-eigenvector quality, wall time."""
    lines = []
    for run in runs:
        h0s = [p.h0 for p in run.points]
        res = max((p.eigvec_residual for p in run.points), default=math.nan)
        lines.append(
            f"- {run.name}: N = {run.num_params} parameters, {run.steps} SGD steps (lr 0.1, batch 128), "
            f"exact reference at every {run.every}th step ({len(run.points)} points), exact h0 between "
            f"{fmt(min(h0s, default=math.nan))} and {fmt(max(h0s, default=math.nan))}; "
            f"top-eigenvector residual ≤ {fmt(res, '.1e')}·h0; {run.seconds:.0f} s."
        )
    return lines
