"""Benchmark: ASI's Tucker form held in 16 bits against 32, at the same activation budget.

The accuracy-parity problem (tests/test_accuracy_parity.py): EfficientNet-Lite0 with its packaged
ImageNet weights, the last 4 convs and the head fine-tuned on 1,024 real MNIST digits at 112 px
(3x3 maps) over cached features, 3 epochs of Adam at 3e-4, tested on 1,000 others. For each
budget (a fraction of vanilla's measured conv bytes) the planner chooses ranks twice: for
float32 storage (``asi-only``) and for float16 storage (``asi-fp16``: 2 bytes per number, so about
twice the numbers); both train through the library's loop, every layer compressed. Each row is
the mean and spread over ``--seeds`` (the batch order), with vanilla and head only (the convs
frozen) as the references measured in the same run; the bytes are measured with
``saved_tensors_hooks`` on the first step.

Run: ``python -m bench.asi_storage [--seeds 0 1 2] [--out bench/results/asi_storage.json]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.accuracy.settings import HEAD_ONLY
from bench.accuracy.train import calibration_batches, fine_tune, prepared_tail
from bench.asi_front import keep_shares, render_rows, train_seeds
from bench.process_tree import write_result
from bench.tail import cache_features, first_block
from odl_fed.asi import last_conv_names
from odl_fed.planning.ranks import plan_ranks
from odl_fed.training.data import load_dataset
from odl_fed.training.methods import get_method
from odl_fed.training.models import build_model

IMAGE_SIZE, LAYERS, TRAIN, BATCH, EPOCHS, LR = 112, 4, 1024, 32, 3, 3e-4
BUDGETS = (50, 100, 200)  # 1/N of vanilla's conv bytes


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("bench/results/asi_storage.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", weights="imagenet", num_classes=10)
    start = first_block(model, last_conv_names(model, LAYERS))
    train = load_dataset("mnist-digits", split="train")
    train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:TRAIN])
    train = cache_features(model, start, train, image_size=IMAGE_SIZE)
    test = cache_features(model, start, load_dataset("mnist-digits", split="test"), image_size=IMAGE_SIZE)

    def run(method: str, ranks=None) -> dict:
        def once(seed: int) -> dict:
            torch.manual_seed(0)
            tail, names = prepared_tail(model, layers=LAYERS, start=start, method=method, ranks=ranks)
            result, _, _ = fine_tune(tail, train, test, layer_names=names, epochs=EPOCHS, batch_size=BATCH, lr=LR,
                                     seed=seed)
            return result
        return {"method": method, "ranks": ranks, **train_seeds(once, args.seeds)}

    vanilla, frozen = run("vanilla"), run(HEAD_ONLY)
    planning_tail, names = prepared_tail(model, layers=LAYERS, start=start)
    calibration = calibration_batches(train, batch_size=BATCH, count=2, seed=0)
    rows = [vanilla, frozen]
    for fraction in BUDGETS:
        budget = vanilla["convs_bytes"] // fraction
        for method in ("asi-only", "asi-fp16"):
            plan = plan_ranks(planning_tail, names, calibration, budget, model_name="efficientnet_lite0",
                              storage_itemsize=get_method(method).storage_itemsize)
            row = run(method, {n: list(r) for n, r in plan.targets().items()}) | {"budget": f"1/{fraction}",
                                                                                  "planned_bytes": plan.total_bytes}
            rows.append(row)
    keep_shares(rows, vanilla, frozen)
    print("\n" + render_rows(rows))
    result = {"problem": {"model": "efficientnet_lite0", "dataset": "mnist-digits", "image_size": IMAGE_SIZE,
                          "layers": LAYERS, "train": TRAIN, "epochs": EPOCHS, "lr": LR, "batch": BATCH},
              "seeds": args.seeds, "rows": rows}
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
