import lightning.pytorch as pl
from helpers import TinyModule, charts, layouts, loader, matching, trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_chaos import HessianEigenvalueMonitor, InverseCurvatureLR
from lightning_chaos.dashboards import chaos_layout
from lightning_chaos.plot import main as plot_main
from lightning_chaos.plot import read_scalars


def run(tmp_path, callbacks):
    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer(callbacks, logger=logger).fit(TinyModule(), loader())
    return tmp_path / "run" / "version_0"


def test_layout_written_once_and_its_tags_exist(tmp_path):
    logdir = run(
        tmp_path, [HessianEigenvalueMonitor(warmup_iters=3), InverseCurvatureLR(), LearningRateMonitor()]
    )
    [layout] = layouts(logdir)  # two chaos callbacks, one layout
    written = charts(layout)
    assert written == {title: spec[1] for title, spec in chaos_layout()["lightning_chaos"].items()}
    tags = set(read_scalars(logdir))
    assert {"chaos/h0", "chaos/inv_h0", "chaos/lyapunov_exponent", "chaos/lr", "chaos/beta"} <= tags
    assert "lr-SGD" in tags and "train/loss" in tags
    for title, least in [("lambda, 1/h0 and lr (Fig. 1)", 4), ("loss", 1), ("eigenvalues", 3)]:
        matched = matching(written[title], tags)  # the regexes match real tags
        assert len(matched) >= least, (title, matched)


def test_plot_command_writes_the_figures(tmp_path):
    logdir = run(tmp_path, [HessianEigenvalueMonitor(warmup_iters=3), LearningRateMonitor()])
    written = plot_main([str(logdir), "--out", str(tmp_path / "figs")])
    assert [p.name for p in written] == ["curvature.png", "loss.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
