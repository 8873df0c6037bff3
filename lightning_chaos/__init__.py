"""lightning_chaos: PyTorch Lightning callbacks that watch training as a dynamical system."""

__version__ = "0.1.0"
