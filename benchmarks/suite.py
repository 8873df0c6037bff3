"""Per-step h0 of ``HessianEigenvalueMonitor`` against the exact same-batch h0, on models wider than digits.

    python -m benchmarks.suite                                    # every model, the monitor's defaults
    python -m benchmarks.suite --models transformer,bn_cnn --steps 60 --every 1 \
        --monitor '{"n_iter": 3, "delta_q": 1e-3}' --json out.json
    python -m benchmarks.suite --monitor '{}' --monitor '{"n_iter": 4}' --monitor '{"delta_q": 1e-3}'
    python -m benchmarks.suite --smoke                            # tiny sizes, a few steps (seconds)

One Lightning training run per model (``benchmarks/suite_models.py``) carries the monitors under test (each
``--monitor`` is one ``HessianEigenvalueMonitor(**json)``; they all watch the very same trajectory, because
monitors never change training) and, last in the callback list, :class:`SameBatchReference`. At every
``--every``-th step, in ``on_before_optimizer_step`` (after the monitors estimated at this θ and batch,
before the optimizer moves θ), the reference computes the exact largest algebraic eigenvalue h0 of the
Hessian of the same batch's training loss at the same θ with its own code (``benchmarks/exact.py``:
double-backward products, float64, ``eigsh``), reads each monitor's estimate through the public API only
(``monitor.latest`` and the values the monitor sent to the Trainer's logger), and, at a few diagnostic
points, the finite-difference quotients along the exact top eigenvector. It never draws from the global
random generators, never touches ``p.grad`` or the model's buffers: training is bit-identical with and
without it (``tests/test_benchmarks.py``).

The record is strict JSON (``--json``; NaN becomes ``null``) and markdown tables (stdout, ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.loggers.logger import Logger  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.optim import Optimizer  # noqa: E402

from benchmarks.common import (  # noqa: E402
    device_description,
    fmt,
    markdown_table,
    median,
    pct,
    progress,
    quantile,
    quiet,
    resolve_device,
    results_block,
    write_block,
)
from benchmarks.exact import (  # noqa: E402
    BatchLoss,
    ExactHessian,
    LossFn,
    dense_crosscheck,
    eigenspace_overlap,
    top_eigen,
)
from benchmarks.suite_models import CASES, Case  # noqa: E402
from lightning_chaos import HessianEigenvalueMonitor  # noqa: E402

DELTA_QS = (1e-1, 5e-2, 1e-2, 1e-3, 1e-4, 1e-5)
"""Separations of the finite-difference diagnostics along the exact top eigenvector."""

OFF = 0.10
"""A step is "off" when ``|chaos/h0 − h0| / |h0|`` exceeds this."""

CRITERIA = {
    "median": 0.03,  # median |error| over flagged-converged steps
    "p90": 0.10,  # p90 |error| over flagged-converged steps
    "converged": 0.90,  # share of steps flagged converged (not on fresh-random-batch models)
    "flagged_off": 0.05,  # share of all steps flagged converged and more than OFF off
    "cost": 4.0,  # mean probe gradients per computed step
}
"""Acceptance thresholds the suite checks its numbers against (the targets the estimator must meet)."""

SUITE_MONITORS: list[dict[str, Any]] = [
    {"label": "defaults"},
    {"budget": 12, "n_iter": 16, "label": "budget=12"},
    {"budget": 1e9, "n_iter": 32, "label": "unlimited"},
    {"products": "finite_difference", "n_iter": 1, "label": "paper mode"},
]
"""The monitors of ``benchmarks/run.py --only suite``: the defaults, a larger budget, no budget (what
converging every step costs) and the paper's one gradient per step."""

GRADIENT_NAMES = ("cost", "num_gradients", "probe_gradients", "num_products", "gradients")
"""Attribute names under which an estimate may carry its cost in gradient-equivalents (first found wins)."""


# ------------------------------------------------------------------------------------ monitor specs


@dataclass
class MonitorSpec:
    """One monitor under test: its label in the tables, its keyword arguments and its log prefix."""

    label: str
    kwargs: dict[str, Any]
    log_prefix: str


def _label(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items()) if kwargs else "defaults"


def monitor_specs(configs: Sequence[dict[str, Any]]) -> list[MonitorSpec]:
    """Specs from JSON dicts (an optional ``"label"`` key names the row); the first logs under ``chaos/``."""
    specs = []
    for i, config in enumerate(configs):
        kwargs = dict(config)
        label = str(kwargs.pop("label", _label(kwargs)))
        prefix = str(kwargs.pop("log_prefix", "chaos/" if i == 0 else f"chaos{i}/"))
        specs.append(MonitorSpec(label, kwargs, prefix))
    if len({s.label for s in specs}) != len(specs) or len({s.log_prefix for s in specs}) != len(specs):
        raise SystemExit("--monitor: labels and log prefixes must be distinct")
    return specs


# --------------------------------------------------------------------------------------- the logger


class MemoryLogger(Logger):
    """Keeps what is logged in the current training step (``current``, cleared by the reference)."""

    def __init__(self) -> None:
        super().__init__()
        self.current: dict[str, float] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        return None

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.current.update({k: float(v) for k, v in metrics.items()})


# ---------------------------------------------------------------------------------- the reference


@dataclass
class Settings:
    """What the reference computes and where."""

    every: int
    dtype: torch.dtype
    diag_steps: frozenset[int]
    hmin_steps: frozenset[int] | None  # None: at every reference step
    crosscheck_steps: frozenset[int]
    crosscheck_max_n: int
    delta_qs: tuple[float, ...] = DELTA_QS
    eig_tol: float = 1e-8
    seed: int = 0


@dataclass
class StepRecord:
    """Exact spectrum, the monitors' estimates and the diagnostics at one reference step."""

    step: int
    h0: float
    h1: float
    h_min: float
    eig_residual: float
    eig_hvps: int
    eig_seconds: float
    overlap_prev: float | None
    grad_check_fp32: float | None
    grad_check_exact: float | None
    monitors: dict[str, dict[str, Any]]
    crosscheck: dict[str, Any] | None = None
    diag: dict[str, Any] | None = None


def _flat_grad(module: torch.nn.Module) -> Tensor | None:
    """``p.grad`` of the trainable parameters as one flat copy (read only), None if any is missing."""
    grads = [p.grad for p in module.parameters() if p.requires_grad]
    if any(g is None for g in grads):
        return None
    return torch.cat([g.detach().reshape(-1) for g in grads])


def _rel(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()))


def _first_attr(obj: Any, names: Sequence[str]) -> Any:
    for name in names:
        if hasattr(obj, name):
            return getattr(obj, name)
    return None


class SameBatchReference(Callback):
    """Exact same-batch h0 at the monitors' θ, and their estimates read through the public API.

    Place it last in the Trainer's callback list. It records the batch in ``on_train_batch_start`` and,
    in ``on_before_optimizer_step``, reads every monitor's estimate of this step (``latest`` and the
    logged values) and, at reference steps, computes the exact spectrum of the same batch at the same θ.

    Args:
        monitors: ``{label: (monitor, log_prefix)}``, each placed before this callback.
        logger: the Trainer's :class:`MemoryLogger`.
        loss: the case's own loss function (``None``: ``module.curvature_loss(batch)``).
        settings: reference interval, dtype, diagnostic steps.
    """

    def __init__(
        self,
        monitors: dict[str, tuple[HessianEigenvalueMonitor, str]],
        logger: MemoryLogger,
        loss: LossFn | None,
        settings: Settings,
    ) -> None:
        self.monitors = monitors
        self.logger = logger
        self.loss = loss
        self.settings = settings
        self.records: list[StepRecord] = []
        self.computed: list[dict[str, Any]] = []  # per optimizer step: each monitor's fresh estimate
        self.num_params = 0
        self.seconds = 0.0
        self._batch: Any = None
        self._seen: dict[str, Any] = {}
        self._previous: tuple[Tensor, tuple[float, float]] | None = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch = batch
        self.logger.current.clear()

    def _read(self, label: str, monitor: HessianEigenvalueMonitor, prefix: str) -> dict[str, Any]:
        """This step's estimate of one monitor: ``fresh`` is False when it did not compute this step."""
        latest = getattr(monitor, "latest", None)
        fresh = latest is not None and latest is not self._seen.get(label)
        self._seen[label] = latest
        if not fresh:
            return {"fresh": False}
        logged = self.logger.current

        def get(name: str) -> float | None:
            return logged.get(prefix + name)

        converged = getattr(latest, "converged", None)
        if converged is None and get("h0_converged") is not None:
            converged = get("h0_converged") >= 0.5
        gradients = _first_attr(latest, GRADIENT_NAMES)
        if gradients is None:
            gradients = get("probe_cost") if get("probe_cost") is not None else get("probe_gradients")
        return {
            "fresh": True,
            "valid": bool(getattr(latest, "valid", True)),
            "h0": float(getattr(latest, "h0", math.nan)),
            "logged_h0": get("h0"),
            "h0_rayleigh": float(getattr(latest, "h0_rayleigh", math.nan)),
            "h0_residual": float(getattr(latest, "h0_residual", math.nan)),
            "num_gradients": None if gradients is None else float(gradients),
            "logged_probe_gradients": get("probe_gradients"),
            "converged": None if converged is None else bool(converged),
            "warmup_iterations": getattr(monitor, "warmup_iterations", None),
        }

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        step = trainer.global_step
        estimates = {label: self._read(label, m, prefix) for label, (m, prefix) in self.monitors.items()}
        self.computed.append({"step": step, **{label: _cost_fields(e) for label, e in estimates.items()}})
        if step % self.settings.every != 0:
            return
        start = time.perf_counter()
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            record = self._exact(pl_module, step, estimates)
        self.seconds += time.perf_counter() - start
        self.records.append(record)
        est = ", ".join(
            f"{label} {fmt(e.get('logged_h0') or e.get('h0'), '.4g')}" for label, e in estimates.items()
        )
        progress(f"  step {step}: exact h0 {record.h0:.5g} ({record.eig_hvps} HVPs); {est}")

    def _exact(self, module: pl.LightningModule, step: int, estimates: dict[str, Any]) -> StepRecord:
        s = self.settings
        exact_loss = BatchLoss(module, self._batch, self.loss, s.dtype)
        self.num_params = exact_loss.dim
        hessian = ExactHessian(exact_loss)
        warm = self._previous[0][:, 0] if self._previous is not None else None
        smallest = s.hmin_steps is None or step in s.hmin_steps
        eig = top_eigen(hessian, k=2, smallest=smallest, tol=s.eig_tol, seed=s.seed + step, warm=warm)
        v0 = eig.vectors[:, 0]
        overlap = None
        if self._previous is not None:
            overlap = eigenspace_overlap(v0, *self._previous)
        self._previous = (eig.vectors, (eig.h0, eig.h1))

        # Same θ, same batch, same loss? The training gradient p.grad (read, never written) against this
        # code's gradient of the case's loss, in float32 with the default kernels and in the exact dtype.
        fp32 = BatchLoss(module, self._batch, self.loss, torch.float32)
        theta32 = fp32.theta()
        g32 = fp32.gradient(theta32)
        p_grad = _flat_grad(module)
        check32 = _rel(g32, p_grad) if p_grad is not None else None
        check_exact = _rel(hessian.grad.detach(), p_grad) if p_grad is not None else None

        record = StepRecord(
            step=step,
            h0=eig.h0,
            h1=eig.h1,
            h_min=eig.h_min,
            eig_residual=eig.residual,
            eig_hvps=eig.hvps,
            eig_seconds=eig.seconds,
            overlap_prev=overlap,
            grad_check_fp32=check32,
            grad_check_exact=check_exact,
            monitors=estimates,
        )
        if step in s.crosscheck_steps and exact_loss.dim <= s.crosscheck_max_n:
            dense = dense_crosscheck(exact_loss, exact_loss.theta())
            ref = dense["autograd"]
            dense["h0_rel_diff"] = abs(ref["h0"] - eig.h0) / abs(ref["h0"])
            dense["h_min_rel_diff"] = abs(ref["h_min"] - eig.h_min) / abs(ref["h0"]) if smallest else None
            if dense["func"] is not None:
                dense["func"]["h0_rel_diff"] = abs(dense["func"]["h0"] - eig.h0) / abs(ref["h0"])
            record.crosscheck = dense
        if step in s.diag_steps:
            record.diag = self._diagnostics(fp32, theta32, g32, p_grad, hessian, eig.h0, v0, step)
        return record

    def _diagnostics(
        self,
        fp32: BatchLoss,
        theta32: Tensor,
        g32: Tensor,
        p_grad: Tensor | None,
        hessian: ExactHessian,
        h0: float,
        v0: Tensor,
        step: int,
    ) -> dict[str, Any]:
        """Finite differences against exact products, along the exact top eigenvector v0 and a random u.

        ``by_delta_q`` (relative errors against h0):

        ``one_sided``/``central``: ``v0ᵀ(g(θ+Δq v0) − g(θ))/Δq`` and ``v0ᵀ(g(θ+Δq v0) − g(θ−Δq v0))/(2Δq)``
        with float32 parameters as trained (default attention kernels, as the monitor runs them);
        ``one_sided_train_grad``: the one-sided quotient with the training gradient ``p.grad`` as ``g(θ)``;
        ``one_sided_exact``/``central_exact``: the same in the exact dtype (no float32 cancellation).

        ``random_by_delta_q``: ``‖(g(θ+Δq u) − g(θ))/Δq − Hu‖ / h0`` for a seeded random unit ``u``, in
        float32 (``fp32``) and the exact dtype (``exact``): the part of the difference that is not ``Hu``, in
        units of h0, which an estimate built on the norm of the difference (the Lyapunov growth) counts as
        curvature.
        """
        exact_loss = hessian.loss
        v32 = v0.to(torch.float32)
        v = v0.double()
        theta_x = exact_loss.theta()
        vx = v0.to(exact_loss.dtype)
        gx = exact_loss.gradient(theta_x)
        out: dict[str, Any] = {"v0_shares": _top_shares(fp32.tensor_shares(v0)), "by_delta_q": {}}
        for dq in self.settings.delta_qs:
            plus = fp32.gradient(theta32 + dq * v32).double()
            minus = fp32.gradient(theta32 - dq * v32).double()
            plus_x = exact_loss.gradient(theta_x + dq * vx).double()
            minus_x = exact_loss.gradient(theta_x - dq * vx).double()
            entry = {
                "one_sided": float(v @ (plus - g32.double())) / dq,
                "central": float(v @ (plus - minus)) / (2 * dq),
                "one_sided_train_grad": float(v @ (plus - p_grad.double())) / dq
                if p_grad is not None
                else None,
                "one_sided_exact": float(v @ (plus_x - gx.double())) / dq,
                "central_exact": float(v @ (plus_x - minus_x)) / (2 * dq),
            }
            out["by_delta_q"][repr(dq)] = {
                k: None if x is None else (x - h0) / abs(h0) for k, x in entry.items()
            }
        generator = torch.Generator().manual_seed(self.settings.seed + 7919 * (step + 1))
        u = torch.randn(v0.numel(), generator=generator, dtype=torch.float64)
        u /= torch.linalg.vector_norm(u)
        hu = hessian.matvec(u).double()
        out["random_by_delta_q"] = {}
        for dq in self.settings.delta_qs:
            y32 = (fp32.gradient(theta32 + dq * u.to(torch.float32)).double() - g32.double()) / dq
            yx = (exact_loss.gradient(theta_x + dq * u.to(exact_loss.dtype)).double() - gx.double()) / dq
            out["random_by_delta_q"][repr(dq)] = {
                "fp32": float(torch.linalg.vector_norm(y32 - hu)) / abs(h0),
                "exact": float(torch.linalg.vector_norm(yx - hu)) / abs(h0),
            }
        out["random_hu_over_h0"] = float(torch.linalg.vector_norm(hu)) / abs(h0)
        return out


def _cost_fields(estimate: dict[str, Any]) -> dict[str, Any]:
    """What the per-step cost and warm-up accounting needs of an estimate (the full one is in the records)."""
    keys = ("fresh", "valid", "h0", "logged_h0", "num_gradients", "converged", "warmup_iterations")
    return {k: estimate[k] for k in keys if k in estimate}


def _top_shares(shares: dict[str, float], n: int = 3) -> dict[str, float]:
    return dict(sorted(shares.items(), key=lambda kv: -kv[1])[:n])


# ---------------------------------------------------------------------------------------- one run


@dataclass
class CaseResult:
    """Everything measured on one model."""

    key: str
    label: str
    num_params: int
    steps: int
    every: int
    dtype: str
    fresh_batches: bool
    seconds: float
    reference_seconds: float
    records: list[StepRecord]
    computed: list[dict[str, Any]]
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)


def _trainer(callbacks: list[Callback], logger: Logger, steps: int, device: torch.device) -> pl.Trainer:
    """A bare Trainer (no checkpoints, progress bar, validation) with the in-memory logger, every step."""
    return pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        max_steps=steps,
        max_epochs=-1,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def _spread(steps: Sequence[int], n: int) -> frozenset[int]:
    """``n`` entries of ``steps`` spread evenly from the first to the last."""
    if n <= 0 or not steps:
        return frozenset()
    if n == 1:
        return frozenset({steps[len(steps) // 2]})
    return frozenset(steps[round(i * (len(steps) - 1) / (n - 1))] for i in range(n))


def run_case(
    case: Case,
    specs: Sequence[MonitorSpec],
    *,
    steps: int,
    every: int,
    skip: int,
    diag_points: int,
    hmin: str,
    dtype: torch.dtype,
    crosscheck_max_n: int,
    smoke: bool,
    seed: int,
    device: torch.device,
    with_reference: bool = True,
) -> tuple[CaseResult, pl.LightningModule]:
    """Train ``case`` for ``steps`` steps with the monitors and the exact reference; returns the result."""
    start = time.perf_counter()
    pl.seed_everything(seed, verbose=False)
    module, data = case.build(smoke, steps, seed)
    monitors = {s.label: HessianEigenvalueMonitor(**s.kwargs, log_prefix=s.log_prefix) for s in specs}
    logger = MemoryLogger()
    ref_steps = list(range(0, steps, every))
    after = [s for s in ref_steps if s >= skip]
    diag = _spread(after, diag_points)
    settings = Settings(
        every=every,
        dtype=dtype,
        diag_steps=diag,
        hmin_steps=None if hmin == "all" else (diag if hmin == "diag" else frozenset()),
        crosscheck_steps=frozenset(ref_steps[:1]),
        crosscheck_max_n=crosscheck_max_n,
        seed=seed,
    )
    reference = SameBatchReference(
        {s.label: (monitors[s.label], s.log_prefix) for s in specs}, logger, case.loss, settings
    )
    callbacks: list[Callback] = [*monitors.values()]
    if with_reference:
        callbacks.append(reference)
    trainer = _trainer(callbacks, logger, steps, device)
    if isinstance(data, pl.LightningDataModule):
        trainer.fit(module, datamodule=data)
    else:
        trainer.fit(module, train_dataloaders=data)
    result = CaseResult(
        key=case.key,
        label=case.label + (" (smoke size)" if smoke else ""),
        num_params=sum(p.numel() for p in module.parameters() if p.requires_grad),
        steps=steps,
        every=every,
        dtype=str(dtype).replace("torch.", ""),
        fresh_batches=case.fresh_batches,
        seconds=time.perf_counter() - start,
        reference_seconds=reference.seconds,
        records=reference.records,
        computed=reference.computed,
    )
    result.summaries = {s.label: summarize(result, s.label, skip) for s in specs}
    return result, module


# ------------------------------------------------------------------------------------------ metrics


def _estimate(m: dict[str, Any]) -> float | None:
    """The monitor's ``h0`` of a step as logged (``latest.h0`` if it logged none); None if not usable."""
    if not m.get("fresh") or not m.get("valid"):
        return None
    value = m.get("logged_h0")
    value = m.get("h0") if value is None else value
    return value if value is not None and math.isfinite(value) else None


def summarize(result: CaseResult, label: str, skip: int) -> dict[str, Any]:
    """Accuracy, flag honesty and cost of one monitor on one model over the reference steps ≥ ``skip``.

    Errors are ``|chaos/h0 − h0| / |h0|`` against the exact largest algebraic eigenvalue. "Flagged" means
    ``converged`` when the estimate carries it; without the attribute, every valid estimate counts as
    flagged (nothing marks it as wrong) and the share flagged is reported as None.
    """
    after = [r for r in result.records if r.step >= skip]
    errors, signed, ray_errors, flagged_errors = [], [], [], []
    flags: list[bool] = []
    has_flag = False
    off = flagged_off = bracket = unusable = 0
    for r in after:
        m = r.monitors[label]
        value = _estimate(m)
        if value is None:
            unusable += 1
            flags.append(False)
            continue
        err = abs(value - r.h0) / abs(r.h0)
        errors.append(err)
        signed.append((value - r.h0) / abs(r.h0))
        rho, res = m.get("h0_rayleigh"), m.get("h0_residual")
        if rho is not None and math.isfinite(rho):
            ray_errors.append(abs(rho - r.h0) / abs(r.h0))
            if res is not None and math.isfinite(res) and abs(rho - r.h0) <= res:
                bracket += 1
        flag = m.get("converged")
        has_flag = has_flag or flag is not None
        flag = True if flag is None else bool(flag)
        flags.append(flag)
        off += err > OFF
        if flag:
            flagged_errors.append(err)
            flagged_off += err > OFF
    n = len(after)
    computed = [c[label] for c in result.computed if c["step"] >= skip and c[label].get("fresh")]
    grads = [c["num_gradients"] for c in computed if c.get("num_gradients") is not None]
    first = next((c for c in result.computed if c[label].get("fresh")), None)
    warm_rec = next((r for r in result.records if first is not None and r.step == first["step"]), None)
    warmup = None
    if first is not None:
        m = first[label]
        value = _estimate(m)
        warmup = {
            "step": first["step"],
            "exact_h0": warm_rec.h0 if warm_rec is not None else None,
            "h0": value,
            "abs_err": abs(value - warm_rec.h0) / abs(warm_rec.h0)
            if value is not None and warm_rec
            else None,
            "num_gradients": m.get("num_gradients"),
            "warmup_iterations": m.get("warmup_iterations"),
        }
    summary = {
        "points": n,
        "unusable": unusable,
        "median_abs_err": median(errors),
        "p90_abs_err": quantile(errors, 0.9),
        "median_signed_err": median(signed),
        "median_abs_err_rayleigh": median(ray_errors),
        "has_flag": has_flag,
        "flagged_share": sum(flags) / n if has_flag and n else None,
        "flagged_median_abs_err": median(flagged_errors),
        "flagged_p90_abs_err": quantile(flagged_errors, 0.9),
        "off_share": off / n if n else None,
        "flagged_off_share": flagged_off / n if n else None,
        "exact_in_rayleigh_pm_residual_share": bracket / n if n else None,
        "mean_gradients": sum(grads) / len(grads) if grads else None,
        "computed_steps": len(computed),
        "warmup": warmup,
    }
    summary["criteria"] = criteria(summary, result.fresh_batches)
    return summary


def criteria(summary: dict[str, Any], fresh_batches: bool) -> dict[str, bool | None]:
    """Which acceptance thresholds (:data:`CRITERIA`) the numbers meet; None where not measurable."""

    def le(value: Any, bound: float) -> bool | None:
        return None if value is None or not math.isfinite(value) else value <= bound

    converged = None
    if not fresh_batches:
        share = summary["flagged_share"]
        converged = None if share is None else share >= CRITERIA["converged"]
    return {
        "median": le(summary["flagged_median_abs_err"], CRITERIA["median"]),
        "p90": le(summary["flagged_p90_abs_err"], CRITERIA["p90"]),
        "converged": converged,
        "flagged_off": le(summary["flagged_off_share"], CRITERIA["flagged_off"]),
        "cost": le(summary["mean_gradients"], CRITERIA["cost"]),
    }


# ------------------------------------------------------------------------------------------- tables


def _verdict(crit: dict[str, bool | None]) -> str:
    failed = [name for name, ok in crit.items() if ok is False]
    unknown = [name for name, ok in crit.items() if ok is None]
    text = "meets all" if not failed else "fails " + ", ".join(failed)
    return text + (f" (n/a: {', '.join(unknown)})" if unknown else "")


def main_table(results: Sequence[CaseResult]) -> str:
    """Per model and monitor: error of ``chaos/h0`` after warm-up, flag honesty, cost."""
    rows = []
    for r in results:
        for label, s in r.summaries.items():
            rows.append(
                [
                    r.label,
                    label,
                    f"{r.num_params:,}",
                    f"{s['points']}" + (f" ({s['unusable']} unusable)" if s["unusable"] else ""),
                    pct(s["median_abs_err"]),
                    pct(s["p90_abs_err"]),
                    pct(s["median_signed_err"]),
                    pct(s["median_abs_err_rayleigh"]),
                    pct(s["flagged_share"]) if s["has_flag"] else "– (no flag)",
                    pct(s["flagged_median_abs_err"]) if s["has_flag"] else "–",
                    pct(s["flagged_p90_abs_err"]) if s["has_flag"] else "–",
                    pct(s["flagged_off_share"]) if s["has_flag"] else "–",
                    pct(s["off_share"]),
                    pct(s["exact_in_rayleigh_pm_residual_share"], 0),
                    fmt(s["mean_gradients"], ".2f"),
                    _verdict(s["criteria"]),
                ]
            )
    header = [
        "model",
        "monitor",
        "N",
        "points",
        "median \\|err\\|",
        "p90 \\|err\\|",
        "median signed err",
        "median \\|err\\| Rayleigh",
        "flagged converged",
        "median \\|err\\| flagged",
        "p90 \\|err\\| flagged",
        "flagged & > 10 % off",
        "> 10 % off",
        "exact in ρ ± r",
        "probe gradients / step",
        "acceptance",
    ]
    return markdown_table(header, rows)


def warmup_table(results: Sequence[CaseResult]) -> str:
    """The first computed step of every monitor (its warm-up), reported apart from the rest."""
    rows = []
    for r in results:
        for label, s in r.summaries.items():
            w = s["warmup"] or {}
            rows.append(
                [
                    r.label,
                    label,
                    fmt(w.get("step"), "d"),
                    fmt(w.get("exact_h0"), ".4g"),
                    fmt(w.get("h0"), ".4g"),
                    pct(w.get("abs_err")),
                    fmt(w.get("num_gradients"), ".0f"),
                    fmt(w.get("warmup_iterations"), "d")
                    if isinstance(w.get("warmup_iterations"), int)
                    else "–",
                ]
            )
    header = [
        "model",
        "monitor",
        "step",
        "exact h0",
        "chaos/h0",
        "\\|err\\|",
        "probe gradients (as reported)",
        "warm-up iterations",
    ]
    return markdown_table(header, rows)


def _signed_and_max(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{pct(median(values))} ({pct(max(abs(v) for v in values))})"


def fd_table(results: Sequence[CaseResult]) -> str:
    """Why (a): finite-difference quotients along the exact top eigenvector against h0, per Δq."""
    rows = []
    for r in results:
        diags = [rec.diag for rec in r.records if rec.diag is not None]
        if not diags:
            continue
        for dq in diags[0]["by_delta_q"]:
            cells = []
            for key in ("one_sided", "central", "one_sided_train_grad", "one_sided_exact", "central_exact"):
                vals = [d["by_delta_q"][dq][key] for d in diags if d["by_delta_q"][dq][key] is not None]
                cells.append(_signed_and_max(vals))
            for key in ("fp32", "exact"):
                vals = [d["random_by_delta_q"][dq][key] for d in diags]
                cells.append(f"{fmt(median(vals), '.2g')} ({fmt(max(vals), '.2g')})")
            rows.append([r.label, str(len(diags)), fmt(float(dq), "g"), *cells])
    header = [
        "model",
        "points",
        "Δq",
        "one-sided fp32",
        "central fp32",
        "one-sided fp32, g(θ) = p.grad",
        "one-sided exact dtype",
        "central exact dtype",
        "random u: ‖y − Hu‖/h0 fp32",
        "random u: ‖y − Hu‖/h0 exact dtype",
    ]
    return markdown_table(header, rows)


def spectrum_table(results: Sequence[CaseResult]) -> str:
    """Why (b): gap, eigenvector drift, where v0 lives, and the checks that the oracle sees the same loss."""
    rows = []
    for r in results:
        recs = r.records
        gaps = [rec.h1 / rec.h0 for rec in recs if math.isfinite(rec.h1)]
        overlaps = [rec.overlap_prev for rec in recs if rec.overlap_prev is not None]
        hmins = [rec.h_min / rec.h0 for rec in recs if math.isfinite(rec.h_min)]
        shares = [rec.diag["v0_shares"] for rec in recs if rec.diag is not None]
        where = "–"
        if shares:
            name, share = next(iter(shares[-1].items()))
            where = f"{name} {pct(share, 0)}"
        g32 = [rec.grad_check_fp32 for rec in recs if rec.grad_check_fp32 is not None]
        gx = [rec.grad_check_exact for rec in recs if rec.grad_check_exact is not None]
        cross = [rec.crosscheck for rec in recs if rec.crosscheck is not None]
        dense = "–"
        if cross:
            dense = f"{fmt(max(c['h0_rel_diff'] for c in cross), '.0e')}"
            funcs = [c["func"] for c in cross if c["func"] is not None]
            dense += f"; {fmt(max(f['h0_rel_diff'] for f in funcs), '.0e')}" if funcs else "; –"
        rows.append(
            [
                r.label,
                str(len(recs)),
                f"{fmt(min(rec.h0 for rec in recs))}–{fmt(max(rec.h0 for rec in recs))}" if recs else "–",
                f"{fmt(median(gaps), '.3f')} ({fmt(max(gaps, default=math.nan), '.3f')})",
                f"{fmt(median(overlaps), '.3f')} ({fmt(min(overlaps, default=math.nan), '.3f')})",
                f"{fmt(median(hmins), '.2f')}" if hmins else "–",
                where,
                fmt(max(g32, default=math.nan), ".1e"),
                fmt(max(gx, default=math.nan), ".1e"),
                fmt(median([rec.eig_hvps for rec in recs]), ".0f"),
                fmt(max((rec.eig_residual for rec in recs), default=math.nan), ".0e"),
                dense,
            ]
        )
    header = [
        "model",
        "points",
        "exact h0",
        "h1/h0 median (max)",
        "\\|v0ᵀv0_prev\\| median (min)",
        "h_min/h0 (diag. points)",
        "largest tensor of v0 (last diag. point)",
        "‖g_fp32 − p.grad‖/‖p.grad‖ max",
        "‖g_exact − p.grad‖/‖p.grad‖ max",
        "HVPs / eigsh",
        "eigsh residual max",
        "dense cross-check: autograd; torch.func",
    ]
    return markdown_table(header, rows)


def setup_lines(results: Sequence[CaseResult], specs: Sequence[MonitorSpec], skip: int) -> list[str]:
    """One line per model (size, steps, reference interval, wall times) and the monitors' arguments."""
    lines = [
        "Monitors: "
        + "; ".join(f"`{s.label}` = `HessianEigenvalueMonitor({_kwargs_src(s.kwargs)})`" for s in specs)
        + f". Warm-up: reference steps < {skip} are reported apart; errors are against the exact largest "
        "algebraic eigenvalue of the same batch at the same θ."
    ]
    for r in results:
        lines.append(
            f"- {r.label}: N = {r.num_params:,}, {r.steps} steps, exact reference every {r.every} step(s) "
            f"({len(r.records)} points, {r.dtype}), {r.seconds:.0f} s "
            f"({r.reference_seconds:.0f} s of it the reference)."
        )
    return lines


def _kwargs_src(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


def tables(results: Sequence[CaseResult], specs: Sequence[MonitorSpec], skip: int) -> list[str]:
    """The markdown sections of a suite run."""
    return [
        "\n".join(setup_lines(results, specs, skip)),
        "Per-step `chaos/h0` against the exact same-batch h0, after warm-up (acceptance: median ≤ 3 % and "
        "p90 ≤ 10 % over flagged-converged steps, ≥ 90 % flagged converged except on fresh random batches, "
        "flagged & > 10 % off on ≤ 5 % of steps, ≤ 4 probe gradients per computed step):",
        main_table(results),
        "Warm-up step (the first computed step):",
        warmup_table(results),
        "Why (a): finite-difference quotients along the exact top eigenvector v0, relative error against h0, "
        "median signed over the diagnostic points (max |·|); and along a random unit direction u the part of "
        "y = (g(θ+Δq u) − g(θ))/Δq that is not Hu, in units of h0, median (max):",
        fd_table(results),
        "Why (b): spectral gap, drift of the exact top eigenvector between consecutive reference steps, "
        "where v0 lives, and the oracle's own checks:",
        spectrum_table(results),
    ]


# --------------------------------------------------------------------------------------------- JSON


def strict(value: Any) -> Any:
    """A JSON-safe copy: NaN/inf → None, floats to 7 significant digits, containers → lists and dicts."""
    if isinstance(value, float):
        return float(f"{value:.7g}") if math.isfinite(value) else None
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [strict(v) for v in value]
    if hasattr(value, "__dataclass_fields__"):
        return strict(asdict(value))
    if isinstance(value, Tensor):
        return strict(value.tolist())
    if hasattr(value, "item"):
        return strict(value.item())
    return str(value)


def git_commit() -> dict[str, Any]:
    """HEAD of the repository the suite runs from and whether its work tree has changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=30
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def record(
    results: Sequence[CaseResult], specs: Sequence[MonitorSpec], args: dict[str, Any], command: str, device
) -> dict[str, Any]:
    """The strict-JSON record of a suite run."""
    return strict(
        {
            "benchmark": "per-step h0 suite",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "git": git_commit(),
            "machine": device_description(device),
            "python": platform.python_version(),
            "settings": args,
            "criteria": CRITERIA,
            "off_threshold": OFF,
            "monitors": [asdict(s) for s in specs],
            "cases": [
                {
                    "key": r.key,
                    "label": r.label,
                    "parameters": r.num_params,
                    "steps": r.steps,
                    "every": r.every,
                    "dtype": r.dtype,
                    "fresh_batches": r.fresh_batches,
                    "seconds": r.seconds,
                    "reference_seconds": r.reference_seconds,
                    "summaries": r.summaries,
                    "records": r.records,
                    "computed": r.computed,
                }
                for r in results
            ],
        }
    )


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="all", help=f"comma-separated, or all: {', '.join(CASES)}")
    parser.add_argument("--steps", type=int, help="training steps of every model (default: per model)")
    parser.add_argument(
        "--every", type=int, help="exact reference every this many steps (default: per model)"
    )
    parser.add_argument(
        "--monitor",
        action="append",
        help='JSON keyword arguments of one HessianEigenvalueMonitor (repeatable; optional "label"); '
        "default: one monitor with its defaults",
    )
    parser.add_argument("--skip", type=int, default=1, help="reference steps < this are the warm-up (1)")
    parser.add_argument("--diag-points", type=int, default=3, help="diagnostic points per model (3)")
    parser.add_argument(
        "--hmin",
        choices=("diag", "all", "none"),
        default="diag",
        help="where to solve for the most negative eigenvalue: diagnostic points (default), all, none",
    )
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64", help="exact HVP dtype")
    parser.add_argument(
        "--crosscheck-max-n",
        type=int,
        help="dense torch.func.hessian + eigvalsh cross-check at the first reference step up to this N "
        "(default 2500; smoke: every model)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 4 steps: checks that it runs")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU (1)")
    parser.add_argument("--json", type=Path, help="write the strict-JSON record here")
    parser.add_argument("--out", type=Path, help="markdown file whose results block (--tag) is (re)written")
    parser.add_argument(
        "--tag", help="results block name in --out (default: <device>-suite, smoke-<device>-suite)"
    )
    return parser.parse_args(argv)


def select(models: str) -> list[Case]:
    """The cases named on the command line (``all``: every case, in :data:`CASES` order)."""
    if models.strip() == "all":
        return list(CASES.values())
    keys = [k.strip() for k in models.split(",") if k.strip()]
    unknown = [k for k in keys if k not in CASES]
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {list(CASES)}")
    return [CASES[k] for k in keys]


def run_suite(
    cases: Sequence[Case],
    specs: Sequence[MonitorSpec],
    *,
    steps: int | None,
    every: int | None,
    skip: int = 1,
    diag_points: int = 3,
    hmin: str = "diag",
    dtype: torch.dtype = torch.float64,
    crosscheck_max_n: int | None = None,
    smoke: bool = False,
    seed: int = 0,
    device: torch.device | None = None,
) -> list[CaseResult]:
    """Run every case (see :func:`run_case`); smoke mode: tiny models, 4 steps, one diagnostic point."""
    device = device or torch.device("cpu")
    results = []
    for case in cases:
        n_steps = steps or (4 if smoke else case.steps)
        n_every = every or (1 if smoke else case.every)
        progress(f"suite: {case.label}, {n_steps} steps, reference every {n_every}")
        result, _ = run_case(
            case,
            specs,
            steps=n_steps,
            every=n_every,
            skip=skip,
            diag_points=1 if smoke and diag_points > 1 else diag_points,
            hmin=hmin,
            dtype=dtype,
            crosscheck_max_n=crosscheck_max_n if crosscheck_max_n is not None else (10**9 if smoke else 2500),
            smoke=smoke,
            seed=seed,
            device=device,
        )
        results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet()
    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    configs = [json.loads(m) for m in args.monitor] if args.monitor else [{}]
    specs = monitor_specs(configs)
    started = time.perf_counter()
    results = run_suite(
        select(args.models),
        specs,
        steps=args.steps,
        every=args.every,
        skip=args.skip,
        diag_points=args.diag_points,
        hmin=args.hmin,
        dtype=getattr(torch, args.dtype),
        crosscheck_max_n=args.crosscheck_max_n,
        smoke=args.smoke,
        seed=args.seed,
        device=device,
    )
    command = "python -m benchmarks.suite " + " ".join(sys.argv[1:] if argv is None else argv)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    rec = record(results, specs, settings, command, device)
    rec["seconds"] = time.perf_counter() - started
    smoke_note = " (smoke sizes: not measurements)" if args.smoke else ""
    commit = (rec["git"]["commit"] or "unknown")[:10] + (
        " (uncommitted changes)" if rec["git"]["dirty"] else ""
    )
    sections = [
        f"### Per-step h0 suite on {device.type.upper()}{smoke_note}",
        f"Machine: {device_description(device)}. Generated {datetime.date.today().isoformat()} by "
        f"`{command}` at commit {commit}.",
        *tables(results, specs, args.skip),
        f"Total wall time: {rec['seconds']:.0f} s.",
    ]
    text = "\n\n".join(sections)
    print(text)
    if args.out is not None:
        tag = args.tag or ("smoke-" if args.smoke else "") + f"{device.type}-suite"
        write_block(args.out, tag, results_block(tag, [text]))
    if args.json is not None:
        args.json.write_text(json.dumps(rec, indent=1, allow_nan=False) + "\n")
    return rec


if __name__ == "__main__":
    main()
