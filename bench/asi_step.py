"""Benchmark: ASI's training step at the ranks the planner gives, against vanilla's, in one run.

The accuracy benchmark's fine-tuned tails (``bench.accuracy.train.prepared_tail``: the model from the
block holding the first trained conv on, over the frozen prefix's features, batch 32, frozen
BatchNorm and ReLU swapped for companions that save no input), with the planner's ranks listed in
``configs/bench/asi_step.yaml``. For each case, number of trained convs and rank row:

- tail step time (forward, backward, Adam step) as a ratio to vanilla's, methods interleaved step
  by step so they share the machine's noise (median of ``steps``);
- tail training FLOPs of one step (``FlopCounterMode``, QR/eigh counted), ratio to vanilla's;
- the compression alone, per step, summed over the trained convs: HOSVD's ``pack`` against ASI's
  (warm bases, after the timed steps), each variant's own code on the layers' real inputs.

Run: ``python -m bench.asi_step`` (``--help``). The features come from random images through the
frozen prefix: time and FLOPs depend on shapes, not on what the pixels show.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn

from bench.accuracy.train import prepared_tail
from bench.settings import check_keys, read_settings
from bench.tail import first_block, layer_inputs, prefix_features
from odl_fed.asi import ASIConv2d, get_variant, last_conv_names
from odl_fed.training.flops import count_flops
from odl_fed.training.models import build_model
from odl_fed.training.task import train_step

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "bench" / "asi_step.yaml"
CONFIG_KEYS = ("threads", "batch", "steps", "warmup", "compression-repeats", "seed", "cases")
CASE_KEYS = ("model", "weights", "image-size", "groups")
LEARNING_RATE = 1e-5  # Adam's rate while timing: small, so the weights barely move


def _optimizer(tail: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam([p for p in tail.parameters() if p.requires_grad], lr=LEARNING_RATE)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # caches and allocator
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def compression_seconds(tail: nn.Module, names: Sequence[str], x: Tensor, *, repeats: int) -> dict:
    """Per compressed conv: the layer's own warm ``pack`` (ASI's, in its storage) and HOSVD's, at the
    layer's ranks, on its real input."""
    hosvd = get_variant("hosvd")
    layers = []
    compressed = {n: tail.get_submodule(n) for n in names if isinstance(tail.get_submodule(n), ASIConv2d)}
    for name, inp in layer_inputs(tail, compressed, x).items():
        layer: ASIConv2d = tail.get_submodule(name)
        asi = layer.variant
        ranks = layer.effective_ranks(inp.shape)
        warm = layer.bases()
        # the contraction order the layer caches for its shape (the code before that cache has none;
        # this lets the benchmark measure it too)
        orders = getattr(layer, "contraction_orders", None)
        kwargs = {"core_order": orders(inp.shape, ranks).core} if orders else {}
        layers.append({
            "layer": name.removeprefix("model."), "shape": list(inp.shape), "ranks": list(ranks),
            "asi_s": _median_seconds(lambda: asi.pack(inp, ranks, warm, **kwargs), repeats),
            "hosvd_s": _median_seconds(lambda: hosvd.pack(inp, ranks, [None] * inp.dim(), **kwargs), repeats),
        })
    return {"layers": layers, "asi_s": sum(r["asi_s"] for r in layers), "hosvd_s": sum(r["hosvd_s"] for r in layers)}


def run_group(base: nn.Module, start: int, layers: int, rows: Mapping[str, Sequence], x: Tensor, y: Tensor, *,
              steps: int, warmup: int, repeats: int) -> dict:
    """Vanilla and every rank row of one case and number of trained convs."""
    runs = []
    for label, row in [("vanilla", None), *rows.items()]:
        method, ranks = row_method(row)
        tail, names = prepared_tail(base, layers=layers, start=start, method=method,
                                    ranks=None if ranks is None else dict(zip(names_of(base, layers), ranks)))
        runs.append({"label": label, "method": method, "ranks": ranks, "tail": tail, "names": names,
                     "optimizer": _optimizer(tail)})
    for run in runs:
        for _ in range(warmup):
            train_step(run["tail"], x, y, optimizer=run["optimizer"])
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(steps):
        for i, run in enumerate(runs):
            started = time.perf_counter()
            train_step(run["tail"], x, y, optimizer=run["optimizer"])
            times[i].append(time.perf_counter() - started)
    out = []
    for run, measured in zip(runs, times):
        row = {"label": run["label"], "method": run["method"], "ranks": run["ranks"],
               "step_s": statistics.median(measured),
               "step_s_all": measured,
               "flops": count_flops(lambda: train_step(run["tail"], x, y, optimizer=run["optimizer"]))[0]}
        if run["ranks"] is not None:
            row["compression"] = compression_seconds(run["tail"], run["names"], x, repeats=repeats)
        out.append(row)
    vanilla = out[0]
    for row in out:
        row["step_ratio"] = row["step_s"] / vanilla["step_s"]
        row["flop_ratio"] = row["flops"] / vanilla["flops"]
        if "compression" in row:
            row["hosvd_over_asi"] = row["compression"]["hosvd_s"] / row["compression"]["asi_s"]
    return {"layers": layers, "trained": [n.removeprefix("model.") for n in runs[0]["names"]], "rows": out}


def row_method(row: Sequence | Mapping | None) -> tuple[str, Sequence | None]:
    """A config row's method and ranks: a list of ranks is ``asi``;
    ``{method: asi-int8, ranks: [...]}`` names its own."""
    if row is None:
        return "vanilla", None
    if isinstance(row, Mapping):
        return row.get("method", "asi"), row["ranks"]
    return "asi", row


def names_of(base: nn.Module, layers: int) -> list[str]:
    """The trained convs' names within a tail (``model.<name>``), in the config's rank order."""
    return [f"model.{name}" for name in last_conv_names(base, layers)]


def run_case(name: str, case: Mapping, settings: Mapping) -> dict:
    torch.manual_seed(settings["seed"])
    base = build_model(case["model"], weights=case["weights"], num_classes=10)
    groups = {int(n): rows for n, rows in case["groups"].items()}
    start = min(first_block(base, last_conv_names(base, n)) for n in groups)
    images = torch.randn(settings["batch"], 3, case["image-size"], case["image-size"])
    x = prefix_features(base, start, images)
    y = torch.randint(0, 10, (settings["batch"],))
    result = {"case": name, "model": case["model"], "weights": case["weights"], "image_size": case["image-size"],
              "features": list(x.shape), "groups": []}
    for layers, rows in groups.items():
        for label, row in rows.items():
            ranks = row_method(row)[1]
            if len(ranks) != layers:
                raise SystemExit(f"error: {name}, {layers} convs, {label!r}: "
                                 f"{len(ranks)} rank lists for {layers} convs")
        group = run_group(base, start, layers, rows, x, y, steps=settings["steps"], warmup=settings["warmup"],
                          repeats=settings["compression-repeats"])
        print(render_group(name, group), flush=True)
        result["groups"].append(group)
    return result


def render_group(case: str, group: dict) -> str:
    lines = [f"**{case}, last {group['layers']} convs {group['trained']}**", "",
             "| ranks | tail step | vs vanilla | tail FLOPs | vs vanilla | ASI compression | HOSVD compression "
             "| HOSVD / ASI |", "|---|---|---|---|---|---|---|---|"]
    for row in group["rows"]:
        ranks = "-" if row["ranks"] is None else "; ".join(
            "exact" if r is None else "x".join(map(str, r)) for r in row["ranks"])
        comp = row.get("compression")
        tail = (f"{comp['asi_s'] * 1e3:.2f} ms | {comp['hosvd_s'] * 1e3:.1f} ms | {row['hosvd_over_asi']:.0f}x"
                if comp else "- | - | -")
        lines.append(f"| {row['label']}: {ranks} | {row['step_s'] * 1e3:.0f} ms | {row['step_ratio']:.2f}x "
                     f"| {row['flops'] / 1e9:.3f} G | {row['flop_ratio']:.2f}x | {tail} |")
    return "\n".join(lines) + "\n"


def load_config(path: Path) -> dict:
    config = read_settings(path)
    check_keys(str(path), config, CONFIG_KEYS)
    for name, case in config.get("cases", {}).items():
        check_keys(f"{path}: cases.{name}", case, CASE_KEYS)
    return config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML settings (flags override)")
    parser.add_argument("--cases", help="comma-separated case names from the config (default: all)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "asi_step.json")
    args = parser.parse_args(argv)
    settings = load_config(args.config)
    for key in ("steps", "threads"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    missing = [k for k in CONFIG_KEYS if k not in settings]
    if missing:
        parser.error(f"{args.config}: missing setting(s) {missing}")
    cases = settings["cases"]
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in wanted if c not in cases]
        if unknown:
            parser.error(f"unknown case(s) {unknown}; choose from {sorted(cases)}")
        cases = {c: cases[c] for c in wanted}

    torch.set_num_threads(settings["threads"])
    started = time.perf_counter()
    results = [run_case(name, case, settings) for name, case in cases.items()]
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__, "machine": platform.machine(),
            "python": platform.python_version(), "settings": {k: v for k, v in settings.items() if k != "cases"},
            "wall_seconds": time.perf_counter() - started, "load_average": list(_load_average())}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    print(f"wrote {args.out} (load average during the run: {meta['load_average']})")


def _load_average() -> tuple[float, ...]:
    try:
        import os

        return os.getloadavg()
    except (AttributeError, OSError):
        return ()


if __name__ == "__main__":
    main()
