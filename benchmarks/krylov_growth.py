"""Time of the Krylov bookkeeping of one long computed step (the warm-up), without the products.

The operator is a diagonal with a clustered top (``B = diag(linspace(0, 1, N)⁴)``), so that the step
runs its full ``m`` products and each costs one elementwise multiply: what is timed is the
Gram–Schmidt, projection and Rayleigh–Ritz work the iteration adds to its products, which grows with
the number of products ``m`` and the dimension ``N``::

    python -m benchmarks.krylov_growth --dim 300000 --products 100
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_chaos.core.controlled_lyapunov import ControlledLyapunov


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dim", type=int, default=300_000, help="N (300,000)")
    parser.add_argument("--products", type=int, default=100, help="products m of the step (100)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps; the median is printed (3)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    diagonal = torch.linspace(0.0, 1.0, args.dim) ** 4

    def apply(block: torch.Tensor) -> torch.Tensor:
        return block * diagonal[:, None]

    seconds = []
    for repeat in range(args.repeats):
        iteration = ControlledLyapunov(seed=repeat)
        start = time.perf_counter()
        step = iteration.step(apply, args.dim, max_products=args.products, tol=1e-12)
        seconds.append(time.perf_counter() - start)
    seconds.sort()
    print(
        f"N = {args.dim:,}, {step.num_products} products: median {seconds[len(seconds) // 2]:.2f} s "
        f"(range {seconds[0]:.2f}–{seconds[-1]:.2f} s, {args.repeats} steps, 1 torch thread)"
    )


if __name__ == "__main__":
    main()
