"""Reproduce the NeurIPS 2022 paper's local-chaos measurements on the embedded 8×8 digits.

The paper is "Chaotic Dynamics are Intrinsic to Neural Network Training with SGD" (Herrmann, Granz and
Landgraf, NeurIPS 2022); the figure, section and theorem numbers below are those of its appendix
(Sections B.2, C.1 and C.2).

Five runs with plain SGD (one with momentum), batch 64, each watched by

* ``LyapunovSpectrumMonitor`` (exact Hessian spectrum of the step's batch every ``--every`` steps):
  counts of positive / negative / chaotic / edge eigenvalues (Figures B.2.1, B.2.2, C.1.2), local
  Lyapunov exponents, gradient overlaps with the eigenspaces (Figures B.2.3, B.2.4), and the Theorem A.11
  overlap of the chaotic subspace with that of step 10 (Section C.2, ``chaos/``) and of the middle of
  training (``late/``, a second monitor that reuses the same per-step eigendecomposition);
* ``TangentMapMonitor`` (every step): finite-time Lyapunov exponents of the accumulated tangent map
  (Figure C.1.1), the mLCE and its Theorem A.6 bound. The small ReLU MLP (N = 610) accumulates the full
  map, so its smallest exponent is available too; the others follow 10 directions.

The paper used USPS/FashionMNIST (``examples/usps_*.yaml``, ``examples/fashionmnist_*.yaml`` run the same
monitors there for users who can download); the networks here are sized so that every spectrum is exact
on a CPU (N = 610–1,210). Writes TensorBoard logs under ``--out``, and four PNGs and a JSON summary of
the numbers quoted in ``examples/lyapunov_spectrum.md`` under ``--figures``. The summary includes a
control for Section C.2: the overlap of the chaotic subspaces of different batches at the same final
parameters.

    python examples/reproduce_chaos_spectrum.py [--steps 600] [--every 10] [--runs mlp_relu,cnn]

Ten to twenty minutes on a 2-core CPU for the five runs of 600 steps, depending on the load (the CNN's
spectra dominate). Deterministic: a rerun reproduces every logged number.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import matplotlib
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_chaos import LyapunovSpectrumMonitor, TangentMapMonitor
from lightning_chaos.core.functional_loss import FunctionalLoss
from lightning_chaos.core.operators import HessianOperator
from lightning_chaos.core.projection import random_subspace_overlap, subspace_overlap
from lightning_chaos.core.sgd import SGDHyperparameters
from lightning_chaos.core.stability import EXACT_EDGE_TOLERANCE, classify_eigenvalues
from lightning_chaos.data import DigitsDataModule
from lightning_chaos.models import MLP, Classifier, SmallCNN
from lightning_chaos.plot import read_scalars

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@dataclass
class Run:
    """One training configuration."""

    label: str
    net: Callable[[], nn.Module]
    lr: float
    momentum: float = 0.0
    flatten: bool = True
    tangent: dict = field(default_factory=dict)
    every_factor: int = 1  # spectra every ``every * every_factor`` steps (the CNN's cost more)


RUNS = {
    "mlp_sigmoid": Run("MLP 64-16-10 sigmoid", lambda: MLP(64, (16,), 10, activation="sigmoid"), lr=0.5),
    "mlp_sigmoid_momentum": Run(
        "MLP 64-16-10 sigmoid, momentum 0.9",
        lambda: MLP(64, (16,), 10, activation="sigmoid"),
        lr=0.05,
        momentum=0.9,
    ),
    "mlp_relu": Run("MLP 64-16-10 ReLU", lambda: MLP(64, (16,), 10, activation="relu"), lr=0.1),
    "mlp_relu_small": Run(
        "MLP 64-8-10 ReLU (full map)", lambda: MLP(64, (8,), 10, activation="relu"), lr=0.1
    ),
    "cnn": Run(
        "CNN 4-8 ReLU",
        lambda: SmallCNN(1, 10, channels=(4, 8)),
        lr=0.1,
        flatten=False,
        tangent={"num_columns": 10},
        every_factor=2,
    ),
}


def train(name: str, run: Run, steps: int, every: int, out: Path) -> Path:
    """Train one configuration with the monitors; returns its TensorBoard run directory."""
    pl.seed_everything(0, verbose=False)
    every = every * run.every_factor
    logger = TensorBoardLogger(out, name=name, version=0)
    # the band examples/lyapunov_spectrum.md was measured with (the default is now EDGE_TOLERANCE = 2e-2)
    band = {"tolerance": EXACT_EDGE_TOLERANCE}
    callbacks = [
        LyapunovSpectrumMonitor(every_n_steps=every, reference_step=10, **band),
        LyapunovSpectrumMonitor(every_n_steps=every, reference_step=steps // 2, log_prefix="late/", **band),
        TangentMapMonitor(**run.tangent),
    ]
    model = Classifier(run.net(), lr=run.lr, momentum=run.momentum)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    trainer.fit(model, DigitsDataModule(batch_size=64, flatten=run.flatten))
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: N = {n}, {steps} steps in {time.perf_counter() - start:.0f} s", flush=True)
    torch.save(model.net.state_dict(), Path(logger.log_dir) / "final_net.pt")
    return Path(logger.log_dir)


def batch_noise_overlap(run: Run, logdir: Path, num_batches: int = 4) -> tuple[float, float]:
    """Mean Theorem A.11 overlap of the chaotic subspaces of different batches at the same (final) parameters.

    The control for Section C.2: how much of the drop of ``chaotic_overlap`` comes from the batch changing
    rather than from the parameters moving. Returns the mean pairwise overlap and its random baseline.
    """
    net = run.net()
    net.load_state_dict(torch.load(logdir / "final_net.pt"))
    model = Classifier(net, lr=run.lr, momentum=run.momentum)
    data = DigitsDataModule(batch_size=64, flatten=run.flatten)
    data.setup("fit")
    bases = []
    for _, batch in zip(range(num_batches), data.train_dataloader()):
        loss = FunctionalLoss(model, lambda batch=batch: model.curvature_loss(batch))
        hessian = HessianOperator(loss, loss.params).to_dense()
        h, v = torch.linalg.eigh(0.5 * (hessian + hessian.T))
        sgd = SGDHyperparameters(lr=run.lr, momentum=run.momentum)
        bases.append(v[:, classify_eigenvalues(h, sgd, EXACT_EDGE_TOLERANCE)["chaotic"]])
    pairs = [(a, b) for i, a in enumerate(bases) for b in bases[i + 1 :]]
    n = bases[0].shape[0]
    overlap = mean([subspace_overlap(a, b) for a, b in pairs])
    return overlap, mean([random_subspace_overlap(a.shape[1], b.shape[1], n) for a, b in pairs])


def mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return statistics.fmean(finite) if finite else math.nan


def summarise(series: dict, n: int) -> dict[str, float]:
    """The numbers the write-up compares with the paper's claims."""

    def values(tag: str) -> list[float]:
        return series[tag][1] if tag in series else []

    def early_late(tag: str, k: int = 5) -> tuple[float, float]:
        v = values(tag)
        return v[0], mean(v[-k:])

    above = [c - m for c, m in zip(values("chaos/n_chaotic"), values("chaos/n_negative"))]
    summary = {"N": n}
    for key in ("n_positive", "n_negative", "n_chaotic", "n_zero"):
        first, last = early_late(f"chaos/{key}")
        summary[f"{key}_step0_frac"], summary[f"{key}_last5_frac"] = first / n, last / n
        summary[f"{key}_max_frac"] = max(values(f"chaos/{key}")) / n
    summary["max_count_above_2_over_lr"] = max(above) if above else math.nan
    for key in ("grad_overlap_positive", "grad_overlap_negative", "grad_overlap_top", "grad_overlap_min"):
        first, last = early_late(f"chaos/{key}")
        summary[f"{key}_mean"] = mean(values(f"chaos/{key}"))
        summary[f"{key}_step0"], summary[f"{key}_last5"] = first, last
    summary["lle_max_step0"], summary["lle_max_last5"] = early_late("chaos/lle_max")
    summary["lle_min_step0"], summary["lle_min_last5"] = early_late("chaos/lle_min")
    ftle_steps, mlce = series["chaos/mlce"]
    bound = values("chaos/mlce_bound")
    for t in (10, 100):
        if t <= len(mlce):
            summary[f"mlce_T{t}"] = mlce[t - 1]
    summary["mlce_final"], summary["mlce_bound_final"] = mlce[-1], bound[-1]
    summary["lle_max_mean_final"] = values("chaos/lle_max_mean")[-1]
    summary["mlce_below_bound_every_step"] = float(all(m <= b + 1e-9 for m, b in zip(mlce, bound)))
    if "chaos/ftle_min" in series:
        summary["ftle_min_T10"], summary["ftle_min_final"] = (
            values("chaos/ftle_min")[9],
            values("chaos/ftle_min")[-1],
        )
    for prefix in ("chaos/", "late/"):
        overlap, baseline = values(f"{prefix}chaotic_overlap"), values(f"{prefix}chaotic_overlap_random")
        if len(overlap) > 1:
            summary[f"{prefix}overlap_last5"] = mean(overlap[-5:])
            summary[f"{prefix}overlap_random_last5"] = mean(baseline[-5:])
            summary[f"{prefix}overlap_after_ref"] = overlap[1]
    summary["val_acc_final"] = values("val/acc")[-1] if values("val/acc") else math.nan
    return summary


def plot_all(results: dict[str, dict], figures: Path, every: int) -> list[Path]:
    """Four figures in the layout of the paper's appendix B.2 / C.1 / C.2 panels, one line per run."""
    figures.mkdir(parents=True, exist_ok=True)
    colors = dict(zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    written = []

    def panel(ax, tag, name, transform=None, style="-", label=True):
        series = results[name]["series"]
        if tag not in series:
            return
        steps, v = series[tag]
        v = [transform(x) for x in v] if transform else v
        ax.plot(steps, v, style, color=colors[name], lw=1, label=RUNS[name].label if label else None)

    def save(fig, name):
        path = figures / name
        fig.tight_layout()
        fig.savefig(path, dpi=72)
        plt.close(fig)
        written.append(path)

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for name, result in results.items():
        n = result["summary"]["N"]
        panel(axes[0, 0], "chaos/n_positive", name, lambda x, n=n: x / n)
        panel(axes[0, 0], "chaos/n_negative", name, lambda x, n=n: x / n, "--", label=False)
        panel(axes[0, 1], "chaos/n_chaotic", name, lambda x, n=n: x / n)
        series = result["series"]
        steps, chaotic = series["chaos/n_chaotic"]
        above = [c - m for c, m in zip(chaotic, series["chaos/n_negative"][1])]
        axes[1, 0].plot(steps, above, color=colors[name], lw=1)
        panel(axes[1, 1], "chaos/n_zero", name, lambda x, n=n: x / n)
    axes[0, 0].set_title(
        "positive (solid) / negative (dashed) eigenvalues, fraction of N (B.2.2)", fontsize=9
    )
    axes[0, 1].set_title("chaotic eigenvalues (LLE > 0), fraction of N (C.1.2)", fontsize=9)
    axes[1, 0].set_title("eigenvalues beyond the stability edge u = 2/γ (B.2.1)", fontsize=9)
    axes[1, 1].set_title("edge eigenvalues |h| ≤ 1e-5 ρ (exact zeros), fraction of N", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    for ax in axes.flat:
        ax.set_xlabel("step")
    save(fig, "lyapunov_counts.png")

    fig, axes = plt.subplots(2, 2, figsize=(8.5, 6))
    for name in results:
        panel(axes[0, 0], "chaos/grad_overlap_positive", name)
        panel(axes[0, 1], "chaos/grad_overlap_negative", name)
        panel(axes[1, 0], "chaos/grad_overlap_top", name)
        panel(axes[1, 1], "chaos/grad_overlap_min", name)
    titles = [
        "mean |cos(g, v)| over positive eigenvectors (B.2.3a)",
        "mean |cos(g, v)| over negative eigenvectors (B.2.3b)",
        "|cos(g, v_top)| (B.2.4a)",
        "|cos(g, v_min)|, most negative eigenvector (B.2.4b)",
    ]
    for ax, title in zip(axes.flat, titles):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0, 0].legend(fontsize=7)
    save(fig, "lyapunov_overlaps.png")

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for name in results:
        panel(axes[0, 0], "chaos/lle_max", name)
        panel(axes[0, 0], "chaos/lle_min", name, style="--", label=False)
        panel(axes[0, 1], "chaos/mlce", name)
        panel(axes[0, 1], "chaos/mlce_bound", name, style="--", label=False)
        panel(axes[1, 0], "chaos/lle_max_mean", name)
        if "chaos/ftle_min" in results[name]["series"]:
            panel(axes[1, 1], "chaos/ftle_min", name)
            panel(axes[1, 1], "chaos/ftle_0", name, style="--", label=False)
    axes[0, 0].set_title("local exponents: max LLE (solid), min LLE (dashed), per step", fontsize=9)
    axes[0, 1].set_title("finite-time mLCE (solid) and its A.6 bound (1/T)Σ log‖J_t‖ (dashed)", fontsize=9)
    axes[1, 0].set_title("running mean of the per-step max LLE (the paper's bound)", fontsize=9)
    axes[1, 1].set_title("full map: smallest (solid) and largest (dashed) FTLE (C.1.1)", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.axhline(0.0, color="grey", lw=0.5)
    save(fig, "lyapunov_exponents.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, prefix, title in [
        (axes[0], "chaos/", "t0 = 10"),
        (axes[1], "late/", "t0 = half of training"),
    ]:
        for name in results:
            panel(ax, f"{prefix}chaotic_overlap", name)
            panel(ax, f"{prefix}chaotic_overlap_random", name, style=":", label=False)
        ax.set_title(f"chaotic-subspace overlap with {title} (dotted: random)", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=7)
    save(fig, "lyapunov_subspace.png")
    return written


def main() -> None:
    """Run the reproduction."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=10, help="spectrum every this many steps")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {list(RUNS)}")
    parser.add_argument("--out", default="chaos_logs/lyapunov_spectrum")
    parser.add_argument("--figures", default="examples/figures")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy CPU)")
    parser.add_argument("--plot-only", action="store_true", help="redraw from the logs under --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = {}
    for name in args.runs.split(","):
        logdir = (
            out / name / "version_0"
            if args.plot_only
            else train(name, RUNS[name], args.steps, args.every, out)
        )
        series = read_scalars(logdir)
        n = sum(p.numel() for p in RUNS[name].net().parameters())
        summary = summarise(series, n)
        summary["batch_overlap_final"], summary["batch_overlap_random"] = batch_noise_overlap(
            RUNS[name], logdir
        )
        results[name] = {"series": series, "summary": summary}
    summary = {name: result["summary"] for name, result in results.items()}
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    (Path(args.figures) / "lyapunov_spectrum_summary.json").write_text(json.dumps(summary, indent=2))
    for path in plot_all(results, Path(args.figures), args.every):
        print(f"figure: {path} ({path.stat().st_size // 1024} KB)")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
