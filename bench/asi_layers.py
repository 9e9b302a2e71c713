"""Benchmark: ASI against vanilla backprop on the last convs of torchvision CNNs, in one run.

For each model, the last N convs are fine-tuned (everything else frozen, BatchNorm in eval) at
one batch size, with vanilla layers and with ASI at a few uniform ranks (and HOSVD at one rank,
for the compression's cost). Every figure is measured in this run, and each is also printed as a
ratio to vanilla measured in the same run:

- bytes saved for backward (``saved_tensors_hooks``): by the trained convs, by the fine-tuned
  part (convs, BatchNorm, activations), by everything up to the loss; and the Tucker-form limit;
- training FLOPs, forward + backward (``FlopCounterMode``; QR/eigh/SVD counted too);
- median step time of the full step and of the fine-tuned part alone (frozen features computed
  once), methods interleaved step by step so they share the machine's noise;
- where ASI's compression time goes: the layer's own compression timed, split by the
  ``odl_fed.asi`` function each operator ran in (products, QR, core: the library's names).

Run: ``python -m bench.asi_layers`` (settings in ``configs/bench/asi_layers.yaml``; ``--help``).
Weights are random (no download): memory, FLOPs and time do not depend on them.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from bench.settings import check_keys, read_settings
from bench.tail import Tail, block_sequence, first_block, layer_inputs, prefix_features
from odl_fed.asi import ASIConv2d, freeze_except, inject_asi, last_conv_names, tucker_numel
from odl_fed.training.flops import count_flops
from odl_fed.training.saved_memory import SavedTensorMeter


@dataclass(frozen=True)
class ModelCase:
    name: str
    layers: int  # the last convs fine-tuned; the part is the model from the block holding the first of them

    def build(self) -> nn.Module:
        return torchvision.models.get_model(self.name, weights=None, num_classes=10)

    def start(self, model: nn.Module) -> int:
        """The first block of the fine-tuned part."""
        return first_block(model, last_conv_names(model, self.layers))

    def part(self, model: nn.Module) -> Tail:
        """The fine-tuned part (blocks, pool, head), sharing the model's modules, run from its input."""
        return Tail(model, self.start(model))

    def prefix(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The frozen features entering the fine-tuned part (run once, without grad)."""
        return prefix_features(model, self.start(model), x)


CASES = {
    "mobilenet_v2": ModelCase("mobilenet_v2", 4),  # features.17 and .18
    "resnet18": ModelCase("resnet18", 2),  # layer4.1
}


def _method_model(case: ModelCase, base: nn.Module, method: str, rank: int | None):
    model = copy.deepcopy(base)
    trained = last_conv_names(model, case.layers)
    if method != "vanilla":
        inject_asi(model, {name: (rank,) * 4 for name in trained}, variant=method)
    freeze_except(model, trained)
    return model.eval(), trained


def _part_modules(case: ModelCase, model: nn.Module) -> dict[str, nn.Module]:
    """Leaf modules of the fine-tuned blocks (convs, BatchNorm, activations), by qualified name."""
    leaves = {}
    for block, _ in block_sequence(model)[case.start(model):]:
        for name, module in model.get_submodule(block).named_modules():
            if not list(module.children()) or isinstance(module, ASIConv2d):
                leaves[f"{block}.{name}"] = module
    return {n: m for n, m in leaves.items() if not n.endswith(".base_layer")}


def _step(module: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, params) -> None:
    for p in params:
        p.grad = None
    F.cross_entropy(module(inputs), labels).backward()


def _measure_memory(case, model, trained, features, labels):
    part = case.part(model)
    modules = _part_modules(case, model)
    shapes = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: shapes.__setitem__(n, tuple(a[0].shape))) for n in trained]
    with SavedTensorMeter(exclude=model.parameters(), modules=modules) as meter:
        loss = F.cross_entropy(part(features), labels)
    for h in handles:
        h.remove()
    loss.backward()
    limit = 0
    for name in trained:
        layer = model.get_submodule(name)
        if isinstance(layer, ASIConv2d):
            limit += tucker_numel(shapes[name], layer.last_ranks) * features.element_size()
    return {
        "convs_bytes": meter.nbytes_of(trained),
        "part_bytes": meter.nbytes_of(modules),
        "to_loss_bytes": meter.nbytes,
        "tucker_limit_bytes": limit or None,
        "input_shapes": {n: list(s) for n, s in shapes.items()},
        "ranks": {n: list(model.get_submodule(n).last_ranks) for n in trained
                  if isinstance(model.get_submodule(n), ASIConv2d)},
    }


def _weight_grad_errors(case, base, model, trained, features, labels):
    """Relative dW error of each trained layer against vanilla on the same batch (after warm-up)."""
    vanilla, _ = _method_model(case, base, "vanilla", None)
    _step(case.part(vanilla), features, labels, [])
    _step(case.part(model), features, labels, [])
    errors = {}
    for name in trained:
        got = model.get_submodule(name).weight.grad
        want = vanilla.get_submodule(name).weight.grad
        errors[name] = ((got - want).norm() / want.norm()).item()
    return errors


LIBRARY = "odl_fed/asi/"  # source files whose functions a compression's time is split by


def _compression_split(layer: ASIConv2d, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """The layer's own compression of ``x`` (``layer.variant.pack``, what a training step calls), timed.

    The median time of ``repeats`` calls is split by the ``odl_fed.asi`` function each operator
    ran in (innermost; ``torch.profiler`` with Python stacks, over ``repeats`` more calls), so the
    pieces are named by the library's own functions and add up to the measured time. The layer's
    state is untouched: its bases are passed in, as the layer does, and the new ones dropped.
    """
    ranks, bases = layer.effective_ranks(x.shape), layer.bases()
    layer.variant.pack(x, ranks, bases)  # warm caches and allocator
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        layer.variant.pack(x, ranks, bases)
        times.append(time.perf_counter() - t0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_stack=True) as prof:
        for _ in range(repeats):
            layer.variant.pack(x, ranks, bases)
    spent: dict[str, float] = {}
    for event in prof.events():
        parent = event.cpu_parent
        if not event.name.startswith("aten::") or (parent is not None and parent.name.startswith("aten::")):
            continue  # only operators called from Python, each once
        while parent is not None and (LIBRARY not in parent.name or parent.name.endswith(">")):
            parent = parent.cpu_parent  # up to a named library function (not a comprehension)
        name = parent.name.rsplit(": ", 1)[-1] if parent is not None else "other"
        spent[name] = spent.get(name, 0.0) + event.cpu_time_total
    total, profiled = statistics.median(times), sum(spent.values())
    return {name: total * t / profiled for name, t in spent.items()}


def run_case(case: ModelCase, *, batch: int, size: int, ranks: list[int], hosvd_rank: int | None,
             steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    base = case.build().eval()
    images = torch.randn(batch, 3, size, size)
    labels = torch.randint(0, 10, (batch,))
    features = case.prefix(base, images)
    methods = [("vanilla", None)] + [("asi", r) for r in ranks] + ([("hosvd", hosvd_rank)] if hosvd_rank else [])
    rows = []
    for method, rank in methods:
        model, trained = _method_model(case, base, method, rank)
        params = [p for p in model.parameters() if p.requires_grad]
        part = case.part(model)
        for _ in range(warmup):  # warm bases, allocator and caches
            _step(part, features, labels, params)
        row = {"method": method, "rank": rank, "label": method if rank is None else f"{method} r={rank}"}
        row.update(_measure_memory(case, model, trained, features, labels))
        row["part_flops"], row["part_flops_by_op"] = count_flops(lambda: _step(part, features, labels, params))
        row["full_flops"], _ = count_flops(lambda: _step(model, images, labels, params))
        if method != "vanilla":
            row["dw_rel_error"] = _weight_grad_errors(case, base, model, trained, features, labels)
        rows.append({"row": row, "model": model, "part": part, "params": params, "trained": trained})

    # Interleave the methods step by step so that they share the machine's noise.
    part_times = {i: [] for i in range(len(rows))}
    full_times = {i: [] for i in range(len(rows))}
    for _ in range(steps):
        for i, r in enumerate(rows):
            t0 = time.perf_counter()
            _step(r["part"], features, labels, r["params"])
            part_times[i].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _step(r["model"], images, labels, r["params"])
            full_times[i].append(time.perf_counter() - t0)
    for i, r in enumerate(rows):
        r["row"]["part_step_s"] = statistics.median(part_times[i])
        r["row"]["full_step_s"] = statistics.median(full_times[i])

    for r in rows:
        row = r["row"]
        if row["method"] != "asi":
            continue
        inputs = layer_inputs(r["part"], {n: r["model"].get_submodule(n) for n in r["trained"]}, features)
        split: dict[str, float] = {}
        for name, x in inputs.items():
            pieces = _compression_split(r["model"].get_submodule(name), x, repeats=max(3, steps // 2))
            for k, v in pieces.items():
                split[k] = split.get(k, 0.0) + v
        row["compression_s"] = split

    vanilla = rows[0]["row"]
    for r in rows:
        row = r["row"]
        row["ratios"] = {
            key: (row[key] / vanilla[key]) if row.get(key) and vanilla.get(key) else None
            for key in ("convs_bytes", "part_bytes", "to_loss_bytes", "part_flops", "full_flops",
                        "part_step_s", "full_step_s")
        }
        if row.get("tucker_limit_bytes"):
            row["ratios"]["convs_bytes_over_tucker_limit"] = row["convs_bytes"] / row["tucker_limit_bytes"]
    return {"model": case.name, "trained": rows[0]["trained"], "batch": batch, "image_size": size,
            "rows": [r["row"] for r in rows]}


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def render_table(result: dict) -> str:
    """A markdown table: each figure and, in brackets, its ratio to vanilla."""
    lines = [
        f"{result['model']}, last {len(result['trained'])} convs, batch {result['batch']}, "
        f"{result['image_size']}x{result['image_size']}",
        "",
        "| method | convs' saved bytes | /Tucker limit | fine-tuned part's saved bytes | to the loss | "
        "part train FLOPs | part step | full step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        r = row["ratios"]

        def both(value, ratio, fmt):
            return fmt(value) if row["method"] == "vanilla" else f"{fmt(value)} ({ratio:.4g}x)"

        lines.append(
            f"| {row['label']} "
            f"| {both(row['convs_bytes'], r['convs_bytes'], _fmt_bytes)} "
            f"| {r.get('convs_bytes_over_tucker_limit', float('nan')):.3f} "
            f"| {both(row['part_bytes'], r['part_bytes'], _fmt_bytes)} "
            f"| {both(row['to_loss_bytes'], r['to_loss_bytes'], _fmt_bytes)} "
            f"| {both(row['part_flops'], r['part_flops'], lambda v: f'{v / 1e9:.3f} G')} "
            f"| {both(row['part_step_s'], r['part_step_s'], lambda v: f'{v * 1e3:.1f} ms')} "
            f"| {both(row['full_step_s'], r['full_step_s'], lambda v: f'{v * 1e3:.1f} ms')} |"
        )
    splits = [(row["label"], row["compression_s"]) for row in result["rows"] if "compression_s" in row]
    if splits:
        lines += ["", "ASI compression time per step, summed over the trained layers (ms):", ""]
        for label, split in splits:
            total = sum(split.values())
            pieces = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in sorted(split.items(), key=lambda kv: -kv[1]))
            lines.append(f"- {label}: {total * 1e3:.2f} in all: {pieces}")
    return "\n".join(lines)


DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bench" / "asi_layers.yaml"
CONFIG_KEYS = ("models", "batch", "image-size", "ranks", "hosvd-rank", "steps", "warmup", "threads")


def load_config(path: Path) -> dict:
    """The benchmark's YAML settings; an unknown key is an error naming the file and the key."""
    config = read_settings(path)
    check_keys(str(path), config, CONFIG_KEYS)
    return config


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML settings (flags override)")
    parser.add_argument("--models", help=f"comma-separated, from {sorted(CASES)}")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--ranks", help="uniform ASI ranks to compare, comma-separated")
    parser.add_argument("--hosvd-rank", type=int, help="HOSVD at this rank too (0: skip)")
    parser.add_argument("--steps", type=int, help="timed steps per method")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, default=Path("bench/results/asi_layers.json"))
    args = parser.parse_args(argv)
    settings = load_config(args.config)
    for key in CONFIG_KEYS:
        flag = getattr(args, key.replace("-", "_"))
        if flag is not None:
            settings[key] = flag
    missing = [k for k in CONFIG_KEYS if k not in settings]
    if missing:
        parser.error(f"{args.config}: missing setting(s) {missing}")
    names = settings["models"]
    names = [m.strip() for m in names.split(",") if m.strip()] if isinstance(names, str) else list(names)
    ranks = settings["ranks"]
    ranks = [int(r) for r in ranks.split(",") if r.strip()] if isinstance(ranks, str) else [int(r) for r in ranks]
    unknown = [m for m in names if m not in CASES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(CASES)}")

    torch.set_num_threads(settings["threads"])
    results = []
    for name in names:
        result = run_case(CASES[name], batch=settings["batch"], size=settings["image-size"], ranks=ranks,
                          hosvd_rank=settings["hosvd-rank"] or None, steps=settings["steps"],
                          warmup=settings["warmup"])
        print(render_table(result), flush=True)
        print(flush=True)
        results.append(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__, "machine": platform.machine(),
            "python": platform.python_version(), "settings": settings}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
