"""Projections and overlaps against explicit projectors and their defining properties."""

import math

import pytest
import torch
from helpers import F64, orthonormal

from lightning_chaos.core.projection import (
    gradient_overlaps,
    gradient_subspace_overlap,
    project_out,
    projector,
    random_subspace_overlap,
    subspace_overlap,
)


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
