"""Paper-style figures from a run's TensorBoard logs.

``python -m lightning_chaos.plot LOGDIR [--out DIR]`` writes, for what the run logged (a figure whose
series are absent is not written, and the command says so):

* ``curvature.png``: λ, 1/h0 and the learning rate against step on a log axis (Figure 1 of the ICLR
  submission), with ``lr/2``, the value of ``1/h0`` at the edge of stability ``h0 = 2/lr``
  (``HessianEigenvalueMonitor``, ``InverseCurvatureLR``);
* ``loss.png``: training (and validation) loss against step;
* ``counts.png``: chaotic / edge / stable and negative / zero / positive eigenvalue counts, with the SLQ
  brackets as bands (``LyapunovSpectrumMonitor``);
* ``exponents.png``: the local Lyapunov exponents of each step (``LyapunovSpectrumMonitor``, and
  ``log‖J_t‖`` of ``TangentMapMonitor``) and, on a second axis, the finite-time exponents, ``mlce`` and
  its bound (``TangentMapMonitor``);
* ``divergence.png``: the distance of each perturbed twin from the main run with the random-walk bound
  and the initial distance of two independent initialisations (``TrajectoryDivergence``);
* ``cgd.png``: the directions CGD removed and, on a second axis, the share of the update it kept
  (``CGDCurvature``).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

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


def _tags(series: Series, prefix: str, pattern: str) -> list[str]:
    """The tags ``prefix + name`` of ``series`` whose name matches ``pattern``, in natural order."""
    found = [t for t in series if t.startswith(prefix) and re.fullmatch(pattern, t[len(prefix) :])]
    return sorted(found, key=lambda t: [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", t)])


def _save(
    fig: plt.Figure, axes: Sequence[plt.Axes], ylabels: Sequence[str], path: str | Path, title: str
) -> Path:
    """Label the axes (step below the last one), add the legends and the title, write ``path``."""
    for ax, ylabel in zip(axes, ylabels, strict=True):
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    axes[-1].set_xlabel("step")
    axes[0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _panels(count: int) -> tuple[plt.Figure, list[plt.Axes]]:
    """A figure with ``count`` axes stacked over a shared step axis."""
    fig, axes = plt.subplots(count, 1, figsize=(7, 1.5 + 2.5 * count), sharex=True, squeeze=False)
    return fig, list(axes[:, 0])


def plot_curvature(series: Series, path: str | Path, prefix: str = "chaos/", title: str = "") -> Path | None:
    """λ, 1/h0 and the learning rate against step (log axis), like Figure 1 of the ICLR submission.

    Steps whose estimate did not converge (``h0_converged = 0``) are marked with crosses.

    Args:
        series: output of :func:`read_scalars`.
        path: PNG to write.
        prefix: prefix of the chaos keys.
        title: figure title.

    Returns:
        ``path``, or ``None`` (nothing written) when the run logged neither λ nor 1/h0.
    """
    curves = [
        (f"{prefix}lyapunov_exponent", "Lyapunov exponent λ", "tab:blue"),
        (f"{prefix}inv_h0", "inverse curvature 1/h0", "tab:orange"),
    ]
    if not any(tag in series for tag, _, _ in curves):
        return None
    fig, [ax] = _panels(1)
    for tag, label, color in curves:
        if tag in series:
            ax.plot(*series[tag], label=label, color=color, lw=1)
    converged = dict(zip(*series.get(f"{prefix}h0_converged", ([], [])), strict=True))
    if f"{prefix}inv_h0" in series and converged:  # mark the steps whose estimate did not converge
        off = [(s, v) for s, v in zip(*series[f"{prefix}inv_h0"], strict=True) if not converged.get(s, 1.0)]
        if off:
            ax.plot(*zip(*off, strict=True), "x", color="tab:orange", ms=3, label="1/h0 not converged")
    lr = learning_rate(series, prefix)
    if lr is not None:
        steps, values = lr[1]
        ax.plot(steps, values, label=f"learning rate ({lr[0]})", color="tab:green", lw=1.5)
        ax.plot(
            steps, [v / 2 for v in values], "--", color="tab:green", lw=1, label="lr/2 (edge of stability)"
        )
    ax.set_yscale("log")
    return _save(fig, [ax], ["λ, 1/h0, learning rate"], path, title or "controlled Lyapunov iteration")


def plot_loss(series: Series, path: str | Path, title: str = "") -> Path | None:
    """Training and validation loss against step.

    Args:
        series: output of :func:`read_scalars`.
        path: PNG to write.
        title: figure title.

    Returns:
        ``path``, or ``None`` (nothing written) when the run logged no ``train/loss`` or ``val/loss``.
    """
    tags = [t for t in sorted(series) if re.fullmatch(r"(train|val)/loss(_step|_epoch)?", t)]
    tags = [t for t in tags if t != "train/loss_epoch"]
    if not tags:
        return None
    fig, [ax] = _panels(1)
    for tag in tags:
        ax.plot(*series[tag], label=tag, lw=1)
    ax.set_yscale("log")
    return _save(fig, [ax], ["loss"], path, title or "loss")


def plot_counts(series: Series, path: str | Path, prefix: str = "chaos/", title: str = "") -> Path | None:
    """Eigenvalue counts against step: by local Lyapunov exponent and by curvature sign.

    Args:
        series: output of :func:`read_scalars`.
        path: PNG to write.
        prefix: prefix of the chaos keys.
        title: figure title.

    Returns:
        ``path``, or ``None`` (nothing written) when the run logged no count.
    """
    groups = [
        [f"{prefix}n_{name}" for name in ("chaotic", "edge", "stable")],
        [f"{prefix}n_{name}" for name in ("negative", "zero", "positive")],
    ]
    groups = [[tag for tag in group if tag in series] for group in groups]
    groups = [group for group in groups if group]
    if not groups:
        return None
    fig, axes = _panels(len(groups))
    for ax, group in zip(axes, groups, strict=True):
        for tag in group:
            [line] = ax.plot(*series[tag], label=tag.removeprefix(prefix), lw=1)
            if f"{tag}_low" in series and f"{tag}_high" in series:  # SLQ quadrature bracket
                steps, low = series[f"{tag}_low"]
                ax.fill_between(steps, low, series[f"{tag}_high"][1], color=line.get_color(), alpha=0.2)
    ylabels = ["eigenvalues (count)"] * len(groups)
    return _save(fig, axes, ylabels, path, title or "chaotic, edge and stable directions")


def plot_exponents(series: Series, path: str | Path, prefix: str = "chaos/", title: str = "") -> Path | None:
    """Local Lyapunov exponents of each step and, on their own axis, the finite-time ones with the bound.

    Args:
        series: output of :func:`read_scalars`.
        path: PNG to write.
        prefix: prefix of the chaos keys.
        title: figure title.

    Returns:
        ``path``, or ``None`` (nothing written) when the run logged no exponent.
    """
    local: list[tuple[str, str, dict[str, Any]]] = [
        (f"{prefix}lle_max", "largest LLE", {}),
        (f"{prefix}lle_min", "smallest LLE", {}),
        (f"{prefix}map_log_norm", "log‖J_t‖ (tangent map)", {"ls": ":"}),
    ]
    finite: list[tuple[str, str, dict[str, Any]]] = [  # one legend entry for all ("_" hides a label)
        (tag, "_" * bool(i) + "finite-time exponents ftle_i", {"lw": 0.6, "color": "0.6"})
        for i, tag in enumerate(_tags(series, prefix, r"ftle_(\d+|min)"))
    ]
    finite += [
        (f"{prefix}mlce", "mlce (largest finite-time exponent)", {"lw": 1.5, "color": "tab:red"}),
        (f"{prefix}mlce_bound", "bound on mlce: mean log‖J_t‖", {"ls": "--", "color": "tab:red"}),
        (f"{prefix}lle_max_mean", "mean largest LLE", {"ls": ":", "color": "tab:purple"}),
    ]
    panels = [
        (ylabel, [curve for curve in curves if curve[0] in series])
        for ylabel, curves in [("local Lyapunov exponent", local), ("finite-time Lyapunov exponent", finite)]
    ]
    panels = [(ylabel, curves) for ylabel, curves in panels if curves]
    if not panels:
        return None
    fig, axes = _panels(len(panels))
    for ax, (_, curves) in zip(axes, panels, strict=True):
        for tag, label, style in curves:
            ax.plot(*series[tag], label=label, **{"lw": 1, **style})
        ax.axhline(0.0, color="k", lw=0.5)
    return _save(fig, axes, [ylabel for ylabel, _ in panels], path, title or "Lyapunov exponents")


def plot_divergence(series: Series, path: str | Path, prefix: str = "chaos/", title: str = "") -> Path | None:
    """Distance of each perturbed twin from the main run, with the random-walk bound and the init distance.

    Args:
        series: output of :func:`read_scalars`.
        path: PNG to write.
        prefix: prefix of the chaos keys.
        title: figure title.

    Returns:
        ``path``, or ``None`` (nothing written) when the run logged no divergence.
    """
    references = {
        f"{prefix}divergence/random_walk_bound": ("random-walk bound √(2 Σ‖Δθ_t‖²)", "--"),
        f"{prefix}divergence/init_distance": ("distance of two initialisations (analytic)", ":"),
        f"{prefix}divergence/init_distance_sampled": ("distance of two initialisations (sampled)", "-."),
    }
    twins = [tag for tag in _tags(series, prefix, r"divergence/.+") if tag not in references]
    if not twins:
        return None
    fig, [ax] = _panels(1)
    for tag in twins:
        ax.plot(*series[tag], label=f"twin: {tag.removeprefix(prefix + 'divergence/')}", lw=1)
    for tag, (label, style) in references.items():
        if tag not in series:
            continue
        steps, values = series[tag]
        if len(steps) > 1:
            ax.plot(steps, values, ls=style, color="k", lw=1, label=label)
        else:  # logged once, at the start
            ax.axhline(values[0], ls=style, color="k", lw=1, label=label)
    return _save(fig, [ax], ["‖θ_twin − θ‖"], path, title or "trajectory divergence")


def plot_cgd(series: Series, path: str | Path, prefix: str = "chaos/", title: str = "") -> Path | None:
    """The directions CGD removed and, on its own axis, the share ``‖PΔθ‖ / ‖Δθ‖`` of the update it kept.

    Args:
        series: output of :func:`read_scalars`.
        path: PNG to write.
        prefix: prefix of the chaos keys.
        title: figure title.

    Returns:
        ``path``, or ``None`` (nothing written) when the run logged nothing of CGD.
    """
    panels = [
        ("directions removed", _tags(series, prefix, r"cgd_removed(_\d+)?")),
        ("share of the update kept ‖PΔθ‖/‖Δθ‖", _tags(series, prefix, r"cgd_update_ratio(_\d+)?")),
    ]
    panels = [(ylabel, tags) for ylabel, tags in panels if tags]
    if not panels:
        return None
    fig, axes = _panels(len(panels))
    for ax, (_, tags) in zip(axes, panels, strict=True):
        for tag in tags:
            ax.plot(*series[tag], label=tag.removeprefix(prefix), lw=1)
    return _save(fig, axes, [ylabel for ylabel, _ in panels], path, title or "CGD")


def main(argv: Sequence[str] | None = None) -> list[Path]:
    """Command line: ``python -m lightning_chaos.plot LOGDIR [--out DIR] [--prefix chaos/] [--title T]``.

    Writes every figure of the module for which the run logged data and prints its path, then names the
    figures it found nothing for.

    Args:
        argv: command-line arguments (``None``: ``sys.argv[1:]``).

    Returns:
        The figures written.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", help="TensorBoard run directory")
    parser.add_argument("--out", default=None, help="output directory (default: LOGDIR)")
    parser.add_argument("--prefix", default="chaos/", help="prefix of the chaos keys")
    parser.add_argument("--title", default="", help="figure title")
    args = parser.parse_args(argv)
    out = Path(args.out or args.logdir)
    out.mkdir(parents=True, exist_ok=True)
    series = read_scalars(args.logdir)
    p = args.prefix
    figures: list[tuple[str, str, Callable[[Series, Path], Path | None]]] = [
        (
            "curvature",
            f"{p}lyapunov_exponent, {p}inv_h0",
            partial(plot_curvature, prefix=p, title=args.title),
        ),
        ("loss", "train/loss, val/loss", partial(plot_loss, title=args.title)),
        ("counts", f"{p}n_chaotic, {p}n_stable, ...", partial(plot_counts, prefix=p, title=args.title)),
        (
            "exponents",
            f"{p}lle_max, {p}mlce, {p}ftle_*, ...",
            partial(plot_exponents, prefix=p, title=args.title),
        ),
        ("divergence", f"{p}divergence/*", partial(plot_divergence, prefix=p, title=args.title)),
        ("cgd", f"{p}cgd_removed, {p}cgd_update_ratio", partial(plot_cgd, prefix=p, title=args.title)),
    ]
    written, missing = [], []
    for name, keys, plot in figures:
        path = plot(series, out / f"{name}.png")
        if path is None:
            missing.append(f"{name} ({keys})")
        else:
            written.append(path)
            print(path)
    if missing:
        print(f"Nothing logged in {args.logdir} for: {'; '.join(missing)}.")
    return written


if __name__ == "__main__":
    main()
