"""lightning_chaos: PyTorch Lightning callbacks that watch training as a dynamical system."""

from lightning_chaos.callbacks import (
    CGDCurvature,
    HessianEigenvalueMonitor,
    InverseCurvatureLR,
    LyapunovSpectrumMonitor,
    TangentMapMonitor,
    TrajectoryDivergence,
)
from lightning_chaos.optim import CGD

__version__ = "0.1.0"

__all__ = [
    "CGD",
    "CGDCurvature",
    "HessianEigenvalueMonitor",
    "InverseCurvatureLR",
    "LyapunovSpectrumMonitor",
    "TangentMapMonitor",
    "TrajectoryDivergence",
]
