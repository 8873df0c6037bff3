"""The Lanczos process against eigh of planted dense matrices and of the exact Hessian."""

import math

import pytest
import torch
from helpers import F64, mlp_loss, planted

from lightning_chaos.core.lanczos import LanczosRuns, lanczos, random_block
from lightning_chaos.core.operators import HessianOperator, dense_hessian


def tridiagonal(alpha, beta):
    return torch.diag(alpha) + torch.diag(beta, 1) + torch.diag(beta, -1)


def test_lanczos_basis_is_orthonormal_and_tridiagonalises():
    a, _ = planted(torch.linspace(-1, 4, 60, dtype=F64) ** 3)
    runs = lanczos(a, 25, generator=torch.Generator().manual_seed(0))
    alpha, beta = runs.tridiagonal()
    v = runs.basis[0].T
    assert isinstance(runs, LanczosRuns) and runs.lengths == [25]
    assert alpha.shape == (25,) and beta.shape == (24,) and v.shape == (60, 25)
    torch.testing.assert_close(v.T @ v, torch.eye(25, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(v.T @ a @ v, tridiagonal(alpha, beta), rtol=0, atol=1e-10)
    # the Ritz values are the eigenvalues of T, descending
    expected = torch.linalg.eigvalsh(tridiagonal(alpha, beta)).flip(0)
    torch.testing.assert_close(runs.ritz_values(), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("which", ["largest", "smallest", "both"])
def test_lanczos_eigenpairs_match_eigvalsh(which):
    gen = torch.Generator().manual_seed(1)
    h = torch.cat([torch.tensor([-9.0, -6.0, -4.5], dtype=F64), torch.randn(300, generator=gen, dtype=F64)])
    h = torch.cat([h, torch.tensor([5.0, 7.0, 12.0], dtype=F64)])
    a, _ = planted(h, seed=2)
    exact_values, exact_vectors = torch.linalg.eigh(a)
    values, vectors = lanczos(a, 80, generator=gen).ritz_pairs(3, which)
    expected_index = {"largest": [-1, -2, -3], "smallest": [0, 1, 2], "both": [-1, -2, -3, 2, 1, 0]}[which]
    torch.testing.assert_close(values, exact_values[expected_index], rtol=0, atol=1e-9)
    overlaps = (vectors * exact_vectors[:, expected_index]).sum(0).abs()
    torch.testing.assert_close(overlaps, torch.ones_like(overlaps), rtol=0, atol=1e-8)
    torch.testing.assert_close(a @ vectors, vectors * values, rtol=0, atol=1e-7)


def test_lanczos_eigenpairs_of_hessian_operator():
    loss_fn, params = mlp_loss(sizes=(4, 12, 12, 3), batch=16)
    exact = torch.linalg.eigvalsh(dense_hessian(loss_fn, params))
    op = HessianOperator(loss_fn, params)
    n = op.shape[0]
    # the step counts CGD and the old lanczos_eigenpairs used: min(N, 3 k_total + 30)
    top, _ = lanczos(op, min(n, 3 * 2 + 30), generator=torch.Generator().manual_seed(0)).ritz_pairs(2)
    bottom, _ = lanczos(op, n, generator=torch.Generator()).ritz_pairs(1, "smallest")
    torch.testing.assert_close(top, exact[[-1, -2]], rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(bottom, exact[:1], rtol=1e-8, atol=1e-10)
    assert op.num_hvps <= 36 + op.shape[0]


def test_lanczos_stops_at_an_invariant_subspace():
    h = torch.tensor([-2.0] * 10 + [0.5] * 20 + [3.0] * 10, dtype=F64)  # three distinct eigenvalues
    a, u = planted(h, seed=3)
    runs = lanczos(a, 30, generator=torch.Generator().manual_seed(0))
    alpha, beta = runs.tridiagonal()
    assert runs.lengths == [3] and alpha.shape == (3,) and beta.shape == (2,)
    assert runs.basis[0, : runs.lengths[0]].T.shape == (40, 3)
    torch.testing.assert_close(
        torch.linalg.eigvalsh(tridiagonal(alpha, beta)),
        torch.tensor([-2.0, 0.5, 3.0], dtype=F64),
        rtol=0,
        atol=1e-12,
    )
    runs = lanczos(a, 30, start=u[:, 4])  # an eigenvector: one step
    alpha, beta = runs.tridiagonal()
    assert runs.lengths == [1] and alpha.shape == (1,) and beta.shape == (0,)
    torch.testing.assert_close(alpha, torch.tensor([-2.0], dtype=F64), rtol=0, atol=1e-12)
    # a multiple eigenvalue comes once: five pairs asked, three distinct eigenvalues found
    values, vectors = lanczos(a, 40, generator=torch.Generator().manual_seed(0)).ritz_pairs(5, "largest")
    torch.testing.assert_close(values, torch.tensor([3.0, 0.5, -2.0], dtype=F64), rtol=0, atol=1e-12)
    assert vectors.shape == (40, 3)


def test_independent_runs_equal_single_runs_and_give_gauss_rules():
    # P runs advanced by one block product per step are P independent single-vector runs.
    h = torch.tensor([-2.0, -1.0, -0.5, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.0], dtype=F64)
    a, u = planted(h, seed=4)
    start = torch.randn(11, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    start[:, 2] = u[:, 7] + u[:, 10]  # a start vector in a two-dimensional invariant space
    block = lanczos(a, 11, start=start)
    assert block.lengths[2] == 2  # breakdown: the Krylov space of the third start vector is invariant
    nodes, weights = block.quadrature()
    assert nodes.shape == weights.shape == (3, 11)
    for p in range(3):
        single = lanczos(a, 11, start=start[:, p])
        assert block.lengths[p] == single.lengths[0]
        for got, expected in zip(block.tridiagonal(p), single.tridiagonal(), strict=True):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
        # the Gauss rule of an exhausted Krylov space is the exact spectral measure seen from the start
        unit = start[:, p] / start[:, p].norm()
        for i, value in enumerate(h.tolist()):
            mass = float((u[:, i] @ unit) ** 2)
            rule = float(weights[p][(nodes[p] - value).abs() < 1e-9].sum())
            assert rule == pytest.approx(mass, abs=1e-12), (p, value)
        assert float(weights[p].sum()) == pytest.approx(1.0, abs=1e-12)
    assert (weights[2, 2:] == 0).all()  # a run shorter than m is padded with zero-weight nodes


def test_without_reorthogonalisation_the_extremes_stay_accurate():
    h = torch.cat([torch.tensor([-3.0, 12.0], dtype=F64), torch.linspace(0, 1, 398, dtype=F64)])
    a, _ = planted(h, seed=6)
    gen = torch.Generator().manual_seed(0)
    runs = lanczos(a, 120, generator=gen, reorthogonalize=False, keep_basis=False)
    assert runs.basis is None
    ritz = runs.ritz_values()
    assert float(ritz[0]) == pytest.approx(12.0, abs=1e-9) and float(ritz[-1]) == pytest.approx(
        -3.0, abs=1e-9
    )
    with pytest.raises(ValueError, match="keep_basis=True"):
        runs.ritz_pairs(1)


def test_random_block_is_drawn_on_the_generators_device():
    gen = torch.Generator().manual_seed(3)
    z = random_block(5, 2, gen, F64, "cpu", "rademacher")
    assert set(z.unique().tolist()) <= {-1.0, 1.0} and z.shape == (5, 2)
    expected = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    assert torch.equal(random_block(5, 2, torch.Generator().manual_seed(3), F64, "cpu"), expected)
    with pytest.raises(ValueError, match="distribution"):
        random_block(5, 2, gen, F64, "cpu", "uniform")


def test_lanczos_rejects_zero_start_and_non_finite_products():
    a = torch.eye(5, dtype=F64)
    with pytest.raises(ValueError, match="nonzero"):
        lanczos(a, 3, start=torch.zeros(5, dtype=F64))
    with pytest.raises(FloatingPointError):
        lanczos(lambda v: v * math.nan, 3, dim=5, start=torch.ones(5, dtype=F64))
    with pytest.raises(ValueError, match="dim"):
        lanczos(lambda v: v, 3)
    with pytest.raises(ValueError, match="num_steps"):
        lanczos(a, 0)
    with pytest.raises(ValueError, match="which"):
        lanczos(a, 5).ritz_pairs(1, "middle")
