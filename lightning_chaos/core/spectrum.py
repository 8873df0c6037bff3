"""Hessian spectra: exact Hessian-vector products, Lanczos, stochastic Lanczos quadrature, LLEs and counts.

Conventions: a *functional loss* ``loss_fn(params) -> scalar`` evaluates the loss on a fixed batch for a
sequence of tensors shaped like the trainable parameters; vectors are flat ``(N,)`` (see
:mod:`lightning_chaos.core.params`), blocks of k vectors ``(N, k)``.

Classification of a Hessian eigenvalue h under SGD with learning rate γ (seed 001, A.5), generalised to the
update ``torch.optim.SGD`` performs (momentum μ, dampening τ, Nesterov, weight decay wd; derivations in
:mod:`lightning_chaos.core.tangent`): with the effective curvature ``h̃ = h + wd``, the steady-state local
Lyapunov exponent (LLE) is negative exactly for ``0 < h̃ < u`` where

    u = 2/γ                          (μ = 0)
    u = 2(1 + μ) / ((1 − τ) γ)       (heavy ball)
    u = 2(1 + μ) / ((1 + 2μ) γ)      (Nesterov)

and positive for ``h̃ < 0`` or ``h̃ > u`` (:func:`stability_interval`). An eigenvalue is *edge* when
``|h̃ − b| ≤ tolerance · scale`` for a boundary ``b ∈ {0, u}``, with ``scale`` the spectral radius
``max_i |h_i|`` of the eigenvalues given unless passed explicitly. The default ``tolerance = 1e-5``
(:data:`DEFAULT_TOLERANCE`) puts the exact zeros of ReLU networks in *edge*: measured on 16 ReLU MLPs
(cross-entropy, N = 452–2730, 5–35 % exact zeros) they come out of ``dense_hessian`` + ``eigvalsh`` below
``1e-15 ρ`` in float64 and below ``7e-8 ρ`` in float32 (over 100× inside the band), while genuine
nonzero eigenvalues start around ``1e-8``–``1e-6 ρ``; those few tiny ones are edge too, which is right:
an edge direction has ``|LLE| ≤ γ · tolerance · ρ``, indistinguishable from 0.

Stochastic Lanczos quadrature cannot resolve such a narrow band: the Hessians of neural networks have a
dense bulk of tiny eigenvalues of both signs around 0 (and the atom of exact zeros for ReLU), and m-step
Gauss quadrature resolves the spectral distribution only to about ``‖H‖/m`` there. Counts split at 0 from
SLQ are therefore meaningful only with a wider band, :data:`SLQ_TOLERANCE` (``2e-2``): measured by
``benchmarks/slq.py`` on digits MLPs (ReLU and tanh, N = 3,466, lr 0.1 and 1) and a small ReLU CNN
(N = 1,898), every 100 SGD steps from the initialisation (31 points), the worst of the six counts from
SLQ with 10 probes × 80 steps was within 1.2 % of N of the exact count at the same tolerance (median
0.2 %), against up to 3.8 % at ``1e-2``, 47 % at ``1e-3`` and 28–66 % at the exact default ``1e-5``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Literal, Protocol

import torch
from torch import Tensor

from lightning_chaos.core.params import flatten, num_params, unflatten
from lightning_chaos.core.tangent import validate_sgd_hyperparameters

__all__ = [
    "DEFAULT_TOLERANCE",
    "SLQ_REORTHOGONALIZE_BYTES",
    "SLQ_TOLERANCE",
    "HessianOperator",
    "LossFn",
    "classify_eigenvalues",
    "dense_hessian",
    "hessian_vector_product",
    "lanczos",
    "lanczos_eigenpairs",
    "local_lyapunov_exponents",
    "log_tangent_map_norm",
    "ritz_values",
    "slq",
    "slq_count",
    "slq_count_bounds",
    "slq_density",
    "slq_spectral_count_bounds",
    "slq_spectral_counts",
    "spectral_counts",
    "stability_interval",
]

LossFn = Callable[[Sequence[Tensor]], Tensor]
HvpMethod = Literal["auto", "double_backward", "forward_over_reverse"]

DEFAULT_TOLERANCE = 1e-5
"""Default edge tolerance of exact spectra, relative to the spectral radius (module docstring)."""

SLQ_REORTHOGONALIZE_BYTES = 2**28
"""Largest Lanczos basis (bytes per block of probes) that :func:`slq` reorthogonalises by default."""

SLQ_TOLERANCE = 2e-2
"""Default edge tolerance of SLQ counts (80 Lanczos steps), relative to the spectral radius (module doc)."""

_AUTO_METHOD = "double_backward"
_METHODS = ("auto", "double_backward", "forward_over_reverse")


class _MatrixLike(Protocol):
    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matvec(self, v: Tensor) -> Tensor: ...


# ---------------------------------------------------------------------------------------------------------
# Hessian-vector products


def _resolve_method(method: str) -> str:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    return _AUTO_METHOD if method == "auto" else method


def _scalar(loss: Tensor) -> Tensor:
    if loss.ndim != 0:
        raise ValueError(f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)}")
    return loss


def _flat_grad_with_graph(loss_fn: LossFn, params: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
    """Leaves ``ps`` (detached copies requiring grad) and the flat gradient ``∇L(ps)`` with its graph."""
    ps = [p.detach().requires_grad_(True) for p in params]
    with torch.enable_grad():
        loss = _scalar(loss_fn(ps))
        grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
    return ps, flatten([torch.zeros_like(p) if g is None else g for g, p in zip(grads, ps, strict=True)])


def _vjp_of_grad(ps: list[Tensor], flat_grad: Tensor, cotangents: Tensor, batched: bool) -> Tensor:
    """``H v`` for a ``(N,)`` cotangent; ``H V`` ``(N, k)`` for ``batched`` rows ``V.T`` ``(k, N)``."""
    if not flat_grad.requires_grad:  # gradient independent of θ: H = 0
        return torch.zeros_like(cotangents.T if batched else cotangents)
    pieces = torch.autograd.grad(
        flat_grad, ps, grad_outputs=cotangents, retain_graph=True, allow_unused=True, is_grads_batched=batched
    )
    lead = (cotangents.shape[0],) if batched else ()
    pieces = [
        torch.zeros(*lead, *p.shape, dtype=p.dtype, device=p.device) if h is None else h
        for h, p in zip(pieces, ps, strict=True)
    ]
    if batched:
        return torch.cat([h.reshape(h.shape[0], -1) for h in pieces], dim=1).T
    return flatten(pieces)


def _hvp_forward_over_reverse(loss_fn: LossFn, params: Sequence[Tensor], v: Tensor) -> Tensor:
    primals = tuple(p.detach() for p in params)
    tangents = tuple(unflatten(v, primals))
    _, hv = torch.func.jvp(torch.func.grad(lambda ps: _scalar(loss_fn(ps))), (primals,), (tangents,))
    return flatten(hv)


def hessian_vector_product(
    loss_fn: LossFn, params: Sequence[Tensor], v: Tensor, method: HvpMethod = "auto"
) -> Tensor:
    """Exact Hessian-vector product ``H v`` with ``H = ∇²L(θ)``.

    Two exact routes, equal up to floating-point rounding:

    * ``"double_backward"``: ``H v = ∇_θ ⟨∇_θ L(θ), v⟩`` (``torch.autograd.grad`` with ``create_graph``);
    * ``"forward_over_reverse"``: ``H v = d/dε ∇L(θ + ε v)|₀`` (``torch.func.jvp`` of ``torch.func.grad``).

    ``"auto"`` picks ``"double_backward"``. Measured on CPU (torch 2.13, 2 threads) for a ReLU MLP
    64-w-w-10, batch 128: one HVP costs 1.2 ms vs 4.2 ms (w = 32, N = 3.5k, float32), 1.9 vs 19 ms
    (w = 128, N = 26k), 9.9 vs 15 ms (w = 512, N = 301k); a plain gradient costs 0.5 / 0.7 / 4.1 ms.
    Reusing the gradient graph (as :class:`HessianOperator` does) halves double backward again, and a
    batched block of 20 HVPs costs 3.6 ms (double backward, ``is_grads_batched``) vs 7.2 ms (``vmap`` of
    forward-over-reverse) at w = 32.

    Args:
        loss_fn: functional loss.
        params: parameters θ at which H is taken (not modified; no ``.grad`` is touched).
        v: direction, shape ``(N,)``.
        method: ``"auto"``, ``"double_backward"`` or ``"forward_over_reverse"``.

    Returns:
        ``H v``, shape ``(N,)``, dtype and device of the parameters.
    """
    method = _resolve_method(method)
    n = num_params(params)
    if v.shape != (n,):
        raise ValueError(f"v must have shape ({n},), got {tuple(v.shape)}")
    if method == "forward_over_reverse":
        return _hvp_forward_over_reverse(loss_fn, params, v)
    ps, flat_grad = _flat_grad_with_graph(loss_fn, params)
    return _vjp_of_grad(ps, flat_grad, v.to(flat_grad), batched=False)


class HessianOperator:
    """Linear operator ``A = H + wd·I`` with ``H = ∇²L(θ)`` at fixed parameters and batch (matrix-free).

    ``θ`` is snapshotted (cloned) at construction, so the operator keeps representing the Hessian at that
    point even if the caller's parameters change. With ``method="double_backward"`` the graph of the
    gradient is built on first use and kept while the operator lives (memory of about one training step);
    every later product costs one backward pass through it.

    Attributes:
        shape: ``(N, N)``.
        dtype: dtype of the parameters.
        device: device of the parameters.
        num_hvps: number of Hessian-vector products performed so far (a ``matmat`` of k columns counts k).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        params: Sequence[Tensor],
        method: HvpMethod = "auto",
        weight_decay: float = 0.0,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        """Create the operator.

        Args:
            loss_fn: functional loss.
            params: parameters θ (cloned).
            method: HVP route, see :func:`hessian_vector_product`.
            weight_decay: wd ≥ 0 added on the diagonal.
            reduce: applied to every product ``Hv`` / ``HV`` before the weight decay is added (e.g. an
                all-reduce mean across data-parallel ranks, making it the global batch's Hessian).
        """
        if not params:
            raise ValueError("params must contain at least one tensor")
        self.loss_fn = loss_fn
        self.method = _resolve_method(method)
        self.weight_decay = float(weight_decay)
        self.reduce = reduce
        self._params = [p.detach().clone() for p in params]
        n = num_params(self._params)
        self.shape = (n, n)
        self.dtype = self._params[0].dtype
        self.device = self._params[0].device
        self.num_hvps = 0
        self._graph: tuple[list[Tensor], Tensor] | None = None
        self._batching_works = True

    def _grad_graph(self) -> tuple[list[Tensor], Tensor]:
        if self._graph is None:
            self._graph = _flat_grad_with_graph(self.loss_fn, self._params)
        return self._graph

    def _hvp(self, v: Tensor) -> Tensor:
        if self.method == "forward_over_reverse":
            return _hvp_forward_over_reverse(self.loss_fn, self._params, v)
        ps, flat_grad = self._grad_graph()
        return _vjp_of_grad(ps, flat_grad, v, batched=False)

    def _hmm(self, block: Tensor) -> Tensor:
        if block.shape[1] == 1:  # Lanczos steps: a plain product, no batching machinery
            return self._hvp(block[:, 0]).unsqueeze(1)
        if self._batching_works:
            try:
                if self.method == "forward_over_reverse":
                    return torch.func.vmap(self._hvp, in_dims=1, out_dims=1, randomness="same")(block)
                ps, flat_grad = self._grad_graph()
                return _vjp_of_grad(ps, flat_grad, block.T, batched=True)
            except (RuntimeError, NotImplementedError) as err:
                self._batching_works = False
                warnings.warn(
                    f"batched Hessian products failed ({err}); falling back to a loop", stacklevel=3
                )
        return torch.stack([self._hvp(block[:, i]) for i in range(block.shape[1])], dim=1)

    def _check(self, x: Tensor, ndim: int) -> Tensor:
        if x.ndim != ndim or x.shape[0] != self.shape[0]:
            expected = "(N,)" if ndim == 1 else "(N, k)"
            raise ValueError(f"expected shape {expected} with N={self.shape[0]}, got {tuple(x.shape)}")
        return x.to(dtype=self.dtype, device=self.device)

    def matvec(self, v: Tensor) -> Tensor:
        """``(H + wd·I) v`` for ``v`` of shape ``(N,)``; returns ``(N,)``."""
        v = self._check(v, 1)
        out = self._hvp(v)
        out = self.reduce(out) if self.reduce is not None else out
        self.num_hvps += 1
        return out + self.weight_decay * v if self.weight_decay else out

    def matmat(self, block: Tensor) -> Tensor:
        """``(H + wd·I) V`` for ``V`` of shape ``(N, k)``; returns ``(N, k)`` (batched HVPs when possible)."""
        block = self._check(block, 2)
        if block.shape[1] == 0:
            return block.clone()
        out = self._hmm(block.contiguous())
        out = self.reduce(out) if self.reduce is not None else out
        self.num_hvps += block.shape[1]
        return out + self.weight_decay * block if self.weight_decay else out

    def __matmul__(self, x: Tensor) -> Tensor:
        return self.matvec(x) if x.ndim == 1 else self.matmat(x)

    def to_dense(self, chunk_size: int | None = 256) -> Tensor:
        """Dense ``(N, N)`` matrix ``A = A I`` from N Hessian-vector products (symmetric up to rounding).

        The identity is applied in blocks of ``chunk_size`` columns (``None``: all at once), which bounds the
        memory of the batched products. Measured on CPU (1 thread, batch 64): a 64-16-10 MLP (N = 1,210)
        takes 0.13 s in blocks of 256, 0.19 s in one block, 0.74 s with :func:`dense_hessian`; a small CNN
        (N = 666) 1.6 s against 1.3 s.

        Args:
            chunk_size: columns per batched product.

        Returns:
            The ``(N, N)`` matrix, in the operator's dtype and device.
        """
        n = self.shape[0]
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        step = n if chunk_size is None else max(1, int(chunk_size))
        return torch.cat([self.matmat(eye[:, i : i + step]) for i in range(0, n, step)], dim=1)


def symmetric_eigh(matrix: Tensor, eigenvectors: bool = True) -> Tensor | tuple[Tensor, Tensor]:
    """``eigh`` (or ``eigvalsh``) of a symmetric matrix that does not give up on clustered spectra.

    LAPACK's divide-and-conquer solver can fail to converge in float32 on matrices with large clusters of
    (near-)repeated eigenvalues, which the Hessians of ReLU networks on small batches are (most
    eigenvalues exactly 0). On such a failure the decomposition is redone in float64 and cast back.

    Args:
        matrix: symmetric ``(N, N)``.
        eigenvectors: return ``(eigenvalues, eigenvectors)``; otherwise the eigenvalues only.

    Returns:
        Eigenvalues ascending ``(N,)`` (and eigenvectors ``(N, N)``, columns), in ``matrix.dtype``.

    Raises:
        torch.linalg.LinAlgError: if float64 fails too (NaN/inf entries).
    """
    solve = torch.linalg.eigh if eigenvectors else torch.linalg.eigvalsh
    try:
        return solve(matrix)
    except torch.linalg.LinAlgError:
        if matrix.dtype == torch.float64:
            raise
        out = solve(matrix.double())
    return tuple(t.to(matrix.dtype) for t in out) if eigenvectors else out.to(matrix.dtype)


def dense_hessian(loss_fn: LossFn, params: Sequence[Tensor]) -> Tensor:
    """Exact dense Hessian ``H_ij = ∂²L / ∂θ_i ∂θ_j`` of the flat loss, forward-over-reverse.

    ``torch.func.jacfwd(torch.func.grad(L))``, i.e. ``torch.func.hessian`` with ``randomness="same"``:
    random operations inside ``loss_fn`` (dropout) draw once for all N columns, as one evaluation would.

    Args:
        loss_fn: functional loss.
        params: parameters θ (not modified).

    Returns:
        ``(N, N)`` tensor; O(N²) memory, meant for N up to a few thousand.
    """
    like = [p.detach() for p in params]
    grad = torch.func.grad(lambda flat: _scalar(loss_fn(unflatten(flat, like))))
    return torch.func.jacfwd(grad, randomness="same")(flatten(like))


# ---------------------------------------------------------------------------------------------------------
# Lanczos and stochastic Lanczos quadrature


def _as_matmat(
    op: Tensor | _MatrixLike | Callable[[Tensor], Tensor],
    dim: int | None,
    dtype: torch.dtype | None,
    device: torch.device | str | None,
) -> tuple[Callable[[Tensor], Tensor], int, torch.dtype, torch.device | str | None]:
    """Normalise an operator to a block product ``(N, k) → (N, k)``; also return N, dtype and device.

    Accepts a dense matrix, an object with ``shape`` and ``matmat`` or ``matvec``, or a bare matvec.
    """
    if isinstance(op, Tensor):
        if op.ndim != 2 or op.shape[0] != op.shape[1]:
            raise ValueError(f"a dense operator must be square, got shape {tuple(op.shape)}")
        return op.__matmul__, op.shape[0], op.dtype, op.device
    if hasattr(op, "shape") and (hasattr(op, "matmat") or hasattr(op, "matvec")):
        if hasattr(op, "matmat"):
            return op.matmat, op.shape[0], op.dtype, op.device
        matvec, dim, dtype, device = op.matvec, op.shape[0], op.dtype, op.device
    elif dim is None:
        raise ValueError("dim is required when the operator is a bare matvec callable")
    else:
        matvec, dtype = op, torch.get_default_dtype() if dtype is None else dtype
    return (lambda block: torch.stack([matvec(col) for col in block.unbind(1)], dim=1)), dim, dtype, device


def _random_block(
    dim: int,
    k: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device | str | None,
    distribution: str = "gaussian",
) -> Tensor:
    # Drawn on the generator's device and then moved, so a CPU generator gives the same probes everywhere.
    gen_device = generator.device if generator is not None else device
    if distribution == "rademacher":
        z = torch.randint(0, 2, (dim, k), generator=generator, device=gen_device).to(dtype) * 2 - 1
    elif distribution == "gaussian":
        z = torch.randn(dim, k, generator=generator, dtype=dtype, device=gen_device)
    else:
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    return z.to(device)


def _lanczos_runs(
    matmat: Callable[[Tensor], Tensor],
    start: Tensor,
    num_steps: int,
    reorthogonalize: bool,
    keep_basis: bool = True,
) -> tuple[Tensor, Tensor, Tensor | None, list[int]]:
    """Independent Lanczos runs from the columns of ``start`` ``(N, P)``, one block product per step.

    Returns ``alpha`` ``(P, m)``, ``beta`` ``(P, m)`` (``beta[:, j]`` couples steps j and j+1; the last
    column is the residual norm ``β_m``), ``basis`` ``(P, m, N)`` (``None`` when neither
    ``reorthogonalize`` nor ``keep_basis`` needs it: memory ``O(P N)`` instead of ``O(P m N)``) and the
    length of each run (shorter after breakdown; entries beyond it are zero).
    """
    dim, runs = start.shape
    m = min(num_steps, dim)
    norms = torch.linalg.vector_norm(start, dim=0)
    if not (torch.isfinite(norms).all() and (norms > 0).all()):
        raise ValueError("starting vectors must be finite and nonzero")
    stored = reorthogonalize or keep_basis
    basis = torch.zeros(runs, m, dim, dtype=start.dtype, device=start.device) if stored else None
    alpha = torch.zeros(runs, m, dtype=start.dtype, device=start.device)
    beta = torch.zeros(runs, m, dtype=start.dtype, device=start.device)
    lengths = [m] * runs
    active = torch.ones(runs, dtype=torch.bool, device=start.device)
    breakdown = math.sqrt(dim) * torch.finfo(start.dtype).eps
    t_norm = torch.zeros(runs, dtype=start.dtype, device=start.device)
    q = start / norms
    prev = torch.zeros_like(q)
    for j in range(m):
        if basis is not None:
            basis[:, j] = q.T
        w = matmat(q)
        a = (q * w).sum(dim=0)
        if not torch.isfinite(a).all():
            raise FloatingPointError(f"the operator returned non-finite values at Lanczos step {j}")
        alpha[:, j] = a
        if basis is not None and reorthogonalize:  # classical Gram-Schmidt twice against each run's basis
            done = basis[:, : j + 1]
            for _ in range(2):
                w = w - torch.einsum("pjn,pj->np", done, torch.einsum("pjn,np->pj", done, w))
        else:
            w = w - a * q - (beta[:, j - 1] * prev if j > 0 else 0.0)
        b = torch.linalg.vector_norm(w, dim=0)
        beta[:, j] = b
        t_norm = torch.maximum(t_norm, a.abs() + (beta[:, j - 1] if j > 0 else 0.0) + b)
        stopped = active & (b <= breakdown * t_norm)
        for p in stopped.nonzero().flatten().tolist():
            lengths[p] = j + 1
        active = active & ~stopped
        if j == m - 1 or not active.any():
            break
        beta[:, j] = torch.where(active, b, 0.0)
        prev, q = q, torch.where(active, w / torch.where(active, b, 1.0), 0.0)
    return alpha, beta, basis, lengths


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    num_steps: int,
    *,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    reorthogonalize: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Lanczos tridiagonalisation ``A V = V T + β_m v_{m+1} e_mᵀ`` of a symmetric operator.

    Three-term recurrence ``β_j v_{j+1} = A v_j − α_j v_j − β_{j−1} v_{j−1}`` with ``α_j = v_jᵀ A v_j``;
    with ``reorthogonalize`` the new vector is instead orthogonalised against all previous ones by
    classical Gram–Schmidt applied twice (full reorthogonalisation, O(N m²) extra work), which keeps ``V``
    orthonormal to working precision. If ``β_j ≤ √N · eps · ‖T‖`` the Krylov space is invariant
    (breakdown): the iteration stops and returns ``m = j + 1 < num_steps`` steps, whose Ritz values are then
    exact eigenvalues of ``A``.

    Args:
        matvec: ``(N,) → (N,)`` product with the symmetric operator ``A``.
        dim: N.
        num_steps: maximal number of steps (capped at N).
        v0: starting vector ``(N,)`` (normalised here); default a Gaussian vector drawn with ``generator``.
        generator: random generator for the default ``v0``.
        dtype: working dtype; default ``v0``'s, else ``torch.get_default_dtype()``.
        device: working device; default ``v0``'s.
        reorthogonalize: full reorthogonalisation (recommended; without it Ritz values can repeat).

    Returns:
        ``alpha`` ``(m,)``, ``beta`` ``(m−1,)`` (the diagonal and off-diagonal of T) and ``V`` ``(N, m)``.

    Raises:
        ValueError: bad sizes or a zero / non-finite starting vector.
        FloatingPointError: ``matvec`` returned non-finite values.
    """
    if dim < 1 or num_steps < 1:
        raise ValueError(f"dim and num_steps must be positive, got dim={dim}, num_steps={num_steps}")
    if v0 is None:
        dtype = torch.get_default_dtype() if dtype is None else dtype
        v0 = _random_block(dim, 1, generator, dtype, device)[:, 0]
    elif v0.shape != (dim,):
        raise ValueError(f"v0 must have shape ({dim},), got {tuple(v0.shape)}")
    v0 = v0.to(dtype=v0.dtype if dtype is None else dtype, device=v0.device if device is None else device)
    matmat, _, _, _ = _as_matmat(matvec, dim, v0.dtype, v0.device)
    alpha, beta, basis, (m,) = _lanczos_runs(matmat, v0.unsqueeze(1), num_steps, reorthogonalize)
    return alpha[0, :m], beta[0, : m - 1], basis[0, :m].T


def _tridiagonal_eigh(alpha: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of the symmetric tridiagonal ``T`` (float64): ascending values, vectors."""
    t = torch.diag(alpha.to(torch.float64))
    if beta.numel():
        off = beta.to(torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


def ritz_values(
    op: Tensor | _MatrixLike | Callable[[Tensor], Tensor],
    num_steps: int,
    *,
    dim: int | None = None,
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    reorthogonalize: bool = True,
) -> Tensor:
    """Ritz values of one ``num_steps``-step Lanczos run: the eigenvalues of T, descending.

    The extreme ones converge first, from inside the spectrum. Without ``reorthogonalize`` no Lanczos
    basis is stored (memory O(N) instead of O(mN), no O(m²N) reorthogonalisation): converged values then
    reappear as copies ("ghosts"), which duplicates but does not move them, so the extreme values stay
    accurate.

    Args:
        op: dense symmetric ``(N, N)`` tensor, an operator with ``matmat``/``matvec`` and ``shape``, or a bare
            matvec (then ``dim`` is required).
        num_steps: Lanczos steps m (capped at N).
        dim: N, for a bare matvec.
        v0: starting vector ``(N,)``; default a Gaussian vector drawn with ``generator``.
        generator: random generator for the default ``v0``.
        reorthogonalize: full reorthogonalisation.

    Returns:
        ``(m,)`` float64 Ritz values, descending (fewer than ``num_steps`` after an early breakdown).
    """
    matmat, dim, dtype, device = _as_matmat(op, dim, None, None)
    start = _random_block(dim, 1, generator, dtype, device) if v0 is None else v0.reshape(dim, 1)
    alpha, beta, _, (m,) = _lanczos_runs(
        matmat, start.to(dtype=dtype, device=device), num_steps, reorthogonalize, keep_basis=False
    )
    return _tridiagonal_eigh(alpha[0, :m], beta[0, : m - 1])[0].flip(0)


def lanczos_eigenpairs(
    op: Tensor | _MatrixLike,
    k: int,
    which: Literal["largest", "smallest", "both"] = "largest",
    num_steps: int | None = None,
    generator: torch.Generator | None = None,
    v0: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Extreme Ritz pairs of a symmetric operator from one Lanczos run with full reorthogonalisation.

    Ritz values are the eigenvalues ``θ_i`` of ``T = Vᵀ A V``, Ritz vectors ``y_i = V s_i``; the extreme
    ones converge first (residual ``‖A y_i − θ_i y_i‖ = β_m |s_{m,i}|``). Lanczos finds each distinct
    eigenvalue once: a multiple eigenvalue is returned with multiplicity one.

    Args:
        op: dense symmetric ``(N, N)`` tensor or an operator with ``matvec``, ``shape``, ``dtype``, ``device``
            (e.g. :class:`HessianOperator`).
        k: number of pairs from each requested end.
        which: ``"largest"`` (descending), ``"smallest"`` (ascending, most negative first) or ``"both"``
            (k largest and k smallest, descending).
        num_steps: Lanczos steps; default ``min(N, 3·k_total + 30)``, ``k_total`` the number of pairs asked.
        generator: random generator for the starting vector.
        v0: starting vector ``(N,)``; overrides ``generator``.

    Returns:
        ``eigenvalues`` ``(r,)`` and unit ``eigenvectors`` ``(N, r)`` in the operator's dtype/device;
        ``r`` is fewer than asked only when the Krylov space is invariant before (early breakdown).
    """
    if which not in ("largest", "smallest", "both"):
        raise ValueError(f"which must be 'largest', 'smallest' or 'both', got {which!r}")
    matmat, dim, dtype, device = _as_matmat(op, None, None, None)
    total = 2 * k if which == "both" else k
    if not 1 <= total <= dim:
        raise ValueError(f"k must request between 1 and N={dim} eigenpairs, got k={k} with which={which!r}")
    steps = min(dim, 3 * total + 30) if num_steps is None else num_steps
    if steps < total:
        raise ValueError(f"num_steps={steps} is smaller than the {total} eigenpairs requested")
    start = _random_block(dim, 1, generator, dtype, device) if v0 is None else v0.reshape(dim, 1)
    alpha, beta, basis, (m,) = _lanczos_runs(matmat, start.to(dtype=dtype, device=device), steps, True)
    values, vectors = _tridiagonal_eigh(alpha[0, :m], beta[0, : m - 1])  # ascending
    if which == "largest":
        idx = torch.arange(m - 1, max(m - k, 0) - 1, -1)
    elif which == "smallest":
        idx = torch.arange(0, min(k, m))
    else:
        idx = torch.unique(torch.cat([torch.arange(0, min(k, m)), torch.arange(max(m - k, 0), m)])).flip(0)
    ritz_vectors = basis[0, :m].T @ vectors[:, idx].to(dtype=basis.dtype, device=basis.device)
    ritz_vectors = ritz_vectors / torch.linalg.vector_norm(ritz_vectors, dim=0)
    return values[idx].to(dtype=dtype, device=basis.device), ritz_vectors


def slq(
    op: Tensor | _MatrixLike | Callable[[Tensor], Tensor],
    dim: int | None = None,
    num_probes: int = 10,
    num_steps: int = 80,
    generator: torch.Generator | None = None,
    *,
    distribution: Literal["rademacher", "gaussian"] = "rademacher",
    probes_per_block: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    reorthogonalize: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """Stochastic Lanczos quadrature of the spectral measure ``(1/N) Σ_i δ(x − h_i)``.

    For each probe ``u_p = z_p / ‖z_p‖`` (z Rademacher or Gaussian), Lanczos started at ``u_p`` gives the
    m-point Gauss quadrature of the measure ``Σ_i (v_iᵀ u_p)² δ(x − h_i)`` (Golub–Welsch): nodes are the
    eigenvalues ``θ_pj`` of ``T_p``, weights the squared first components ``τ_pj = s_{pj,1}²`` (summing
    to 1). Then ``tr f(A) ≈ N · (1/P) Σ_p Σ_j τ_pj f(θ_pj)`` (Hutchinson), unbiased over probes up to the
    quadrature error (see :func:`slq_count`). Probes that break down early (invariant Krylov space,
    where quadrature is exact) are padded with zero-weight nodes at 0. The probes are advanced together,
    one block product ``A [u_1 … u_P]`` per Lanczos step (batched HVPs for :class:`HessianOperator`).

    Full reorthogonalisation makes each probe's rule the exact Gauss rule (and the brackets of
    :func:`slq_count_bounds` rigorous), but it keeps ``P·m`` vectors of length N and reads them four
    times per step: O(P m N) memory and O(P m² N) memory traffic (on one CPU core at N = 1.1M, 10 probes
    × 20 steps took 20 s, 15 s of it Gram–Schmidt). Without it the three-term recurrence loses
    orthogonality once Ritz values converge, which duplicates converged nodes ("ghosts") and splits their
    weight but leaves the quadrature of the spectral distribution accurate (Chen, Trogdon & Ubaru, ICML
    2021; on the networks of :data:`SLQ_TOLERANCE` the worst count error at that tolerance was 1.8 % of N
    without it against 1.2 % with it, median 0.1 % both); memory is O(P N) and the brackets of
    :func:`slq_count_bounds` are then approximate. By default (``None``) the runs are reorthogonalised
    while their basis (``probes_per_block · m · N`` entries) fits in :data:`SLQ_REORTHOGONALIZE_BYTES`
    (256 MiB: N up to about 80k at 10 probes × 80 steps in float32) and run without it beyond.

    Args:
        op: dense symmetric ``(N, N)`` tensor, an operator with ``matmat``/``matvec`` and ``shape``, or a bare
            matvec.
        dim: N (required for a bare matvec).
        num_probes: P.
        num_steps: m (Lanczos steps per probe, capped at N).
        generator: random generator for the probes.
        distribution: ``"rademacher"`` or ``"gaussian"`` probes.
        probes_per_block: probes advanced together (memory ``≈ probes_per_block · m · N``); default all.
        dtype: working dtype for a bare matvec (default ``torch.get_default_dtype()``).
        device: working device for a bare matvec.
        reorthogonalize: full reorthogonalisation of each run; ``None`` decides by the basis size (above).

    Returns:
        ``nodes`` and ``weights``, each ``(P, m)``, float64 on the CPU.
    """
    matmat, dim, dtype, device = _as_matmat(op, dim, dtype, device)
    if num_probes < 1:
        raise ValueError(f"num_probes must be positive, got {num_probes}")
    block = num_probes if probes_per_block is None else max(1, probes_per_block)
    m = min(num_steps, dim)
    if reorthogonalize is None:
        basis_bytes = min(block, num_probes) * m * dim * torch.finfo(dtype).bits // 8
        reorthogonalize = basis_bytes <= SLQ_REORTHOGONALIZE_BYTES
    nodes = torch.zeros(num_probes, m, dtype=torch.float64)
    weights = torch.zeros(num_probes, m, dtype=torch.float64)
    for first in range(0, num_probes, block):
        z = _random_block(dim, min(block, num_probes - first), generator, dtype, device, distribution)
        alpha, beta, _, lengths = _lanczos_runs(matmat, z, m, reorthogonalize, keep_basis=False)
        for i, length in enumerate(lengths):
            values, vectors = _tridiagonal_eigh(alpha[i, :length], beta[i, : length - 1])
            nodes[first + i, :length] = values.cpu()
            weights[first + i, :length] = vectors[0].cpu() ** 2
    return nodes, weights


def slq_count(
    nodes: Tensor, weights: Tensor, dim: int, lower: float = -math.inf, upper: float = math.inf
) -> float:
    """Estimate the eigenvalue count in ``[lower, upper]``: ``N (1/P) Σ_pj τ_pj 1[lower ≤ θ_pj ≤ upper]``.

    Two error sources. (i) Probe noise: for a true count c the standard deviation is about
    ``√(2 c (1 − c/N) / P)`` for Gaussian probes (Rademacher is no worse). (ii) Quadrature: by the
    Chebyshev–Markov–Stieltjes inequalities each probe's quadrature CDF is off by at most the weights of
    the two nodes adjacent to an endpoint (:func:`slq_count_bounds` returns that bracket). This is small for
    an endpoint in a gap or in the sparse tail (outliers above 2/γ), but an endpoint inside a dense bulk
    or next to an atom is resolved only to about ``‖A‖ / m``. In particular the exact zeros of ReLU
    networks form an atom at 0 that the nodes near 0 carry together with the surrounding bulk, so counts
    split at 0 (negative / zero / positive, and the negative-curvature part of chaotic) can be off by a
    sizeable fraction of N at m ≈ 100: measured on a ReLU MLP Hessian (N = 2730, 26 % exact zeros, P = 10,
    m = 80) the negative count came out as 1727 instead of 894. Use the bracket, not the point estimate,
    there, or move the boundary out of the bulk (the edge band of :data:`SLQ_TOLERANCE`).

    Args:
        nodes: ``(P, m)`` quadrature nodes from :func:`slq`.
        weights: ``(P, m)`` quadrature weights.
        dim: N.
        lower: lower end of the (closed) interval.
        upper: upper end of the (closed) interval.

    Returns:
        The estimated count (a float in ``[0, N]``).
    """
    inside = (nodes >= lower) & (nodes <= upper)
    return float(dim * (weights * inside).sum(dim=1).mean())


def _cdf_bracket(nodes: Tensor, weights: Tensor, t: float, strict: bool) -> tuple[Tensor, Tensor]:
    """Per-probe bracket ``[low, high]`` of ``F(t)`` (``F(t−)`` if ``strict``) from the CMS inequalities.

    ``Σ_{θ_j ≤ t} τ_j − τ_k ≤ F(t) ≤ Σ_{θ_j ≤ t} τ_j + τ_{k+1}`` for the nodes ``θ_k ≤ t < θ_{k+1}``.
    """
    if math.isinf(t):
        exact = torch.full(nodes.shape[:1], 0.0 if (t < 0) else 1.0, dtype=torch.float64)
        return exact, exact
    valid = weights > 0  # padding of early-stopped probes carries no mass and is never adjacent
    below = valid & ((nodes < t) if strict else (nodes <= t))
    above = valid & ~below
    mass = (weights * below).sum(dim=1)
    last = torch.where(below, nodes, -math.inf).argmax(dim=1, keepdim=True)
    following = torch.where(above, nodes, math.inf).argmin(dim=1, keepdim=True)
    w_last = weights.gather(1, last).squeeze(1) * below.any(dim=1)
    w_next = weights.gather(1, following).squeeze(1) * above.any(dim=1)
    return (mass - w_last).clamp_min(0), (mass + w_next).clamp_max(1)


def slq_count_bounds(
    nodes: Tensor, weights: Tensor, dim: int, lower: float = -math.inf, upper: float = math.inf
) -> tuple[float, float]:
    """Bracket of the quadrature error of :func:`slq_count` (Chebyshev–Markov–Stieltjes inequalities).

    For each probe the Gauss rule brackets the probe's spectral distribution function at any t by the
    weights of the two nodes adjacent to t; applied at both endpoints this brackets the probe's mass
    ``Σ_{h_i ∈ [lower, upper]} (v_iᵀ u_p)²``, and N times the mean over probes brackets the Hutchinson
    estimate with exact quadrature. The bracket is rigorous for that estimate (up to rounding); the
    probe noise of :func:`slq_count` comes on top.

    Args:
        nodes: ``(P, m)`` quadrature nodes from :func:`slq`.
        weights: ``(P, m)`` quadrature weights.
        dim: N.
        lower: lower end of the (closed) interval.
        upper: upper end of the (closed) interval.

    Returns:
        ``(low, high)`` with ``0 ≤ low ≤ slq_count(...) ≤ high ≤ N``.
    """
    hi_low, hi_high = _cdf_bracket(nodes, weights, upper, strict=False)
    lo_low, lo_high = _cdf_bracket(nodes, weights, lower, strict=True)
    low = (hi_low - lo_high).clamp_min(0)
    high = (hi_high - lo_low).clamp_max(1)
    return float(dim * low.mean()), float(dim * high.mean())


def slq_density(nodes: Tensor, weights: Tensor, grid: Tensor, bandwidth: float) -> Tensor:
    """Gaussian-smoothed spectral density ``φ(x) = (1/P) Σ_p Σ_j τ_pj 𝒩(x; θ_pj, σ²)`` on a grid.

    Args:
        nodes: ``(P, m)`` quadrature nodes.
        weights: ``(P, m)`` quadrature weights.
        grid: ``(G,)`` points x.
        bandwidth: σ > 0.

    Returns:
        ``(G,)`` density (integrates to 1; multiply by N for eigenvalues per unit curvature).
    """
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    x = grid.to(torch.float64).reshape(-1, 1, 1)
    kernel = torch.exp(-0.5 * ((x - nodes) / bandwidth) ** 2) / (bandwidth * math.sqrt(2 * math.pi))
    return (kernel * weights).sum(dim=2).mean(dim=1)


# ---------------------------------------------------------------------------------------------------------
# Local Lyapunov exponents and spectral counts


def stability_interval(
    lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False
) -> tuple[float, float]:
    """Effective curvatures ``h̃ = h + wd`` with negative steady-state LLE: the open interval ``(0, u)``.

    Per eigen-direction the steady-state map has characteristic polynomial ``z² − T z + D`` (μ > 0) and is
    contracting iff ``|D| < 1``, ``1 − T + D > 0`` and ``1 + T + D > 0`` (Jury). Heavy ball:
    ``T = 1 + μ − (1 − τ)γh̃``, ``D = μ`` gives ``h̃ > 0`` and ``h̃ < 2(1 + μ)/((1 − τ)γ)``. Nesterov:
    ``T = (1 + μ)(1 − γh̃)``, ``D = μ(1 − γh̃)`` gives ``h̃ > 0`` and ``h̃ < 2(1 + μ)/((1 + 2μ)γ)`` (the
    ``|D| < 1`` condition is then implied). μ = 0: ``|1 − γh̃| < 1``, i.e. ``0 < h̃ < 2/γ``. Outside the
    closed interval the LLE is positive (a real root leaves the unit disc through 1 or −1).

    Args:
        lr: learning rate γ.
        momentum: momentum μ.
        dampening: dampening τ (heavy ball only; ignored when μ = 0).
        nesterov: Nesterov momentum.

    Returns:
        ``(0.0, u)``.

    Raises:
        ValueError: invalid hyper-parameters, or heavy ball with ``dampening == 1`` (the gradient never
            enters the update after the first step; every direction has ``|z| = 1``).
    """
    validate_sgd_hyperparameters(lr, momentum, dampening, nesterov)
    if momentum == 0:
        return 0.0, 2.0 / lr
    if nesterov:
        return 0.0, 2.0 * (1 + momentum) / ((1 + 2 * momentum) * lr)
    if dampening == 1:
        raise ValueError(
            "dampening=1 with momentum removes the gradient from the update: no stability interval"
        )
    return 0.0, 2.0 * (1 + momentum) / ((1 - dampening) * lr)


def local_lyapunov_exponents(
    eigenvalues: Tensor,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> Tensor:
    """Steady-state local Lyapunov exponents of the SGD update per Hessian eigenvalue.

    With ``h̃ = h + wd``: μ = 0 gives ``LLE = log|1 − γh̃|`` (seed 001, A.5). With momentum the tangent map
    restricted to an eigen-direction is a 2 × 2 block with characteristic polynomial ``z² − T z + D = 0``,

        heavy ball: T = 1 + μ − (1 − τ)γh̃,  D = μ
        Nesterov:   T = (1 + μ)(1 − γh̃),     D = μ(1 − γh̃)

    and ``LLE = log max|z|``: ``(|T| + √(T² − 4D))/2`` for real roots, ``√D`` for a complex pair. The
    first optimizer step (buffer initialised without dampening) is not described by it. Exponents are
    ``-inf`` where the block is nilpotent (μ = 0 and h̃ = 1/γ exactly: the direction is annihilated).

    Args:
        eigenvalues: Hessian eigenvalues h, any shape.
        lr: learning rate γ.
        momentum: momentum μ.
        dampening: dampening τ (ignored when μ = 0, as in torch).
        nesterov: Nesterov momentum.
        weight_decay: wd.

    Returns:
        LLEs, same shape as ``eigenvalues`` (floating dtype of the input, computed in float64).
    """
    validate_sgd_hyperparameters(lr, momentum, dampening, nesterov, weight_decay)
    h = eigenvalues.to(torch.float64) + weight_decay
    if momentum == 0:
        radius = (1 - lr * h).abs()
    else:
        if nesterov:
            trace = (1 + momentum) * (1 - lr * h)
            det = momentum * (1 - lr * h)
        else:
            trace = 1 + momentum - (1 - dampening) * lr * h
            det = torch.full_like(h, momentum)
        disc = trace**2 - 4 * det
        real = (trace.abs() + disc.clamp_min(0).sqrt()) / 2
        radius = torch.where(disc >= 0, real, det.clamp_min(0).sqrt())
    out_dtype = eigenvalues.dtype if eigenvalues.is_floating_point() else torch.get_default_dtype()
    return torch.log(radius).to(out_dtype)


def log_tangent_map_norm(
    eigenvalues: Tensor,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    first_step: bool = False,
) -> float:
    """Log spectral norm ``log ‖J‖₂`` of the one-step SGD tangent map, from the Hessian eigenvalues.

    Every block of ``J`` (:func:`lightning_chaos.core.tangent.sgd_tangent_map`) is a polynomial in
    ``H̃ = H + wd·I``, so in the eigenbasis of H (applied to δθ and δv alike, an orthogonal change of
    basis) ``J`` splits into one block ``B(h̃)`` per eigenvalue and ``‖J‖₂ = max_i ‖B(h̃_i)‖₂``:

        μ = 0:      B = 1 − γh̃                                   (‖B‖ = |1 − γh̃| = exp(LLE))
        heavy ball: B = [[1 − γ(1 − τ)h̃, −γμ], [(1 − τ)h̃, μ]]      (τ = 0 with ``first_step``)
        Nesterov:   B = [[1 − γ(1 + μ)h̃, −γμ²], [h̃, μ]]

    with ``‖[[a, b], [c, d]]‖₂ = (√((a + d)² + (c − b)²) + √((a − d)² + (b + c)²)) / 2``. The block norm is
    convex in h̃ (B is affine in it), so the maximum sits at the smallest or the largest eigenvalue:
    passing only the two extremes gives the same value.

    By submultiplicativity ``log ‖J_T ⋯ J_1‖ ≤ Σ_t log ‖J_t‖``: the time average of this quantity bounds
    the finite-time maximal Lyapunov exponent at every T (seed 001, A.6). For μ = 0 it is the largest
    LLE of :func:`local_lyapunov_exponents`; with momentum ``J`` is not normal and the norm exceeds the
    spectral radius (the largest LLE), which is then no bound.

    Args:
        eigenvalues: Hessian eigenvalues h (without weight decay), any shape, at least one.
        lr: learning rate γ.
        momentum: momentum μ.
        dampening: dampening τ (ignored when μ = 0).
        nesterov: Nesterov momentum.
        weight_decay: wd.
        first_step: the map of torch's first step with momentum (buffer created without dampening).

    Returns:
        ``max_i log ‖B(h̃_i)‖₂`` (``-inf`` if J = 0).
    """
    validate_sgd_hyperparameters(lr, momentum, dampening, nesterov, weight_decay)
    if eigenvalues.numel() == 0:
        raise ValueError("eigenvalues must contain at least one value")
    h = eigenvalues.to(torch.float64).reshape(-1) + weight_decay
    if momentum == 0:
        return float(torch.log((1 - lr * h).abs().max()))
    if nesterov:
        a, b, c = 1 - lr * (1 + momentum) * h, -lr * momentum**2, h
    else:
        keep = 1.0 if first_step else 1.0 - dampening
        a, b, c = 1 - lr * keep * h, -lr * momentum, keep * h
    d = momentum
    norm = (torch.sqrt((a + d) ** 2 + (c - b) ** 2) + torch.sqrt((a - d) ** 2 + (b + c) ** 2)) / 2
    return float(torch.log(norm.max()))


def classify_eigenvalues(
    eigenvalues: Tensor,
    lr: float,
    tolerance: float = DEFAULT_TOLERANCE,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    scale: float | None = None,
) -> dict[str, Tensor]:
    """Boolean masks classifying each eigenvalue (module docstring for the rules).

    With ``h̃ = h + wd``, ``(0, u) = stability_interval(...)`` and ``ε = tolerance · scale``:
    ``edge = |h̃| ≤ ε or |h̃ − u| ≤ ε``; ``chaotic = not edge and (h̃ < 0 or h̃ > u)``;
    ``stable = not edge and 0 < h̃ < u``; ``negative = h̃ < −ε``; ``positive = h̃ > ε``; ``zero = |h̃| ≤ ε``.
    ``chaotic | edge | stable`` and ``negative | zero | positive`` each partition the eigenvalues.

    Args:
        eigenvalues: Hessian eigenvalues h (without weight decay), shape ``(n,)``.
        lr: learning rate γ.
        tolerance: edge half-width relative to ``scale``.
        momentum: momentum μ.
        dampening: dampening τ.
        nesterov: Nesterov momentum.
        weight_decay: wd.
        scale: reference magnitude; default the spectral radius ``max |h_i|`` of ``eigenvalues``.

    Returns:
        Boolean tensors ``chaotic, edge, stable, negative, positive, zero``, each of the input's shape.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be non-negative, got {tolerance}")
    validate_sgd_hyperparameters(lr, momentum, dampening, nesterov, weight_decay)
    _, upper = stability_interval(lr, momentum, dampening, nesterov)
    h = eigenvalues.to(torch.float64)
    if scale is None:
        scale = float(h.abs().max()) if h.numel() else 0.0
    eps = tolerance * scale
    h = h + weight_decay
    zero = h.abs() <= eps
    edge = zero | ((h - upper).abs() <= eps)
    return {
        "chaotic": ~edge & ((h < 0) | (h > upper)),
        "edge": edge,
        "stable": ~edge & (h > 0) & (h < upper),
        "negative": h < -eps,
        "positive": h > eps,
        "zero": zero,
    }


def spectral_counts(
    eigenvalues: Tensor,
    lr: float,
    tolerance: float = DEFAULT_TOLERANCE,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    scale: float | None = None,
) -> dict[str, int]:
    """Count chaotic / edge / stable and negative / zero / positive eigenvalues of an exact spectrum.

    See :func:`classify_eigenvalues`; ``n_chaotic + n_edge + n_stable = n_negative + n_zero + n_positive``
    ``= n``.
    Negative and positive are beyond the tolerance band (ReLU zeros count as ``n_zero``, not as a sign).

    Args:
        eigenvalues: all N Hessian eigenvalues (e.g. ``torch.linalg.eigvalsh(dense_hessian(...))``).
        lr: learning rate γ.
        tolerance: edge half-width relative to ``scale`` (default :data:`DEFAULT_TOLERANCE`).
        momentum: momentum μ.
        dampening: dampening τ.
        nesterov: Nesterov momentum.
        weight_decay: wd.
        scale: reference magnitude for the tolerance; default ``max |h_i|``.

    Returns:
        ``{"n_chaotic", "n_edge", "n_stable", "n_negative", "n_positive", "n_zero"}`` → int.
    """
    masks = classify_eigenvalues(
        eigenvalues, lr, tolerance, momentum, dampening, nesterov, weight_decay, scale=scale
    )
    return {f"n_{name}": int(mask.sum()) for name, mask in masks.items()}


def slq_spectral_count_bounds(
    nodes: Tensor,
    weights: Tensor,
    dim: int,
    lr: float,
    tolerance: float = DEFAULT_TOLERANCE,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    scale: float | None = None,
) -> dict[str, tuple[float, float]]:
    """Quadrature brackets ``(low, high)`` of the counts of :func:`slq_spectral_counts`.

    Each class is a union of intervals of h bounded by ``b₀ = −wd`` (curvature 0) and ``b_u = u − wd``
    (the stability edge), widened by ``ε = tolerance · scale``:

        negative: h < b₀ − ε            positive: h > b₀ + ε          zero: |h − b₀| ≤ ε
        chaotic:  h < b₀ − ε  or  h > b_u + ε                         stable: b₀ + ε < h < b_u − ε
        edge:     the rest (N minus chaotic minus stable)

    Per probe, the Chebyshev–Markov–Stieltjes inequalities bracket the spectral distribution function at
    each endpoint by the weights of the adjacent nodes (as :func:`slq_count_bounds`); the bracket of a
    union or complement follows by interval arithmetic, is clipped to ``[0, 1]`` per probe and averaged.
    It brackets the Hutchinson estimate with exact quadrature, not the probe noise.

    Args:
        nodes: ``(P, m)`` quadrature nodes from :func:`slq`.
        weights: ``(P, m)`` quadrature weights.
        dim: N.
        lr: learning rate γ.
        tolerance: edge half-width relative to ``scale``.
        momentum: momentum μ.
        dampening: dampening τ.
        nesterov: Nesterov momentum.
        weight_decay: wd.
        scale: reference magnitude; default as :func:`slq_spectral_counts`.

    Returns:
        ``{"n_chaotic", "n_edge", "n_stable", "n_negative", "n_positive", "n_zero"}`` → ``(low, high)``
        with ``0 ≤ low ≤ high ≤ N``.

    Raises:
        ValueError: ``2ε ≥ u`` (the two edge bands overlap and the classes are not intervals).
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be non-negative, got {tolerance}")
    _, upper = stability_interval(lr, momentum, dampening, nesterov)
    validate_sgd_hyperparameters(lr, momentum, dampening, nesterov, weight_decay)
    if scale is None:
        support = nodes[weights > 0]
        scale = float(support.abs().max()) if support.numel() else 0.0
    eps = tolerance * scale
    if 2 * eps >= upper:
        raise ValueError(f"the edge bands overlap: 2 * tolerance * scale = {2 * eps} >= u = {upper}")
    zero, edge = -weight_decay, upper - weight_decay

    def below(t: float, strict: bool) -> tuple[Tensor, Tensor]:  # bracket of F(t−) or F(t) per probe
        return _cdf_bracket(nodes, weights, t, strict)

    neg = below(zero - eps, strict=True)
    not_pos = below(zero + eps, strict=False)
    pos = (1 - not_pos[1], 1 - not_pos[0])
    not_above = below(edge + eps, strict=False)
    above = (1 - not_above[1], 1 - not_above[0])
    stable_top = below(edge - eps, strict=True)
    brackets = {
        "chaotic": (neg[0] + above[0], neg[1] + above[1]),
        "stable": (stable_top[0] - not_pos[1], stable_top[1] - not_pos[0]),
        "negative": neg,
        "positive": pos,
        "zero": (not_pos[0] - neg[1], not_pos[1] - neg[0]),
    }
    brackets = {k: (lo.clamp(0, 1), hi.clamp(0, 1)) for k, (lo, hi) in brackets.items()}
    chaotic, stable = brackets["chaotic"], brackets["stable"]
    brackets["edge"] = ((1 - chaotic[1] - stable[1]).clamp(0, 1), (1 - chaotic[0] - stable[0]).clamp(0, 1))
    order = ("chaotic", "edge", "stable", "negative", "positive", "zero")
    return {f"n_{k}": (float(dim * brackets[k][0].mean()), float(dim * brackets[k][1].mean())) for k in order}


def slq_spectral_counts(
    nodes: Tensor,
    weights: Tensor,
    dim: int,
    lr: float,
    tolerance: float = DEFAULT_TOLERANCE,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    scale: float | None = None,
) -> dict[str, float]:
    """SLQ estimates of :func:`spectral_counts`: ``N · (1/P) Σ_p Σ_j τ_pj 1[class(θ_pj)]``.

    The nodes are classified like eigenvalues; ``scale`` defaults to the largest ``|θ_pj|`` among nodes
    with positive weight (extreme Ritz values converge to the spectral radius from inside). Error as in
    :func:`slq_count`: the bias sits at the class boundaries, so ``n_edge`` (a band of width 2ε around
    0 and u, far narrower than the quadrature resolution) is the least reliable number and the split of
    a zero-eigenvalue atom between ``n_edge`` and its neighbours depends on where the nodes fall;
    ``n_chaotic`` driven by negative curvature inherits the same caveat at 0.

    Args:
        nodes: ``(P, m)`` quadrature nodes from :func:`slq`.
        weights: ``(P, m)`` quadrature weights.
        dim: N.
        lr: learning rate γ.
        tolerance: edge half-width relative to ``scale``.
        momentum: momentum μ.
        dampening: dampening τ.
        nesterov: Nesterov momentum.
        weight_decay: wd.
        scale: reference magnitude for the tolerance.

    Returns:
        Same keys as :func:`spectral_counts`, float values summing (per partition) to N.
    """
    if scale is None:
        support = nodes[weights > 0]
        scale = float(support.abs().max()) if support.numel() else 0.0
    masks = classify_eigenvalues(
        nodes, lr, tolerance, momentum, dampening, nesterov, weight_decay, scale=scale
    )
    return {f"n_{name}": float(dim * (weights * mask).sum(dim=1).mean()) for name, mask in masks.items()}
