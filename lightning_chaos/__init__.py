"""lightning_chaos: PyTorch Lightning callbacks that watch training as a dynamical system.

The public names are imported lazily, so that ``import lightning_chaos.core`` (the plain-PyTorch
numerical core) and ``from lightning_chaos import CGD`` load neither Lightning nor TensorBoard.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CGD": "lightning_chaos.optim",
    "CGDCurvature": "lightning_chaos.callbacks.cgd_curvature",
    "HessianEigenvalueMonitor": "lightning_chaos.callbacks.hessian_eigenvalue",
    "InverseCurvatureLR": "lightning_chaos.callbacks.inverse_curvature_lr",
    "LyapunovSpectrumMonitor": "lightning_chaos.callbacks.lyapunov_spectrum",
    "TangentMapMonitor": "lightning_chaos.callbacks.tangent_map",
    "TrajectoryDivergence": "lightning_chaos.callbacks.trajectory_divergence",
}

__all__ = [
    "CGD",
    "CGDCurvature",
    "HessianEigenvalueMonitor",
    "InverseCurvatureLR",
    "LyapunovSpectrumMonitor",
    "TangentMapMonitor",
    "TrajectoryDivergence",
]

if TYPE_CHECKING:
    from lightning_chaos.callbacks.cgd_curvature import CGDCurvature
    from lightning_chaos.callbacks.hessian_eigenvalue import HessianEigenvalueMonitor
    from lightning_chaos.callbacks.inverse_curvature_lr import InverseCurvatureLR
    from lightning_chaos.callbacks.lyapunov_spectrum import LyapunovSpectrumMonitor
    from lightning_chaos.callbacks.tangent_map import TangentMapMonitor
    from lightning_chaos.callbacks.trajectory_divergence import TrajectoryDivergence
    from lightning_chaos.optim import CGD


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # later lookups bypass this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
