import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import (
    Exploding,
    MemoryLogger,
    MetricModule,
    QuadraticModule,
    TinyModule,
    assert_same_training,
    fit_state,
    loader,
    trainer,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_chaos import LyapunovSpectrumMonitor
from lightning_chaos.core.stability import EDGE_TOLERANCE, EXACT_EDGE_TOLERANCE

# γ = 0.2: 2/γ = 10; 1/γ = 5 is avoided (its LLE is -inf); two exact zeros and one h = 2/γ exactly.
PLANTED = [-3.0, -0.5, 0.0, 0.0, 0.3, 1.0, 4.0, 4.5, 9.0, 10.0, 12.0, 20.0]


def run_planted(monitor, max_steps=3, **sgd):
    pl.seed_everything(0, verbose=False)
    logger = MemoryLogger()
    module = QuadraticModule(PLANTED, **sgd)
    trainer([monitor], logger=logger, max_steps=max_steps).fit(module, loader())
    return module, logger.chaos()


def at(values, step=0):
    return {k.removeprefix("chaos/"): v[step] for k, v in values.items() if step in v}


@pytest.mark.parametrize(
    "sgd, tolerance, counts, lle_max, lle_min",
    [
        # plain SGD: chaotic h < 0 or h > 10, edge = the zeros and h = 10, LLE = log|1 - 0.2 h|
        (
            {"lr": 0.2},
            EXACT_EDGE_TOLERANCE,
            {"n_chaotic": 4, "n_edge": 3, "n_stable": 5, "n_negative": 2, "n_positive": 8, "n_zero": 2},
            math.log(3.0),
            math.log(0.1),
        ),
        # weight decay is part of the map: h + 0.25 moves the zeros into the stable set, 10 beyond 2/γ
        (
            {"lr": 0.2, "weight_decay": 0.25},
            EXACT_EDGE_TOLERANCE,
            {"n_chaotic": 5, "n_edge": 0, "n_stable": 7, "n_negative": 2, "n_positive": 10, "n_zero": 0},
            math.log(abs(1 - 0.2 * 20.25)),
            math.log(abs(1 - 0.2 * 4.75)),
        ),
        # the default band (EDGE_TOLERANCE, was 1e-5 for the exact method): ε = 2e-2 · 20 = 0.4 also takes
        # h = 0.3 into the edge; -0.5 stays chaotic
        (
            {"lr": 0.2},
            None,
            {"n_chaotic": 4, "n_edge": 4, "n_stable": 4, "n_negative": 2, "n_positive": 7, "n_zero": 3},
            math.log(3.0),
            math.log(0.1),
        ),
    ],
)
def test_planted_quadratic_counts_and_lles_are_the_closed_form(sgd, tolerance, counts, lle_max, lle_min):
    kwargs = {} if tolerance is None else {"tolerance": tolerance}
    module, logged = run_planted(LyapunovSpectrumMonitor(every_n_steps=1, **kwargs), **sgd)
    for step in range(3):
        values = at(logged, step)
        expected_tolerance = EDGE_TOLERANCE if tolerance is None else tolerance
        assert values["spectrum_exact"] == 1.0 and values["edge_tolerance"] == expected_tolerance
        assert {k: values[k] for k in counts} == counts
        assert values["lle_max"] == pytest.approx(lle_max, abs=1e-12)
        assert values["lle_min"] == pytest.approx(lle_min, abs=1e-12)
        # the Hessian is constant: the chaotic subspace never moves
        assert values["chaotic_dim"] == counts["n_chaotic"]
        assert values["chaotic_overlap"] == pytest.approx(1.0, abs=1e-12)
        assert values["chaotic_overlap_random"] == pytest.approx(counts["n_chaotic"] / 12)


def lle_2x2(h, lr, mu):
    """log max|z| over the roots of z² − (1 + μ − γh) z + μ (heavy ball, no dampening), per eigenvalue."""
    return [math.log(max(abs(np.roots([1.0, -(1 + mu - lr * x), mu])))) for x in h]


def test_momentum_exponents_are_the_2x2_block_formula():
    lr, mu = 0.2, 0.5  # stable interval (0, 2(1 + μ)/γ) = (0, 15)
    _, logged = run_planted(LyapunovSpectrumMonitor(every_n_steps=1), lr=lr, momentum=mu)
    exponents = lle_2x2(PLANTED, lr, mu)
    for step in range(3):
        values = at(logged, step)
        assert values["lle_max"] == pytest.approx(max(exponents), abs=1e-12)
        assert values["lle_min"] == pytest.approx(min(exponents), abs=1e-12)
        assert values["lle_min"] == pytest.approx(0.5 * math.log(mu))  # a complex pair: |z| = √μ
        # default band ε = 2e-2 · 20 = 0.4 (was 1e-5: (3, 2, 7)): the zeros and h = 0.3 are edge
        assert (values["n_chaotic"], values["n_edge"], values["n_stable"]) == (3, 3, 6)
        assert values["n_chaotic"] == sum(e > 1e-9 for e in exponents)


class CheckOverlaps(Callback):
    """After the monitor: its overlaps are |cos| between g + wd·θ and the planted eigenvectors."""

    def __init__(self, monitor, weight_decay):
        self.monitor, self.weight_decay, self.checked = monitor, weight_decay, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        theta = pl_module.theta.detach()
        g = pl_module.A @ theta + pl_module.b + self.weight_decay * theta
        h, u = pl_module.eigenvalues, pl_module.eigenvectors
        cos = (u.T @ g).abs() / g.norm()
        latest = self.monitor.latest
        assert latest["grad_overlap_top"] == pytest.approx(float(cos[h.argmax()]), abs=1e-12)
        assert latest["grad_overlap_min"] == pytest.approx(float(cos[h.argmin()]), abs=1e-12)
        shifted = h + self.weight_decay
        eps = self.monitor.tolerance * float(h.abs().max())  # the monitor's band (default 2e-2, was 1e-5)
        positive, negative = shifted > eps, shifted < -eps
        assert latest["grad_overlap_positive"] == pytest.approx(float(cos[positive].mean()), abs=1e-12)
        assert latest["grad_overlap_negative"] == pytest.approx(float(cos[negative].mean()), abs=1e-12)
        self.checked += 1


@pytest.mark.parametrize("weight_decay", [0.0, 0.25])
def test_gradient_overlaps_with_the_planted_eigenvectors(weight_decay):
    monitor = LyapunovSpectrumMonitor(every_n_steps=1)
    check = CheckOverlaps(monitor, weight_decay)
    pl.seed_everything(0, verbose=False)
    distinct = PLANTED[:3] + PLANTED[4:]  # mean |cos| over a degenerate eigenspace depends on its basis
    module = QuadraticModule(distinct, lr=0.05, weight_decay=weight_decay)
    trainer([monitor, check], max_steps=3).fit(module, loader())
    assert check.checked == 3


# The classes of PLANTED at γ = 0.2 and the default band ε = 2e-2 · 20 = 0.4, by index (written out).
PLANTED_CLASSES = {
    "n_chaotic": [0, 1, 10, 11],
    "n_edge": [2, 3, 4, 9],
    "n_stable": [5, 6, 7, 8],
    "n_negative": [0, 1],
    "n_positive": [5, 6, 7, 8, 9, 10, 11],
    "n_zero": [2, 3, 4],
}


def test_lanczos_method_reports_slq_counts_and_names_the_method():
    monitor = LyapunovSpectrumMonitor(
        every_n_steps=1, method="lanczos", num_eigenpairs=3, slq_steps=12, seed=5
    )
    module, logged = run_planted(monitor, max_steps=2, lr=0.2)
    n, u = 12, module.eigenvectors
    # slq_steps = N: each probe's Gauss rule is exact, so the SLQ count of a class is the Hutchinson estimate
    # N · mean_p Σ_{i ∈ class} (u_iᵀ z_p)² / ‖z_p‖² of the monitor's Rademacher probes z_p. The oracle replays
    # the monitor's generator (one Gaussian Lanczos start vector, then 10 probes, per step) and uses the
    # planted eigenvectors; no function of the package computes it.
    generator = torch.Generator().manual_seed(5)
    for step in range(2):
        values = at(logged, step)
        torch.randn(n, 1, generator=generator, dtype=torch.float64)  # the eigenpair run's start vector
        z = torch.randint(0, 2, (n, 10), generator=generator).to(torch.float64) * 2 - 1
        mass = (u.T @ (z / z.norm(dim=0))) ** 2  # (N, P)
        assert values["spectrum_exact"] == 0.0 and values["edge_tolerance"] == EDGE_TOLERANCE
        for key, index in PLANTED_CLASSES.items():
            expected = float(n * mass[index].sum(0).mean())
            assert values[key] == pytest.approx(expected, abs=1e-8), key
            assert values[f"{key}_low"] - 1e-9 <= values[key] <= values[f"{key}_high"] + 1e-9, key
        # with a full Krylov space the extreme Ritz values are exact: lle_max is the closed form
        assert values["lle_max"] == pytest.approx(math.log(3.0), abs=1e-9)
        assert "grad_overlap_positive" not in values  # needs whole eigenspaces: exact mode only
    # auto switches to Lanczos above max_exact_params
    _, logged = run_planted(LyapunovSpectrumMonitor(max_exact_params=11), max_steps=1, lr=0.2)
    assert at(logged)["spectrum_exact"] == 0.0


@pytest.mark.parametrize("module_cls", [TinyModule, MetricModule], ids=["tiny", "torchmetrics"])
def test_monitors_leave_training_bit_identical(module_cls):
    # MetricModule: no curvature_loss, so the probe re-runs training_step, which updates a torchmetrics
    # MulticlassAccuracy: its state and update count must be those of the run without the monitors
    plain = fit_state([], module_cls=module_cls)
    exact = LyapunovSpectrumMonitor(every_n_steps=2)
    lanczos = LyapunovSpectrumMonitor(every_n_steps=3, method="lanczos", slq_steps=20, log_prefix="lz/")
    watched = fit_state([exact, lanczos], module_cls=module_cls)
    for key in plain[0]:
        assert torch.equal(plain[0][key], watched[0][key]), key  # weights and BatchNorm buffers
    assert all(torch.equal(a, b) for a, b in zip(plain[1], watched[1]))  # optimizer state
    assert torch.equal(plain[2], watched[2])  # global RNG stream after training
    assert torch.equal(plain[3], watched[3])
    assert_same_training(plain, watched)  # all of the above and the metrics' states and update counts
    if module_cls is MetricModule:
        assert plain[4]["train_acc"][1] == 6  # one update per training step
    assert exact.latest["spectrum_exact"] == 1.0 and lanczos.latest["spectrum_exact"] == 0.0


def test_resume_logs_what_the_uninterrupted_run_logs(tmp_path):
    def run(ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        logger = MemoryLogger()
        callbacks = [
            LyapunovSpectrumMonitor(every_n_steps=1, reference_step=2),
            LyapunovSpectrumMonitor(every_n_steps=1, method="lanczos", slq_steps=20, log_prefix="chaos/lz_"),
            ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"),
        ]
        tr = trainer(callbacks, logger=logger, max_steps=-1, max_epochs=2, enable_checkpointing=True)
        tr.fit(TinyModule(), loader(shuffle=False), ckpt_path=ckpt_path)
        return logger.chaos()

    full = run()
    resumed = run(ckpt_path=tmp_path / "epoch=0.ckpt")
    assert set(resumed["chaos/n_chaotic"]) == {4, 5, 6, 7}
    assert set(full["chaos/chaotic_overlap"]) == {2, 3, 4, 5, 6, 7}  # reference stored at step 2
    assert set(resumed["chaos/lz_n_chaotic"]) == {4, 5, 6, 7}
    for key, values in resumed.items():
        for step, value in values.items():
            assert full[key][step] == value, (key, step)


def test_nan_hessians_are_skipped_counted_and_never_logged():
    logger = MemoryLogger()
    monitor = LyapunovSpectrumMonitor(every_n_steps=1)
    pl.seed_everything(0, verbose=False)
    trainer([monitor], logger=logger, max_steps=8).fit(Exploding(), loader())
    chaos = logger.chaos()
    assert 0 < monitor.skipped_steps < 8
    assert chaos["chaos/spectrum_skipped"][7] == monitor.skipped_steps
    assert len(chaos["chaos/n_chaotic"]) + monitor.skipped_steps == 8
    assert all(math.isfinite(v) for values in chaos.values() for v in values.values())


class AdamModule(TinyModule):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters())


class TwoGroups(TinyModule):
    def configure_optimizers(self):
        first, second = list(self.net.parameters())[:2], list(self.net.parameters())[2:]
        return torch.optim.SGD([{"params": first}, {"params": second, "lr": 0.01}], lr=0.1)


@pytest.mark.parametrize(
    "module, match",
    [(AdamModule(), "Adam"), (TwoGroups(), "param group 1 differs"), (TinyModule(momentum=0.0), None)],
)
def test_optimizers_without_the_sgd_map_are_refused_at_fit_start(module, match):
    monitor = LyapunovSpectrumMonitor(every_n_steps=1)
    if match is None:
        trainer([monitor], max_steps=1).fit(module, loader())
        assert monitor.latest["spectrum_exact"] == 1.0
        return
    with pytest.raises(MisconfigurationException, match=match):
        trainer([monitor], max_steps=1).fit(module, loader())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"every_n_steps": 0},
        {"method": "dense"},
        {"max_exact_params": 0},
        {"tolerance": -1e-3},
        {"num_eigenpairs": 0},
        {"lanczos_steps": 5},
        {"slq_probes": 0},
        {"slq_steps": 0},
        {"reference_step": -1},
        {"probe_fraction": 0.0},
    ],
)
def test_bad_arguments_name_the_argument(kwargs):
    with pytest.raises(MisconfigurationException, match=f"`{next(iter(kwargs))}`"):
        LyapunovSpectrumMonitor(**kwargs)


def test_two_monitors_keep_separate_state():
    """Two Lanczos monitors with different seeds: each checkpoints its own generator, and their estimates
    (drawn from those generators) differ, so neither reads the other's state."""
    a = LyapunovSpectrumMonitor(every_n_steps=1, method="lanczos", slq_steps=12, seed=0, log_prefix="a/")
    b = LyapunovSpectrumMonitor(every_n_steps=1, method="lanczos", slq_steps=12, seed=1, log_prefix="b/")
    logger = MemoryLogger()
    pl.seed_everything(0, verbose=False)
    tr = trainer([a, b], logger=logger, max_steps=3)
    tr.fit(TinyModule(), loader())
    saved = tr._checkpoint_connector.dump_checkpoint()["callbacks"]
    assert set(saved) >= {a.state_key, b.state_key} and a.state_key != b.state_key
    assert not torch.equal(saved[a.state_key]["generator"], saved[b.state_key]["generator"])
    assert torch.equal(saved[a.state_key]["generator"], a.generator.get_state())
    assert logger.metrics["a/n_chaotic_low"] != logger.metrics["b/n_chaotic_low"]


@pytest.mark.parametrize("method", ["exact", "lanczos"])
def test_without_overlaps_only_counts_and_exponents_are_computed(method):
    monitor = LyapunovSpectrumMonitor(every_n_steps=1, method=method, overlaps=False, slq_steps=12)
    _, logged = run_planted(monitor, max_steps=1, lr=0.2)
    values = at(logged)
    assert values["lle_max"] == pytest.approx(math.log(3.0), abs=1e-9)
    assert not any(k.startswith(("grad_overlap", "chaotic_")) for k in values)
    assert monitor.reference_basis is None


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_slq_counts_of_a_digits_mlp_are_within_two_percent_of_n_of_the_exact_counts(activation):
    # The Lanczos monitor (defaults: 10 probes x 80 steps, edge tolerance 2e-2) and an exact monitor at the
    # same tolerance watch one run of a 64-32-32-10 MLP (N = 3,466) on the digits: at initialisation and
    # after 300 SGD steps (measured worst errors: 1.2 % and 0.3 % of N for ReLU, 0.3 % for tanh).
    from lightning_chaos.data import DigitsDataModule
    from lightning_chaos.models import MLP, Classifier

    pl.seed_everything(0, verbose=False)
    logger = MemoryLogger()
    lanczos = LyapunovSpectrumMonitor(every_n_steps=300, method="lanczos", overlaps=False)
    exact = LyapunovSpectrumMonitor(
        every_n_steps=300, method="exact", tolerance=EDGE_TOLERANCE, overlaps=False, log_prefix="chaos/exact_"
    )
    module = Classifier(MLP(64, (32, 32), 10, activation=activation), lr=0.1)
    trainer([lanczos, exact], logger=logger, max_steps=301, limit_val_batches=0).fit(
        module, DigitsDataModule(batch_size=128)
    )
    n = sum(p.numel() for p in module.parameters())
    assert n == 3466
    for step in (0, 300):
        values = at(logger.chaos(), step)
        assert values["spectrum_exact"] == 0.0 and values["exact_spectrum_exact"] == 1.0
        assert values["edge_tolerance"] == values["exact_edge_tolerance"] == EDGE_TOLERANCE
        if step == 0:  # the hard case: a dense spectrum through 0, a third of it outside the edge band
            assert values["exact_n_chaotic"] >= 0.1 * n and values["exact_n_stable"] >= 0.1 * n
        for key in ("n_chaotic", "n_edge", "n_stable", "n_negative", "n_positive", "n_zero"):
            assert abs(values[key] - values[f"exact_{key}"]) <= 0.02 * n, (step, key)


COUNT_KEYS = ("n_chaotic", "n_edge", "n_stable", "n_negative", "n_positive", "n_zero")


def both_methods(spectrum, max_steps=2, **monitor_kwargs):
    """Exact and Lanczos monitors on one diagonal planted Hessian (Rademacher probes of a diagonal matrix
    weigh every eigenvalue 1/N exactly, so with a full Krylov space the SLQ counts are exact)."""
    pl.seed_everything(0, verbose=False)
    logger = MemoryLogger()
    monitors = [
        LyapunovSpectrumMonitor(every_n_steps=1, method="exact", **monitor_kwargs),
        LyapunovSpectrumMonitor(every_n_steps=1, method="lanczos", log_prefix="chaos/lz_", **monitor_kwargs),
    ]
    module = QuadraticModule(spectrum, lr=0.2, diagonal=True)
    trainer(monitors, logger=logger, max_steps=max_steps).fit(module, loader())
    return logger.chaos(), monitors


def test_a_large_spectral_radius_at_a_large_learning_rate_is_counted_by_both_methods():
    # lr 0.2 (u = 10) and an eigenvalue of 300: ε = 2e-2 · 300 = 6 and the two edge bands meet. The
    # Lanczos monitor used to fail here (the count brackets raised on overlapping bands); now stable is
    # empty and edge is the band [−6, 16], as in the exact classification.
    spectrum = [-20.0, -3.0, 0.0, 2.0, 4.0, 9.0, 12.0, 20.0, 40.0, 300.0]
    expected = {"n_chaotic": 4, "n_edge": 6, "n_stable": 0, "n_negative": 1, "n_positive": 5, "n_zero": 4}
    logged, monitors = both_methods(spectrum, slq_steps=10)
    assert all(m.skipped_steps == 0 for m in monitors)
    for step in range(2):
        values = at(logged, step)
        assert values["spectrum_exact"] == 1.0 and values["lz_spectrum_exact"] == 0.0
        for key, count in expected.items():
            assert values[key] == count, (step, key)
            assert values[f"lz_{key}"] == pytest.approx(count, abs=1e-9), (step, key)
            assert values[f"lz_{key}_low"] - 1e-9 <= count <= values[f"lz_{key}_high"] + 1e-9, (step, key)
        assert values["lz_n_stable_low"] == values["lz_n_stable_high"] == 0.0
        assert values["lle_max"] == values["lz_lle_max"] == pytest.approx(math.log(59.0), abs=1e-9)


def test_exact_and_lanczos_counts_use_one_edge_band():
    # N = 300 with eight distinct eigenvalues at lr 0.2 (u = 10, ρ = 20, ε = 0.4): -0.3, 0.2 and 9.8 are edge
    # at the default band but chaotic / stable at 1e-5 (the exact method's old default). Both methods now
    # count them alike.
    values = [-5.0, -0.3, 0.0, 0.2, 3.0, 9.8, 14.0, 20.0]
    multiplicity = [20, 30, 100, 50, 60, 20, 15, 5]
    spectrum = [v for v, m in zip(values, multiplicity, strict=True) for _ in range(m)]
    expected = {
        "n_chaotic": 40,
        "n_edge": 200,
        "n_stable": 60,
        "n_negative": 20,
        "n_positive": 100,
        "n_zero": 180,
    }
    logged, monitors = both_methods(spectrum, max_steps=1, overlaps=False)
    assert monitors[0].tolerance == monitors[1].tolerance == EDGE_TOLERANCE
    values = at(logged)
    assert values["edge_tolerance"] == values["lz_edge_tolerance"] == EDGE_TOLERANCE
    for key, count in expected.items():
        assert values[key] == count, key
        assert values[f"lz_{key}"] == pytest.approx(count, abs=1e-6), key
    # at the exact method's old band the counts would disagree
    fine, _ = both_methods(spectrum, max_steps=1, overlaps=False, tolerance=EXACT_EDGE_TOLERANCE)
    assert (at(fine)["n_chaotic"], at(fine)["n_edge"], at(fine)["n_stable"]) == (70, 100, 130)
