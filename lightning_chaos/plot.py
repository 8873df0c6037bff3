"""Paper-style figures from a run's TensorBoard logs.

``python -m lightning_chaos.plot LOGDIR [--out DIR]`` writes

* ``curvature.png``: λ, 1/h0 and the learning rate against step on a log axis (Figure 1 of the ICLR
  submission), with ``lr/2``, the value of ``1/h0`` at the edge of stability ``h0 = 2/lr``;
* ``loss.png``: training (and validation) loss against step.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

Series = dict[str, tuple[list[int], list[float]]]


def read_scalars(logdir: str | Path) -> Series:
    """All scalar series of the TensorBoard event files under ``logdir``.

    Args:
        logdir: a run directory (or a parent of several event files; series with one tag are merged).

    Returns:
        ``{tag: (steps, values)}`` sorted by step.

    Raises:
        FileNotFoundError: if there is no event file under ``logdir``.
    """
    files = sorted(Path(logdir).rglob("events.out.tfevents.*"))
    if not files:
        raise FileNotFoundError(f"No TensorBoard event files under {logdir}.")
    merged: dict[str, dict[int, float]] = {}
    for file in files:
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            merged.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return {tag: (sorted(points), [points[s] for s in sorted(points)]) for tag, points in merged.items()}


def learning_rate(series: Series, prefix: str = "chaos/") -> tuple[str, tuple[list[int], list[float]]] | None:
    """The learning-rate series: ``chaos/lr`` if logged, else a ``LearningRateMonitor`` ``lr-*`` series."""
    if f"{prefix}lr" in series:
        return f"{prefix}lr", series[f"{prefix}lr"]
    monitored = sorted(tag for tag in series if re.fullmatch(r"lr-[^/]*", tag))
    return (monitored[0], series[monitored[0]]) if monitored else None


def _save(fig: plt.Figure, ax: plt.Axes, path: str | Path, title: str) -> Path:
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_curvature(series: Series, path: str | Path, prefix: str = "chaos/", title: str = "") -> Path:
    """λ, 1/h0 and the learning rate against step (log axis), like Figure 1 of the ICLR submission.

    Args:
        series: output of :func:`read_scalars`.
        path: PNG to write.
        prefix: prefix of the chaos keys.
        title: figure title.

    Returns:
        ``path``.
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    for tag, label, color in [
        (f"{prefix}lyapunov_exponent", "Lyapunov exponent λ", "tab:blue"),
        (f"{prefix}inv_h0", "inverse curvature 1/h0", "tab:orange"),
    ]:
        if tag in series:
            ax.plot(*series[tag], label=label, color=color, lw=1)
    lr = learning_rate(series, prefix)
    if lr is not None:
        steps, values = lr[1]
        ax.plot(steps, values, label=f"learning rate ({lr[0]})", color="tab:green", lw=1.5)
        ax.plot(
            steps, [v / 2 for v in values], "--", color="tab:green", lw=1, label="lr/2 (edge of stability)"
        )
    return _save(fig, ax, path, title or "controlled Lyapunov iteration")


def plot_loss(series: Series, path: str | Path, title: str = "") -> Path:
    """Training and validation loss against step.

    Args:
        series: output of :func:`read_scalars`.
        path: PNG to write.
        title: figure title.

    Returns:
        ``path``.
    """
    fig, ax = plt.subplots(figsize=(7, 4))
    for tag in sorted(t for t in series if re.fullmatch(r"(train|val)/loss(_step|_epoch)?", t)):
        if tag != "train/loss_epoch":
            ax.plot(*series[tag], label=tag, lw=1)
    return _save(fig, ax, path, title or "loss")


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Command line: ``python -m lightning_chaos.plot LOGDIR [--out DIR] [--prefix chaos/]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", help="TensorBoard run directory")
    parser.add_argument("--out", default=None, help="output directory (default: LOGDIR)")
    parser.add_argument("--prefix", default="chaos/", help="prefix of the chaos keys")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    out = Path(args.out or args.logdir)
    out.mkdir(parents=True, exist_ok=True)
    series = read_scalars(args.logdir)
    written = [
        plot_curvature(series, out / "curvature.png", args.prefix, args.title),
        plot_loss(series, out / "loss.png", args.title),
    ]
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
