"""Divergence baselines and fits (seed 001, A.8-A.10) and the twins' perturbation directions."""

import math

import pytest
import torch
from helpers import F64, planted
from torch import nn

from lightning_chaos.core.divergence import (
    DIRECTIONS,
    default_init_distance,
    fit_divergence,
    random_walk_distance,
    sampled_init_distances,
    twin_directions,
)
from lightning_chaos.core.sgd import SGDHyperparameters


def test_seed_a8_init_distance_is_sqrt2_too_large():
    mlp = nn.Sequential(nn.Linear(784, 20), nn.ReLU(), nn.Linear(20, 10))
    expected = math.sqrt(2 / 3 * (20 + 20 / 784 + 10 + 10 / 20))
    assert default_init_distance(mlp) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(4.5111, abs=1e-4)
    seed_value = math.sqrt(4 * 30 / 3 + 4 * 20 / (3 * 784) + 4 * 10 / (3 * 20))  # A.8's own expression
    assert seed_value == pytest.approx(6.38, abs=5e-3) and seed_value / expected == pytest.approx(
        math.sqrt(2)
    )


def test_analytic_init_distance_matches_sampling():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 10),
        nn.Linear(10, 3),
    )
    state = torch.get_rng_state()
    samples = sampled_init_distances(model, num_pairs=400, seed=1)
    assert torch.equal(state, torch.get_rng_state())  # the global stream is untouched
    rms = float(samples.pow(2).mean().sqrt())
    # E d² is exact; its sampling error is std(d²)/√n
    stderr = float(samples.pow(2).std() / math.sqrt(samples.numel())) / (2 * rms)
    assert abs(rms - default_init_distance(model)) < 4 * stderr
    with pytest.raises(ValueError, match="Bilinear"):
        default_init_distance(nn.Bilinear(2, 2, 1))


def test_fit_recovers_a_planted_divergence_law():
    t = torch.arange(50, dtype=torch.float64)
    a, b = fit_divergence(torch.sqrt(0.3**2 * t**2 + 2.0 * t))
    assert a == pytest.approx(0.3, rel=1e-9) and b == pytest.approx(2.0, rel=1e-9)
    a, b = fit_divergence(torch.sqrt(5.0 * t))  # pure diffusion: a = 0 under the b >= 0, a² >= 0 constraint
    assert a == pytest.approx(0.0, abs=1e-6) and b == pytest.approx(5.0, rel=1e-9)


def test_random_walk_distance_matches_simulation():
    gen = torch.Generator().manual_seed(0)
    steps, dim, sigma = 30, 50, 0.2
    walks = torch.randn(2000, 2, steps, dim, generator=gen, dtype=torch.float64) * sigma
    d = (walks[:, 0].sum(1) - walks[:, 1].sum(1)).norm(dim=1)
    assert float(d.pow(2).mean().sqrt()) == pytest.approx(random_walk_distance(steps, dim, sigma), rel=0.02)


def test_twin_directions_of_a_planted_spectrum():
    # lr 0.5 (2/γ = 4): LLE = log|1 − h/2|; chaotic: h < 0 or h > 4
    h = torch.tensor([-1.0, 0.0, 0.5, 1.5, 2.0, 3.0, 5.0, 9.0], dtype=F64)
    _, u = planted(h, seed=3)
    sgd = SGDHyperparameters(lr=0.5)
    found = twin_directions(DIRECTIONS, 8, torch.Generator().manual_seed(0), sgd, (h, u))
    assert list(found.vectors) == list(DIRECTIONS) and found.empty == []
    assert all(float(v.norm()) == pytest.approx(1.0, abs=1e-12) for v in found.vectors.values())
    # the extremes are single eigenvectors: 9 (|1 − 4.5| = 3.5) and 2 (annihilated, LLE −inf)
    assert abs(float(found.vectors["max_chaotic"] @ u[:, 7])) == pytest.approx(1.0, abs=1e-12)
    assert abs(float(found.vectors["max_non_chaotic"] @ u[:, 4])) == pytest.approx(1.0, abs=1e-12)
    assert found.lle == {"max_chaotic": pytest.approx(math.log(3.5)), "max_non_chaotic": -math.inf}
    chaotic = u[:, [0, 6, 7]]
    assert float((chaotic.T @ found.vectors["chaotic"]).norm()) == pytest.approx(1.0, abs=1e-12)
    assert float((chaotic.T @ found.vectors["non_chaotic"]).norm()) == pytest.approx(0.0, abs=1e-12)
    # edge directions (h = 0 here) are not chaotic: they belong to the complement
    assert float(u[:, 1] @ found.vectors["chaotic"]) == pytest.approx(0.0, abs=1e-12)


def test_twin_directions_report_empty_eigenspaces_and_need_the_spectrum():
    h = torch.tensor([0.5, 1.0, 2.0], dtype=F64)  # all stable at lr 0.5
    _, u = planted(h)
    found = twin_directions(["chaotic", "random"], 3, torch.Generator(), SGDHyperparameters(lr=0.5), (h, u))
    assert found.empty == ["chaotic"] and list(found.vectors) == ["random"]
    random_only = twin_directions(["random"], 3, torch.Generator().manual_seed(1))
    expected = torch.randn(3, generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(random_only.vectors["random"], expected / expected.norm())
    with pytest.raises(ValueError, match="eigenpairs"):
        twin_directions(["chaotic"], 3, torch.Generator())
    with pytest.raises(ValueError, match="unknown direction"):
        twin_directions(["sideways"], 3, torch.Generator())
