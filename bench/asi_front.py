"""Benchmark: ASI's memory/accuracy front on a case of the accuracy benchmark, at a few budgets.

Issue 12's hard problem by default: MobileNetV2 pretrained here on Fashion-MNIST (``odl-fed
pretrain``, cached under runs/bench-accuracy/) -> MNIST digits, last 4 convs + head, 128 px (4x4
maps), over cached features, at the case's epochs and learning rate (``configs/bench/accuracy.yaml``).
For each budget (1/N of vanilla's measured conv bytes) the planner chooses ranks for each storage
(float32 ``asi-only``, ``asi-fp16``, ``asi-int8``: 4, 2 or 1 bytes per number) and each weighting
of the layers' gradient errors (``absolute``: the paper's perplexity summed; ``relative``: each
layer's divided by its exact gradient's norm), every conv compressed. Each row is the mean and
spread over ``--seeds`` (the batch order); vanilla and head only (the convs frozen) are measured in
the same run, and each row says what share of the conv gain (vanilla over head only) it keeps.
With ``--replan also`` (or ``only``), each such row is run again with its ranks planned anew after every epoch, on
the model as trained so far (a federated client would re-plan on each round's global model): the
inputs of every trained conv but the first move as the convs before it learn.

Run: ``python -m bench.asi_front [--case mnv2-digits] [--budgets 50] [--seeds 0 1 2]``
(``--storages``, ``--weightings`` to run fewer rows, ``--replan also|only`` for re-planned rows,
``--gradfilt-radius 4`` for gradient filtering rows; ``--out`` for the JSON).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from bench.accuracy.run import case_data
from bench.accuracy.settings import HEAD_ONLY, load_settings
from bench.accuracy.train import calibration_batches, fine_tune, prepared_tail
from bench.process_tree import write_result
from odl_fed.asi import restore_model
from odl_fed.planning.ranks import WEIGHTINGS, plan_ranks
from odl_fed.training.methods import get_method

__all__ = ["train_seeds", "keep_shares", "render_rows", "main"]

ROOT = Path(__file__).resolve().parents[1]
STORAGES = ("asi-only", "asi-fp16", "asi-int8")  # methods: the Tucker form in 4, 2 or 1 bytes per number


def train_seeds(train: Callable[[int], dict], seeds: Sequence[int]) -> dict:
    """``train(seed)`` at every seed: top-1 per seed, mean and sample spread, the first run's bytes."""
    runs = [train(seed) for seed in seeds]
    top1 = [r["top1"] for r in runs]
    return {"top1": top1, "mean": statistics.fmean(top1), "std": statistics.stdev(top1) if len(top1) > 1 else 0.0,
            "convs_bytes": runs[0]["convs_bytes"], "epoch_top1": [r["epoch_top1"] for r in runs]}


def keep_shares(rows: list[dict], vanilla: dict, frozen: dict) -> None:
    """Each row's share of what training the convs is worth: (top-1 - head only's) / (vanilla's - head only's)."""
    gain = vanilla["mean"] - frozen["mean"]
    for row in rows:
        row["of_conv_gain"] = (row["mean"] - frozen["mean"]) / gain if gain > 0 else float("nan")


def render_rows(rows: list[dict]) -> str:
    lines = ["| method | weighting | budget | top-1 (mean ± std) | of conv gain "
             "| convs' saved bytes | ranks per conv |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        ranks = "; ".join("x".join(map(str, r)) for r in row["ranks"].values()) if row.get("ranks") else "-"
        method = row["method"] + (" (re-planned per epoch)" if row.get("replanned") else "") + (
            f" r={row['radius']}" if "radius" in row else "")
        lines.append(f"| {method} | {row.get('weighting', '-')} | {row.get('budget', '-')} "
                     f"| {row['mean']:.4f} ± {row['std']:.4f} | {row['of_conv_gain']:.0%} | {row['convs_bytes']:,} "
                     f"| {ranks} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "bench" / "accuracy.yaml")
    parser.add_argument("--case", default="mnv2-digits")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--budgets", type=int, nargs="+", default=[50], help="1/N of vanilla's conv bytes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--storages", nargs="*", default=list(STORAGES), choices=STORAGES)
    parser.add_argument("--weightings", nargs="+", default=list(WEIGHTINGS), choices=WEIGHTINGS)
    parser.add_argument("--replan", choices=("no", "also", "only"), default="no",
                        help="run each row with its ranks re-planned per epoch as well ('also') or instead ('only')")
    parser.add_argument("--gradfilt-radius", type=int, nargs="*", default=[],
                        help="also run gradient filtering at these patch sizes "
                             "(float32, no budget: its bytes are its own)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "asi_front.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = load_settings(args.config)
    cases = {c.name: c for c in settings.cases}
    if args.case not in cases:
        parser.error(f"--case {args.case!r}: choose from {sorted(cases)}")
    case = cases[args.case]
    data = case_data(case, settings)
    base, start, train, test = data["base"], data["start"], data["train"], data["test"]

    calibration = calibration_batches(train, batch_size=settings.batch, count=settings.calibration_batches,
                                      seed=settings.seed)
    planned_bytes: dict[tuple, int] = {}  # the first plan's (re-planned rows: before the first epoch)
    planning_tail, names = prepared_tail(base, layers=args.layers, start=start)  # plain, untrained: the first plans

    def plan(model, budget: int, method: str, weighting: str) -> dict[str, list[int]]:
        made = plan_ranks(model, names, calibration, budget, model_name=case.model,
                          storage_itemsize=get_method(method).storage_itemsize, relative=weighting == "relative")
        planned_bytes[method, weighting, budget] = made.total_bytes
        return {n: list(r) for n, r in made.targets().items()}

    def replanner(tail, budget: int, method: str, weighting: str, history: list):
        def after_epoch(epoch: int) -> None:
            plain = copy.deepcopy(tail)  # the model as trained so far, its layers plain again for calibration
            restore_model(plain)
            ranks = plan(plain, budget, method, weighting)
            for name, r in ranks.items():
                tail.get_submodule(name).ranks = tuple(r)  # a new shape: the layer starts its bases afresh
            history.append(ranks)
        return after_epoch

    def run(method: str, ranks=None, replan=None, radius: int = 2) -> dict:
        histories = []

        def once(seed: int) -> dict:
            torch.manual_seed(settings.seed)  # the head's initial weights: the same at every seed
            tail, layer_names = prepared_tail(base, layers=args.layers, start=start, method=method, ranks=ranks,
                                              radius=radius)
            history = [ranks]
            after_epoch = replanner(tail, *replan, history) if replan else None
            result, _, _ = fine_tune(tail, train, test, layer_names=layer_names, epochs=case.epochs,
                                     batch_size=settings.batch, lr=case.lr, seed=seed, after_epoch=after_epoch)
            histories.append(history)
            return result
        row = {"method": method, "ranks": ranks, **train_seeds(once, args.seeds)}
        if replan:
            row["ranks_per_epoch"] = histories
        print(f"  {method}: top-1 {row['mean']:.4f} ± {row['std']:.4f}, convs' bytes {row['convs_bytes']:,}",
              flush=True)
        return row

    vanilla, frozen = run("vanilla"), run(HEAD_ONLY)
    rows = [vanilla, frozen]
    rows += [run("gradfilt", radius=r) | {"radius": r} for r in args.gradfilt_radius]
    for fraction in args.budgets:
        budget = vanilla["convs_bytes"] // fraction
        for method in args.storages:
            for weighting in args.weightings:
                ranks = plan(planning_tail, budget, method, weighting)
                print(f"{method}, {weighting}, 1/{fraction}: ranks "
                      + "; ".join("x".join(map(str, r)) for r in ranks.values()), flush=True)
                labels = {"weighting": weighting, "budget": f"1/{fraction}",
                          "planned_bytes": planned_bytes[method, weighting, budget]}
                if args.replan != "only":
                    rows.append(run(method, ranks) | labels)
                if args.replan != "no":
                    rows.append(run(method, ranks, replan=(budget, method, weighting)) | labels | {"replanned": True})
    keep_shares(rows, vanilla, frozen)
    print("\n" + render_rows(rows))
    result = {"problem": {"case": case.name, "title": case.title, "model": case.model, "dataset": case.dataset,
                          "image_size": case.image_size, "layers": args.layers, "train": len(train),
                          "test": len(test), "epochs": case.epochs, "lr": case.lr, "batch": settings.batch},
              "seeds": args.seeds, "threads": args.threads, "rows": rows}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
