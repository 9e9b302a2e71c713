"""Warm ASI bases across rounds: the first step of a round, with the bases a client kept and without.

EfficientNet-Lite0 (its packaged ImageNet weights) fine-tunes its last convs on real Fashion-MNIST
with pure ASI at planned ranks. Round 1 trains ``--steps`` steps; the global model then moves (the
average of this client's update and another client's, trained on other data). The first step of
round 2 is taken three ways, on the same batch, against the exact weight gradient (plain autograd):

- **warm**: the bases this client kept from round 1 (what a node's ``context.state`` gives it);
- **exact start**: no bases: odl-fed's ASI starts a layer from the exact leading subspace (an
  eigendecomposition of each mode's Gram matrix, as HOSVD does);
- **random start**: the paper's cold start, one subspace iteration from a random orthonormal basis.

Printed per layer: the relative error ``||dW_asi - dW|| / ||dW||`` and the compression time of the
step, as a ratio against the exact start measured in the same run.

    python -m bench.warm_bases [--image-size 128] [--layers 4] [--steps 20] [--out bench/results/warm_bases.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from odl_fed.asi import restore_model
from odl_fed.asi.layers import ASIConv2d
from odl_fed.planning.ranks import plan_ranks
from odl_fed.training.data import batches, load_dataset
from odl_fed.training.models import build_model, prepare_finetune
from odl_fed.training.task import apply_method, make_optimizer

STARTS = ("warm", "exact start", "random start")


def _train(model, data, *, steps: int, batch: int, image_size: int, seed: int) -> None:
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for step, (x, y) in enumerate(batches(data, batch_size=batch, image_size=image_size, shuffle=True, seed=seed)):
        if step == steps:
            break
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()


def _weight_grads(model, convs, x, y) -> dict[str, torch.Tensor]:
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    return {name: model.get_submodule(name).weight.grad.clone() for name in convs}


def _compression_seconds(model, convs, x, repeats: int = 5) -> float:
    """Time the layers' own packing of ``x``'s activations (the variant's code), bases as they are now."""
    layers = [model.get_submodule(name) for name in convs]
    inputs = {}
    hooks = [layer.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0].detach()))
             for name, layer in zip(convs, layers)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    bases = {name: [None if b is None else b.clone() for b in layer.bases()] for name, layer in zip(convs, layers)}
    times = []
    for _ in range(repeats):
        for name, layer in zip(convs, layers):  # every repeat starts from the same bases
            for mode, basis in zip(layer.modes, bases[name]):
                setattr(layer, f"basis_{mode}", basis)
        started = time.perf_counter()
        for name, layer in zip(convs, layers):
            layer._pack(inputs[name])
        times.append(time.perf_counter() - started)
    for name, layer in zip(convs, layers):
        for mode, basis in zip(layer.modes, bases[name]):
            setattr(layer, f"basis_{mode}", basis)
    return statistics.median(times)


def run(*, image_size: int = 128, layers: int = 4, steps: int = 20, batch: int = 32, budget_fraction: float = 0.02,
        seed: int = 0) -> dict:
    torch.manual_seed(seed)
    train = load_dataset("fashion-mnist", split="train")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    client, other, later = (train.subset(order[i * 2048:(i + 1) * 2048]) for i in range(3))
    model = build_model("efficientnet_lite0", weights="imagenet", num_classes=10)
    convs = prepare_finetune(model, layers=layers)
    calibration = [b for _, b in zip(range(2), batches(client, batch_size=batch, image_size=image_size,
                                                       shuffle=True, seed=seed, drop_last=True))]
    budget = int(_conv_bytes(model, convs, calibration[0]) * budget_fraction)
    plan = plan_ranks(model, convs, calibration, budget, model_name="efficientnet_lite0")
    ranks = plan.targets()
    start = {k: v.clone() for k, v in model.state_dict().items()}

    # Round 1: this client and another train from the same global model; the server averages them.
    updates = []
    for data, s in ((client, seed + 1), (other, seed + 2)):
        model.load_state_dict(start)
        apply_method(model, "asi-only", ranks)
        _train(model, data, steps=steps, batch=batch, image_size=image_size, seed=s)
        if data is client:
            kept = {name: [None if b is None else b.clone() for b in model.get_submodule(name).bases()]
                    for name in convs}
        restore_model(model)
        updates.append({k: v.clone() for k, v in model.state_dict().items()})
    averaged = {k: (updates[0][k].float() + updates[1][k].float()).div(2).to(updates[0][k].dtype)
                for k in start}
    model.load_state_dict(averaged)

    # Round 2's first step on a new batch: exact gradient, then ASI from each start.
    x, y = next(batches(later, batch_size=batch, image_size=image_size, shuffle=True, seed=seed + 3))
    exact = _weight_grads(model, convs, x, y)
    apply_method(model, "asi-only", ranks)
    rows = {}
    for start_name in STARTS:
        generator = torch.Generator().manual_seed(seed + 4)
        for name in convs:
            layer: ASIConv2d = model.get_submodule(name)
            for mode, basis in zip(layer.modes, kept[name]):
                if basis is None:  # a mode kept whole has no basis
                    value = None
                elif start_name == "warm":
                    value = basis.clone()
                elif start_name == "exact start":
                    value = None
                else:
                    value = torch.linalg.qr(torch.randn(basis.shape, generator=generator))[0]
                setattr(layer, f"basis_{mode}", value)
        seconds = _compression_seconds(model, convs, x)
        grads = _weight_grads(model, convs, x, y)
        rows[start_name] = {
            "relative_error": {name: ((grads[name] - exact[name]).norm() / exact[name].norm()).item()
                               for name in convs},
            "compression_seconds": seconds,
        }
    reference = rows["exact start"]["compression_seconds"]
    for row in rows.values():
        row["compression_ratio_to_exact_start"] = row["compression_seconds"] / reference
        row["mean_relative_error"] = statistics.mean(row["relative_error"].values())
    return {"setting": {"model": "efficientnet_lite0 (imagenet)", "dataset": "fashion-mnist", "image_size": image_size,
                        "layers": convs, "batch": batch, "round1_steps": steps, "budget_fraction": budget_fraction,
                        "ranks": {n: None if r is None else list(r) for n, r in ranks.items()}},
            "starts": rows}


def _conv_bytes(model, convs, batch) -> int:
    """What the trained convs save when exact, on one batch."""
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.__setitem__(n, a[0]))
             for n in convs]
    with torch.no_grad():
        model(batch[0])
    for h in hooks:
        h.remove()
    return sum(t.numel() * t.element_size() for t in inputs.values())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.warm_bases", description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/results/warm_bases.json"))
    args = parser.parse_args(argv)
    result = run(image_size=args.image_size, layers=args.layers, steps=args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    setting = result["setting"]
    print(f"{setting['model']} -> {setting['dataset']}, {setting['image_size']} px, last {len(setting['layers'])} "
          f"convs at ranks {setting['ranks']}")
    print("| start of round 2 | relative error of dW per layer | mean | compression time (vs exact start) |")
    print("|---|---|---|---|")
    for name, row in result["starts"].items():
        errors = ", ".join(f"{e:.3f}" for e in row["relative_error"].values())
        print(f"| {name} | {errors} | {row['mean_relative_error']:.3f} | "
              f"{row['compression_seconds'] * 1e3:.2f} ms ({row['compression_ratio_to_exact_start']:.2f}x) |")
    return result


if __name__ == "__main__":
    main()
