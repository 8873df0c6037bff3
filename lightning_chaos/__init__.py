"""lightning_chaos: PyTorch Lightning callbacks that watch training as a dynamical system."""

from lightning_chaos.callbacks import (
    HessianEigenvalueMonitor,
    InverseCurvatureLR,
    LyapunovSpectrumMonitor,
    TangentMapMonitor,
)

__version__ = "0.1.0"

__all__ = [
    "HessianEigenvalueMonitor",
    "InverseCurvatureLR",
    "LyapunovSpectrumMonitor",
    "TangentMapMonitor",
]
