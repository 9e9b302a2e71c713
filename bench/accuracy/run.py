"""Running the benchmark: a case's data, backbone and cached features, then every method on each group of convs."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from bench.accuracy.report import pareto_check
from bench.accuracy.settings import ASI_INT8, ASI_ONLY, ASI_PAPER, HEAD_ONLY, PLANNER, Case, PretrainSpec, Settings
from bench.accuracy.train import (
    calibration_batches,
    fine_tune,
    make_optimizer,
    paired_difference,
    prepared_tail,
    validation_split,
)
from bench.tail import Cached, cache_features, first_block, layer_inputs, prefix_features
from odl_fed.asi import ASIConv2d, get_variant, last_conv_names
from odl_fed.planning.ranks import BudgetTooSmallError, plan_ranks
from odl_fed.training.data import ImageData, batches, load_dataset
from odl_fed.training.flops import count_flops
from odl_fed.training.methods import get_method
from odl_fed.training.models import build_model
from odl_fed.training.task import train_step

__all__ = ["ROOT", "RUNS_DIR", "run_case", "run_group", "case_data", "estimate", "compression_cost"]

ROOT = Path(__file__).resolve().parents[2]
RUNS_DIR = ROOT / "runs" / "bench-accuracy"
# Step cost of each method against vanilla's, for the run-time estimate only (docs/accuracy.md's
# measured ratios, rounded up): ASI steps 0.83-0.96x at 1/50-1/200 and 1.13-1.25x where the planner
# keeps layers exact, HOSVD's 6-12x, head only trains no conv; the 8-bit row 1.06x (bench.asi_step).
ESTIMATE_STEP_FACTORS = {"vanilla": 1.0, "gradfilt": 1.0, HEAD_ONLY: 0.5, ASI_ONLY: 1.0, ASI_INT8: 1.1,
                         PLANNER: 1.25, ASI_PAPER: 1.0, "hosvd": 10.0}


def _step(tail: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
    train_step(tail, x, y, optimizer=optimizer)  # the library's step, as its loop runs it


def pretrained_checkpoint(model: str, spec: PretrainSpec, *, seed: int, runs_dir: Path) -> tuple[Path, dict]:
    """A backbone from ``odl-fed pretrain`` (its own code path), trained once and cached under ``runs_dir``."""
    from odl_fed.cli import build_parser

    stem = (f"{model}-{spec.dataset}-{spec.image_size}px-{spec.train}x{spec.epochs}ep-b{spec.batch}"
            f"-lr{spec.lr:g}-seed{seed}")
    path, info_path = runs_dir / f"{stem}.pt", runs_dir / f"{stem}.json"
    if path.is_file() and info_path.is_file():
        return path, json.loads(info_path.read_text()) | {"cached": True}
    argv = ["pretrain", "--model", model, "--dataset", spec.dataset, "--image-size", str(spec.image_size),
            "--limit-train", str(spec.train), "--limit-test", str(spec.test), "--epochs", str(spec.epochs),
            "--batch-size", str(spec.batch), "--lr", str(spec.lr), "--seed", str(seed), "--out"]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".pt.partial")  # a run stopped half-way leaves no checkpoint behind
    args = build_parser().parse_args([*argv, str(partial)])
    started = time.perf_counter()
    result = args.run(args)
    partial.rename(path)
    info = {"test_top1": result["test_accuracy"], "seconds": time.perf_counter() - started,
            "command": " ".join(["odl-fed", *argv, str(path)])}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return path, info | {"cached": False}


def _subset(data: ImageData, count: int, seed: int) -> ImageData:
    if count > len(data):
        raise SystemExit(f"error: {data.name} has {len(data)} examples, fewer than the {count} asked for")
    return data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count])


def _cached_features(case: Case, base: nn.Module, start: int, weights: str | None, train: ImageData,
                     test: ImageData, *, seed: int, runs_dir: Path) -> tuple[Cached, Cached]:
    """The features of ``train`` and ``test``, computed once and kept under ``runs_dir`` for later runs.

    The file is named by everything that decides its contents (model, weights, dataset, sizes,
    seed, cut block); a checkpoint trained here is named by its own settings.
    """
    stem = Path(weights).stem if weights and weights != "imagenet" else (weights or "random")
    path = (runs_dir / "features" / f"{case.model}-{stem}-{case.dataset}-{case.image_size}px-{len(train)}-"
            f"{len(test)}-seed{seed}-block{start}.pt")
    if path.is_file():
        stored = torch.load(path, weights_only=True)
        if torch.equal(stored["train_labels"], train.labels) and torch.equal(stored["test_labels"], test.labels):
            return (Cached(stored["train"], stored["train_labels"], stored["train_seconds"]),
                    Cached(stored["test"], stored["test_labels"], stored["test_seconds"]))
    cached_train = cache_features(base, start, train, image_size=case.image_size)
    cached_test = cache_features(base, start, test, image_size=case.image_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"train": cached_train.features, "train_labels": cached_train.labels,
                "train_seconds": cached_train.seconds, "test": cached_test.features,
                "test_labels": cached_test.labels, "test_seconds": cached_test.seconds}, path)
    return cached_train, cached_test


def case_data(case: Case, settings: Settings, *, runs_dir: Path = RUNS_DIR) -> dict:
    """The case's backbone, cut block, cached train and test features, and the prefix's FLOPs."""
    torch.manual_seed(settings.seed)
    pretrain = None
    weights = case.weights
    if case.pretrain is not None:
        path, pretrain = pretrained_checkpoint(case.model, case.pretrain, seed=settings.seed, runs_dir=runs_dir)
        weights = str(path)
    torch.manual_seed(settings.seed)
    train = _subset(load_dataset(case.dataset, split="train"), case.train, settings.seed)
    test = _subset(load_dataset(case.dataset, split="test"), case.test, settings.seed)
    base = build_model(case.model, weights=weights, num_classes=train.num_classes)
    start = min(first_block(base, last_conv_names(base, n)) for n in case.layers)
    cached_train, cached_test = _cached_features(case, base, start, weights, train, test, seed=settings.seed,
                                                 runs_dir=runs_dir)
    probe = next(batches(train, batch_size=settings.batch, image_size=case.image_size))[0]
    prefix_flops, _ = count_flops(lambda: prefix_features(base, start, probe))
    print(f"{case.name}: cached {len(train)} + {len(test)} images' features "
          f"{tuple(cached_train.features.shape[1:])} in {cached_train.seconds + cached_test.seconds:.0f} s", flush=True)
    return {"base": base, "start": start, "train": cached_train, "test": cached_test, "pretrain": pretrain,
            "prefix_flops": prefix_flops}


def _step_flops(tail: nn.Module, optimizer, x: Tensor, y: Tensor) -> int:
    flops, _ = count_flops(lambda: _step(tail, optimizer, x, y))
    return flops


def compression_cost(tail: nn.Module, names: Sequence[str], x: Tensor, *, repeats: int) -> dict:
    """ASI's compression (one warm subspace-iteration step, then the core) against HOSVD's, same ranks.

    Runs on the trained layers' real inputs of batch ``x``, with the bases the layers hold after
    training; each variant's ``pack`` is what a training step calls.
    """
    asi, hosvd = get_variant("asi"), get_variant("hosvd")
    layers = []
    for name, inp in layer_inputs(tail, {n: tail.get_submodule(n) for n in names}, x).items():
        layer: ASIConv2d = tail.get_submodule(name)
        ranks = layer.effective_ranks(inp.shape)
        warm = layer.bases()
        row = {"layer": name.removeprefix("model."), "shape": list(inp.shape), "ranks": list(ranks)}
        for label, variant, previous in (("asi", asi, warm), ("hosvd", hosvd, [None] * inp.dim())):
            variant.pack(inp, ranks, previous)  # warm caches and allocator
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                variant.pack(inp, ranks, previous)
                times.append(time.perf_counter() - started)
            row[f"{label}_s"] = statistics.median(times)
            row[f"{label}_flops"], _ = count_flops(lambda: variant.pack(inp, ranks, previous))
        layers.append(row)
    total = {k: sum(r[k] for r in layers) for k in ("asi_s", "hosvd_s", "asi_flops", "hosvd_flops")}
    total["time_ratio"] = total["hosvd_s"] / total["asi_s"]
    total["flop_ratio"] = total["hosvd_flops"] / total["asi_flops"]
    return {"layers": layers, "total": total}


def _ratios(row: dict, vanilla: dict) -> dict:
    keys = ("convs_bytes", "tail_bytes", "tail_flops", "full_flops", "step_s")
    return {key: row[key] / vanilla[key] for key in keys if row.get(key) and vanilla.get(key)}


def _trained_ranks(tail: nn.Module, names: Sequence[str],
                   planned: Mapping[str, Sequence[int] | None]) -> tuple[dict, bool]:
    """Each trained conv's ranks in training (None: kept exact), and whether they are the planned ones.

    A compressed layer caps its ranks at its input's shape (``last_ranks``); the planner plans on
    the same input (after a padding the conv applies itself), so the two agree unless the plan
    was made for another input shape.
    """
    used = {}
    for name in names:
        layer = tail.get_submodule(name)
        last = getattr(layer, "last_ranks", None)
        used[name.removeprefix("model.")] = None if last is None else list(last)
    matches = all(used[n.removeprefix("model.")] == (None if planned.get(n) is None else list(planned[n]))
                  for n in names)
    return used, matches


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _over_seeds(results: Sequence[dict], seeds: Sequence[int]) -> dict:
    """One row's figures from its runs at ``seeds``: the first seed's, with top-1 as mean and spread.

    Bytes do not depend on the seed (the same ranks, the same batch size); the first seed's run
    is also the one timed and counted.
    """
    first = results[0]
    top1, top1_std = _mean_std([r["top1"] for r in results])
    epochs = list(zip(*(r["epoch_top1"] for r in results)))
    return {**{k: v for k, v in first.items() if k != "epoch_top1"}, "top1": top1, "top1_std": top1_std,
            "epoch_top1": [statistics.fmean(e) for e in epochs],
            "epoch_top1_std": [_mean_std(e)[1] for e in epochs],
            "seeds": [{"seed": s, **{k: r[k] for k in ("top1", "epoch_top1", "train_losses", "train_seconds")}}
                      for s, r in zip(seeds, results)]}


def run_group(case: Case, base: nn.Module, layers: int, start: int, train: Cached, test: Cached,
              settings: Settings, prefix_flops: int) -> dict:
    """Every method on one case and one number of trained convs, at every seed."""
    seed, seeds, batch = settings.seed, settings.seeds, settings.batch
    runs = []
    selection_split = None  # (training, validation), carved from the training set when a learning rate is checked

    checked: dict[str, tuple[float, dict]] = {}  # method -> its check, when one budget's check serves every budget

    def choose_lr(method, label, ranks, budget=None):
        """The method's learning rate: the best validation top-1 among its candidates (seed ``seeds[0]``).

        With ``lr_check_budget`` set, a budgeted method is checked once, at the ranks planned for that
        budget, and every budget trains at the rate chosen there.
        """
        nonlocal selection_split
        candidates = case.lr_candidates(method)
        if len(candidates) == 1:
            return candidates[0], None
        shared = settings.lr_check_budget is not None and budget is not None
        if shared and method in checked:
            return checked[method]
        if shared and budget != settings.lr_check_budget:
            check_label = f"1/{1 / settings.lr_check_budget:.0f}"
            planned = make_plan(max(1, int(settings.lr_check_budget * vanilla_bytes)), check_label, method=method)
            if planned is None:
                raise SystemExit(f"error: {case.name}: lr-check-budget {check_label}: the budget is too small to plan")
            ranks, label = planned[0].targets(), f"{method} {check_label}"
        if selection_split is None:
            selection_split = validation_split(train, settings.validation, seed=seed)
        fit, held = selection_split
        checks = []
        for lr in candidates:
            torch.manual_seed(seeds[0])
            tail, names = prepared_tail(base, layers=layers, start=start, method=method, ranks=ranks,
                                        radius=settings.radius)
            result, _, _ = fine_tune(tail, fit, held, layer_names=names, epochs=case.epochs, batch_size=batch,
                                     lr=lr, seed=seeds[0], schedule=settings.schedule)
            checks.append({"lr": lr, "val_top1": result["top1"], "val_epoch_top1": result["epoch_top1"]})
        best = max(checks, key=lambda c: c["val_top1"])  # the first listed wins a tie
        print(f"  {case.name} last {layers}: {label}: learning rate {best['lr']:g} (validation top-1 "
              + ", ".join(f"{c['lr']:g}: {c['val_top1']:.4f}" for c in checks)
              + f"; {len(held)} held-out training examples)", flush=True)
        check = {"validation_examples": len(held), "candidates": checks}
        if shared:
            checked[method] = best["lr"], check | {"budget_fraction": settings.lr_check_budget}
            return checked[method]
        return best["lr"], check

    def train_method(method, label, budget=None, plan=None, ranks=None):
        lr, lr_check = choose_lr(method, label, ranks, budget)
        results, first = [], None
        for s in seeds:
            torch.manual_seed(s)
            tail, names = prepared_tail(base, layers=layers, start=start, method=method, ranks=ranks,
                                        radius=settings.radius)
            result, optimizer, predictions = fine_tune(tail, train, test, layer_names=names, epochs=case.epochs,
                                                       batch_size=batch, lr=lr, seed=s, schedule=settings.schedule)
            results.append(result | {"predictions": predictions})
            if first is None:  # the first seed's tail is the one timed and counted
                first = {"tail": tail, "names": names, "optimizer": optimizer}
        tail, optimizer = first["tail"], first["optimizer"]
        row = {"method": method, "label": label, "budget_fraction": budget,
               **_over_seeds([{k: v for k, v in r.items() if k != "predictions"} for r in results], seeds)}
        if lr_check is not None:
            row["lr_check"] = lr_check
        x, y = train.features[:batch], train.labels[:batch]
        row["tail_flops"] = _step_flops(tail, optimizer, x, y)
        row["full_flops"] = row["tail_flops"] + prefix_flops
        if plan is not None:
            row["plan"] = plan
        if ranks is not None:
            row["ranks"], row["ranks_as_planned"] = _trained_ranks(tail, first["names"], ranks)
            if not row["ranks_as_planned"]:
                print(f"  warning: {case.name} last {layers}: {label}: the compressed layers used ranks "
                      f"{row['ranks']}, not the planned {plan['ranks']}", flush=True)
        runs.append({"row": row, **first, "predictions": [r["predictions"] for r in results]})
        spread = f" ± {row['top1_std']:.4f} over {len(seeds)} seeds" if len(seeds) > 1 else ""
        print(f"  {case.name} last {layers}: {label}: top-1 {row['top1']:.4f}{spread}, convs' bytes "
              f"{row['convs_bytes']}, {sum(r['train_seconds'] for r in results):.1f} s"
              + (f", exact: {plan['exact']}" if plan and plan["exact"] else ""), flush=True)
        return runs[-1]

    wanted = set(settings.methods)
    vanilla = train_method("vanilla", "vanilla")
    # the methods without a budget first: a run stopped half-way still has every reference row
    if "gradfilt" in wanted:
        train_method("gradfilt", f"gradfilt r={settings.radius}")
    if HEAD_ONLY in wanted:
        train_method(HEAD_ONLY, "head only (convs frozen)")
    names = vanilla["names"]
    vanilla_bytes = vanilla["row"]["convs_bytes"]  # choose_lr plans at lr_check_budget from it
    calibration = calibration_batches(train, batch_size=batch, count=settings.calibration_batches, seed=seed)

    def make_plan(budget, label, *, method=ASI_ONLY):
        """``method``'s ranks for ``budget`` on a fresh, untrained tail (None: the budget is too small).

        The paper grid's row plans on its grid; the planner's (``asi``) may keep layers exact; the
        8-bit row plans for its storage's bytes; every plan weighs errors by ``settings.weighting``.
        """
        grid, exact = "paper" if method == ASI_PAPER else "batch-whole", method == PLANNER
        itemsize = get_method(ASI_ONLY if method == ASI_PAPER else method).storage_itemsize
        planning_tail, _ = prepared_tail(base, layers=layers, start=start)
        started = time.perf_counter()
        try:
            plan = plan_ranks(planning_tail, names, calibration, budget, model_name=case.model, grid=grid,
                              exact=exact, storage_itemsize=itemsize, relative=settings.weighting == "relative")
        except BudgetTooSmallError as error:
            print(f"  {case.name} last {layers}: budget {label} of vanilla, {grid} grid: {error}", flush=True)
            return None
        planning_s = time.perf_counter() - started
        return plan, planning_s, {
            "grid": grid, "exact_allowed": exact, "weighting": settings.weighting, "budget_bytes": budget,
            "planned_bytes": plan.total_bytes,
            "planning_seconds": planning_s,
            "eps": {layer.name.removeprefix("model."): layer.eps for layer in plan.layers},
            "whole": {layer.name.removeprefix("model."): list(layer.whole) for layer in plan.layers},
            "exact": [name.removeprefix("model.") for name in plan.exact_layers],
            "ranks": {layer.name.removeprefix("model."): None if layer.exact else list(layer.ranks)
                      for layer in plan.layers}}

    compression = []
    for fraction in settings.budgets:
        budget = max(1, int(fraction * vanilla_bytes))
        label = f"1/{1 / fraction:.0f}"
        reference = fraction in settings.reference_budgets
        if reference and ASI_PAPER in wanted and (paper := make_plan(budget, label, method=ASI_PAPER)):
            train_method(ASI_PAPER, f"asi-only paper grid {label}", fraction, paper[2], paper[0].targets())
        asi = None
        pure = make_plan(budget, label) if ASI_ONLY in wanted else None
        if pure:
            asi = train_method(ASI_ONLY, f"asi-only {label}", fraction, pure[2], pure[0].targets())
        if ASI_INT8 in wanted and (int8 := make_plan(budget, label, method=ASI_INT8)):
            train_method(ASI_INT8, f"asi-int8 {label}", fraction, int8[2], int8[0].targets())
        chosen = make_plan(budget, label, method=PLANNER) if PLANNER in wanted else None
        if chosen and asi and chosen[0].targets() == pure[0].targets() and (
                case.lr_candidates(PLANNER) == case.lr_candidates(ASI_ONLY)):
            # no layer kept exact and the same ranks: method asi then runs exactly what asi-only ran
            # (same layers, seeds, batches and learning rates), so its row is that measurement, marked as such
            runs.append({**asi, "row": {**asi["row"], "method": PLANNER, "label": f"planner (asi) {label}",
                                        "plan": chosen[2], "same_run_as": asi["row"]["label"]}})
            print(f"  {case.name} last {layers}: planner (asi) {label}: the plan of {asi['row']['label']} "
                  f"(no layer exact), so its run", flush=True)
        elif chosen:
            train_method(PLANNER, f"planner (asi) {label}", fraction, chosen[2], chosen[0].targets())
        if pure and reference and "hosvd" in wanted:
            train_method("hosvd", f"hosvd {label}", fraction, pure[2], pure[0].targets())
            compression.append({"budget_fraction": fraction, "planning_seconds": pure[1],
                                **compression_cost(asi["tail"], names, train.features[:batch],
                                                   repeats=settings.compression_repeats)})

    # Step time: methods interleaved step by step on one batch, so that they share the machine's noise.
    x, y = train.features[:batch], train.labels[:batch]
    times: list[list[float]] = [[] for _ in runs]
    for run in runs:
        _step(run["tail"], run["optimizer"], x, y)
    for _ in range(settings.timing_steps):
        for i, run in enumerate(runs):
            started = time.perf_counter()
            _step(run["tail"], run["optimizer"], x, y)
            times[i].append(time.perf_counter() - started)
    for run, measured in zip(runs, times):
        run["row"]["step_s"] = statistics.median(measured)
    base_row = runs[0]["row"]
    rows = []
    for run in runs:
        row = run["row"]
        row["ratios"] = _ratios(row, base_row)
        paired = [paired_difference(ref, other, test.labels)
                  for ref, other in zip(runs[0]["predictions"], run["predictions"])]
        if len(paired) == 1:  # one seed: the paired standard error on the test images
            row["delta_pp"], row["delta_se_pp"] = 100 * paired[0][0], 100 * paired[0][1]
        else:  # several: the mean over seeds and its standard error over seeds
            mean, std = _mean_std([100 * d for d, _ in paired])
            row["delta_pp"], row["delta_se_pp"], row["delta_std_pp"] = mean, std / len(paired) ** 0.5, std
            for entry, (d, se) in zip(row["seeds"], paired):
                entry["delta_pp"], entry["delta_se_pp"] = 100 * d, 100 * se
        rows.append(row)
    return {"case": case.name, "title": case.title, "model": case.model, "dataset": case.dataset, "layers": layers,
            "trained": [n.removeprefix("model.") for n in names], "image_size": case.image_size, "batch": batch,
            "train": len(train), "test": len(test), "epochs": case.epochs, "seeds": list(seeds), "rows": rows,
            "compression": compression, "pareto": pareto_check({"rows": rows})}


def estimate(case: Case, settings: Settings, data: dict, *, steps: int = 3) -> dict:
    """How long the case's training will take: runs and steps counted, vanilla's step timed now.

    Each method's step is taken as a fixed multiple of vanilla's (``ESTIMATE_STEP_FACTORS``);
    planning, evaluation and the step-time and compression measurements are not counted. The
    planner's rows are counted as runs of their own (``high``) or as asi-only's (``low``: where a
    plan keeps no layer exact, which is known only once it is made).
    """
    train, batch = data["train"], settings.batch
    steps_per_epoch = len(train) // batch
    held = max(1, round(settings.validation * len(train)))  # as validation_split carves it
    check_steps = (len(train) - held) // batch
    wanted = set(settings.methods)
    shared = ASI_ONLY in wanted and case.lr_candidates(PLANNER) == case.lr_candidates(ASI_ONLY)
    vanilla_step_s, totals = {}, {"runs": 0, "steps": 0, "low": 0.0, "high": 0.0}
    for layers in case.layers:
        tail, _ = prepared_tail(data["base"], layers=layers, start=data["start"])
        optimizer = make_optimizer(tail, lr=case.lr)
        x, y = train.features[:batch], train.labels[:batch]
        _step(tail, optimizer, x, y)
        times = []
        for _ in range(steps):
            started = time.perf_counter()
            _step(tail, optimizer, x, y)
            times.append(time.perf_counter() - started)
        vanilla_step_s[layers] = step_s = statistics.median(times)
        methods = [(m, None) for m in ("vanilla", "gradfilt", HEAD_ONLY) if m == "vanilla" or m in wanted]
        for fraction in settings.budgets:
            methods += [(m, fraction) for m in (ASI_ONLY, ASI_INT8, PLANNER) if m in wanted]
            if fraction in settings.reference_budgets:
                methods += [(m, fraction) for m in (ASI_PAPER, "hosvd") if m in wanted]
        for method, fraction in methods:
            checks = len(case.lr_candidates(method))
            if checks == 1 or (settings.lr_check_budget is not None and fraction is not None
                               and fraction != settings.lr_check_budget):
                checks = 0  # no check, or the one made at lr_check_budget
            method_steps = case.epochs * (steps_per_epoch * len(settings.seeds) + check_steps * checks)
            seconds = method_steps * step_s * ESTIMATE_STEP_FACTORS[method]
            totals["runs"] += len(settings.seeds) + checks
            totals["steps"] += method_steps
            totals["high"] += seconds
            totals["low"] += 0.0 if method == PLANNER and shared else seconds
    return {**totals, "vanilla_step_s": vanilla_step_s}


def render_estimate(case: Case, est: dict) -> str:
    steps = ", ".join(f"{s * 1e3:.0f} ms (last {n})" for n, s in est["vanilla_step_s"].items())
    span = (f"{est['low'] / 60:.0f}-{est['high'] / 60:.0f}" if round(est["low"] / 60) != round(est["high"] / 60)
            else f"{est['high'] / 60:.0f}")
    return (f"{case.name}: estimated training time ~{span} min (the low end if the planner keeps no layer exact "
            f"and so reuses asi-only's runs): up to {est['runs']} training runs, {est['steps']} steps; vanilla's "
            f"step measured now: {steps}; other methods' steps taken as "
            f"{', '.join(f'{m} {f:g}x' for m, f in ESTIMATE_STEP_FACTORS.items() if m != 'vanilla')} of it "
            f"(planning, evaluation and the timing runs not included)")


def run_case(case: Case, settings: Settings, *, runs_dir: Path = RUNS_DIR) -> dict:
    data = case_data(case, settings, runs_dir=runs_dir)
    print(render_estimate(case, estimate(case, settings, data)), flush=True)
    train, test, start = data["train"], data["test"], data["start"]
    groups = [run_group(case, data["base"], n, start, train, test, settings, data["prefix_flops"])
              for n in case.layers]
    return {"case": case.name, "title": case.title, "pretrain": data["pretrain"], "cut_block": start,
            "feature_shape": list(train.features.shape[1:]),
            "caching_seconds": train.seconds + test.seconds, "prefix_flops": data["prefix_flops"],
            "groups": groups}
