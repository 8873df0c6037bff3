"""Exact Hessian-vector products and the Hessian as a linear operator.

Conventions: a *functional loss* ``loss_fn(params) -> scalar`` evaluates the loss of a fixed batch for a
sequence of tensors shaped like the trainable parameters
(:class:`~lightning_chaos.core.functional_loss.FunctionalLoss` is one); vectors of the parameter space are
flat ``(N,)`` (:mod:`lightning_chaos.core.params`), blocks of k vectors ``(N, k)``.

The operator contract, shared by every routine that takes an operator (Lanczos, SLQ, the Benettin
accumulator): an object with ``shape == (N, N)``, ``dtype``, ``device`` and ``matmat(V) -> A V`` for
``V`` of shape ``(N, k)`` (a dense square tensor and a bare ``matvec`` callable are accepted too, see
:func:`as_matmat`).

Every second-order product is evaluated under PyTorch's math kernel of scaled-dot-product attention
(:func:`second_order_context`): the fused attention kernels (flash, memory-efficient, and the fused CPU
kernel that ``nn.MultiheadAttention`` and ``nn.Transformer`` select) have no double backward.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_chaos.core.params import filled, flatten, num_params, unflatten

__all__ = [
    "HessianOperator",
    "HvpMethod",
    "LinearOperator",
    "LossFn",
    "SecondOrderError",
    "as_matmat",
    "dense_hessian",
    "hessian_vector_product",
    "second_order_context",
    "symmetric_eigh",
]

LossFn = Callable[[Sequence[Tensor]], Tensor]
"""A functional loss (tensors shaped like the trainable parameters in, scalar loss on a fixed batch out)."""

HvpMethod = Literal["auto", "double_backward", "forward_over_reverse"]
_METHODS = ("auto", "double_backward", "forward_over_reverse")


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric ``N × N`` operator given by its block product (the contract of the module docstring).

    Example:
        >>> op = HessianOperator(lambda ps: (ps[0] ** 2).sum(), [torch.ones(3)])
        >>> isinstance(op, LinearOperator), op.shape
        (True, (3, 3))
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def matmat(self, block: Tensor) -> Tensor:
        """``A V`` for ``V`` of shape ``(N, k)``."""
        ...


class SecondOrderError(RuntimeError):
    """A second-order product failed: an operation of the model has no double backward.

    (Or no forward-mode derivative.) For example a custom ``autograd.Function`` or a fused kernel.
    """


@contextlib.contextmanager
def second_order_context() -> Iterator[None]:
    """Evaluate second-order autograd with the math attention kernel; report failures as such.

    Selects the scaled-dot-product attention kernel that has a double backward, and re-raises autograd's
    ``RuntimeError``/``NotImplementedError`` (e.g. "derivative for ... is not implemented") as
    :class:`SecondOrderError`, so callers can tell "this model has no second-order products" from a bug.
    """
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    except (RuntimeError, NotImplementedError) as err:
        if type(err) not in (RuntimeError, NotImplementedError):
            raise
        raise SecondOrderError(f"a second-order product failed: {err}") from err


def as_matmat(
    op: Tensor | LinearOperator | Callable[[Tensor], Tensor],
    dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Callable[[Tensor], Tensor], int, torch.dtype, torch.device | str | None]:
    """Normalise an operator to a block product ``(N, k) → (N, k)``; also return N, dtype and device.

    Args:
        op: a dense square tensor, a :class:`LinearOperator`, or a bare ``matvec`` ``(N,) → (N,)``.
        dim: N (required for a bare matvec).
        dtype: working dtype for a bare matvec (default ``torch.get_default_dtype()``).
        device: working device for a bare matvec.

    Returns:
        ``(matmat, N, dtype, device)``.
    """
    if isinstance(op, Tensor):
        if op.ndim != 2 or op.shape[0] != op.shape[1]:
            raise ValueError(f"a dense operator must be square, got shape {tuple(op.shape)}")
        return op.__matmul__, op.shape[0], op.dtype, op.device
    if isinstance(op, LinearOperator):
        return op.matmat, op.shape[0], op.dtype, op.device
    if dim is None:
        raise ValueError("dim is required when the operator is a bare matvec callable")
    matvec = op

    def matmat(block: Tensor) -> Tensor:
        return torch.stack([matvec(column) for column in block.unbind(1)], dim=1)

    return matmat, dim, torch.get_default_dtype() if dtype is None else dtype, device


def _resolve_method(method: str) -> HvpMethod:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    return "forward_over_reverse" if method == "forward_over_reverse" else "double_backward"


def _scalar(loss: Tensor) -> Tensor:
    if loss.ndim != 0:
        raise ValueError(f"loss_fn must return a scalar tensor, got shape {tuple(loss.shape)}")
    return loss


def _flat_grad_with_graph(loss_fn: LossFn, params: Sequence[Tensor]) -> tuple[list[Tensor], Tensor]:
    """Leaves ``ps`` (detached copies requiring grad) and the flat gradient ``∇L(ps)`` with its graph."""
    ps = [p.detach().requires_grad_(True) for p in params]
    with torch.enable_grad(), second_order_context():
        loss = _scalar(loss_fn(ps))
        grads = torch.autograd.grad(loss, ps, create_graph=True, allow_unused=True)
    flat_grad = flatten(filled(grads, ps))
    if _once_differentiable(flat_grad):
        raise SecondOrderError(
            "a second-order product failed: the gradient passes through a backward marked "
            "@once_differentiable (a custom autograd.Function without double backward)"
        )
    return ps, flat_grad


def _once_differentiable(tensor: Tensor) -> bool:
    """Whether the graph of ``tensor`` holds the error node of a ``@once_differentiable`` backward.

    That node hangs off detached copies, not off the parameters: autograd never reaches it when
    differentiating again with respect to them, and the second derivatives through it would come out as
    zero instead of an error.
    """
    stack = [] if tensor.grad_fn is None else [tensor.grad_fn]
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.name() == "torch::autograd::Error":
            return True
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return False


def _vjp_of_grad(ps: list[Tensor], flat_grad: Tensor, cotangents: Tensor, batched: bool) -> Tensor:
    """``H v`` for a ``(N,)`` cotangent; ``H V`` ``(N, k)`` for ``batched`` rows ``V.T`` ``(k, N)``."""
    if not flat_grad.requires_grad:  # gradient independent of θ: H = 0
        return torch.zeros_like(cotangents.T if batched else cotangents)
    with second_order_context():
        pieces = torch.autograd.grad(
            flat_grad,
            ps,
            grad_outputs=cotangents,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
    if all(piece is None for piece in pieces):
        # the gradient depends on θ, yet nothing reaches θ twice: an operation's backward is not itself
        # differentiable (e.g. marked once_differentiable), and H v would silently be 0
        raise SecondOrderError("the gradient's graph does not reach the parameters: no second derivatives")
    if batched:
        lead = cotangents.shape[0]
        full = [
            torch.zeros(lead, *p.shape, dtype=p.dtype, device=p.device) if h is None else h
            for h, p in zip(pieces, ps, strict=True)
        ]
        return torch.cat([h.reshape(lead, -1) for h in full], dim=1).T
    return flatten(filled(pieces, ps))


def _hvp_forward_over_reverse(loss_fn: LossFn, params: Sequence[Tensor], v: Tensor) -> Tensor:
    primals = tuple(p.detach() for p in params)
    tangents = tuple(unflatten(v, primals))

    def loss(ps: tuple[Tensor, ...]) -> Tensor:
        return _scalar(loss_fn(ps))

    with second_order_context():
        hv = torch.func.jvp(torch.func.grad(loss), (primals,), (tangents,))[1]
    return flatten(hv)


def hessian_vector_product(
    loss_fn: LossFn, params: Sequence[Tensor], v: Tensor, method: HvpMethod = "auto"
) -> Tensor:
    """Exact Hessian-vector product ``H v`` with ``H = ∇²L(θ)``.

    Two exact routes, equal up to floating-point rounding:

    * ``"double_backward"``: ``H v = ∇_θ ⟨∇_θ L(θ), v⟩`` (``torch.autograd.grad`` with ``create_graph``);
    * ``"forward_over_reverse"``: ``H v = d/dε ∇L(θ + ε v)|₀`` (``torch.func.jvp`` of ``torch.func.grad``).

    ``"auto"`` picks ``"double_backward"`` (the faster one on the benchmark models, see
    ``benchmarks/README.md``).

    Args:
        loss_fn: functional loss.
        params: parameters θ at which H is taken (not modified; no ``.grad`` is touched).
        v: direction, shape ``(N,)``.
        method: ``"auto"``, ``"double_backward"`` or ``"forward_over_reverse"``.

    Returns:
        ``H v``, shape ``(N,)``, dtype and device of the parameters.

    Example:
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> hessian_vector_product(lambda ps: 0.5 * ps[0] @ a @ ps[0], [torch.zeros(2)], torch.ones(2))
        tensor([3., 4.])
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

    Args:
        loss_fn: functional loss.
        params: parameters θ (cloned).
        method: HVP route, see :func:`hessian_vector_product`.
        weight_decay: wd ≥ 0 added on the diagonal.
        reduce: applied to every product ``Hv`` / ``HV`` before the weight decay is added (e.g. an
            all-reduce mean across data-parallel ranks, making it the global batch's Hessian).

    Attributes:
        shape: ``(N, N)``.
        dtype: dtype of the parameters.
        device: device of the parameters.
        num_hvps: number of Hessian-vector products performed so far (a ``matmat`` of k columns counts k).
        num_graphs: number of gradient graphs built (``create_graph=True`` passes: at most one).

    Example:
        >>> a = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> op = HessianOperator(lambda ps: 0.5 * ps[0] @ a @ ps[0], [torch.zeros(2)], weight_decay=1.0)
        >>> op.to_dense()
        tensor([[3., 1.],
                [1., 4.]])
    """

    def __init__(
        self,
        loss_fn: LossFn,
        params: Sequence[Tensor],
        method: HvpMethod = "auto",
        weight_decay: float = 0.0,
        reduce: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
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
        self.num_graphs = 0
        self._graph: tuple[list[Tensor], Tensor] | None = None
        self._batching_works = True

    def _grad_graph(self) -> tuple[list[Tensor], Tensor]:
        if self._graph is None:
            self._graph = _flat_grad_with_graph(self.loss_fn, self._params)
            self.num_graphs += 1
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
                # the loop raises (SecondOrderError) when the products themselves fail, not their batching:
                # that is no batching failure to warn about
                looped = self._loop(block)
                warnings.warn(
                    f"batched Hessian products failed ({err}); falling back to a loop", stacklevel=3
                )
                return looped
        return self._loop(block)

    def _loop(self, block: Tensor) -> Tensor:
        return torch.stack([self._hvp(block[:, i]) for i in range(block.shape[1])], dim=1)

    def _check(self, x: Tensor, ndim: int) -> Tensor:
        if x.ndim != ndim or x.shape[0] != self.shape[0]:
            expected = "(N,)" if ndim == 1 else "(N, k)"
            raise ValueError(f"expected shape {expected} with N={self.shape[0]}, got {tuple(x.shape)}")
        return x.to(dtype=self.dtype, device=self.device)

    def matvec(self, v: Tensor) -> Tensor:
        """``(H + wd·I) v`` for ``v`` of shape ``(N,)``; returns ``(N,)``."""
        return self.matmat(self._check(v, 1).unsqueeze(1)).squeeze(1)

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

    def matmat_chunked(self, block: Tensor, chunk_size: int | None) -> Tensor:
        """:meth:`matmat` applied ``chunk_size`` columns at a time (``None``: all at once).

        The same ``(N, k)`` result; the chunks bound the memory of the batched products.
        """
        step = block.shape[1] if chunk_size is None else max(1, int(chunk_size))
        if block.shape[1] <= step:
            return self.matmat(block)
        return torch.cat([self.matmat(chunk) for chunk in block.split(step, dim=1)], dim=1)

    def to_dense(self, chunk_size: int | None = 256) -> Tensor:
        """Dense ``(N, N)`` matrix ``A = A I`` from N Hessian-vector products (symmetric up to rounding).

        The identity is applied in blocks of ``chunk_size`` columns (``None``: all at once), which bounds
        the memory of the batched products.

        Args:
            chunk_size: columns per batched product.

        Returns:
            The ``(N, N)`` matrix, in the operator's dtype and device.
        """
        eye = torch.eye(self.shape[0], dtype=self.dtype, device=self.device)
        return self.matmat_chunked(eye, chunk_size)


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
    if isinstance(out, Tensor):
        return out.to(matrix.dtype)
    return out[0].to(matrix.dtype), out[1].to(matrix.dtype)


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
    with second_order_context():
        return torch.func.jacfwd(grad, randomness="same")(flatten(like))
