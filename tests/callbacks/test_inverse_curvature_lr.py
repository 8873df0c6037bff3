import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import MemoryLogger, TinyModule, loader, trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_chaos import HessianEigenvalueMonitor, InverseCurvatureLR
from lightning_chaos.callbacks._batch import step_curvature
from lightning_chaos.core.controlled_lyapunov import CurvatureEstimate

PAPER = {"products": "finite_difference", "n_iter": 1}


def fit(callbacks, module=None, max_steps=6, **kwargs):
    pl.seed_everything(0, verbose=False)
    logger = MemoryLogger()
    module = module or TinyModule()
    trainer(callbacks, logger=logger, max_steps=max_steps, **kwargs).fit(module, loader())
    return logger.metrics, module


def test_lr_is_scale_over_h0_from_the_first_step():
    cb = InverseCurvatureLR(ema=0.0, scale=0.5, use_unconverged=True)
    metrics, _ = fit([cb])
    h0, lr = metrics["chaos/h0"], metrics["chaos/lr"]
    assert sorted(lr) == list(range(6))  # step 0 already runs at a curvature-based rate (warm start)
    assert metrics["chaos/warmup_iters"][0] >= 1 and metrics["chaos/h0_converged"][0] == 1
    for step in lr:
        assert lr[step] == pytest.approx(0.5 / h0[step], rel=1e-12)


def test_ema_of_h0_then_inverse_and_clamps():
    cb = InverseCurvatureLR(ema=0.7, lr_max=1.2, use_unconverged=True)
    metrics, _ = fit([cb])
    h0 = [metrics["chaos/h0"][s] for s in range(6)]
    ema = h0[0]
    for step in range(6):
        ema = ema if step == 0 else 0.7 * ema + 0.3 * h0[step]
        assert metrics["chaos/h0_ema"][step] == pytest.approx(ema, rel=1e-12)
        assert metrics["chaos/lr"][step] == pytest.approx(min(1 / ema, 1.2), rel=1e-12)


class Scripted(HessianEigenvalueMonitor):
    """A monitor whose estimates are given: (converged, h0) per step."""

    def __init__(self, script):
        super().__init__(warmup_iters=0)
        self.script = script

    def estimate(self, trainer, pl_module):
        converged, h0 = self.script[trainer.global_step]
        self.latest = CurvatureEstimate(valid=h0 is not None, converged=converged, h0=h0 or math.nan)
        return self.latest


@pytest.mark.parametrize("use_unconverged", [False, True])
def test_unconverged_estimates_only_ever_lower_the_rate(use_unconverged):
    script = [(True, 2.0), (False, 1.0), (False, 4.0), (True, 1.0), (False, None), (False, 8.0)]
    monitor = Scripted(script)
    cb = InverseCurvatureLR(ema=0.5, use_unconverged=use_unconverged)
    metrics, _ = fit([monitor, cb])
    lr, held = metrics["chaos/lr"], metrics["chaos/lr_held_steps"]
    if use_unconverged:  # every valid estimate: 2, 1.5, 2.75, 1.875, (skipped), 4.9375
        expected, expected_held = [2.0, 1.5, 2.75, 1.875, 1.875, 4.9375], [0, 0, 0, 0, 1, 1]
    else:  # 1.0 < 2.0 is no evidence (a lower bound): held; 4.0 > 2.0 raises; 8.0 > 1.5 raises
        expected, expected_held = [2.0, 2.0, 3.0, 2.0, 2.0, 5.0], [0, 1, 1, 1, 2, 2]
    assert [lr[s] for s in range(6)] == pytest.approx([1 / h for h in expected], rel=1e-12)
    assert [held[s] for s in range(6)] == expected_held
    assert cb.held_steps == expected_held[-1]


def test_before_the_first_converged_estimate_the_optimizers_rate_is_used():
    record = RecordLR()
    metrics, module = fit(
        [Scripted([(False, 3.0), (False, 5.0), (True, 4.0)] * 2), InverseCurvatureLR(), record]
    )
    assert record.used[:2] == [module.lr, module.lr] and 0 not in metrics.get("chaos/lr", {})
    assert record.used[2] == pytest.approx(1 / 4.0)


class RecordLR(Callback):
    def __init__(self):
        self.used, self.gradients = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.used.append(optimizer.param_groups[0]["lr"])
        self.gradients.append(step_curvature(trainer, pl_module).loss.num_gradients)


@pytest.mark.parametrize("order", ["monitor_first", "lr_first"])
def test_reads_the_trainers_monitor_without_a_second_probe(order):
    monitor, record = HessianEigenvalueMonitor(warmup_iters=3, **PAPER), RecordLR()
    cb = InverseCurvatureLR(ema=0.0, use_unconverged=True)
    callbacks = [monitor, cb] if order == "monitor_first" else [cb, monitor]
    metrics, _ = fit([*callbacks, record])
    assert cb.monitor is monitor and not cb.owns_monitor
    assert record.gradients[1:] == [1] * 5  # one extra gradient per step in all: the monitor's
    assert record.used == [metrics["chaos/lr"][s] for s in range(6)]  # the update of step t uses chaos/lr[t]


def test_learning_rate_monitor_shows_the_rate_it_set():
    metrics, _ = fit([InverseCurvatureLR(ema=0.0, use_unconverged=True), LearningRateMonitor("step")])
    for step in range(5):
        assert metrics["lr-SGD"][step + 1] == pytest.approx(metrics["chaos/lr"][step])


def test_adam_is_refused():
    class AdamModule(TinyModule):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    with pytest.raises(MisconfigurationException, match="torch.optim.SGD.*Adam"):
        fit([InverseCurvatureLR()], module=AdamModule())


def test_a_scheduler_is_refused():
    class Scheduled(TinyModule):
        def configure_optimizers(self):
            opt = super().configure_optimizers()
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]

    with pytest.raises(MisconfigurationException, match="scheduler"):
        fit([InverseCurvatureLR()], module=Scheduled())


def test_skipped_steps_keep_the_previous_rate():
    from .test_hessian_eigenvalue import Diverging

    # a huge scale makes the run diverge (NaN after a few steps), while 1/h0 of each batch gives a
    # different rate at every step before: "kept" and "reset" are told apart
    record, cb = RecordLR(), InverseCurvatureLR(ema=0.0, scale=3e3, use_unconverged=True)
    metrics, module = fit([cb, record], module=Diverging(), max_steps=14)
    assert cb.monitor.skipped_steps > 0
    rates = metrics["chaos/lr"]
    assert len({rates[s] for s in rates if s < min(set(range(14)) - set(metrics["chaos/h0"]))}) >= 3
    last = None
    for step, used in enumerate(record.used):
        if step in metrics["chaos/h0"]:
            last = rates[step]
        assert used == last and used != module.lr  # a skipped step runs at the last rate, not the module's
    assert all(math.isfinite(v) for v in rates.values())


def test_resume_continues_the_average_and_the_rate(tmp_path):
    def run(ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        logger = MemoryLogger()
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        tr = trainer(
            [InverseCurvatureLR(ema=0.5, warmup_iters=30), ckpt],
            logger=logger,
            max_steps=-1,
            max_epochs=2,
            enable_checkpointing=True,
        )
        tr.fit(TinyModule(), loader(shuffle=False), ckpt_path=ckpt_path)
        return logger.chaos()

    full, resumed = run(), run(tmp_path / "epoch=0.ckpt")
    assert set(resumed["chaos/lr"]) == {4, 5, 6, 7}
    for key, values in resumed.items():
        for step, value in values.items():
            assert full[key][step] == value, (key, step)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"scale": 0}, "scale"),
        ({"ema": 1.0}, "ema"),
        ({"ema": -0.1}, "ema"),
        ({"lr_min": -1.0}, "lr_min"),
        ({"lr_max": 0.0}, "lr_max"),
        ({"lr_min": 1.0, "lr_max": 0.5}, "lr_max"),
        ({"estimator": "rayleigh"}, "estimator"),
        ({"warmup_iters": 0}, "warmup_iters"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(MisconfigurationException, match=f"`{name}`"):
        InverseCurvatureLR(**kwargs)
