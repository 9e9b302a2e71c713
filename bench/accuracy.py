"""Benchmark: top-1 against activation memory on real data, ASI vs vanilla, HOSVD and gradient filtering.

Transfer cases, each fine-tuning the last 2 and the last 4 convs plus the head (everything else
frozen, BatchNorm in eval), all in one run:

- EfficientNet-Lite0 with its packaged ImageNet weights, on Fashion-MNIST;
- MobileNetV2 pretrained here on Fashion-MNIST (``odl-fed pretrain``'s code path; the checkpoint
  is cached under ``runs/``), on the 5,000 real MNIST digits.

Methods: vanilla backprop; pure ASI (``asi-only``) with ranks planned by ``plan_ranks`` under
budgets given as fractions of vanilla's measured activation bytes (default grid, and the paper's
grid at the reference budgets); the planner's choice at the same budgets (``plan_ranks(...,
exact=True)`` trained with method ``asi``: layers stay exact where the budget allows, the rest
hold ASI at planned ranks); HOSVD at ``asi-only``'s ranks (reference budgets only: its steps are
most of the run's time); gradient filtering (r x r patches); head only. Per run: top-1, the bytes the trained convs save for backward
(measured with ``saved_tensors_hooks``), training FLOPs of a step (forward + backward), step time;
each also as a ratio to vanilla from the same run (step times interleaved across methods so
they share the machine's noise). Besides: ASI's compression against HOSVD's at the same ranks
(time and FLOPs per step, on the trained layers' real inputs) and the time to plan ranks; and, for
each case and budget, whether the planner's row is on the Pareto front of every method's rows
(top-1 against the convs' saved bytes, within 0.5 pp: :func:`pareto_check`).

Speed on a CPU: the frozen prefix runs once per image (:func:`cache_features`), and every
method trains the fine-tuned tail over those cached features (:class:`Tail`).

Run: ``python -m bench.accuracy`` (settings in ``configs/bench/accuracy.yaml``; ``--quick`` for a
small version; ``--help``). On a crowded machine, parts can run side by side (``--cases``,
``--layers``, each with its own ``--out``) and be joined by ``--merge`` into one report.
"""

from __future__ import annotations

# ruff: noqa: E402
import os

# OpenMP threads that spin at barriers stall LAPACK calls (eigh, QR) by up to 100x on a 2-core
# machine while another process runs (measured here: an eigh of 1152 x 1152 in 18 s instead of
# 0.2 s); passive waiting keeps the timings sane. Read once, when torch loads: set it first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import contextlib
import copy
import json
import platform
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from bench.settings import check_keys, read_settings
from odl_fed.asi import ASIConv2d, get_variant, last_conv_names
from odl_fed.data import ImageData, batches, load_dataset
from odl_fed.flops import count_flops
from odl_fed.models import build_model, prepare_finetune
from odl_fed.plan import BudgetTooSmallError, plan_ranks
from odl_fed.saved_memory import SavedTensorMeter
from odl_fed.task import apply_method

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "bench" / "accuracy.yaml"
RUNS_DIR = ROOT / "runs" / "bench-accuracy"
EQUIVALENCE_TOLERANCE = 1e-4  # cached-feature logits against the full model's, relative
CACHE_BATCH = 64
HEAD_ONLY = "head-only"
ASI_ONLY = "asi-only"  # pure ASI on every trained conv, at ranks planned on the default grid
ASI_PAPER = "asi-paper-grid"  # pure ASI with ranks planned on the paper's grid (one threshold for every mode)
PLANNER = "asi"  # the planner's choice: plan_ranks(exact=True), layers kept exact where the budget allows
PARETO_TOLERANCE_PP = 0.5  # the planner's row may trail a row with no more bytes by this much
EVAL_BATCH = 256


# ---------------------------------------------------------------------------------------------
# The fine-tuned tail over cached features


def _efficientnet_class():
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return None
    return EfficientNet


def block_sequence(model: nn.Module) -> tuple[str, Sequence[nn.Module]]:
    """The model's chain of blocks (qualified name of their container, the blocks).

    Each block takes one tensor, the previous block's output, so the input of a block is all
    that the rest of the model needs.
    """
    if isinstance(model, torchvision.models.MobileNetV2):
        return "features", model.features
    efficientnet = _efficientnet_class()
    if efficientnet is not None and isinstance(model, efficientnet):
        return "_blocks", model._blocks
    if isinstance(model, nn.Sequential):
        return "", model
    raise TypeError(f"cached features support MobileNetV2, EfficientNet and nn.Sequential models, "
                    f"but got {type(model).__name__}")


def first_block(model: nn.Module, layer_names: Sequence[str]) -> int:
    """Index of the block holding the earliest of ``layer_names`` (len(blocks): after the last block)."""
    container, blocks = block_sequence(model)
    prefix = f"{container}." if container else ""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    earliest = min(layer_names, key=order.__getitem__)
    if not earliest.startswith(prefix):
        return len(blocks)  # a layer after the blocks (EfficientNet's _conv_head)
    return int(earliest[len(prefix):].split(".")[0])


def run_from(model: nn.Module, start: int, x: Tensor) -> Tensor:
    """``model``'s forward from block ``start`` on, ``x`` being that block's input.

    Modules are looked up at call time, so layers swapped in after this is set up are used.
    """
    _, blocks = block_sequence(model)
    if isinstance(model, torchvision.models.MobileNetV2):
        for block in list(model.features)[start:]:
            x = block(x)
        return model.classifier(torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1))
    if isinstance(model, nn.Sequential):
        for layer in list(model)[start:]:
            x = layer(x)
        return x
    rate = model._global_params.drop_connect_rate  # EfficientNet: its extract_features, then its head
    for index in range(start, len(blocks)):
        x = blocks[index](x, drop_connect_rate=rate * index / len(blocks) if rate else rate)
    x = model._swish(model._bn1(model._conv_head(x)))
    return model._fc(model._dropout(model._avg_pooling(x).flatten(1)))


class Tail(nn.Module):
    """``model`` from block ``start`` on: ``Tail(model, start)(features)`` is ``model(images)``.

    ``features`` is the input of block ``start`` computed from ``images`` (:func:`cache_features`).
    With the prefix frozen, BatchNorm and dropout in eval mode and no augmentation, the prefix is
    a fixed function of each image, so computing it once and reusing it across epochs and
    methods changes no number; :func:`cache_features` checks this on a batch. The model is a
    submodule, so its layers are named ``model.<name>`` here.
    """

    def __init__(self, model: nn.Module, start: int):
        super().__init__()
        self.model = model
        self.start = start

    def forward(self, features: Tensor) -> Tensor:
        return run_from(self.model, self.start, features)


class _Stop(Exception):
    pass


def _prefix(model: nn.Module, start: int, images: Tensor) -> Tensor:
    """The input of block ``start`` (the frozen prefix's output), without grad."""
    _, blocks = block_sequence(model)
    stop_at = blocks[start] if start < len(blocks) else model._conv_head
    captured = {}

    def hook(module, args):
        captured["x"] = args[0]
        raise _Stop

    handle = stop_at.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(images)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["x"].contiguous()


@dataclass(frozen=True)
class Cached:
    """Features entering the fine-tuned tail, one row per image, with the labels."""

    features: Tensor
    labels: Tensor
    seconds: float

    def __len__(self) -> int:
        return self.labels.numel()


def cache_features(model: nn.Module, start: int, data: ImageData, *, image_size: int,
                   batch_size: int = CACHE_BATCH) -> Cached:
    """Run the frozen prefix once per image; check on the first batch that the tail gives the model's logits."""
    model.eval()
    features, started = [], time.perf_counter()
    for x, _ in batches(data, batch_size=batch_size, image_size=image_size):
        cut = _prefix(model, start, x)
        if not features:
            with torch.no_grad():
                want, got = model(x), run_from(model, start, cut)
            error = ((got - want).norm() / want.norm()).item()
            if error > EQUIVALENCE_TOLERANCE:
                raise RuntimeError(f"the tail from block {start} of {type(model).__name__} does not reproduce the "
                                   f"model's logits (relative error {error:.2e}); cached features would be wrong")
        features.append(cut)
    return Cached(torch.cat(features), data.labels.clone(), time.perf_counter() - started)


# ---------------------------------------------------------------------------------------------
# Training over cached features


def _minibatches(data: Cached, batch_size: int, generator: torch.Generator):
    order = torch.randperm(len(data), generator=generator)
    for start in range(0, len(order) - batch_size + 1, batch_size):  # fixed batch: ASI keeps warm bases
        index = order[start:start + batch_size]
        yield data.features[index], data.labels[index]


def calibration_batches(data: Cached, *, batch_size: int, count: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    batches_ = _minibatches(data, batch_size, torch.Generator().manual_seed(seed))
    return [b for _, b in zip(range(count), batches_)]


def train_step(tail: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
               meter: SavedTensorMeter | None = None) -> Tensor:
    """One training step; with a ``meter``, what its forward saves for backward is counted."""
    optimizer.zero_grad(set_to_none=True)
    with meter or contextlib.nullcontext():
        loss = F.cross_entropy(tail(x), y)
    loss.backward()
    optimizer.step()
    return loss.detach()


@torch.no_grad()
def predict(tail: nn.Module, data: Cached) -> Tensor:
    """Predicted class of every example (nothing is compressed under no_grad)."""
    return torch.cat([tail(data.features[start:start + EVAL_BATCH]).argmax(-1)
                      for start in range(0, len(data), EVAL_BATCH)])


def paired_difference(reference: Tensor, other: Tensor, labels: Tensor) -> tuple[float, float]:
    """Top-1 of ``other`` minus ``reference``'s on the same examples, and its standard error.

    Only the examples where exactly one of the two is right move the difference, so its error
    is far smaller than either accuracy's alone.
    """
    ref, oth = reference == labels, other == labels
    gained, lost, n = (oth & ~ref).sum().item(), (ref & ~oth).sum().item(), labels.numel()
    return (gained - lost) / n, max(gained + lost - (gained - lost) ** 2 / n, 0.0) ** 0.5 / n


def fine_tune(tail: nn.Module, train: Cached, test: Cached, *, layer_names: Sequence[str], epochs: int,
              batch_size: int, lr: float, seed: int) -> tuple[dict, torch.optim.Optimizer, Tensor]:
    """Adam over the trainable parameters, ``epochs`` passes of shuffled fixed-size batches; then the test predictions.

    The saved bytes (parameters excluded) are measured on the first step, which trains like any other.
    """
    optimizer = torch.optim.Adam([p for p in tail.parameters() if p.requires_grad], lr=lr)
    modules = {name: tail.get_submodule(name) for name in layer_names}
    generator = torch.Generator().manual_seed(seed)
    saved, losses, started = None, [], time.perf_counter()
    for _ in range(epochs):
        total, count = 0.0, 0
        for x, y in _minibatches(train, batch_size, generator):
            if saved is None:
                meter = SavedTensorMeter(exclude=tail.parameters(), modules=modules)
                loss = train_step(tail, optimizer, x, y, meter)
                saved = {"convs_bytes": meter.nbytes_of(layer_names), "tail_bytes": meter.nbytes}
            else:
                loss = train_step(tail, optimizer, x, y)
            total += loss.item() * y.numel()
            count += y.numel()
        losses.append(total / count)
    if saved is None:
        raise ValueError(f"fewer than one batch of {batch_size} training examples ({len(train)})")
    predictions = predict(tail, test)
    result = {"top1": (predictions == test.labels).float().mean().item(), "train_losses": losses,
              "train_seconds": time.perf_counter() - started, **saved}
    return result, optimizer, predictions


def prepared_tail(base: nn.Module, *, layers: int, start: int, method: str = "vanilla",
                  ranks: Mapping[str, Sequence[int]] | None = None, radius: int = 2) -> tuple[Tail, list[str]]:
    """A fresh copy of ``base`` with its last ``layers`` convs (and head) trainable, as a Tail, ``method`` in place.

    ``method`` is one of ``odl_fed.methods.METHODS``, ``"asi-paper-grid"`` (``asi-only`` at ranks
    planned on the paper's grid) or ``"head-only"`` (the convs stay frozen: the reference that says
    how much training them is worth). ``ranks`` None for a conv keeps it exact (``asi``). Returns the
    tail and the convs' names within it (``model.<name>``).
    """
    model = copy.deepcopy(base)
    convs = prepare_finetune(model, layers=layers)
    if first_block(model, convs) < start:
        raise ValueError(f"the trained convs {convs} start before the cached features (block {start})")
    tail = Tail(model, start)
    names = [f"model.{name}" for name in convs]
    if method == HEAD_ONLY:
        for name in names:
            tail.get_submodule(name).requires_grad_(False)
    else:
        apply_method(tail, ASI_ONLY if method == ASI_PAPER else method,
                     {name: (ranks or {}).get(name) for name in names}, radius=radius)
    return tail, names


# ---------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class PretrainSpec:
    """A backbone trained here (``odl-fed pretrain``) before it is fine-tuned on the case's dataset."""

    dataset: str
    image_size: int
    train: int
    test: int
    epochs: int
    batch: int = 32
    lr: float = 1e-3


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    dataset: str
    image_size: int
    train: int
    test: int
    epochs: int
    lr: float
    layers: tuple[int, ...]
    weights: str | None = None
    pretrain: PretrainSpec | None = None
    title: str = ""

    def __post_init__(self):
        if self.weights and self.pretrain:
            raise ValueError(f"case {self.name!r}: give weights or pretrain, not both")
        for key in ("image_size", "train", "test", "epochs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"case {self.name!r}: {key.replace('_', '-')} must be a positive integer, "
                                 f"but got {value!r}")
        if not self.layers or any(n < 1 for n in self.layers):
            raise ValueError(f"case {self.name!r}: layers must be positive integers, but got {list(self.layers)}")


@dataclass(frozen=True)
class Settings:
    cases: tuple[Case, ...]
    budgets: tuple[float, ...]  # fractions of vanilla's measured conv activation bytes
    reference_budgets: tuple[float, ...]  # the budgets that also run HOSVD and the paper grid
    batch: int
    radius: int
    calibration_batches: int
    timing_steps: int
    compression_repeats: int
    threads: int
    seed: int
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if not self.budgets or any(not 0 < b < 1 for b in self.budgets):
            raise ValueError(f"budgets must be fractions of vanilla's bytes in (0, 1), but got {list(self.budgets)}")
        if any(not 0 < b < 1 for b in self.reference_budgets):
            raise ValueError(f"reference-budgets must be fractions of vanilla's bytes in (0, 1), "
                             f"but got {list(self.reference_budgets)}")


SETTING_KEYS = ("cases", "budgets", "reference-budgets", "batch", "radius", "calibration-batches", "timing-steps",
                "compression-repeats", "threads", "seed", "quick")
CASE_KEYS = tuple(f.name.replace("_", "-") for f in fields(Case) if f.name != "name")
PRETRAIN_KEYS = tuple(f.name.replace("_", "-") for f in fields(PretrainSpec))


def _merge(base: dict, override: Mapping) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, Mapping) and isinstance(
            merged.get(key), Mapping) else value
    return merged


def _snake(mapping: Mapping) -> dict:
    return {key.replace("-", "_"): value for key, value in mapping.items()}


def load_settings(path: Path, *, quick: bool = False) -> Settings:
    """The YAML settings; ``quick`` applies its ``quick:`` overrides. Unknown keys name the file and key."""
    raw = read_settings(path)
    check_keys(str(path), raw, SETTING_KEYS)
    overrides = raw.pop("quick", None) or {}
    check_keys(f"{path}: quick", overrides, SETTING_KEYS)
    if quick:
        raw = _merge(raw, overrides)
    missing = [k for k in SETTING_KEYS if k not in raw and k != "quick"]
    if missing:
        raise SystemExit(f"error: {path}: missing setting(s) {missing}")
    cases = []
    for name, spec in raw["cases"].items():
        check_keys(f"{path}: case {name}", spec, CASE_KEYS)
        spec = _snake(spec)
        if spec.get("pretrain") is not None:
            check_keys(f"{path}: case {name}: pretrain", spec["pretrain"], PRETRAIN_KEYS)
            spec["pretrain"] = PretrainSpec(**_snake(spec["pretrain"]))
        spec["layers"] = tuple(spec["layers"])
        try:
            cases.append(Case(name=name, **spec))
        except TypeError as error:
            raise SystemExit(f"error: {path}: case {name}: {error}") from None
    settings = {k.replace("-", "_"): v for k, v in raw.items() if k != "cases"}
    settings["budgets"] = tuple(float(b) for b in settings["budgets"])
    settings["reference_budgets"] = tuple(float(b) for b in settings["reference_budgets"])
    return Settings(cases=tuple(cases), **settings)


# ---------------------------------------------------------------------------------------------
# The benchmark


def pretrained_checkpoint(model: str, spec: PretrainSpec, *, seed: int) -> tuple[Path, dict]:
    """A backbone from ``odl-fed pretrain`` (its own code path), trained once and cached under ``runs/``."""
    from odl_fed.cli import build_parser

    stem = (f"{model}-{spec.dataset}-{spec.image_size}px-{spec.train}x{spec.epochs}ep-b{spec.batch}"
            f"-lr{spec.lr:g}-seed{seed}")
    path, info_path = RUNS_DIR / f"{stem}.pt", RUNS_DIR / f"{stem}.json"
    if path.is_file() and info_path.is_file():
        return path, json.loads(info_path.read_text()) | {"cached": True}
    argv = ["pretrain", "--model", model, "--dataset", spec.dataset, "--image-size", str(spec.image_size),
            "--limit-train", str(spec.train), "--limit-test", str(spec.test), "--epochs", str(spec.epochs),
            "--batch-size", str(spec.batch), "--lr", str(spec.lr), "--seed", str(seed), "--out"]
    partial = path.with_suffix(".pt.partial")  # a run stopped half-way leaves no checkpoint behind
    args = build_parser().parse_args([*argv, str(partial)])
    started = time.perf_counter()
    result = args.run(args)
    partial.rename(path)
    info = {"test_top1": result["test_accuracy"], "seconds": time.perf_counter() - started,
            "command": " ".join(["odl-fed", *argv, str(path.relative_to(ROOT))])}
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return path, info | {"cached": False}


def _subset(data: ImageData, count: int, seed: int) -> ImageData:
    if count > len(data):
        raise SystemExit(f"error: {data.name} has {len(data)} examples, fewer than the {count} asked for")
    return data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:count])


def _step_flops(tail: nn.Module, optimizer, x: Tensor, y: Tensor) -> int:
    flops, _ = count_flops(lambda: train_step(tail, optimizer, x, y))
    return flops


def _layer_inputs(tail: nn.Module, names: Sequence[str], x: Tensor) -> dict[str, Tensor]:
    """What each compressed layer packs on batch ``x``: its input, after any padding it applies itself."""
    inputs = {}

    def capture(name):
        def hook(module, args):
            value = args[0] if module.pre_padding is None else module.pre_padding(args[0])
            inputs[name] = value.detach().contiguous()

        return hook

    handles = [tail.get_submodule(n).register_forward_pre_hook(capture(n)) for n in names]
    try:
        with torch.no_grad():
            tail(x)
    finally:
        for handle in handles:
            handle.remove()
    return inputs


def compression_cost(tail: nn.Module, names: Sequence[str], x: Tensor, *, repeats: int) -> dict:
    """ASI's compression (one warm subspace-iteration step, then the core) against HOSVD's, same ranks.

    Runs on the trained layers' real inputs of batch ``x``, with the bases the layers hold after
    training; each variant's ``pack`` is what a training step calls.
    """
    asi, hosvd = get_variant("asi"), get_variant("hosvd")
    layers = []
    for name, inp in _layer_inputs(tail, names, x).items():
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


def run_group(case: Case, base: nn.Module, layers: int, start: int, train: Cached, test: Cached,
              settings: Settings, prefix_flops: int) -> dict:
    """Every method on one case and one number of trained convs."""
    seed, batch = settings.seed, settings.batch
    runs = []

    def train_method(method, label, budget=None, plan=None, ranks=None):
        torch.manual_seed(seed)
        tail, names = prepared_tail(base, layers=layers, start=start, method=method, ranks=ranks,
                                    radius=settings.radius)
        result, optimizer, predictions = fine_tune(tail, train, test, layer_names=names, epochs=case.epochs, batch_size=batch,
                                      lr=case.lr, seed=seed)
        x, y = train.features[:batch], train.labels[:batch]
        result["tail_flops"] = _step_flops(tail, optimizer, x, y)
        result["full_flops"] = result["tail_flops"] + prefix_flops
        row = {"method": method, "label": label, "budget_fraction": budget, **result}
        if plan is not None:
            row["plan"] = plan
        if ranks is not None:
            row["ranks"], row["ranks_as_planned"] = _trained_ranks(tail, names, ranks)
            if not row["ranks_as_planned"]:
                print(f"  warning: {case.name} last {layers}: {label}: the compressed layers used ranks "
                      f"{row['ranks']}, not the planned {plan['ranks']}", flush=True)
        runs.append({"row": row, "tail": tail, "names": names, "optimizer": optimizer, "predictions": predictions})
        print(f"  {case.name} last {layers}: {label}: top-1 {row['top1']:.4f}, convs' bytes {row['convs_bytes']}, "
              f"{row['train_seconds']:.1f} s" + (f", exact: {plan['exact']}" if plan and plan["exact"] else ""),
              flush=True)
        return runs[-1]

    vanilla = train_method("vanilla", "vanilla")
    # the methods without a budget first: a run stopped half-way still has every reference row
    train_method("gradfilt", f"gradfilt r={settings.radius}")
    train_method(HEAD_ONLY, "head only (convs frozen)")
    names = vanilla["names"]
    vanilla_bytes = vanilla["row"]["convs_bytes"]
    calibration = calibration_batches(train, batch_size=batch, count=settings.calibration_batches, seed=seed)

    def make_plan(budget, label, *, grid="batch-whole", exact=False):
        """The planner's ranks for ``budget`` on a fresh, untrained tail (None: the budget is too small)."""
        planning_tail, _ = prepared_tail(base, layers=layers, start=start)
        started = time.perf_counter()
        try:
            plan = plan_ranks(planning_tail, names, calibration, budget, model_name=case.model, grid=grid,
                              exact=exact)
        except BudgetTooSmallError as error:
            print(f"  {case.name} last {layers}: budget {label} of vanilla, {grid} grid: {error}", flush=True)
            return None
        planning_s = time.perf_counter() - started
        return plan, planning_s, {
            "grid": grid, "exact_allowed": exact, "budget_bytes": budget, "planned_bytes": plan.total_bytes,
            "planning_seconds": planning_s,
            "eps": {l.name.removeprefix("model."): l.eps for l in plan.layers},
            "whole": {l.name.removeprefix("model."): list(l.whole) for l in plan.layers},
            "exact": [name.removeprefix("model.") for name in plan.exact_layers],
            "ranks": {l.name.removeprefix("model."): None if l.exact else list(l.ranks) for l in plan.layers}}

    compression = []
    for fraction in settings.budgets:
        budget = max(1, int(fraction * vanilla_bytes))
        label = f"1/{1 / fraction:.0f}"
        reference = fraction in settings.reference_budgets
        if reference and (paper := make_plan(budget, label, grid="paper")):
            train_method(ASI_PAPER, f"asi-only paper grid {label}", fraction, paper[2], paper[0].targets())
        pure = make_plan(budget, label)
        if pure:
            asi = train_method(ASI_ONLY, f"asi-only {label}", fraction, pure[2], pure[0].targets())
        if (chosen := make_plan(budget, label, exact=True)) and pure and chosen[0].targets() == pure[0].targets():
            # no layer kept exact and the same ranks: method asi then runs exactly what asi-only ran
            # (same layers, seed and batches), so its row is that measurement, marked as such
            runs.append({**asi, "row": {**asi["row"], "method": PLANNER, "label": f"planner (asi) {label}",
                                        "plan": chosen[2], "same_run_as": asi["row"]["label"]}})
            print(f"  {case.name} last {layers}: planner (asi) {label}: the plan of {asi['row']['label']} "
                  f"(no layer exact), so its run", flush=True)
        elif chosen:
            train_method(PLANNER, f"planner (asi) {label}", fraction, chosen[2], chosen[0].targets())
        if pure and reference:
            train_method("hosvd", f"hosvd {label}", fraction, pure[2], pure[0].targets())
            compression.append({"budget_fraction": fraction, "planning_seconds": pure[1],
                                **compression_cost(asi["tail"], names, train.features[:batch],
                                                   repeats=settings.compression_repeats)})

    # Step time: methods interleaved step by step on one batch, so that they share the machine's noise.
    x, y = train.features[:batch], train.labels[:batch]
    times: list[list[float]] = [[] for _ in runs]
    for run in runs:
        train_step(run["tail"], run["optimizer"], x, y)
    for _ in range(settings.timing_steps):
        for i, run in enumerate(runs):
            started = time.perf_counter()
            train_step(run["tail"], run["optimizer"], x, y)
            times[i].append(time.perf_counter() - started)
    for run, measured in zip(runs, times):
        run["row"]["step_s"] = statistics.median(measured)
    base_row = runs[0]["row"]
    rows = []
    for run in runs:
        row = run["row"]
        row["ratios"] = _ratios(row, base_row)
        delta, error = paired_difference(runs[0]["predictions"], run["predictions"], test.labels)
        row["delta_pp"], row["delta_se_pp"] = 100 * delta, 100 * error
        rows.append(row)
    return {"case": case.name, "title": case.title, "model": case.model, "dataset": case.dataset, "layers": layers,
            "trained": [n.removeprefix("model.") for n in names], "image_size": case.image_size, "batch": batch,
            "train": len(train), "test": len(test), "epochs": case.epochs, "rows": rows,
            "compression": compression, "pareto": pareto_check({"rows": rows})}


def _cached_features(case: Case, base: nn.Module, start: int, weights: str | None, train: ImageData,
                     test: ImageData, *, seed: int) -> tuple[Cached, Cached]:
    """The features of ``train`` and ``test``, computed once and kept under ``runs/`` for later runs.

    The file is named by everything that decides its contents (model, weights, dataset, sizes,
    seed, cut block); a checkpoint trained here is named by its own settings.
    """
    stem = Path(weights).stem if weights and weights != "imagenet" else (weights or "random")
    path = (RUNS_DIR / "features" / f"{case.model}-{stem}-{case.dataset}-{case.image_size}px-{len(train)}-"
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


def run_case(case: Case, settings: Settings) -> dict:
    torch.manual_seed(settings.seed)
    pretrain = None
    weights = case.weights
    if case.pretrain is not None:
        path, pretrain = pretrained_checkpoint(case.model, case.pretrain, seed=settings.seed)
        weights = str(path)
    torch.manual_seed(settings.seed)
    train = _subset(load_dataset(case.dataset, split="train"), case.train, settings.seed)
    test = _subset(load_dataset(case.dataset, split="test"), case.test, settings.seed)
    base = build_model(case.model, weights=weights, num_classes=train.num_classes)
    start = min(first_block(base, last_conv_names(base, n)) for n in case.layers)
    cached_train, cached_test = _cached_features(case, base, start, weights, train, test, seed=settings.seed)
    probe = next(batches(train, batch_size=settings.batch, image_size=case.image_size))[0]
    prefix_flops, _ = count_flops(lambda: _prefix(base, start, probe))
    print(f"{case.name}: cached {len(train)} + {len(test)} images' features "
          f"{tuple(cached_train.features.shape[1:])} in {cached_train.seconds + cached_test.seconds:.0f} s", flush=True)
    groups = [run_group(case, base, n, start, cached_train, cached_test, settings, prefix_flops) for n in case.layers]
    return {"case": case.name, "title": case.title, "pretrain": pretrain, "cut_block": start,
            "feature_shape": list(cached_train.features.shape[1:]),
            "caching_seconds": cached_train.seconds + cached_test.seconds, "prefix_flops": prefix_flops,
            "groups": groups}


# ---------------------------------------------------------------------------------------------
# Report


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_ratio(ratio: float | None) -> str:
    if not ratio:
        return "-"
    if ratio < 0.1:
        return f"1/{1 / ratio:.0f}"
    return f"{ratio:.2f}x"


def render_group(group: dict) -> str:
    lines = [
        f"{group['title'] or group['case']}: last {group['layers']} convs {group['trained']} + head, "
        f"{group['image_size']}px, batch {group['batch']}, train {group['train']} / test {group['test']}, "
        f"{group['epochs']} epochs",
        "",
        "| method | top-1 | vs vanilla (paired SE) | convs' saved bytes | tail's saved bytes | train FLOPs/step (tail) "
        "| full step FLOPs | step time (tail) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in group["rows"]:
        r = row["ratios"]

        def both(key, fmt):
            return fmt(row[key]) if row["method"] == "vanilla" else f"{fmt(row[key])} ({_fmt_ratio(r.get(key))})"

        lines.append(
            f"| {row['label']} | {row['top1']:.4f} | {row['delta_pp']:+.1f} pp (±{row['delta_se_pp']:.1f}) "
            f"| {both('convs_bytes', _fmt_bytes)} | {both('tail_bytes', _fmt_bytes)} "
            f"| {both('tail_flops', lambda v: f'{v / 1e9:.3f} G')} "
            f"| {both('full_flops', lambda v: f'{v / 1e9:.2f} G')} "
            f"| {both('step_s', lambda v: f'{v * 1e3:.0f} ms')} |"
        )
    return "\n".join(lines)


def render_compression(results: list[dict]) -> str:
    lines = ["ASI's compression against HOSVD's at the same planned ranks (per training step, summed over "
             "the trained convs), and the time to plan the ranks:", "",
             "| case | convs | budget | ranks (per conv) | ASI | HOSVD | HOSVD/ASI time | ASI FLOPs | HOSVD FLOPs "
             "| HOSVD/ASI FLOPs | planning |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for group in result["groups"]:
            for entry in group["compression"]:
                t = entry["total"]
                ranks = "; ".join("x".join(map(str, layer["ranks"])) for layer in entry["layers"])
                lines.append(
                    f"| {result['case']} | {group['layers']} | 1/{1 / entry['budget_fraction']:.0f} | {ranks} "
                    f"| {t['asi_s'] * 1e3:.2f} ms | {t['hosvd_s'] * 1e3:.1f} ms | {t['time_ratio']:.0f}x "
                    f"| {t['asi_flops'] / 1e6:.1f} M | {t['hosvd_flops'] / 1e6:.0f} M | {t['flop_ratio']:.0f}x "
                    f"| {entry['planning_seconds']:.1f} s |")
    return "\n".join(lines)


def pareto_check(group: dict, *, tolerance_pp: float = PARETO_TOLERANCE_PP) -> list[dict]:
    """For each planner row of ``group``: is it on the Pareto front of all the group's rows?

    Top-1 against the trained convs' saved bytes: the row is on the front (within ``tolerance_pp``)
    when no other row with no more bytes has a top-1 more than ``tolerance_pp`` higher. The best
    such row is named either way.
    """
    checks = []
    for row in group["rows"]:
        if row["method"] != PLANNER:
            continue
        cheaper = [r for r in group["rows"] if r is not row and r["convs_bytes"] <= row["convs_bytes"]]
        best = max(cheaper, key=lambda r: r["top1"], default=None)
        gap_pp = 0.0 if best is None else round(100 * (best["top1"] - row["top1"]), 6)  # top-1 is k/n: no float fuzz
        checks.append({"label": row["label"], "budget_fraction": row["budget_fraction"], "top1": row["top1"],
                       "convs_bytes": row["convs_bytes"], "exact": row["plan"]["exact"],
                       "best_other": None if best is None else {
                           "label": best["label"], "top1": best["top1"], "convs_bytes": best["convs_bytes"]},
                       "gap_pp": gap_pp, "tolerance_pp": tolerance_pp, "met": gap_pp <= tolerance_pp})
    return checks


def render_pareto(results: list[dict]) -> list[str]:
    """The Pareto check's lines, one per case, convs and budget."""
    lines = []
    for result in results:
        for group in result["groups"]:
            for c in group["pareto"]:
                best = c["best_other"]
                other = ("no other row has as few bytes" if best is None else
                         f"best other row with <= its bytes: {best['label']}, top-1 {best['top1']:.4f} at "
                         f"{_fmt_bytes(best['convs_bytes'])} ({c['gap_pp']:+.1f} pp)")
                exact = f"exact: {', '.join(c['exact'])}" if c["exact"] else "no layer exact"
                lines.append(f"- {result['case']}, last {group['layers']}, {c['label']} ({exact}): top-1 "
                             f"{c['top1']:.4f} at {_fmt_bytes(c['convs_bytes'])}; {other}: "
                             f"{'met' if c['met'] else 'not met'}")
    return lines


def targets(results: list[dict]) -> list[str]:
    """The stated targets, checked against what was measured (no judgement beyond the numbers)."""
    lines = []
    for result in results:
        for group in result["groups"]:
            reference = {r["method"]: r["top1"] for r in group["rows"]}
            if HEAD_ONLY in reference and reference["vanilla"] <= reference[HEAD_ONLY]:
                lines.append(f"- {result['case']}, last {group['layers']}: parity not measurable: vanilla "
                             f"({reference['vanilla']:.3f}) did not beat head only ({reference[HEAD_ONLY]:.3f})")
                continue
            asi_rows = [r for r in group["rows"] if r["method"] in (ASI_ONLY, ASI_PAPER, PLANNER)]
            hits = [r for r in asi_rows if r["ratios"]["convs_bytes"] <= 0.01 and r["delta_pp"] >= -1.0]
            best = max(asi_rows, key=lambda r: r["delta_pp"], default=None)
            what = (f"met by {', '.join(r['label'] for r in hits)}" if hits else "not met")
            detail = "" if best is None else (f" (closest ASI: {best['label']}, {best['delta_pp']:+.1f} pp at "
                                              f"{_fmt_ratio(best['ratios']['convs_bytes'])} of vanilla's bytes)")
            lines.append(f"- {result['case']}, last {group['layers']}: ASI within 1 pp of vanilla at >= 100x less "
                         f"activation memory: {what}{detail}")
    compression = [e["total"] for r in results for g in r["groups"] for e in g["compression"]]
    if compression:
        lines.append(f"- ASI's compression >= 50x cheaper than HOSVD's: time ratio "
                     f"{min(c['time_ratio'] for c in compression):.0f}x..{max(c['time_ratio'] for c in compression):.0f}x,"
                     f" FLOP ratio {min(c['flop_ratio'] for c in compression):.0f}x.."
                     f"{max(c['flop_ratio'] for c in compression):.0f}x")
    planning = [(r["case"], g["layers"], e["planning_seconds"]) for r in results for g in r["groups"]
                for e in g["compression"] if g["layers"] == 4]
    if planning:
        lines.append(f"- planning ranks for 4 convs: {min(p[2] for p in planning):.1f}.."
                     f"{max(p[2] for p in planning):.1f} s")
    return lines


MARKERS = {"vanilla": "o", ASI_ONLY: "^", ASI_PAPER: "v", "hosvd": "s", "gradfilt": "D", PLANNER: "*"}
COLORS = {"vanilla": "black", ASI_ONLY: "tab:red", ASI_PAPER: "tab:orange", "hosvd": "tab:blue",
          "gradfilt": "tab:green", PLANNER: "tab:purple"}
LEGEND = {ASI_ONLY: "asi-only", ASI_PAPER: "asi-only, paper grid", PLANNER: "planner (asi)"}


def plot_pareto(results: list[dict], path: Path) -> None:
    """Top-1 against the trained convs' saved bytes (log x), one panel per case and layer count.

    The planner's rows are large stars, labelled with their budget and the Pareto check's outcome.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(r["groups"]) for r in results)
    fig, axes = plt.subplots(len(results), cols, figsize=(5.2 * cols, 4.0 * len(results)), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for i, result in enumerate(results):
        for j, group in enumerate(result["groups"]):
            ax = axes[i][j]
            ax.set_visible(True)
            for method, marker in MARKERS.items():
                rows = [r for r in group["rows"] if r["method"] == method]
                if rows:
                    planner = method == PLANNER
                    ax.scatter([r["convs_bytes"] for r in rows], [100 * r["top1"] for r in rows], marker=marker,
                               color=COLORS[method], label=LEGEND.get(method, method), s=160 if planner else 50,
                               edgecolors="black" if planner else "none", linewidths=0.6, zorder=4 if planner else 3)
                    for r in rows:
                        if r["budget_fraction"] and not planner:
                            ax.annotate(r["label"].split()[-1], (r["convs_bytes"], 100 * r["top1"]), fontsize=7,
                                        xytext=(4, -9 if method == "hosvd" else 4), textcoords="offset points")
            for check in group.get("pareto", ()):  # the planner's rows: budget and the Pareto check
                ax.annotate(f"{check['label'].split()[-1]} {'on front' if check['met'] else 'OFF front'}",
                            (check["convs_bytes"], 100 * check["top1"]), fontsize=7, color=COLORS[PLANNER],
                            fontweight="bold", xytext=(-6, 8), textcoords="offset points", ha="right")
            references = {r["method"]: 100 * r["top1"] for r in group["rows"] if r["method"] in ("vanilla", HEAD_ONLY)}
            ax.axhline(references["vanilla"] - 1, color="gray", linestyle="--", linewidth=0.8, label="vanilla - 1 pp")
            if HEAD_ONLY in references:
                ax.axhline(references[HEAD_ONLY], color="gray", linestyle=":", linewidth=0.8,
                           label="head only (convs frozen)")
            ax.set_xscale("log")
            ax.set_xlabel("trained convs' saved activation bytes (measured)")
            ax.set_ylabel("top-1 (%)")
            ax.set_title(f"{group['title'] or group['case']}, last {group['layers']} convs", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML settings")
    parser.add_argument("--quick", action="store_true", help="the config's small 'quick' version (a few minutes)")
    parser.add_argument("--cases", help="comma-separated case names from the config (default: all)")
    parser.add_argument("--layers", help="comma-separated numbers of trained convs, instead of each case's")
    parser.add_argument("--budgets", help="comma-separated budget fractions of vanilla's bytes, instead of the config's")
    parser.add_argument("--reference-budgets", help="comma-separated budgets that also run HOSVD and the paper grid "
                        "('none': no such budget), instead of the config's")
    parser.add_argument("--out", type=Path, help="result JSON (default: bench/results/accuracy[_quick].json)")
    parser.add_argument("--plot", type=Path, help="Pareto PNG (default: bench/results/accuracy_pareto[_quick].png)")
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
    out = args.out or ROOT / "bench" / "results" / f"accuracy{suffix}.json"
    plot = args.plot or ROOT / "bench" / "results" / f"accuracy_pareto{suffix}.png"

    torch.set_num_threads(settings.threads)
    started = time.perf_counter()
    results = []
    for case in cases:
        results.append(run_case(case, settings))
        for group in results[-1]["groups"]:
            print(render_group(group) + "\n", flush=True)
    wall = time.perf_counter() - started
    meta = {"torch": torch.__version__, "torchvision": torchvision.__version__, "machine": platform.machine(),
            "python": platform.python_version(), "threads": settings.threads, "quick": args.quick,
            "wall_seconds": wall, "command": " ".join(["python -m bench.accuracy", *(argv or sys.argv[1:])]),
            "settings": {k: v for k, v in asdict(settings).items() if k != "cases"},
            "cases": [asdict(c) for c in cases]}
    report(meta, results, out=out, plot=plot)


def report(meta: dict, results: list[dict], *, out: Path, plot: Path) -> None:
    """Print the summary tables and checks; write the JSON (first: nothing measured is lost) and the plot."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "targets": targets(results),
                               "pareto": render_pareto(results)}, indent=2, default=str) + "\n")
    print(render_compression(results) + "\n")
    print(f"The planner's row on the Pareto front of every method's rows (top-1 vs convs' bytes, within "
          f"{PARETO_TOLERANCE_PP} pp):")
    print("\n".join(render_pareto(results)) + "\n")
    print("Targets:")
    print("\n".join(targets(results)))
    walls = [part["wall_seconds"] for part in meta.get("parts", [meta])]
    print(f"\nwall time: {' + '.join(f'{w / 60:.1f}' for w in walls)} min ({meta['threads']} threads)")
    plot_pareto(results, plot)
    print(f"wrote {out} and {plot}")


def merge_runs(paths: Sequence[Path], *, out: Path, plot: Path) -> None:
    """One report of several runs' JSON (each made with ``--cases`` and/or ``--layers``); their metadata kept as ``parts``."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    by_case: dict[str, dict] = {}
    for result in (result for part in parts for result in part["results"]):
        if result["case"] not in by_case:
            by_case[result["case"]] = result
            continue
        joined = by_case[result["case"]]  # the same case run for other layer counts (--layers)
        groups = joined["groups"] + result["groups"]
        if len({g["layers"] for g in groups}) < len(groups):
            raise SystemExit(f"error: --merge: case {result['case']} has a layer count in more than one file")
        joined["groups"] = sorted(groups, key=lambda g: g["layers"])
    results = list(by_case.values())
    first = parts[0]["meta"]
    meta = {k: first[k] for k in ("torch", "torchvision", "machine", "python", "threads", "quick")}
    meta["parts"] = [part["meta"] | {"file": str(p)} for part, p in zip(parts, paths)]
    meta["wall_seconds"] = max(part["meta"]["wall_seconds"] for part in parts)  # the parts ran side by side
    for result in results:
        for group in result["groups"]:
            group["pareto"] = pareto_check(group)
    report(meta, results, out=out, plot=plot)


if __name__ == "__main__":
    main()
