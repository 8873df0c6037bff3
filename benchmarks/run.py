"""Run the lightning_chaos benchmarks and write their markdown tables.

    python benchmarks/run.py --device cpu --only timing --models mlp,small_resnet \
        --out benchmarks/README.md --json benchmarks/results_cpu.json     # ~15 min on 2 shared cores
    python benchmarks/run.py --device cpu --only timing --models resnet18 --tag cpu-resnet18 \
        --out benchmarks/README.md --json benchmarks/results_cpu_resnet18.json
    python benchmarks/run.py --device cuda --out benchmarks/README.md    # full GPU run (timing, slq)
    python benchmarks/run.py --smoke --out /tmp/bench.md                 # tiny sizes for CI
    python benchmarks/run.py --device cpu --only suite --out benchmarks/README.md   # block cpu-suite

With ``--out``, the results replace the block between ``<!-- BEGIN RESULTS: <tag> -->`` and
``<!-- END RESULTS: <tag> -->`` of that file (tag: ``cpu`` or ``cuda``, ``<device>-suite`` for
``--only suite``, ``smoke-…`` in smoke mode) and leave the rest of the file alone; a file without that block
gets the block appended (a missing file is created).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import slq, suite, timing  # noqa: E402
from benchmarks.common import (  # noqa: E402
    device_description,
    quiet,
    resolve_device,
    results_block,
    write_block,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks that it runs")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: cuda when available)")
    parser.add_argument("--out", type=Path, help="markdown file whose results block is (re)written")
    parser.add_argument("--json", type=Path, help="also write the raw measurements as JSON")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch intra-op threads (default on CPU: 1, see benchmarks/README.md; on CUDA: torch's default)",
    )
    parser.add_argument(
        "--only",
        default="timing,slq",
        help="comma-separated parts to run: timing, slq, suite (the per-step h0 suite of "
        "benchmarks/suite.py: not in the default, it takes ~15 min on one CPU core)",
    )
    parser.add_argument(
        "--suite-models",
        default="all",
        help=f"models of the suite part: all or some of {', '.join(suite.CASES)}",
    )
    parser.add_argument(
        "--models", default="mlp,small_resnet,resnet18", help="comma-separated networks of the timing part"
    )
    parser.add_argument(
        "--tag",
        help="name of the results block in --out (default: cpu or cuda, smoke-cpu in smoke mode); "
        "use distinct tags to keep the blocks of partial runs side by side",
    )
    return parser.parse_args(argv)


def load_note(start: tuple[float, float, float] | None) -> str:
    """The 1-minute load average at the start and end of the run (other processes on the machine)."""
    if start is None:
        return ""
    end = os.getloadavg()
    return (
        f" Load average (1 min) at start {start[0]:.1f}, at end {end[0]:.1f}, on {os.cpu_count()} logical "
        "CPUs: other processes share the machine, so absolute times are noisy; ratios compare within a round."
    )


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    quiet()
    device = resolve_device(args.device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - {"timing", "slq", "suite"}
    if unknown:
        raise SystemExit(f"--only: unknown parts {sorted(unknown)}")
    tag = args.tag or ("smoke-" if args.smoke else "") + device.type + (
        "-suite" if parts == {"suite"} else ""
    )
    started = time.perf_counter()
    command = "python benchmarks/run.py " + " ".join(sys.argv[1:] if argv is None else argv)
    git = suite.git_commit()
    sections = [
        f"### Results on {device.type.upper()}{' (smoke sizes: not measurements)' if args.smoke else ''}",
        f"Machine: {device_description(device)}. Generated {datetime.date.today().isoformat()} by "
        f"`{command}` at commit {(git['commit'] or 'unknown')[:10]}"
        f"{' (uncommitted changes)' if git['dirty'] else ''}.",
    ]
    record: dict = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "git": git,
        "machine": device_description(device),
        "smoke": args.smoke,
    }
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    if "timing" in parts:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        chosen = [c for c in timing.cases(device, args.smoke) if c.key in wanted]
        results = [timing.run_case(case, device) for case in chosen]
        sections.append("#### (c) What each configuration adds to a training step, in floors")
        sections.append(
            "Per network: the median over rounds (range) of the computed steps, their ratio to the left-out "
            "steps of the same run (`every_n_steps=2`), the time a configuration adds (computed − left-out "
            "step), that time as a multiple of what the floor (one extra `torch.autograd.grad` of the same "
            "loss) adds in the same round, the cost the configuration counts (gradient-equivalents per "
            "computed step: `chaos/probe_cost` of the monitors; the spectrum monitor and CGD: their exact "
            "products at `HVP_COST` plus one graph), and the added time per counted gradient-equivalent in "
            "floors (1 where the count is right)."
        )
        for r in results:
            sections += [timing.notes(r), timing.timing_table(r)]
        sections += [
            "What the constants of the cost count stand for, on each step's own batch and θ (median over "
            "steps): one gradient of the library's `FunctionalLoss`, the gradient graph (first exact product "
            "minus the second) and one exact product (double backward), in gradients:",
            timing.product_table(results),
            "#### The competitors' cost in training steps, at the monitors' point",
            timing.competitor_table(results),
            "#### Relative error of each method's h0 against a 100-step Lanczos reference at the same point",
            timing.error_table(results),
            "#### Peak extra memory (CUDA `max_memory_allocated`, MiB)",
            timing.memory_table(results)
            if device.type == "cuda"
            else "Not measured on CPU (`torch.cuda.max_memory_allocated` is CUDA-only).",
        ]
        record["timing"] = [timing.raw(r) for r in results]

    if "slq" in parts:
        exact_runs = [slq.run_exact_case(case, device) for case in slq.exact_cases(args.smoke)]
        large = slq.run_large(device, args.smoke)
        sections += [
            "#### (d) SLQ counts of the spectrum monitor against the exact counts (N of a few thousand)",
            slq.EXACT_CAPTION,
            slq.exact_table(exact_runs),
            "#### (e) SLQ counts on a ~1M-parameter model against a long-run reference",
            slq.large_table(large) + "\n\n" + slq.plain_step_note(large),
        ]
        record["slq"] = {
            "exact": [
                {
                    "network": r.case.label,
                    "lr": r.case.lr,
                    "parameters": r.num_params,
                    "points": [vars(p) for p in r.points],
                }
                for r in exact_runs
            ],
            "large": {
                "network": large.label,
                "parameters": large.num_params,
                "plain_step": large.plain_step,
                "monitor_seconds": large.monitor_seconds,
                "points": [vars(p) for p in large.points],
            },
        }

    if "suite" in parts:
        specs = suite.monitor_specs(suite.SUITE_MONITORS)
        results = suite.run_suite(
            suite.select(args.suite_models), specs, steps=None, every=None, smoke=args.smoke, device=device
        )
        record["suite"] = suite.record(results, specs, vars(args), command, device)
        sections += [
            "#### (f) Per-step h0 against the exact same-batch h0 on models wider than digits "
            "(`benchmarks/suite.py`)",
            *suite.tables(results, specs, skip=1),
        ]

    sections += [
        f"Total wall time of this run: {time.perf_counter() - started:.0f} s." + load_note(load_start),
    ]
    block = results_block(tag, sections)
    if args.out is not None:
        write_block(args.out, tag, block)
    if args.json is not None:
        args.json.write_text(json.dumps(suite.strict(record), indent=1, allow_nan=False) + "\n")
    print(block)
    return block


if __name__ == "__main__":
    main()
