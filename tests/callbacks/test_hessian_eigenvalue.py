import math
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from helpers import CustomFunctionModule, MemoryLogger, OnceTanh, TinyModule, loader, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_chaos import HessianEigenvalueMonitor
from lightning_chaos.callbacks._batch import step_curvature
from lightning_chaos.callbacks._checks import check_supported


def fit_state(callbacks, precision="32-true", curvature_loss=False, max_steps=6, **module_kwargs):
    pl.seed_everything(0, verbose=False)
    model = TinyModule(dropout=0.3, batchnorm=True, curvature_loss=curvature_loss, **module_kwargs)
    tr = trainer(callbacks, precision=precision, max_steps=max_steps)
    tr.fit(model, loader())
    opt = tr.optimizers[0].state_dict()
    momentum = [opt["state"][i]["momentum_buffer"] for i in sorted(opt["state"])]
    return model.state_dict(), momentum, torch.get_rng_state(), torch.randn(3)


@pytest.mark.parametrize("curvature_loss", [False, True])
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_monitor_leaves_training_bit_identical(curvature_loss, precision):
    plain = fit_state([], precision=precision, curvature_loss=curvature_loss)
    monitor = HessianEigenvalueMonitor(top_k=2, most_negative=True, n_iter=2, warmup_iters=5)
    watched = fit_state([monitor], precision=precision, curvature_loss=curvature_loss)
    for key in plain[0]:
        assert torch.equal(plain[0][key], watched[0][key]), key  # weights and BatchNorm buffers
    assert all(torch.equal(a, b) for a, b in zip(plain[1], watched[1]))  # optimizer state
    assert torch.equal(plain[2], watched[2])  # global RNG stream after training
    assert torch.equal(plain[3], watched[3])
    assert monitor.latest is not None and monitor.latest.valid


class CheckProbe(Callback):
    """Runs after the monitor: the reused training gradient equals the probe's recomputed g(θ)."""

    def __init__(self):
        self.checked = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        probe = step_curvature(trainer, pl_module)
        assert probe.reuses_gradient
        torch.testing.assert_close(probe.g0(), probe.loss.gradient(), rtol=0, atol=1e-6)
        self.checked += 1


def test_probe_replays_dropout_and_batchnorm_of_the_step():
    check = CheckProbe()
    fit_state([HessianEigenvalueMonitor(warmup_iters=0), check])
    assert check.checked == 6


PAPER = {"products": "finite_difference", "n_iter": 1}  # one gradient per step, a fixed Δq


def test_logs_every_key_each_step_and_the_cost():
    logger = MemoryLogger()
    monitor = HessianEigenvalueMonitor(top_k=2, most_negative=True)
    pl.seed_everything(0, verbose=False)
    trainer([monitor], logger=logger).fit(TinyModule(), loader())
    chaos = logger.chaos()
    for key in [
        "h0",
        "h0_converged",
        "h0_lyapunov",
        "h0_residual",
        "lyapunov_exponent",
        "beta",
        "inv_h0",
        "probe_gradients",
        "probe_hvps",
        "probe_cost",
        "h_top0",
        "h_top1",
        "h_min",
        "skipped_steps",
        "unconverged_steps",
    ]:
        assert len(chaos[f"chaos/{key}"]) == 6, key
    assert chaos["chaos/skipped_steps"][5] == 0
    assert list(chaos["chaos/warmup_iters"].values()) == [monitor.warmup_iterations]
    for step, h0 in chaos["chaos/h0"].items():
        assert chaos["chaos/inv_h0"][step] == pytest.approx(1 / h0)
        assert chaos["chaos/h_top0"][step] == h0  # the top Ritz value is h0
        assert chaos["chaos/h0_converged"][step] in (0.0, 1.0)
    assert sum(1 - c for c in chaos["chaos/h0_converged"].values()) == chaos["chaos/unconverged_steps"][5]
    assert chaos["chaos/probe_cost"][5] == monitor.latest.cost > 0


def test_unconverged_steps_warn_once_with_the_settings_that_help():
    """One product per step from a random start never converges: one warning, naming what to change."""
    monitor = HessianEigenvalueMonitor(warmup_iters=0, budget=4, **PAPER)
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([monitor], max_steps=24).fit(TinyModule(), loader())
    assert monitor.unconverged_steps == monitor.computed_steps == 24
    ours = [str(w.message) for w in caught if "did not converge" in str(w.message)]
    assert len(ours) == 1, ours
    assert "20 of 20 computed steps" in ours[0]
    assert "every_n_steps=2, budget=8, n_iter=2" in ours[0] and "raise `budget` and `n_iter`" in ours[0]


@pytest.mark.parametrize(
    ("make_module", "kwargs", "expected"),
    [
        (TinyModule, {"delta_q": 10.0}, ["using delta_q=", "Pass delta_q="]),
        (
            TinyModule,
            {"delta_q_tol": 1e-12},
            ["no finite-difference separation met delta_q_tol=1e-12", "products='exact'"],
        ),
        (lambda: CustomFunctionModule(OnceTanh), {}, ["no second derivatives", "not checked"]),
    ],
    ids=["delta_q_shrunk", "exact_products", "no_second_derivatives"],
)
def test_delta_q_and_product_warnings_are_given_once_naming_the_setting(make_module, kwargs, expected):
    monitor = HessianEigenvalueMonitor(**kwargs)
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer([monitor], max_steps=6).fit(make_module(), loader())
    ours = [str(w.message) for w in caught if str(w.message).startswith("HessianEigenvalueMonitor:")]
    assert len(ours) == 1, ours
    assert all(text in ours[0] for text in expected), ours[0]


def test_paper_mode_costs_one_gradient_and_keeps_the_papers_estimate():
    logger = MemoryLogger()
    monitor = HessianEigenvalueMonitor(warmup_iters=3, **PAPER)
    pl.seed_everything(0, verbose=False)
    trainer([monitor], logger=logger).fit(TinyModule(), loader())
    chaos = logger.chaos()
    assert [chaos["chaos/probe_gradients"][s] for s in range(1, 6)] == [1.0] * 5
    assert [chaos["chaos/probe_hvps"][s] for s in range(1, 6)] == [0.0] * 5
    e = monitor.latest
    assert e.h0_lyapunov == pytest.approx(math.expm1(e.lyapunov_exponent) / e.beta)


class RecordWarmDirection(Callback):
    """After the monitor: the warm direction the next computed step will start from, at every step."""

    def __init__(self, monitor):
        self.monitor, self.directions = monitor, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.directions.append(self.monitor._estimator.top.basis.clone())


def test_every_n_steps_keeps_the_direction_between_computed_steps():
    logger = MemoryLogger()
    monitor = HessianEigenvalueMonitor(every_n_steps=3, warmup_iters=5)
    record = RecordWarmDirection(monitor)
    pl.seed_everything(0, verbose=False)
    trainer([monitor, record], logger=logger).fit(TinyModule(), loader())
    assert sorted(logger.chaos()["chaos/h0"]) == [0, 3]
    d = record.directions
    assert torch.equal(d[0], d[1]) and torch.equal(d[1], d[2])  # carried unchanged over steps 1 and 2 ...
    assert not torch.equal(d[2], d[3])  # ... and moved on by the computed step 3
    assert torch.equal(d[3], d[4]) and torch.equal(d[4], d[5])


def test_resume_logs_what_the_uninterrupted_run_logs(tmp_path):
    def run(ckpt_path=None, max_epochs=2):
        pl.seed_everything(0, verbose=False)
        logger = MemoryLogger()
        monitor = HessianEigenvalueMonitor(top_k=2, most_negative=True, warmup_iters=4)
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        tr = trainer(
            [monitor, ckpt], logger=logger, max_steps=-1, max_epochs=max_epochs, enable_checkpointing=True
        )
        tr.fit(TinyModule(), loader(shuffle=False), ckpt_path=ckpt_path)
        return logger.chaos()

    full = run()
    resumed = run(ckpt_path=tmp_path / "epoch=0.ckpt")
    assert set(resumed["chaos/h0"]) == {4, 5, 6, 7}
    for key, values in resumed.items():
        for step, value in values.items():
            assert full[key][step] == value, (key, step)


def test_two_monitors_keep_separate_state(tmp_path):
    """Two monitors (different seeds and prefixes) in one Trainer: each checkpoints and resumes its own."""

    def run(ckpt_path=None, max_epochs=2):
        pl.seed_everything(0, verbose=False)
        monitors = [
            HessianEigenvalueMonitor(seed=0, warmup_iters=4),
            HessianEigenvalueMonitor(seed=1, warmup_iters=4, log_prefix="chaos_b/"),
        ]
        logger = MemoryLogger()
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        tr = trainer(
            [*monitors, ckpt], logger=logger, max_steps=-1, max_epochs=max_epochs, enable_checkpointing=True
        )
        tr.fit(TinyModule(), loader(shuffle=False), ckpt_path=ckpt_path)
        return logger.metrics, monitors

    full, monitors = run()
    a, b = (m._estimator.top.basis for m in monitors)
    assert not torch.allclose(a, b)  # different seeds: different directions, states not shared
    assert full["chaos/h0"] != full["chaos_b/h0"]
    resumed, resumed_monitors = run(ckpt_path=tmp_path / "epoch=0.ckpt")
    for prefix in ("chaos/", "chaos_b/"):
        for step, value in resumed[f"{prefix}h0"].items():
            assert full[f"{prefix}h0"][step] == value, (prefix, step)  # each resumed its own state
    for m, r in zip(monitors, resumed_monitors, strict=True):
        assert torch.equal(m._estimator.top.basis, r._estimator.top.basis)


class Diverging(TinyModule):
    """A linear least-squares model at a huge learning rate: weights overflow to inf, then NaN."""

    def __init__(self):
        super().__init__(lr=1e4, momentum=0.0)
        self.net = torch.nn.Linear(8, 3)

    def _loss(self, batch):
        x, y = batch
        return (self.net(x) - torch.nn.functional.one_hot(y, 3)).pow(2).mean()


def test_nan_steps_are_skipped_counted_and_never_logged():
    logger = MemoryLogger()
    monitor = HessianEigenvalueMonitor(warmup_iters=2)
    pl.seed_everything(0, verbose=False)
    trainer([monitor], logger=logger, max_steps=14).fit(Diverging(), loader())
    assert monitor.skipped_steps > 0
    chaos = logger.chaos()
    assert chaos["chaos/skipped_steps"][13] == monitor.skipped_steps
    assert all(math.isfinite(v) for values in chaos.values() for v in values.values())
    assert len(chaos.get("chaos/h0", {})) + monitor.skipped_steps == 14


def test_huge_weights_do_not_turn_rounding_into_curvature():
    """Weights of 1e30: θ + Δq·u rounds the perturbation away in float32. The paper's finite difference
    skips such a step; the default switches to exact products, which know the (constant) Hessian."""
    paper = HessianEigenvalueMonitor(warmup_iters=2, **PAPER)
    default = HessianEigenvalueMonitor(warmup_iters=2, log_prefix="d/")
    pl.seed_everything(0, verbose=False)
    model = Diverging()
    trainer([paper, default], max_steps=1).fit(model, loader())
    x = torch.cat([b[0] for b in loader()])
    with torch.no_grad():
        model.net.weight.fill_(1e30)
    trainer([paper, default], max_steps=2).fit(model, loader())
    assert not paper.latest.valid
    assert default.latest.valid and default.latest.exact_products
    design = torch.cat([x, torch.ones(len(x), 1)], dim=1).double()
    assert 0 < default.latest.h0 <= float(torch.linalg.eigvalsh(2 * design.T @ design / 3)[-1])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"every_n_steps": 0},
        {"n_iter": 0},
        {"top_k": 0},
        {"top_k": 1.5},
        {"delta_q": 0.0},
        {"delta_q": -1e-2},
        {"probe_fraction": 1.5},
        {"probe_fraction": 0},
        {"warmup_iters": -1},
        {"warmup_tol": 0},
    ],
)
def test_bad_arguments_name_the_argument(kwargs):
    with pytest.raises(MisconfigurationException, match=f"`{next(iter(kwargs))}`"):
        HessianEigenvalueMonitor(**kwargs)


def test_sharded_strategies_and_frozen_models_are_rejected():
    module = TinyModule()
    for cls in (FSDPStrategy, DeepSpeedStrategy):
        fake = SimpleNamespace(strategy=cls.__new__(cls))
        with pytest.raises(MisconfigurationException, match=cls.__name__):
            check_supported(fake, module, "HessianEigenvalueMonitor")
    module.requires_grad_(False)
    with pytest.raises(MisconfigurationException, match="requires_grad"):
        trainer([HessianEigenvalueMonitor()]).fit(module, loader())


class VectorLoss(TinyModule):
    def curvature_loss(self, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y, reduction="none")


def test_non_scalar_curvature_loss_is_a_clear_error():
    with pytest.raises(ValueError, match="scalar"):
        trainer([HessianEigenvalueMonitor()]).fit(VectorLoss(), loader())


class Manual(TinyModule):
    def __init__(self, with_curvature_loss):
        super().__init__(curvature_loss=with_curvature_loss)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = self._loss(batch)
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_needs_curvature_loss_and_then_works():
    with pytest.raises(MisconfigurationException, match="curvature_loss"):
        trainer([HessianEigenvalueMonitor()]).fit(Manual(False), loader())
    monitor = HessianEigenvalueMonitor(warmup_iters=5, **PAPER)
    logger = MemoryLogger()
    trainer([monitor], logger=logger).fit(Manual(True), loader())
    assert len(logger.chaos()["chaos/h0"]) == 6
    assert monitor.latest.num_gradients == 2  # g(θ) recomputed: p.grad belongs to the user's own backward


def test_gradient_accumulation_recomputes_g0_on_the_last_micro_batch():
    monitor = HessianEigenvalueMonitor(warmup_iters=5, **PAPER)
    logger = MemoryLogger()
    trainer([monitor], logger=logger, accumulate_grad_batches=2, max_steps=2).fit(TinyModule(), loader())
    assert len(logger.chaos()["chaos/h0"]) == 2
    assert monitor.latest.num_gradients == 2


def test_probe_fraction_uses_part_of_the_batch():
    seen = []

    class Spy(TinyModule):
        def curvature_loss(self, batch):
            seen.append(batch[0].shape[0])
            return self._loss(batch)

    trainer([HessianEigenvalueMonitor(probe_fraction=0.25, warmup_iters=0)], max_steps=1).fit(Spy(), loader())
    assert set(seen) == {4}


class CheckSharedSpectrum(Callback):
    """The probe's exact Hessian and HVP operator agree with torch.func.hessian on the step's batch."""

    def __init__(self):
        self.checked = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        from lightning_chaos.callbacks._batch import record_batch

        record_batch(trainer, batch, batch_idx)
        self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        probe = step_curvature(trainer, pl_module)
        evals, evecs = probe.eigh()
        assert probe.eigh()[0] is evals  # cached: computed once per step
        params = dict(pl_module.named_parameters())
        names = list(params)

        def flat_loss(vec):
            pieces, i = {}, 0
            for n in names:
                pieces[n] = vec[i : i + params[n].numel()].reshape(params[n].shape)
                i += params[n].numel()
            x, y = self.batch
            return torch.nn.functional.cross_entropy(
                torch.func.functional_call(pl_module.net, {k[4:]: v for k, v in pieces.items()}, (x,)), y
            )

        theta = torch.cat([params[n].detach().reshape(-1) for n in names])
        exact = torch.linalg.eigvalsh(torch.func.hessian(flat_loss)(theta))
        torch.testing.assert_close(evals, exact, rtol=1e-4, atol=1e-5)
        v = evecs[:, -1]
        torch.testing.assert_close(probe.hessian().matvec(v), evals[-1] * v, rtol=1e-3, atol=1e-4)
        self.checked += 1


def test_shared_exact_spectrum_of_the_step():
    check = CheckSharedSpectrum()
    pl.seed_everything(0, verbose=False)
    trainer([check], max_steps=2).fit(TinyModule(momentum=0.0), loader())
    assert check.checked == 2
