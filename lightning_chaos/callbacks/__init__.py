"""Thin Lightning callbacks over the numerical core: hook wiring, state and logging."""

from lightning_chaos.callbacks.cgd_curvature import CGDCurvature
from lightning_chaos.callbacks.hessian_eigenvalue import HessianEigenvalueMonitor
from lightning_chaos.callbacks.inverse_curvature_lr import InverseCurvatureLR
from lightning_chaos.callbacks.lyapunov_spectrum import LyapunovSpectrumMonitor
from lightning_chaos.callbacks.tangent_map import TangentMapMonitor
from lightning_chaos.callbacks.trajectory_divergence import TrajectoryDivergence

__all__ = [
    "CGDCurvature",
    "HessianEigenvalueMonitor",
    "InverseCurvatureLR",
    "LyapunovSpectrumMonitor",
    "TangentMapMonitor",
    "TrajectoryDivergence",
]
