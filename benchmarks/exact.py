"""An exact, independent same-batch Hessian oracle: plain torch autograd + ``scipy.sparse.linalg.eigsh``.

Nothing here comes from ``lightning_chaos``: the loss of one batch is evaluated with
:func:`torch.func.functional_call` on the training module itself with *cloned* buffers (BatchNorm running
statistics of the model are never updated), gradients come from :func:`torch.autograd.grad` with respect to
a fresh flat leaf (``p.grad`` is never read or written here), and Hessian-vector products are double
backward passes through a gradient graph built once with ``create_graph=True``, in float64 by default,
inside ``sdpa_kernel(SDPBackend.MATH)`` (the fused attention kernels have no double backward).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

LossFn = Callable[[nn.Module, Any], Tensor]


def _cast_batch(batch: Any, dtype: torch.dtype) -> Any:
    """The batch with its floating-point tensors cast to ``dtype`` (integers such as labels unchanged)."""
    if isinstance(batch, Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, (list, tuple)):
        return type(batch)(_cast_batch(b, dtype) for b in batch)
    if isinstance(batch, dict):
        return {k: _cast_batch(v, dtype) for k, v in batch.items()}
    return batch


class _LossCall(nn.Module):
    """Holds the module so that ``functional_call`` reparametrises it around an arbitrary loss closure."""

    def __init__(self, module: nn.Module, compute: Callable[[], Tensor]) -> None:
        super().__init__()
        self.m = module
        self.compute = compute

    def forward(self) -> Tensor:
        return self.compute()


@contextmanager
def math_attention(enabled: bool = True) -> Iterator[None]:
    """Restrict scaled-dot-product attention to the math kernel (differentiable twice)."""
    if enabled:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    else:
        yield


class BatchLoss:
    """``L(θ; B)`` of one fixed batch as a function of a flat parameter vector, in a chosen dtype.

    Args:
        module: the training module (its parameters define θ; it is never modified).
        batch: the batch.
        loss: ``loss(module, batch)``; ``None`` calls ``module.curvature_loss(batch)``.
        dtype: dtype of parameters, floating buffers and floating batch tensors during evaluation.
    """

    def __init__(self, module: nn.Module, batch: Any, loss: LossFn | None, dtype: torch.dtype) -> None:
        self.named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.shapes = [p.shape for _, p in self.named]
        self.sizes = [p.numel() for _, p in self.named]
        self.dtype = dtype
        self.buffers = {f"m.{n}": b.detach() for n, b in module.named_buffers()}
        batch = _cast_batch(batch, dtype)
        if loss is None:
            self._wrapper = _LossCall(module, lambda: module.curvature_loss(batch))
        else:
            self._wrapper = _LossCall(module, lambda: loss(module, batch))

    @property
    def dim(self) -> int:
        """Number N of trainable parameter entries."""
        return sum(self.sizes)

    def theta(self) -> Tensor:
        """The current parameters as a flat ``(N,)`` vector in :attr:`dtype` (a copy)."""
        return torch.cat([p.detach().reshape(-1) for _, p in self.named]).to(self.dtype)

    def __call__(self, theta: Tensor) -> Tensor:
        """The loss at the flat parameters ``theta`` (buffers cloned anew for every call)."""
        mapping: dict[str, Tensor] = {}
        for (name, _), piece, shape in zip(self.named, theta.split(self.sizes), self.shapes):
            mapping[f"m.{name}"] = piece.view(shape)
        for name, buffer in self.buffers.items():
            mapping[name] = buffer.to(self.dtype, copy=True) if buffer.is_floating_point() else buffer.clone()
        loss = torch.func.functional_call(self._wrapper, mapping, (), strict=False)
        return loss.reshape(())

    def gradient(self, theta: Tensor) -> Tensor:
        """Flat gradient ``g(theta)`` (one backward pass, no graph kept)."""
        leaf = theta.detach().clone().requires_grad_()
        with torch.enable_grad():
            return torch.autograd.grad(self(leaf), leaf)[0].detach()

    def tensor_shares(self, v: Tensor) -> dict[str, float]:
        """Share ``‖v_tensor‖² / ‖v‖²`` of a flat vector on each parameter tensor."""
        total = float(v.double().square().sum())
        return {
            name: float(piece.double().square().sum()) / total
            for (name, _), piece in zip(self.named, v.split(self.sizes))
        }


class ExactHessian:
    """Exact Hessian-vector products of a :class:`BatchLoss` at θ by double backward; counts them.

    The gradient graph is built once (``create_graph=True``); each product is one more backward pass
    through it. Attention runs on the math kernel during the build and every product.
    """

    def __init__(self, loss: BatchLoss, theta: Tensor | None = None) -> None:
        self.loss = loss
        self.theta = (loss.theta() if theta is None else theta).detach().clone().requires_grad_()
        with torch.enable_grad(), math_attention():
            self.value = loss(self.theta)
            (self.grad,) = torch.autograd.grad(self.value, self.theta, create_graph=True)
        self.num_hvps = 0

    @property
    def dim(self) -> int:
        """N."""
        return self.theta.numel()

    def matvec(self, v: Tensor) -> Tensor:
        """``H v`` for a flat ``(N,)`` vector."""
        self.num_hvps += 1
        v = v.to(self.theta.dtype)
        with torch.enable_grad(), math_attention():
            (hv,) = torch.autograd.grad(self.grad, self.theta, grad_outputs=v, retain_graph=True)
        return hv.detach()

    def operator(self) -> LinearOperator:
        """The Hessian as a scipy ``LinearOperator`` (float64 numpy in and out)."""

        def mv(x: np.ndarray) -> np.ndarray:
            v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
            return self.matvec(v).double().numpy()

        return LinearOperator((self.dim, self.dim), matvec=mv, dtype=np.float64)


@dataclass
class TopEigen:
    """Exact extreme eigenpairs of a Hessian (``eigsh`` with ``which="LA"`` / ``"SA"``).

    Attributes:
        h0: largest algebraic eigenvalue.
        h1: second largest (``nan`` if not computed).
        h_min: smallest algebraic (most negative) eigenvalue (``nan`` if not computed).
        vectors: unit eigenvectors of ``h0`` and ``h1`` as columns, float64 ``(N, k)``.
        residual: ``‖H v0 − h0 v0‖ / |h0|`` of the returned top eigenvector (one extra product).
        hvps: Hessian-vector products spent (residual check included).
        seconds: wall time of the eigen-solves.
    """

    h0: float
    h1: float
    h_min: float
    vectors: Tensor
    residual: float
    hvps: int
    seconds: float


def start_vector(dim: int, seed: int, warm: Tensor | None = None) -> np.ndarray:
    """Deterministic ``eigsh`` start: a seeded normal vector (numpy's own generator), plus ``warm`` if given.

    A previous top eigenvector shortens the solve; the random part keeps every eigenvector in the start.
    """
    v = np.random.default_rng(seed).standard_normal(dim)
    v /= np.linalg.norm(v)
    if warm is not None:
        v = v + warm.double().numpy().reshape(-1)
    return v


def top_eigen(
    hessian: ExactHessian,
    *,
    k: int = 2,
    smallest: bool = True,
    tol: float = 1e-10,
    seed: int = 0,
    warm: Tensor | None = None,
) -> TopEigen:
    """The ``k`` largest algebraic eigenpairs (and, with ``smallest``, the smallest eigenvalue) by ``eigsh``.

    Args:
        hessian: the exact operator.
        k: number of top eigenpairs (1 or 2: 2 gives the gap h1/h0).
        smallest: also solve for the most negative eigenvalue (a second ``eigsh``, ``which="SA"``).
        tol: ARPACK's relative tolerance on the Ritz values.
        seed: seed of the deterministic start vector.
        warm: optional flat vector added to the start (e.g. the previous step's top eigenvector).
    """
    start = time.perf_counter()
    before = hessian.num_hvps
    op = hessian.operator()
    n = hessian.dim
    k = min(k, n - 1)
    values, vectors = eigsh(op, k=k, which="LA", v0=start_vector(n, seed, warm), tol=tol)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    h_min = math.nan
    if smallest:
        low = eigsh(op, k=1, which="SA", v0=start_vector(n, seed + 1), tol=tol, return_eigenvectors=False)
        h_min = float(low[0])
    vecs = torch.from_numpy(np.ascontiguousarray(vectors))
    vecs = vecs / torch.linalg.vector_norm(vecs, dim=0, keepdim=True)
    h0 = float(values[0])
    r = hessian.matvec(vecs[:, 0]).double() - h0 * vecs[:, 0]
    residual = float(torch.linalg.vector_norm(r)) / abs(h0) if h0 != 0 else math.nan
    return TopEigen(
        h0=h0,
        h1=float(values[1]) if k > 1 else math.nan,
        h_min=h_min,
        vectors=vecs,
        residual=residual,
        hvps=hessian.num_hvps - before,
        seconds=time.perf_counter() - start,
    )


def eigenspace_overlap(v: Tensor, previous: Tensor, values: tuple[float, float], rtol: float = 1e-6) -> float:
    """``|vᵀ v_prev|``, or ``‖P_prev v‖`` onto the previous top eigenspace when its top eigenvalue is double.

    Args:
        v: this step's unit top eigenvector.
        previous: previous step's top eigenvectors ``(N, k)`` (columns, descending eigenvalues).
        values: previous step's ``(h0, h1)``; ``h1`` within ``rtol`` of ``h0`` counts as the same eigenvalue.
        rtol: relative tolerance of that test.
    """
    h0, h1 = values
    cols = 2 if previous.shape[1] > 1 and math.isfinite(h1) and abs(h0 - h1) <= rtol * abs(h0) else 1
    return float(torch.linalg.vector_norm(previous[:, :cols].double().T @ v.double()))


def dense_crosscheck(loss: BatchLoss, theta: Tensor) -> dict[str, Any]:
    """Top and bottom eigenvalues of dense Hessians of ``loss`` at ``theta`` (``eigvalsh``), for small N.

    ``autograd``: ``torch.autograd.functional.hessian`` (double backward, vectorised over the rows; a loop
    where that fails). ``func``: ``torch.func.hessian`` (forward-over-reverse under ``vmap``); None where it
    cannot transform the model. The first is the cross-check of the ``eigsh`` route; the second is
    reported separately because it is not always right: in torch 2.13 it returns a wrong, non-symmetric
    Hessian for ``Linear → LayerNorm → Linear`` (the cross block of the LayerNorm weight and the weight
    before it), and likewise with BatchNorm, while the double-backward Hessian matches central finite
    differences of the gradient (``tests/test_benchmarks.py``).
    """
    theta = theta.detach().clone()
    out: dict[str, Any] = {}
    with math_attention():
        try:
            dense = torch.autograd.functional.hessian(loss, theta, vectorize=True)
            out["autograd_method"] = "torch.autograd.functional.hessian(vectorize=True)"
        except RuntimeError:
            dense = torch.autograd.functional.hessian(loss, theta)
            out["autograd_method"] = "torch.autograd.functional.hessian"
        values = torch.linalg.eigvalsh(0.5 * (dense + dense.T).double())
        out["autograd"] = {"h0": float(values[-1]), "h_min": float(values[0])}
        try:
            func = torch.func.hessian(loss)(theta).double()
        except RuntimeError:
            out["func"] = None
        else:
            values = torch.linalg.eigvalsh(0.5 * (func + func.T))
            asym = float((func - func.T).abs().max() / func.abs().max())
            out["func"] = {"h0": float(values[-1]), "h_min": float(values[0]), "asymmetry": asym}
    return out
