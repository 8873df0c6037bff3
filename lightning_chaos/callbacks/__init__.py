"""Thin Lightning callbacks over the numerical core: hook wiring, state and logging."""

from lightning_chaos.callbacks.hessian_eigenvalue import HessianEigenvalueMonitor

__all__ = ["HessianEigenvalueMonitor"]
