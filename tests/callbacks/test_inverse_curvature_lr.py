import math

import lightning.pytorch as pl
import pytest
import torch
from helpers import MemoryLogger, TinyModule, loader, trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_chaos import HessianEigenvalueMonitor, InverseCurvatureLR
from lightning_chaos.callbacks._batch import step_curvature


def fit(callbacks, module=None, max_steps=6, **kwargs):
    pl.seed_everything(0, verbose=False)
    logger = MemoryLogger()
    module = module or TinyModule()
    trainer(callbacks, logger=logger, max_steps=max_steps, **kwargs).fit(module, loader())
    return logger.metrics, module


def test_lr_is_scale_over_h0_from_the_first_step():
    cb = InverseCurvatureLR(ema=0.0, scale=0.5, warmup_iters=10)
    metrics, _ = fit([cb])
    h0, lr = metrics["chaos/h0"], metrics["chaos/lr"]
    assert sorted(lr) == list(range(6))  # step 0 already runs at a curvature-based rate (warm start)
    assert metrics["chaos/warmup_iters"][0] >= 1
    for step in lr:
        assert lr[step] == pytest.approx(0.5 / h0[step], rel=1e-12)


def test_ema_of_h0_then_inverse_and_clamps():
    cb = InverseCurvatureLR(ema=0.7, warmup_iters=5, lr_max=1.2)
    metrics, _ = fit([cb])
    h0 = [metrics["chaos/h0"][s] for s in range(6)]
    ema = h0[0]
    for step in range(6):
        ema = ema if step == 0 else 0.7 * ema + 0.3 * h0[step]
        assert metrics["chaos/h0_ema"][step] == pytest.approx(ema, rel=1e-12)
        assert metrics["chaos/lr"][step] == pytest.approx(min(1 / ema, 1.2), rel=1e-12)


class RecordLR(Callback):
    def __init__(self):
        self.used, self.gradients = [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.used.append(optimizer.param_groups[0]["lr"])
        self.gradients.append(step_curvature(trainer, pl_module).loss.num_gradients)


@pytest.mark.parametrize("order", ["monitor_first", "lr_first"])
def test_reads_the_trainers_monitor_without_a_second_probe(order):
    monitor, cb, record = HessianEigenvalueMonitor(warmup_iters=3), InverseCurvatureLR(ema=0.0), RecordLR()
    callbacks = [monitor, cb] if order == "monitor_first" else [cb, monitor]
    metrics, _ = fit([*callbacks, record])
    assert cb.monitor is monitor and not cb.owns_monitor
    assert record.gradients[1:] == [1] * 5  # one extra gradient per step in all: the monitor's
    assert record.used == [metrics["chaos/lr"][s] for s in range(6)]  # the update of step t uses chaos/lr[t]


def test_learning_rate_monitor_shows_the_rate_it_set():
    metrics, _ = fit([InverseCurvatureLR(ema=0.0, warmup_iters=3), LearningRateMonitor("step")])
    for step in range(5):
        assert metrics["lr-SGD"][step + 1] == pytest.approx(metrics["chaos/lr"][step])


def test_works_with_adam():
    class AdamModule(TinyModule):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    record = RecordLR()
    metrics, _ = fit([InverseCurvatureLR(ema=0.0, warmup_iters=3), record], module=AdamModule())
    assert record.used == [metrics["chaos/lr"][s] for s in range(6)]


def test_a_scheduler_is_refused():
    class Scheduled(TinyModule):
        def configure_optimizers(self):
            opt = super().configure_optimizers()
            return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1)]

    with pytest.raises(MisconfigurationException, match="scheduler"):
        fit([InverseCurvatureLR()], module=Scheduled())


def test_skipped_steps_keep_the_previous_rate():
    from .test_hessian_eigenvalue import Diverging

    record, cb = RecordLR(), InverseCurvatureLR(ema=0.0, warmup_iters=2, lr_min=1e4, lr_max=1e4)  # diverges
    metrics, _ = fit([cb, record], module=Diverging(), max_steps=8)
    assert cb.monitor.skipped_steps > 0
    last = None
    for step, used in enumerate(record.used):
        if step in metrics["chaos/lr"]:
            last = metrics["chaos/lr"][step]
        assert last is None or used == last
    assert all(math.isfinite(v) for v in metrics["chaos/lr"].values())


def test_resume_continues_the_average_and_the_rate(tmp_path):
    def run(ckpt_path=None):
        pl.seed_everything(0, verbose=False)
        logger = MemoryLogger()
        ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        tr = trainer(
            [InverseCurvatureLR(ema=0.5, warmup_iters=4), ckpt],
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
        ({"estimator": "power"}, "estimator"),
        ({"warmup_iters": 0}, "warmup_iters"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(MisconfigurationException, match=f"`{name}`"):
        InverseCurvatureLR(**kwargs)
