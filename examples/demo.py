"""Main demo: the largest Hessian eigenvalue of every training step of an MLP on the embedded digits.

Trains a 64-64-64-10 ReLU MLP with SGD (lr 0.1, batch 128) on scikit-learn's bundled 8×8 digits for a
few epochs with :class:`~lightning_chaos.HessianEigenvalueMonitor` attached, writes TensorBoard logs
(with the chaos custom-scalars layout) and the paper-style PNG of λ, 1/h0 and the learning rate (steps
whose estimate did not converge marked), and prints how many steps converged at what cost.

The monitor runs with ``budget=12`` gradient-equivalents per step: this ReLU network's batches do not
share their top eigenvector closely enough for the default budget of 4 to converge most steps (see
``benchmarks/README.md``); with 12 most of them converge.

    python examples/demo.py [--epochs 10] [--out demo_logs]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_chaos import HessianEigenvalueMonitor
from lightning_chaos.data import DigitsDataModule
from lightning_chaos.models import MLP, Classifier
from lightning_chaos.plot import plot_curvature, plot_loss, read_scalars


def main() -> None:
    """Run the demo."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--out", default="demo_logs")
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    data = DigitsDataModule(batch_size=128)
    model = Classifier(MLP(64, (64, 64), 10, activation="relu"), lr=args.lr)
    monitor = HessianEigenvalueMonitor(budget=12)
    logger = TensorBoardLogger(args.out, name="digits_mlp")
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=logger,
        callbacks=[monitor, LearningRateMonitor("step")],
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    seconds = time.perf_counter() - start
    val = trainer.validate(model, data, verbose=False)[0]

    logdir = Path(logger.log_dir)
    series = read_scalars(logdir)
    figures = [
        plot_curvature(series, logdir / "curvature.png", title=f"digits MLP, SGD lr={args.lr}"),
        plot_loss(series, logdir / "loss.png", title=f"digits MLP, SGD lr={args.lr}"),
    ]
    steps, h0 = series["chaos/h0"]
    converged = series["chaos/h0_converged"][1]
    cost = series["chaos/probe_cost"][1][1:]  # after the warm-up
    late = [h for h, c in zip(h0[len(h0) // 2 :], converged[len(h0) // 2 :], strict=True) if c]
    print(
        f"\nTrained {trainer.global_step} steps in {seconds:.1f} s on CPU; "
        f"validation accuracy {val['val/acc']:.3f}, loss {val['val/loss']:.3f}."
    )
    print(
        f"Warm-up: {monitor.warmup_iterations} products at the initial point; skipped steps: "
        f"{monitor.skipped_steps}; h0 logged on {len(steps)} steps, converged on {int(sum(converged))}, "
        f"at {statistics.mean(cost):.1f} gradient-equivalents per step."
    )
    if late:
        print(
            f"Second half of training, converged steps: median h0 = {statistics.median(late):.2f}, "
            f"median 1/h0 = {statistics.median(1 / h for h in late):.4f} against lr = {args.lr} "
            f"(edge of stability: h0 = 2/lr = {2 / args.lr:.1f})."
        )
    print(f"\nTensorBoard logs: {logdir}  (tensorboard --logdir {args.out}, tab 'Custom Scalars')")
    for figure in figures:
        print(f"Figure: {figure}")


if __name__ == "__main__":
    main()
