"""``python -m bench.accuracy``: the command line (see the package's docstring and ``--help``)."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torchvision

import bench.accuracy as package
from bench.accuracy.report import merge_runs, render_epochs, render_group, report
from bench.accuracy.run import ROOT, RUNS_DIR, case_data, estimate, render_estimate, run_case
from bench.accuracy.settings import load_settings

DEFAULT_CONFIG = ROOT / "configs" / "bench" / "accuracy.yaml"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=package.__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML settings")
    parser.add_argument("--quick", action="store_true", help="the config's small 'quick' version (a few minutes)")
    parser.add_argument("--cases", help="comma-separated case names from the config (default: all)")
    parser.add_argument("--layers", help="comma-separated numbers of trained convs, instead of each case's")
    parser.add_argument("--budgets",
                        help="comma-separated budget fractions of vanilla's bytes, instead of the config's")
    parser.add_argument("--reference-budgets", help="comma-separated budgets that also run HOSVD and the paper grid "
                        "('none': no such budget), instead of the config's")
    parser.add_argument("--out", type=Path, help="result JSON (default: bench/results/<config name>[_quick].json)")
    parser.add_argument("--plot", type=Path, help="Pareto PNG (default: bench/results/accuracy_pareto[_quick].png)")
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR,
                        help=f"where pretrained backbones and cached features are kept (default: {RUNS_DIR})")
    parser.add_argument("--estimate", action="store_true",
                        help="run nothing: load each case's features, time vanilla's step and print the estimate")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                        help="run nothing: join the results of runs made with --cases/--layers (e.g. one "
                             "process per case, run side by side) into one report, JSON and plot")
    args = parser.parse_args(argv)
    if args.merge:
        merge_runs(args.merge, out=args.out or ROOT / "bench" / "results" / "accuracy.json",
                   plot=args.plot or ROOT / "bench" / "results" / "accuracy_pareto.png")
        return
    try:
        settings = load_settings(args.config, quick=args.quick)
    except ValueError as error:
        raise SystemExit(f"error: {args.config}: {error}") from None
    if args.budgets:
        try:
            settings = replace(settings, budgets=tuple(float(b) for b in args.budgets.split(",") if b.strip()))
        except ValueError as error:
            parser.error(f"--budgets {args.budgets!r}: {error}")
    if args.reference_budgets:
        try:
            settings = replace(settings, reference_budgets=tuple(
                float(b) for b in args.reference_budgets.split(",") if b.strip() and b.strip() != "none"))
        except ValueError as error:
            parser.error(f"--reference-budgets {args.reference_budgets!r}: {error}")
    cases = settings.cases
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in {case.name for case in cases}]
        if unknown:
            parser.error(f"unknown case(s) {unknown}; choose from {[c.name for c in cases]}")
        cases = tuple(c for c in cases if c.name in wanted)
    if args.layers:
        try:
            cases = tuple(replace(c, layers=tuple(int(n) for n in args.layers.split(",") if n.strip())) for c in cases)
        except ValueError as error:
            parser.error(f"--layers {args.layers!r}: {error}")
    suffix = "_quick" if args.quick else ""
    stem = args.config.stem  # accuracy.yaml -> accuracy.json; another config's results keep its own name
    out = args.out or ROOT / "bench" / "results" / f"{stem}{suffix}.json"
    plot = args.plot or ROOT / "bench" / "results" / (
        f"accuracy_pareto{suffix}.png" if stem == "accuracy" else f"{stem}_pareto{suffix}.png")

    torch.set_num_threads(settings.threads)
    if args.estimate:
        for case in cases:
            print(render_estimate(case, estimate(case, settings, case_data(case, settings, runs_dir=args.runs_dir))),
                  flush=True)
        return
    started = time.perf_counter()
    results = []
    for case in cases:
        results.append(run_case(case, settings, runs_dir=args.runs_dir))
        for group in results[-1]["groups"]:
            print(render_group(group) + "\n", flush=True)
            print(render_epochs(group) + "\n", flush=True)
    wall = time.perf_counter() - started
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__, "machine": platform.machine(),
            "python": platform.python_version(), "threads": settings.threads, "quick": args.quick,
            "wall_seconds": wall, "command": " ".join(["python -m bench.accuracy", *(argv or sys.argv[1:])]),
            "settings": {k: v for k, v in asdict(settings).items() if k != "cases"},
            "cases": [asdict(c) for c in cases]}
    report(meta, results, out=out, plot=plot)


if __name__ == "__main__":
    main()
