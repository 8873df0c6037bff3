"""Projections and overlaps against explicit projectors and their defining properties."""

import math

import pytest
import torch

from lightning_chaos.core.projection import (
    gradient_overlaps,
    gradient_subspace_overlap,
    project_out,
    projector,
    random_subspace_overlap,
    select_directions,
    subspace_overlap,
)
from lightning_chaos.core.spectrum import local_lyapunov_exponents
from lightning_chaos.core.tangent import sgd_tangent_map

F64 = torch.float64


def orthonormal(n, k, seed):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=F64))
    return q


# planted spectrum for lr = 0.5 (2/γ = 4): indices 0-2 negative, 3-4 exact-zero noise, 5-7 stable,
# 8 on the edge 2/γ, 9-10 beyond it
H = torch.tensor([-3.0, -1.0, -0.1, -1e-8, 1e-8, 0.5, 2.0, 3.5, 4.0, 4.5, 6.0], dtype=F64)


@pytest.mark.parametrize(
    ("strategy", "removed"),
    [("chaotic", [0, 1, 2, 9, 10]), ("negative", [0, 1, 2]), ("positive", [9, 10])],
)
def test_select_directions_by_strategy(strategy, removed):
    mask = select_directions(H, 0.5, strategy)
    assert mask.dtype == torch.bool
    assert mask.nonzero().flatten().tolist() == removed
    # every removed direction has a positive LLE; edge directions (3, 4, 8) are kept
    assert (local_lyapunov_exponents(H[mask], 0.5) > 0).all()
    assert not mask[[3, 4, 8]].any()


def test_select_directions_with_momentum_moves_the_upper_boundary():
    # heavy ball μ = 0.5: stable for 0 < h < 2(1 + μ)/γ = 6
    mask = select_directions(H, 0.5, "positive", momentum=0.5)
    assert mask.nonzero().flatten().tolist() == []
    mask = select_directions(torch.tensor([5.9, 6.1], dtype=F64), 0.5, "chaotic", momentum=0.5)
    assert mask.tolist() == [False, True]


def test_select_directions_rejects_unknown_strategy():
    with pytest.raises(ValueError, match=r"strategy.*'chaotic', 'negative', 'positive'.*'everything'"):
        select_directions(H, 0.5, "everything")


def test_project_out_matches_the_explicit_projector():
    basis = orthonormal(12, 4, seed=0)
    explicit = torch.eye(12, dtype=F64) - basis @ basis.T
    torch.testing.assert_close(projector(basis), explicit, rtol=0, atol=1e-14)
    gen = torch.Generator().manual_seed(1)
    vector, block = torch.randn(12, generator=gen, dtype=F64), torch.randn(12, 3, generator=gen, dtype=F64)
    torch.testing.assert_close(project_out(vector, basis), explicit @ vector, rtol=0, atol=1e-14)
    torch.testing.assert_close(project_out(block, basis), explicit @ block, rtol=0, atol=1e-14)
    torch.testing.assert_close(
        basis.T @ project_out(block, basis), torch.zeros(4, 3, dtype=F64), rtol=0, atol=1e-14
    )
    p = projector(basis)
    torch.testing.assert_close(p @ p, p, rtol=0, atol=1e-14)
    assert torch.equal(project_out(vector, basis[:, :0]), vector)
    with pytest.raises(ValueError, match="shape"):
        project_out(vector, basis[:5])


def test_cgd_projection_removes_every_chaotic_lle():
    # seed 001, A.7: with P projecting out the chaotic eigenvectors, the modified map I − γ P H has the
    # removed directions at multiplier 1 (LLE 0) and keeps the others' 1 − γ h.
    lr = 0.5
    u = orthonormal(H.numel(), H.numel(), seed=2)
    hessian = (u * H) @ u.T
    removed = select_directions(H, lr, "chaotic")
    p = projector(u[:, removed])
    modified = torch.eye(H.numel(), dtype=F64) - lr * p @ hessian
    multipliers = torch.linalg.eigvals(modified)
    assert float(multipliers.abs().max()) <= 1 + lr * 1e-8 + 1e-12  # the edge direction h = -1e-8 is kept
    expected = torch.where(removed, torch.ones_like(H), 1 - lr * H).sort().values
    torch.testing.assert_close(multipliers.real.sort().values, expected, rtol=0, atol=1e-10)
    # the projected SGD update has no component along removed eigenvectors
    gradient = torch.randn(H.numel(), generator=torch.Generator().manual_seed(3), dtype=F64)
    update = project_out(-lr * gradient, u[:, removed])
    assert float((u[:, removed].T @ update).abs().max()) < 1e-14
    assert torch.allclose(u[:, ~removed].T @ update, u[:, ~removed].T @ (-lr * gradient), rtol=0, atol=1e-14)
    assert not torch.allclose(sgd_tangent_map(hessian, lr), modified)


def test_subspace_overlap_properties():
    v = orthonormal(20, 5, seed=4)
    mixing = orthonormal(5, 5, seed=5)
    assert subspace_overlap(v, v) == pytest.approx(1.0, abs=1e-14)
    assert subspace_overlap(v, v @ mixing) == pytest.approx(1.0, abs=1e-14)  # same subspace, other basis
    assert subspace_overlap(v[:, :2], v) == pytest.approx(1.0, abs=1e-14)  # containment
    complement = orthonormal(20, 20, seed=6)
    w = project_out(complement, v)
    w = torch.linalg.svd(w, full_matrices=False).U[:, :15]  # orthonormal basis of the complement of V
    assert subspace_overlap(v, w) == pytest.approx(0.0, abs=1e-14)
    a, b = orthonormal(20, 3, seed=7), orthonormal(20, 6, seed=8)
    value = subspace_overlap(a, b)
    assert 0.0 <= value <= 1.0
    explicit = torch.trace((a @ a.T) @ (b @ b.T)) / 3  # tr(P_V P_W) / d_min
    assert value == pytest.approx(float(explicit), abs=1e-14)
    rotated = subspace_overlap(a @ orthonormal(3, 3, seed=9), b @ orthonormal(6, 6, seed=10))
    assert rotated == pytest.approx(value, abs=1e-14)
    assert subspace_overlap(a, b) == pytest.approx(subspace_overlap(b, a), abs=1e-14)
    assert math.isnan(subspace_overlap(a, b[:, :0]))


def test_random_subspace_overlap_matches_the_empirical_mean():
    n, d1, d2, trials = 40, 4, 10, 400
    gen = torch.Generator().manual_seed(11)
    values = []
    for _ in range(trials):
        v, _ = torch.linalg.qr(torch.randn(n, d1, generator=gen, dtype=F64))
        w, _ = torch.linalg.qr(torch.randn(n, d2, generator=gen, dtype=F64))
        values.append(subspace_overlap(v, w))
    baseline = random_subspace_overlap(d1, d2, n)
    assert baseline == pytest.approx(10 / 40)
    assert sum(values) / trials == pytest.approx(baseline, rel=0.03)
    assert math.isnan(random_subspace_overlap(0, 3, 10))
    with pytest.raises(ValueError):
        random_subspace_overlap(11, 3, 10)


def test_gradient_overlaps():
    basis = torch.tensor([[3.0, 0.0], [4.0, 0.0], [0.0, -2.0]], dtype=F64)  # unnormalised columns
    gradient = torch.tensor([1.0, 0.0, 1.0], dtype=F64)
    cosines = gradient_overlaps(gradient, basis)
    expected = torch.tensor([3.0 / (5.0 * math.sqrt(2.0)), 2.0 / (2.0 * math.sqrt(2.0))], dtype=F64)
    torch.testing.assert_close(cosines, expected, rtol=0, atol=1e-15)
    v = orthonormal(10, 3, seed=12)
    g = torch.randn(10, generator=torch.Generator().manual_seed(13), dtype=F64)
    in_span = g - projector(v) @ g
    assert gradient_subspace_overlap(g, v) == pytest.approx(float(in_span @ in_span / (g @ g)), abs=1e-14)
    assert gradient_subspace_overlap(v[:, 0], v) == pytest.approx(1.0, abs=1e-14)
    assert math.isnan(gradient_subspace_overlap(torch.zeros(10, dtype=F64), v))
