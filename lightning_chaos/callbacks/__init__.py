"""Thin Lightning callbacks over the numerical core: hook wiring, state and logging."""

from lightning_chaos.callbacks.hessian_eigenvalue import HessianEigenvalueMonitor
from lightning_chaos.callbacks.inverse_curvature_lr import InverseCurvatureLR
from lightning_chaos.callbacks.lyapunov_spectrum import LyapunovSpectrumMonitor
from lightning_chaos.callbacks.tangent_map import TangentMapMonitor

__all__ = [
    "HessianEigenvalueMonitor",
    "InverseCurvatureLR",
    "LyapunovSpectrumMonitor",
    "TangentMapMonitor",
]
