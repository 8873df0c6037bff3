"""Reproduce the NeurIPS 2022 paper's CGD pruning and perturbed-twin divergence on the embedded digits.

The paper is "Chaotic Dynamics are Intrinsic to Neural Network Training with SGD" (Herrmann, Granz and
Landgraf, NeurIPS 2022); section, figure and theorem numbers below are those of its appendix: pruning in
Section B.1, divergence in Theorems A.8-A.10 and Section C.3.

A ReLU MLP 64-12-10 (910 parameters: small enough for the exact Hessian eigendecomposition at every
step on a CPU) is trained on scikit-learn's 8×8 digits, batch 64, seed 0. Three parts, each under about
ten minutes on two CPU cores; each writes a JSON summary and PNGs to ``--out`` (default
``examples/figures``)::

    python examples/reproduce_cgd_divergence.py pruning --lr 0.5 --momentum 0.0     # Figure B.1.4 setting
    python examples/reproduce_cgd_divergence.py pruning --lr 0.1 --momentum 0.9     # Figures B.1.1/B.1.2
    python examples/reproduce_cgd_divergence.py divergence

``pruning``: plain SGD against CGD with each strategy (``chaotic``, ``negative``, ``positive`` = beyond the
stability edge, ``positive_curvature`` = every positive eigenvalue): training loss and accuracy per
step, validation accuracy per epoch, directions removed per step, exact spectral counts per step.
``divergence``: Theorem A.8's init-distance baselines (analytic and sampled, for the paper's 784-20-10 MLP
and this one), twins perturbed by ε = 0.1 along the five directions under plain SGD, and a random twin
under each CGD strategy. The write-up is ``examples/cgd_divergence.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import matplotlib
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from torch import nn

from lightning_chaos import CGD, CGDCurvature, TrajectoryDivergence
from lightning_chaos.callbacks._batch import record_batch, step_curvature
from lightning_chaos.core.divergence import default_init_distance, sampled_init_distances
from lightning_chaos.core.sgd import SGDHyperparameters
from lightning_chaos.core.stability import EXACT_EDGE_TOLERANCE, classify_eigenvalues
from lightning_chaos.data import DigitsDataModule
from lightning_chaos.models import MLP, Classifier

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after selecting the non-interactive backend

STRATEGIES = ("chaotic", "negative", "positive", "positive_curvature")
COLORS = {
    "sgd": "black",
    "chaotic": "tab:red",
    "negative": "tab:blue",
    "positive": "tab:orange",
    "positive_curvature": "tab:olive",
    "max_chaotic": "darkred",
    "random": "tab:gray",
    "non_chaotic": "tab:cyan",
    "max_non_chaotic": "navy",
}
HIDDEN = (12,)
BATCH_SIZE = 64


class CGDClassifier(Classifier):
    """The package's ``Classifier`` whose optimizer is CGD over its SGD (``strategy=None``: plain SGD)."""

    def __init__(self, strategy: str | None, project_momentum: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.strategy = strategy
        self.project_momentum = project_momentum

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD, wrapped in CGD unless ``strategy`` is None."""
        sgd = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
        if self.strategy is None:
            return sgd
        return CGD(sgd, strategy=self.strategy, project_momentum=self.project_momentum)


class MemoryLogger(Logger):
    """Every logged scalar as ``{name: {step: value}}``."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, dict[int, float]] = defaultdict(dict)

    @property
    def name(self) -> str:
        """Logger name."""
        return "memory"

    @property
    def version(self) -> int:
        """Logger version."""
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Hyper-parameters are not kept."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Keep every value."""
        for key, value in metrics.items():
            self.metrics[key][int(step or 0)] = float(value)


class SpectrumCounts(Callback):
    """Exact counts of the step's Hessian: negative, beyond the stability edge, and the top eigenvalue.

    Uses the shared per-step eigendecomposition, which CGD computes anyway (free for CGD runs).
    """

    def __init__(self) -> None:
        self.rows: dict[str, dict[int, float]] = defaultdict(dict)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int
    ) -> None:
        """Record the batch for the probe."""
        record_batch(trainer, batch, idx)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Count from the exact spectrum of this step's batch."""
        values, _ = step_curvature(trainer, pl_module).eigh()
        group = optimizer.param_groups[0]
        sgd = SGDHyperparameters(lr=group["lr"], momentum=group["momentum"])
        masks = classify_eigenvalues(values, sgd, EXACT_EDGE_TOLERANCE)  # CGD's band
        step = trainer.global_step
        self.rows["n_negative"][step] = int(masks["negative"].sum())
        self.rows["n_beyond_edge"][step] = int((masks["chaotic"] & masks["positive"]).sum())
        self.rows["n_positive"][step] = int(masks["positive"].sum())
        self.rows["h0"][step] = float(values[-1])


def build(strategy: str | None, args: argparse.Namespace) -> CGDClassifier:
    """The seeded digits MLP (identical initialisation for every strategy)."""
    pl.seed_everything(0, verbose=False)
    net = MLP(64, HIDDEN, 10, activation="relu")
    return CGDClassifier(strategy, not args.keep_momentum, net=net, lr=args.lr, momentum=args.momentum)


def fit(model: pl.LightningModule, callbacks: list[Callback], steps: int) -> tuple[MemoryLogger, str | None]:
    """Train for ``steps`` optimizer steps; returns the logs and the error that stopped a diverged run."""
    logger = MemoryLogger()
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
    try:
        trainer.fit(model, DigitsDataModule(batch_size=BATCH_SIZE, seed=0))
    except FloatingPointError as err:  # CGD refuses a non-finite Hessian: the loss diverged
        return logger, f"step {trainer.global_step}: {err}"
    return logger, None


def series(metrics: dict[int, float]) -> tuple[list[int], list[float]]:
    """Steps and values, sorted by step."""
    steps = sorted(metrics)
    return steps, [metrics[s] for s in steps]


def smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing moving average (the paper smooths with a window of 50 over much longer runs)."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def pruning(args: argparse.Namespace) -> dict[str, Any]:
    """Plain SGD and CGD with each strategy from one initialisation: curves, removed counts, spectra."""
    runs: dict[str, Any] = {}
    for name in args.runs:
        strategy = None if name == "sgd" else name
        counts = SpectrumCounts()
        callbacks: list[Callback] = [counts] + ([CGDCurvature()] if strategy else [])
        start = time.perf_counter()
        logger, error = fit(build(strategy, args), callbacks, args.steps)
        m = logger.metrics
        loss = series(m["train/loss_step"])[1]
        finite = [v for v in loss if math.isfinite(v)]
        runs[name] = {
            "seconds": round(time.perf_counter() - start, 1),
            "diverged": error,
            "steps_run": len(loss),
            "final_train_loss_mean10": sum(finite[-10:]) / max(1, len(finite[-10:])) if finite else None,
            "min_train_loss": min(finite) if finite else None,
            "val_acc": series(m["val/acc"])[1],
            "val_acc_final": series(m["val/acc"])[1][-1] if m["val/acc"] else None,
            "mean_removed": (
                sum(m["chaos/cgd_removed"].values()) / len(m["chaos/cgd_removed"]) if strategy else 0.0
            ),
            "mean_update_ratio": (
                sum(m["chaos/cgd_update_ratio"].values()) / len(m["chaos/cgd_update_ratio"])
                if strategy
                else 1.0
            ),
            "max_h0": max(counts.rows["h0"].values()),
            "mean_n_negative": sum(counts.rows["n_negative"].values()) / len(counts.rows["n_negative"]),
            "steps_with_beyond_edge": sum(1 for v in counts.rows["n_beyond_edge"].values() if v > 0),
            "curves": {
                "train_loss": loss,
                "train_acc": series(m["train/acc_step"])[1],
                "val_acc_steps": series(m["val/acc"])[0],
                "removed": series(m["chaos/cgd_removed"])[1] if strategy else [],
                "h0": series(counts.rows["h0"])[1],
                "n_beyond_edge": series(counts.rows["n_beyond_edge"])[1],
                "n_negative": series(counts.rows["n_negative"])[1],
            },
        }
        run = runs[name]
        print(
            f"{name:>18}: {run['seconds']:6.1f} s, loss(last 10) {run['final_train_loss_mean10']}, "
            f"val acc {run['val_acc_final']}, removed/step {run['mean_removed']:.1f}, diverged: {error}"
        )
    plot_pruning(runs, args, args.out / f"cgd_pruning_{tag(args)}.png")
    for run in runs.values():  # the curves are in the figure; the JSON keeps the summary
        del run["curves"]
    setting = {
        "lr": args.lr,
        "momentum": args.momentum,
        "steps": args.steps,
        "keep_momentum": args.keep_momentum,
    }
    return {"setting": setting, "runs": runs}


def plot_pruning(runs: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    """Training loss, training accuracy, validation accuracy, removed directions and top curvature."""
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for name, run in runs.items():
        c = run["curves"]
        color = COLORS[name]
        steps = range(len(c["train_loss"]))
        # drawn wide under the run that equals them whenever nothing exceeds the edge: negative, positive
        wide = name in ("sgd", "chaotic")
        axes[0].plot(steps, smooth(c["train_loss"]), color=color, label=name, lw=3.5 if wide else 1.2)
        axes[1].plot(range(len(c["train_acc"])), smooth(c["train_acc"]), color=color, lw=1.2)
        axes[1].plot(c["val_acc_steps"], run["val_acc"], color=color, ls="--", marker=".", lw=0.8)
        if c["removed"]:
            axes[2].plot(range(len(c["removed"])), c["removed"], color=color, lw=0.8)
        axes[3].plot(range(len(c["h0"])), c["h0"], color=color, lw=0.8)
    edge = 2 * (1 + args.momentum) / args.lr
    axes[3].axhline(edge, color="k", ls=":", lw=1, label=f"stability edge {edge:g}")
    axes[0].set(yscale="log", title="training loss (moving avg 10)", xlabel="step")
    axes[1].set(title="accuracy: train (solid), val (dashed)", xlabel="step", ylim=(0, 1.02))
    axes[2].set(title="directions removed per step", xlabel="step", yscale="symlog")
    axes[3].set(title="top Hessian eigenvalue h0", xlabel="step", yscale="log")
    axes[0].legend(fontsize=8)
    axes[3].legend(fontsize=8)
    fig.suptitle(
        f"digits ReLU MLP 64-12-10, batch {BATCH_SIZE}, SGD lr {args.lr:g}, momentum {args.momentum:g}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def divergence(args: argparse.Namespace) -> dict[str, Any]:
    """Init-distance baselines, twins along the five directions (SGD), a random twin per CGD strategy."""
    seed_mlp = nn.Sequential(nn.Linear(784, 20), nn.ReLU(), nn.Linear(20, 10))
    samples = sampled_init_distances(seed_mlp, num_pairs=200, seed=0)
    digits = build(None, args)
    digits_samples = sampled_init_distances(digits, num_pairs=200, seed=0)
    init = {
        "seed_a8_claim": math.sqrt(4 * 30 / 3 + 4 * 20 / (3 * 784) + 4 * 10 / (3 * 20)),
        "mlp_784_20_10_analytic": default_init_distance(seed_mlp),
        "mlp_784_20_10_sampled_rms": float(samples.pow(2).mean().sqrt()),
        "mlp_784_20_10_sampled_mean": float(samples.mean()),
        "mlp_784_20_10_sampled_std": float(samples.std()),
        "digits_mlp_analytic": default_init_distance(digits),
        "digits_mlp_sampled_rms": float(digits_samples.pow(2).mean().sqrt()),
    }
    print("init distances:", json.dumps(init, indent=1))
    out: dict[str, Any] = {"init_distance": init, "setting": {"lr": args.lr, "momentum": args.momentum}}
    start = time.perf_counter()
    twins = TrajectoryDivergence(epsilon=0.1, init_samples=0)
    logger, error = fit(build(None, args), [twins], args.steps)
    out["sgd"] = summarize(twins, logger, error, time.perf_counter() - start)
    print("sgd:", {k: v for k, v in out["sgd"].items() if k != "distances"})
    for strategy in STRATEGIES:
        start = time.perf_counter()
        twins = TrajectoryDivergence(epsilon=0.1, directions=["random"], init_samples=0)
        logger, error = fit(build(strategy, args), [CGDCurvature(), twins], args.cgd_steps)
        out[strategy] = summarize(twins, logger, error, time.perf_counter() - start)
        print(f"{strategy}:", {k: v for k, v in out[strategy].items() if k != "distances"})
    plot_divergence(out, args.out / f"divergence_{tag(args)}.png")
    for run in (out["sgd"], *(out[s] for s in STRATEGIES)):
        run["distances_every_50"] = {k: d[::50] for k, d in run.pop("distances").items()}
        del run["bound_curve"]
    return out


def summarize(twins: TrajectoryDivergence, logger: MemoryLogger, error: str | None, seconds: float) -> dict:
    """Distances, fits, bounds and the final training loss of one divergence run."""
    loss = series(logger.metrics["train/loss_step"])[1]
    return {
        "seconds": round(seconds, 1),
        "diverged": error,
        "final": {k: d[-1] for k, d in twins.distances.items()},
        "fit_a_b": twins.results.get("fit", {}),
        "random_walk_bound": twins.results.get("random_walk_bound"),
        "sigma": twins.results.get("sigma"),
        "direction_lle": twins.direction_lle,
        "final_train_loss_mean10": sum(loss[-10:]) / len(loss[-10:]),
        "distances": twins.distances,
        "bound_curve": series(logger.metrics["chaos/divergence/random_walk_bound"])[1],
    }


def plot_divergence(out: dict[str, Any], path: Path) -> None:
    """Distance to the main run per direction (SGD) and per CGD strategy, against the baselines."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    sgd = out["sgd"]
    for name, d in sgd["distances"].items():
        axes[0].plot(range(len(d)), d, color=COLORS[name], label=name, lw=1.2)
        if name in sgd["fit_a_b"]:
            a, b = sgd["fit_a_b"][name]
            t = torch.arange(len(d), dtype=torch.float64)
            axes[0].plot(t, torch.sqrt(a**2 * t**2 + b * t), color=COLORS[name], ls=":", lw=0.8)
    for ax in axes:
        ax.axhline(out["init_distance"]["digits_mlp_analytic"], color="k", ls="--", lw=1, label="two inits")
        ax.set(yscale="log", xlabel="step t", ylabel="‖θ_twin − θ‖")
    bound = sgd["bound_curve"]
    axes[0].plot(range(len(bound)), bound, color="k", ls="-.", lw=1, label="random walks √(2TD)σ")
    axes[0].set_title("plain SGD, ε = 0.1 (dotted: √(a²t² + bt) fits)")
    axes[0].legend(fontsize=8)
    for name in STRATEGIES:
        d = out[name]["distances"].get("random", [])
        axes[1].plot(range(len(d)), d, color=COLORS[name], label=f"CGD {name}", lw=1.2)
    d = sgd["distances"]["random"][: len(out[STRATEGIES[0]]["distances"].get("random", []))]
    axes[1].plot(range(len(d)), d, color=COLORS["sgd"], label="SGD", lw=1.2)
    axes[1].set_title("random direction, ε = 0.1, per optimizer")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def tag(args: argparse.Namespace) -> str:
    """File-name tag of a part's outputs: the setting, plus the runs and steps when not the defaults."""
    name = f"lr{args.lr:g}_m{args.momentum:g}"
    if args.part == "pruning" and (args.runs != ["sgd", *STRATEGIES] or args.steps != 300):
        name += f"_{'-'.join(args.runs)}_{args.steps}steps"
    return name + ("_keep_momentum" if args.keep_momentum else "")


def main() -> None:
    """Parse the arguments, run one part and write ``cgd_{part}_*.json``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", choices=["pruning", "divergence"])
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--steps", type=int, default=300, help="steps per run (divergence: SGD twins)")
    parser.add_argument("--cgd-steps", type=int, default=150, help="divergence: steps of the CGD twin runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "figures")
    parser.add_argument("--keep-momentum", action="store_true", help="CGD(project_momentum=False)")
    parser.add_argument(
        "--runs",
        nargs="+",
        choices=["sgd", *STRATEGIES],
        default=["sgd", *STRATEGIES],
        help="pruning: which runs",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)  # a 910-parameter model gains nothing from intra-op threads
    args.out.mkdir(parents=True, exist_ok=True)
    result = pruning(args) if args.part == "pruning" else divergence(args)
    path = args.out / f"cgd_{args.part}_{tag(args)}.json"
    path.write_text(json.dumps(result, indent=1, default=float))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
