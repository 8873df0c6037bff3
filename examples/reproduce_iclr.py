"""Reproduce Figures 1–2 of the ICLR 2021 submission on the embedded digits, and the quasi-Newton comparison.

The submission is "A Chaos Theory Approach to Understand Neural Network Optimization" (ICLR 2021).

    python examples/reproduce_iclr.py [--out chaos_logs/iclr] [--seeds 0 1 2] [--epochs 30]

Every run goes through the ``lightning-chaos`` CLI with the example configs of this folder, one
TensorBoard run per (setting, seed) under ``--out``; existing runs are reused (``--rerun`` repeats them):

- fixed lr 0.01, 0.1 and 1.0: ``digits_mlp_fixed_lr.yaml`` with ``--model.init_args.lr``;
- cyclic lr: ``digits_mlp_cyclic_lr.yaml``;
- quasi-Newton with ``scale=1`` (accurate h0) and ``scale=e-1`` (the paper's effective rule):
  ``digits_mlp_quasi_newton.yaml``.

The seed is the initialisation seed (``seed_everything``); the train/validation split and the batch order
are the same in every run. The script prints Markdown tables (validation accuracy and losses at the last
epoch, mean ± std over seeds; how closely 1/h0 follows lr and lr/2) and writes the figures of the first
seed with :mod:`lightning_chaos.plot` (``<setting>_curvature.png``, ``quasi_newton*_loss.png``) and
``comparison.png`` (loss and accuracy per epoch of every setting, mean over seeds) to ``--figures``.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from lightning_chaos.cli import main as cli_main
from lightning_chaos.plot import Series, learning_rate, plot_curvature, plot_loss, read_scalars

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Setting:
    """One row of the comparison: a config, its overrides and a label."""

    name: str
    label: str
    config: str
    overrides: tuple[str, ...] = ()


SETTINGS = (
    Setting("fixed_lr_0.01", "fixed lr 0.01", "digits_mlp_fixed_lr.yaml", ("--model.init_args.lr", "0.01")),
    Setting("fixed_lr_0.1", "fixed lr 0.1", "digits_mlp_fixed_lr.yaml", ("--model.init_args.lr", "0.1")),
    Setting("fixed_lr_1.0", "fixed lr 1.0", "digits_mlp_fixed_lr.yaml", ("--model.init_args.lr", "1.0")),
    Setting("cyclic_lr", "cyclic lr 0.01-0.5", "digits_mlp_cyclic_lr.yaml"),
    Setting("quasi_newton", "quasi-Newton, scale 1", "digits_mlp_quasi_newton.yaml"),
    Setting(
        "quasi_newton_e-1",
        "quasi-Newton, scale e-1",
        "digits_mlp_quasi_newton.yaml",
        ("--trainer.callbacks.init_args.scale", repr(math.e - 1)),
    ),
)


def run(setting: Setting, seed: int, epochs: int, out: Path, rerun: bool) -> Path:
    """Train one setting with one seed (unless its logs exist) and return its TensorBoard run directory."""
    logdir = out / setting.name / f"seed{seed}"
    if rerun or not any(logdir.glob("events.out.tfevents.*")):
        for stale in logdir.glob("events.out.tfevents.*"):
            stale.unlink()
        cli_main(
            [
                "fit",
                "--config",
                str(HERE / setting.config),
                *setting.overrides,
                "--seed_everything",
                str(seed),
                "--trainer.max_epochs",
                str(epochs),
                "--trainer.logger.init_args.save_dir",
                str(out),
                "--trainer.logger.init_args.name",
                setting.name,
                "--trainer.logger.init_args.version",
                f"seed{seed}",
                "--trainer.enable_checkpointing",
                "false",
                "--trainer.enable_progress_bar",
                "false",
                "--trainer.enable_model_summary",
                "false",
            ]
        )
    return logdir


def last(series: Series, tag: str) -> float:
    """The last logged value of ``tag``."""
    return series[tag][1][-1]


def paired(series: Series, tag: str, skip_steps: int) -> list[tuple[float, float]]:
    """``(value of tag, lr)`` at every step ``>= skip_steps`` where both were logged."""
    found = learning_rate(series)
    if found is None:
        raise KeyError("no learning-rate series (chaos/lr or lr-*) in the run")
    lr = dict(zip(*found[1], strict=True))
    return [(v, lr[t]) for t, v in zip(*series[tag], strict=True) if t >= skip_steps and t in lr]


def tracking(series: Series, skip_steps: int) -> dict[str, float]:
    """How 1/h0 relates to the learning rate after the first ``skip_steps`` steps.

    Returns:
        ``ratio``: median of (1/h0)/lr; ``between``: share of steps with lr/2 <= 1/h0 <= lr (h0 between
        1/lr and 2/lr); ``beyond``: share with 1/h0 < lr/2 (h0 above the edge of stability 2/lr);
        ``below``: share with 1/h0 > lr (h0 < 1/lr).
    """
    ratios = [inv / rate for inv, rate in paired(series, "chaos/inv_h0", skip_steps)]
    n = len(ratios)
    return {
        "ratio": statistics.median(ratios),
        "between": sum(0.5 <= r <= 1.0 for r in ratios) / n,
        "beyond": sum(r < 0.5 for r in ratios) / n,
        "below": sum(r > 1.0 for r in ratios) / n,
    }


def cycle_response(series: Series, skip_steps: int) -> dict[str, float]:
    """Does 1/h0 rise and fall with a cyclic lr? Phases are the top and bottom 30% of the lr range.

    Returns:
        ``corr``: correlation of log(1/h0) with log(lr); ``high``/``low``: median 1/h0 while lr is in the
        upper/lower 30% of its range; ``lr_high``/``lr_low``: median lr in those phases.
    """
    pairs = paired(series, "chaos/inv_h0", skip_steps)
    lo, hi = min(r for _, r in pairs), max(r for _, r in pairs)
    high = [(v, r) for v, r in pairs if r >= hi - 0.3 * (hi - lo)]
    low = [(v, r) for v, r in pairs if r <= lo + 0.3 * (hi - lo)]
    return {
        "corr": statistics.correlation([math.log(r) for _, r in pairs], [math.log(v) for v, _ in pairs]),
        "high": statistics.median(v for v, _ in high),
        "low": statistics.median(v for v, _ in low),
        "lr_high": statistics.median(r for _, r in high),
        "lr_low": statistics.median(r for _, r in low),
    }


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± std`` (sample std; just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def per_seed(values: Sequence[float], digits: int = 3) -> str:
    """The values of the seeds, in seed order."""
    return " / ".join(f"{v:.{digits}f}" for v in values)


def plot_comparison(results: dict[str, list[Series]], path: Path) -> Path:
    """Training loss and validation accuracy per epoch of every setting, mean over seeds."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.8))
    for s in SETTINGS:
        runs = results[s.name]
        for ax, tag in ((loss_ax, "train/loss_epoch"), (acc_ax, "val/acc")):
            curves = [r[tag][1] for r in runs]
            ax.plot(range(1, len(curves[0]) + 1), [statistics.mean(c) for c in zip(*curves)], label=s.label)
    loss_ax.set(yscale="log", xlabel="epoch", title="training loss (epoch mean)")
    acc_ax.set(xlabel="epoch", title="validation accuracy", ylim=(0, 1))
    acc_ax.legend(fontsize=8)
    fig.suptitle(f"digits MLP, mean over {len(next(iter(results.values())))} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    """Run the settings, print the tables and write the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("chaos_logs/iclr"), help="TensorBoard root")
    parser.add_argument("--figures", type=Path, default=HERE / "figures", help="where the PNGs go")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--skip-epochs", type=int, default=5, help="epochs left out of the tracking stats")
    parser.add_argument("--rerun", action="store_true", help="repeat runs whose logs exist")
    args = parser.parse_args(argv)

    results = {
        s.name: [read_scalars(run(s, seed, args.epochs, args.out, args.rerun)) for seed in args.seeds]
        for s in SETTINGS
    }
    steps_per_epoch = round(len(results[SETTINGS[0].name][0]["train/loss_step"][0]) / args.epochs)
    skip = args.skip_epochs * steps_per_epoch

    print(
        f"\n{args.epochs} epochs ({steps_per_epoch} steps each), seeds {args.seeds}; "
        "values at the last epoch\n"
    )
    print("| setting | val acc | val acc per seed | best-epoch val acc | train loss | val loss |")
    print("|---|---|---|---|---|---|")
    for s in SETTINGS:
        runs = results[s.name]
        accuracy = [last(r, "val/acc") for r in runs]
        print(
            f"| {s.label} | {mean_std(accuracy)} | {per_seed(accuracy)} "
            f"| {mean_std([max(r['val/acc'][1]) for r in runs])} "
            f"| {mean_std([last(r, 'train/loss_epoch') for r in runs])} "
            f"| {mean_std([last(r, 'val/loss') for r in runs])} |"
        )

    print(
        f"\n1/h0 against lr from epoch {args.skip_epochs} on (steps >= {skip}); shares are means over seeds\n"
    )
    print(
        "| setting | median (1/h0)/lr per seed | lr/2 <= 1/h0 <= lr | 1/h0 < lr/2 (h0 > 2/lr) | 1/h0 > lr |"
    )
    print("|---|---|---|---|---|")
    for s in SETTINGS:
        stats = [tracking(r, skip) for r in results[s.name]]
        shares = [
            f"{100 * statistics.mean(t[k] for t in stats):.0f}%" for k in ("between", "beyond", "below")
        ]
        print(f"| {s.label} | {per_seed([t['ratio'] for t in stats], 2)} | {' | '.join(shares)} |")

    for s in SETTINGS:
        if s.name.startswith("cyclic"):
            cycles = [cycle_response(r, skip) for r in results[s.name]]
            print(
                f"\n{s.label}: correlation of log(1/h0) with log(lr) "
                f"{per_seed([c['corr'] for c in cycles], 2)}; "
                f"median 1/h0 {mean_std([c['high'] for c in cycles])} in the high-lr phases "
                f"(median lr {mean_std([c['lr_high'] for c in cycles])}), "
                f"{mean_std([c['low'] for c in cycles])} in the low-lr phases "
                f"(median lr {mean_std([c['lr_low'] for c in cycles])})"
            )
        if s.name.startswith("quasi"):
            rates = [r["chaos/lr"][1] for r in results[s.name]]
            print(
                f"\n{s.label}: lr at the first step {mean_std([v[0] for v in rates])}, "
                f"at the last step {mean_std([v[-1] for v in rates])}"
            )

    args.figures.mkdir(parents=True, exist_ok=True)
    for s in SETTINGS:
        series = results[s.name][0]
        title = f"digits MLP, {s.label} (seed {args.seeds[0]})"
        plot_curvature(series, args.figures / f"{s.name}_curvature.png", title=title)
        if s.name.startswith("quasi"):
            plot_loss(series, args.figures / f"{s.name}_loss.png", title=title)
    plot_comparison(results, args.figures / "comparison.png")
    print(f"\nfigures in {args.figures}")


if __name__ == "__main__":
    main()
