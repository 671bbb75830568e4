"""Command line: ``python -m fastlla <command>``.

Commands
--------
demo      MAP vs ExactLLA vs ScaLLA on digits (with OOD) and a 1-D gap regression.
backends  Which implementation (native C++/CUDA or pure-PyTorch reference) each op uses.
fidelity  Held-out kernel error vs training cost of ScaLLA configurations (digits CNN).
calibration  MAP, laplace-torch, ExactLLA and ScaLLA, default workflow and validation δ
          (issue 15's table: NLL, ECE, Brier, OOD AUROC on six data sets).
bench     Benchmarks against ExactLLA and laplace-torch; writes bench/results/suite/<date>-<device>.md.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _iterations(value: str) -> int | str:
    return value if value == "auto" else int(value)


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    cfg = DemoConfig(
        seed=args.seed,
        n_features=args.n_features,
        iterations=_iterations(args.iterations),
        time_budget=args.time_budget,
        n_projections=args.n_projections,
        regression_iterations=_iterations(args.iterations),
        regression_time_budget=args.time_budget / 3,
        all_classes=args.all_classes,
        out_dir=args.out_dir,
        progress_bar=not args.no_progress,
    )
    run_demo(cfg)
    return 0


def _backends(args: argparse.Namespace) -> int:
    from fastlla import _ops

    print(_ops.backend_report())
    return 0


def _fidelity(args: argparse.Namespace) -> int:
    from .fidelity import main as fidelity_main

    fidelity_main(args)
    return 0


def _calibration(args: argparse.Namespace) -> int:
    from .calibration import main as calibration_main

    calibration_main(args)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    mode = "full" if args.full else "smoke" if args.smoke else "quick"
    sections = args.sections.split(",") if args.sections else None
    run_bench(mode, time_budget=args.time_budget, out=args.out, sections=sections)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlla", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="compare MAP, ExactLLA and ScaLLA on bundled data")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--n-features", type=int, default=128, help="surrogate features M")
    demo.add_argument(
        "--iterations", default="auto", help="kernel-matching steps, or 'auto' (time budget)"
    )
    demo.add_argument(
        "--time-budget", type=float, default=60.0,
        help="seconds of kernel matching per digits surrogate (a third for the regression)",
    )
    demo.add_argument("--n-projections", type=int, default=8, help="tangents per step S")
    demo.add_argument("--all-classes", action="store_true",
                      help="add the ten-class digits table (about 5 more minutes)")
    demo.add_argument("--out-dir", default=".", help="where the PNG is written")
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")
    demo.set_defaults(run=_demo)

    backends = sub.add_parser("backends", help="report which backend each op uses")
    backends.set_defaults(run=_backends)

    from .fidelity import add_arguments as fidelity_arguments

    fidelity = sub.add_parser("fidelity", help="kernel error vs cost of ScaLLA configurations")
    fidelity_arguments(fidelity)
    fidelity.set_defaults(run=_fidelity)

    from .calibration import add_arguments as calibration_arguments

    calibration = sub.add_parser(
        "calibration", help="default workflow vs validation δ vs MAP and laplace-torch (issue 15)"
    )
    calibration_arguments(calibration)
    calibration.set_defaults(run=_calibration)

    bench = sub.add_parser("bench", help="benchmark suite and report (run from a checkout)")
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="under 10 minutes on 2 cores (default)")
    size.add_argument("--full", action="store_true", help="100-step fits, 10-minute fidelity runs")
    size.add_argument("--smoke", action="store_true", help="tiny sizes: checks the suite runs")
    bench.add_argument("--time-budget", type=float, default=None, help="seconds for everything")
    bench.add_argument("--sections", default=None, help="comma-separated subset of the sections")
    bench.add_argument("--out", default=None, help="markdown path (default bench/results/...)")
    bench.set_defaults(run=_bench)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
