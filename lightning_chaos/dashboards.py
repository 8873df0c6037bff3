"""TensorBoard custom-scalars layout for the chaos keys, written once per run.

TensorBoard's *Custom Scalars* tab then shows, per run, a ``training`` category with the losses and one
category per ``log_prefix`` with the charts of the chaos callbacks that the Trainer holds (and nothing
for those it does not). Each chart groups series of one scale, since the layout format has no axis
setting: λ alone (controlled to ≈ 1); 1/h0 with β and the learning rate (the ICLR submission's
Figure 1 compares these); the eigenvalue estimates; the probe's cost; the chaos counts; the local
Lyapunov exponents; the finite-time ones; the maximal exponent with its bound; the overlaps; the twins'
distances; what CGD removed and the share of the update it kept, on separate charts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from torch.optim import Optimizer

_WRITTEN = "_lightning_chaos_layout_written"

Layout = dict[str, dict[str, list]]

LOSS = "loss"
LAMBDA = "lambda (Lyapunov exponent, controlled to 1)"
INVERSE_CURVATURE = "1/h0, beta and learning rate"
EIGENVALUES = "Hessian eigenvalues"
PROBE = "probe cost (gradient-equivalents)"
CONVERGED = "h0 converged (1) or not (0)"
COUNTERS = "skipped and unconverged steps"
DELTA_Q = "finite-difference separation and its error"
COUNTS = "chaos counts"
LLE = "local Lyapunov exponents"
FTLE = "finite-time Lyapunov exponents"
MLCE = "maximal Lyapunov exponent and its bound"
TANGENT_STEPS = "tangent map steps"
OVERLAPS = "gradient and subspace overlaps"
SPECTRUM = "spectrum method and skipped steps"
DIVERGENCE = "trajectory divergence"
DIVERGENCE_FIT = "divergence fit"
CGD_REMOVED = "CGD: directions removed"
CGD_RATIO = "CGD: share of the update kept"

# display order of the charts in a category
_CHARTS = (
    LAMBDA,
    INVERSE_CURVATURE,
    EIGENVALUES,
    PROBE,
    CONVERGED,
    COUNTERS,
    DELTA_Q,
    COUNTS,
    LLE,
    FTLE,
    MLCE,
    TANGENT_STEPS,
    OVERLAPS,
    SPECTRUM,
    DIVERGENCE,
    DIVERGENCE_FIT,
    CGD_REMOVED,
    CGD_RATIO,
)

# chart -> logged keys (regexes after the prefix) of each callback
_CURVATURE = {
    LAMBDA: ["lyapunov_exponent", "lyapunov_fluctuation"],
    INVERSE_CURVATURE: ["inv_h0", "beta"],
    EIGENVALUES: ["h0", "h0_lyapunov", "h0_residual", r"h_top\d+", "h_min"],
    PROBE: ["probe_gradients", "probe_hvps", "probe_cost", "warmup_iters"],
    CONVERGED: ["h0_converged"],
    COUNTERS: ["skipped_steps", "unconverged_steps"],
    DELTA_Q: ["delta_q", "delta_q_error"],
}
_INVERSE_CURVATURE_LR = {INVERSE_CURVATURE: ["lr"], EIGENVALUES: ["h0_ema"], COUNTERS: ["lr_held_steps"]}
_SPECTRUM = {
    COUNTS: [r"n_(chaotic|edge|stable|negative|positive|zero)(_low|_high)?"],
    LLE: ["lle_max", "lle_min"],
    SPECTRUM: ["spectrum_exact", "edge_tolerance", "spectrum_skipped"],
}
_OVERLAPS = {COUNTS: ["chaotic_dim"], OVERLAPS: [r"grad_overlap_\w+", r"chaotic_overlap\w*"]}
_TANGENT_MAP = {
    LLE: ["map_log_norm"],
    FTLE: [r"ftle_\d+", "ftle_min"],
    MLCE: ["mlce", "mlce_bound", "lle_max_mean"],
    TANGENT_STEPS: ["tangent_steps", "tangent_skipped"],
}
_DIVERGENCE = {DIVERGENCE: [r"divergence/.+"], DIVERGENCE_FIT: [r"divergence_fit/.+"]}
_CGD = {CGD_REMOVED: [r"cgd_removed(_\d+)?"], CGD_RATIO: [r"cgd_update_ratio(_\d+)?"]}
_LR_MONITOR = r"lr-.*"  # LearningRateMonitor's tags, which carry no prefix


def _category(prefix: str) -> str:
    return f"lightning_chaos: {prefix}"


def chaos_layout(callbacks: Iterable[Callback], optimizers: Iterable[Optimizer] = ()) -> Layout:
    """The custom-scalars layout of the chaos callbacks among ``callbacks``.

    Each callback's charts go to the category of its ``log_prefix``; a callback that is not there (nor a
    subclass of one that is) gets no chart: ``HessianEigenvalueMonitor`` (λ, 1/h0, eigenvalues, probe
    cost), ``InverseCurvatureLR`` (its learning rate and ``h0_ema``, plus the charts of the monitor it
    owns when the Trainer has no ``HessianEigenvalueMonitor``), ``LyapunovSpectrumMonitor``,
    ``TangentMapMonitor``, ``TrajectoryDivergence``, and ``CGDCurvature`` when one of ``optimizers`` is a
    :class:`~lightning_chaos.CGD` (otherwise it logs nothing). A ``LearningRateMonitor`` adds its
    ``lr-*`` series to the 1/h0 charts. The ``training`` category holds the loss.

    Args:
        callbacks: the Trainer's callbacks.
        optimizers: the Trainer's optimizers.

    Returns:
        A layout ``{category: {chart title: ["Multiline", [tag regexes]]}}`` for
        ``SummaryWriter.add_custom_scalars``.
    """
    # imported here: the callbacks import this module
    from lightning_chaos.callbacks import (
        CGDCurvature,
        HessianEigenvalueMonitor,
        InverseCurvatureLR,
        LyapunovSpectrumMonitor,
        TangentMapMonitor,
        TrajectoryDivergence,
    )
    from lightning_chaos.callbacks._base import ProbeCallback
    from lightning_chaos.optim import CGD

    callbacks = list(callbacks)
    shared_monitor = any(isinstance(c, HessianEigenvalueMonitor) for c in callbacks)
    with_cgd = any(isinstance(opt, CGD) for opt in optimizers)
    keys: dict[str, dict[str, list[str]]] = {}  # prefix -> chart -> regexes
    for callback in callbacks:
        if not isinstance(callback, ProbeCallback):
            continue
        spectrum = isinstance(callback, LyapunovSpectrumMonitor)
        contributions = [
            (isinstance(callback, HessianEigenvalueMonitor), _CURVATURE),
            (isinstance(callback, InverseCurvatureLR) and not shared_monitor, _CURVATURE),  # its own monitor
            (isinstance(callback, InverseCurvatureLR), _INVERSE_CURVATURE_LR),
            (spectrum, _SPECTRUM),
            (isinstance(callback, LyapunovSpectrumMonitor) and callback.overlaps, _OVERLAPS),
            (isinstance(callback, TangentMapMonitor), _TANGENT_MAP),
            (isinstance(callback, TrajectoryDivergence), _DIVERGENCE),
            (isinstance(callback, CGDCurvature) and with_cgd, _CGD),
        ]
        for applies, group in contributions:
            if not applies:
                continue
            category = keys.setdefault(callback.log_prefix, {})
            for chart, names in group.items():
                found = category.setdefault(chart, [])
                regexes = (f"{re.escape(callback.log_prefix)}{name}$" for name in names)
                found += [rx for rx in regexes if rx not in found]
    if any(isinstance(c, LearningRateMonitor) for c in callbacks):
        for charts in keys.values():
            if INVERSE_CURVATURE in charts:
                charts[INVERSE_CURVATURE].append(_LR_MONITOR)
    layout: Layout = {"training": {LOSS: ["Multiline", [r".*loss.*"]]}}
    for prefix, charts in keys.items():
        layout[_category(prefix)] = {
            title: ["Multiline", charts[title]] for title in _CHARTS if title in charts
        }
    return layout


def write_layout(trainer: pl.Trainer, prefix: str = "chaos/") -> bool:
    """Write :func:`chaos_layout` of ``trainer``'s callbacks to each of its TensorBoard loggers, once per run.

    Args:
        trainer: the trainer (call from ``on_fit_start``, when its optimizers exist; only global rank
            zero writes).
        prefix: the calling callback's ``log_prefix``. Not needed: every callback's charts use its own
            prefix (kept so that the callbacks' call ``write_layout(trainer, self.log_prefix)`` works).

    Returns:
        True if a layout was written by this call.
    """
    if not trainer.is_global_zero:
        return False
    written = False
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and not getattr(logger, _WRITTEN, False):
            callbacks = trainer.callbacks  # type: ignore[attr-defined]  # set by Lightning's callback connector
            logger.experiment.add_custom_scalars(chaos_layout(callbacks, trainer.optimizers))
            setattr(logger, _WRITTEN, True)
            written = True
    return written
