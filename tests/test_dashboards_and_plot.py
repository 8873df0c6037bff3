import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyModule, charts, layouts, loader, matching, trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter

from lightning_chaos import (
    CGD,
    CGDCurvature,
    HessianEigenvalueMonitor,
    InverseCurvatureLR,
    LyapunovSpectrumMonitor,
    TangentMapMonitor,
    TrajectoryDivergence,
    plot,
)
from lightning_chaos import dashboards as d
from lightning_chaos.plot import read_scalars


class CGDModule(TinyModule):
    def configure_optimizers(self):
        return CGD(torch.optim.SGD(self.parameters(), lr=0.5), strategy="positive_curvature")


# kind of run: (callbacks, module, {category: the charts it must have, in order})
RUNS = {
    "curvature": (
        lambda: [
            HessianEigenvalueMonitor(top_k=2, most_negative=True),  # a warm-up that converges: lr is set
            InverseCurvatureLR(),
            LearningRateMonitor(),
        ],
        TinyModule,
        {
            "chaos/": [
                d.LAMBDA,
                d.INVERSE_CURVATURE,
                d.EIGENVALUES,
                d.PROBE,
                d.CONVERGED,
                d.COUNTERS,
                d.DELTA_Q,
            ]
        },
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
    "cgd": (
        lambda: [CGDCurvature(), LearningRateMonitor()],
        CGDModule,
        {"chaos/": [d.CGD_REMOVED, d.CGD_RATIO]},
    ),
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
            "c/": [d.LAMBDA, d.INVERSE_CURVATURE, d.EIGENVALUES, d.PROBE, d.CONVERGED, d.COUNTERS, d.DELTA_Q],
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


# kind of run: {figure: the y labels of its axes}
FIGURES = {
    "curvature": {"curvature": ["λ, 1/h0, learning rate"], "loss": ["loss"]},
    "spectrum": {
        "loss": ["loss"],
        "counts": ["eigenvalues (count)"] * 2,
        "exponents": ["local Lyapunov exponent", "finite-time Lyapunov exponent"],
    },
    "divergence": {"loss": ["loss"], "divergence": ["‖θ_twin − θ‖"]},
    "cgd": {"loss": ["loss"], "cgd": ["directions removed", "share of the update kept ‖PΔθ‖/‖Δθ‖"]},
}


@pytest.fixture
def figures(monkeypatch):
    """The matplotlib figures the plot command closes after writing them, in that order."""
    close, closed = plot.plt.close, []
    monkeypatch.setattr(plot.plt, "close", closed.append)
    yield closed
    for fig in closed:
        close(fig)


@pytest.mark.parametrize("kind", FIGURES)
def test_plot_command_writes_a_labelled_figure_for_each_logged_group(
    kind, logdirs, tmp_path, figures, capsys
):
    written = plot.main([str(logdirs[kind]), "--out", str(tmp_path)])
    expected = FIGURES[kind]
    assert [p.stem for p in written] == list(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    assert all(p.stat().st_size > 10_000 for p in written)
    for fig, ylabels in zip(figures, expected.values(), strict=True):
        assert [ax.get_ylabel() for ax in fig.axes] == ylabels
        assert fig.axes[-1].get_xlabel() == "step"
        assert all(ax.get_lines() and ax.get_legend() for ax in fig.axes)  # every axis shows a series
    out = capsys.readouterr().out
    for name in ("curvature", "counts", "exponents", "divergence", "cgd"):
        assert (f"{name} (" in out) == (name not in expected), out  # the groups it found nothing for


def test_plot_shows_what_each_group_logged(logdirs, tmp_path, figures):
    plot.main([str(logdirs["divergence"]), "--out", str(tmp_path)])
    [ax] = figures[-1].axes
    labels = [text.get_text() for text in ax.get_legend().get_texts()]
    assert labels == [
        "twin: chaotic",
        "twin: random",
        "random-walk bound √(2 Σ‖Δθ_t‖²)",
        "distance of two initialisations (analytic)",
        "distance of two initialisations (sampled)",
    ]
    plot.main([str(logdirs["prefixes"]), "--out", str(tmp_path), "--prefix", "b/"])  # SLQ counts
    counts = [fig for fig in figures if fig.axes[0].get_title() == "chaotic, edge and stable directions"]
    assert all(len(ax.collections) == 3 for ax in counts[-1].axes)  # a bracket band per count
    plot.main([str(logdirs["curvature"]), "--out", str(tmp_path)])
    curvature = figures[-2].axes[0]
    assert curvature.get_yscale() == "log"
    unconverged = [v == 0 for v in read_scalars(logdirs["curvature"])["chaos/h0_converged"][1]]
    lines = {line.get_label(): line for line in curvature.get_lines()}
    assert list(lines) == [
        "Lyapunov exponent λ",
        "inverse curvature 1/h0",
        *(["1/h0 not converged"] if any(unconverged) else []),
        "learning rate (chaos/lr)",
        "lr/2 (edge of stability)",
    ]
    if any(unconverged):  # one cross per unconverged step
        assert len(lines["1/h0 not converged"].get_xdata()) == sum(unconverged)


def test_plot_of_a_run_without_chaos_series_writes_only_what_exists(tmp_path, capsys):
    with SummaryWriter(tmp_path / "run") as writer:
        for step in range(3):
            writer.add_scalar("other/metric", 1.0, step)
    assert plot.main([str(tmp_path / "run")]) == []
    out = capsys.readouterr().out
    assert "Nothing logged in" in out and "curvature (chaos/lyapunov_exponent, chaos/inv_h0)" in out
    assert "loss (train/loss, val/loss)" in out and "cgd (" in out
    assert not list((tmp_path / "run").glob("*.png"))
