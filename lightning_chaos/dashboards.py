"""TensorBoard custom-scalars layout for the chaos keys, written once per run.

TensorBoard's *Custom Scalars* tab then shows, per run: λ, 1/h0 and the learning rate on one chart (the
ICLR submission's Figure 1; switch the chart to a log axis in the UI, the layout format has no axis
setting), the losses, the eigenvalue estimates, the chaos counts, the Lyapunov exponents, the
gradient / chaotic-subspace overlaps, the distances of TrajectoryDivergence's twins and what CGD removed.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.loggers import TensorBoardLogger

_WRITTEN = "_lightning_chaos_layout_written"


def chaos_layout(prefix: str = "chaos/") -> dict[str, dict[str, list]]:
    """The custom-scalars layout: ``{category: {chart title: ["Multiline", [tag regexes]]}}``.

    Args:
        prefix: prefix of the chaos keys.

    Returns:
        A layout for ``SummaryWriter.add_custom_scalars``.
    """
    p = prefix.replace("/", r"\/")
    return {
        "lightning_chaos": {
            "lambda, 1/h0 and lr (Fig. 1)": [
                "Multiline",
                [f"{p}lyapunov_exponent$", f"{p}inv_h0$", f"{p}lr$", r"lr-.*"],
            ],
            "loss": ["Multiline", [r"train\/loss.*", r"val\/loss.*"]],
            "eigenvalues": [
                "Multiline",
                [f"{p}h0$", f"{p}h0_rayleigh$", f"{p}h0_ema$", f"{p}h_top.*", f"{p}h_min.*"],
            ],
            "chaos counts": ["Multiline", [f"{p}n_(chaotic|edge|stable|negative|positive|zero)$"]],
            "Lyapunov exponents": ["Multiline", [f"{p}lle_.*", f"{p}mlce.*", f"{p}ftle.*"]],
            "gradient and subspace overlaps": ["Multiline", [f"{p}grad_overlap_.*", f"{p}chaotic_overlap.*"]],
            "trajectory divergence": ["Multiline", [f"{p}divergence\\/.*", f"{p}divergence_fit\\/.*"]],
            "CGD": ["Multiline", [f"{p}cgd_.*"]],
        }
    }


def write_layout(trainer: pl.Trainer, prefix: str = "chaos/") -> bool:
    """Write :func:`chaos_layout` to every TensorBoard logger of ``trainer``, once per logger and run.

    Args:
        trainer: the trainer (call from ``on_fit_start``; only global rank zero writes).
        prefix: prefix of the chaos keys.

    Returns:
        True if a layout was written by this call.
    """
    if not trainer.is_global_zero:
        return False
    written = False
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger) and not getattr(logger, _WRITTEN, False):
            logger.experiment.add_custom_scalars(chaos_layout(prefix))
            setattr(logger, _WRITTEN, True)
            written = True
    return written
