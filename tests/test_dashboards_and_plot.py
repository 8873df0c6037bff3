import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, charts, layouts, loader, matching, trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_chaos import (
    CGD,
    CGDCurvature,
    HessianEigenvalueMonitor,
    InverseCurvatureLR,
    LyapunovSpectrumMonitor,
    TangentMapMonitor,
    TrajectoryDivergence,
)
from lightning_chaos import dashboards as d
from lightning_chaos.plot import main as plot_main
from lightning_chaos.plot import read_scalars


class CGDModule(TinyModule):
    def configure_optimizers(self):
        return CGD(torch.optim.SGD(self.parameters(), lr=0.5), strategy="positive_curvature")


# kind of run: (callbacks, module, {category: the charts it must have, in order})
RUNS = {
    "curvature": (
        lambda: [
            HessianEigenvalueMonitor(warmup_iters=3, top_k=2, most_negative=True),
            InverseCurvatureLR(),
            LearningRateMonitor(),
        ],
        TinyModule,
        {"chaos/": [d.LAMBDA, d.INVERSE_CURVATURE, d.EIGENVALUES, d.PROBE]},
    ),
    "spectrum": (
        lambda: [LyapunovSpectrumMonitor(every_n_steps=2), TangentMapMonitor()],
        TinyModule,
        {"chaos/": [d.COUNTS, d.LLE, d.FTLE, d.MLCE, d.TANGENT_STEPS, d.OVERLAPS, d.SPECTRUM]},
    ),
    "divergence": (
        lambda: [TrajectoryDivergence(directions=["random", "chaotic"], init_samples=2)],
        TinyModule,
        {"chaos/": [d.DIVERGENCE, d.DIVERGENCE_FIT]},
    ),
    "cgd": (lambda: [CGDCurvature()], CGDModule, {"chaos/": [d.CGD_REMOVED, d.CGD_RATIO]}),
    "prefixes": (
        lambda: [
            LyapunovSpectrumMonitor(every_n_steps=2, overlaps=False),
            LyapunovSpectrumMonitor(every_n_steps=2, method="lanczos", log_prefix="b/"),
            HessianEigenvalueMonitor(warmup_iters=2, log_prefix="c/"),
        ],
        TinyModule,
        {
            "chaos/": [d.COUNTS, d.LLE, d.SPECTRUM],
            "b/": [d.COUNTS, d.LLE, d.OVERLAPS, d.SPECTRUM],
            "c/": [d.LAMBDA, d.INVERSE_CURVATURE, d.EIGENVALUES, d.PROBE],
        },
    ),
}


@pytest.fixture(scope="module")
def logdirs(tmp_path_factory):
    """One short TensorBoard run per kind of RUNS."""
    root = tmp_path_factory.mktemp("runs")
    for kind, (callbacks, module, _) in RUNS.items():
        pl.seed_everything(0, verbose=False)
        logger = TensorBoardLogger(root, name=kind, version=0)
        trainer(callbacks(), logger=logger, max_steps=4).fit(module(), loader())
    return {kind: root / kind / "version_0" for kind in RUNS}


@pytest.mark.parametrize("kind", RUNS)
def test_layout_has_a_chart_for_every_logged_series_and_no_empty_chart(kind, logdirs):
    [layout] = layouts(logdirs[kind])  # written once, however many chaos callbacks
    written = charts(layout)
    expected = RUNS[kind][2]
    assert list(written) == ["training", *(f"lightning_chaos: {prefix}" for prefix in expected)]
    tags = set(read_scalars(logdirs[kind]))
    assert matching(written["training"][d.LOSS], tags) == {"train/loss"}
    for prefix, titles in expected.items():
        category = written[f"lightning_chaos: {prefix}"]
        assert list(category) == titles  # only the charts of the callbacks present
        shown = {title: matching(regexes, tags) for title, regexes in category.items()}
        assert all(shown.values()), shown  # each chart shows something
        logged = {t for t in tags if t.startswith(prefix)}
        assert set().union(*shown.values()) >= logged  # everything the callbacks logged is on a chart
        per_tag = [t for series in shown.values() for t in series]
        assert len(per_tag) == len(set(per_tag))  # on one chart only


def test_series_of_unlike_scale_are_on_separate_charts(logdirs):
    def chart_of(kind, tag):
        [layout] = layouts(logdirs[kind])
        [title] = [t for t, rx in charts(layout)["lightning_chaos: chaos/"].items() if matching(rx, {tag})]
        return title

    tags = set(read_scalars(logdirs["curvature"]))
    category = charts(layouts(logdirs["curvature"])[0])["lightning_chaos: chaos/"]
    assert matching(category[d.LAMBDA], tags) == {"chaos/lyapunov_exponent", "chaos/lyapunov_fluctuation"}
    inverse = {"chaos/inv_h0", "chaos/beta", "chaos/lr", "lr-SGD"}  # ~1/h0 each, lr-SGD the monitor's
    assert matching(category[d.INVERSE_CURVATURE], tags) == inverse
    assert chart_of("spectrum", "chaos/lle_min") != chart_of("spectrum", "chaos/ftle_0")
    assert chart_of("spectrum", "chaos/mlce") == chart_of("spectrum", "chaos/mlce_bound")
    assert chart_of("cgd", "chaos/cgd_removed") != chart_of("cgd", "chaos/cgd_update_ratio")


def test_layout_without_a_cgd_optimizer_has_no_cgd_chart():
    sgd = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    assert list(d.chaos_layout([CGDCurvature()], [sgd])) == ["training"]
    monitors = [InverseCurvatureLR(), LearningRateMonitor()]  # no HessianEigenvalueMonitor: owns one
    assert list(d.chaos_layout(monitors)["lightning_chaos: chaos/"]) == RUNS["curvature"][2]["chaos/"]


def test_plot_command_writes_the_figures(tmp_path):
    pl.seed_everything(0, verbose=False)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer([HessianEigenvalueMonitor(warmup_iters=3), LearningRateMonitor()], logger=logger).fit(
        TinyModule(), loader()
    )
    logdir = tmp_path / "run" / "version_0"
    written = plot_main([str(logdir), "--out", str(tmp_path / "figs")])
    assert [p.name for p in written] == ["curvature.png", "loss.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
