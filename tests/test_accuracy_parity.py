"""ASI keeps vanilla's accuracy at a twentieth of its activation memory, on a small real transfer problem.

EfficientNet-Lite0 with its packaged ImageNet weights is fine-tuned on 1,024 real MNIST digits
(the last 4 convs and the head; 112 px, so the trained maps are 3x3), over cached features
(``bench.tail.Tail``: exact for a frozen prefix with BatchNorm in eval), with vanilla
backprop, with ASI at ranks the planner chose for 1/20 of vanilla's measured activation bytes,
and with the convs frozen (head only). Seeds are fixed.

Why this problem: it runs in about a minute (the cached features make every epoch cheap), the
pretrained features are real, and training the convs is worth something here (the test checks
that vanilla beats head only by 5 pp, so that parity means something). The full comparison, on
larger maps and budgets down to 1/200, is ``python -m bench.accuracy`` (docs/accuracy.md). The parity
test runs in ``make test-slow``; the cache's own checks, over a few digits, in the default stage.
"""

import pytest
import torch

from bench.accuracy.settings import HEAD_ONLY
from bench.accuracy.train import calibration_batches, fine_tune, prepared_tail
from bench.tail import CACHE_BATCH, Cached, Tail, cache_features, first_block, prefix_features
from odl_fed.asi import last_conv_names
from odl_fed.planning.ranks import plan_ranks
from odl_fed.training.data import batches, load_dataset
from odl_fed.training.models import build_model

IMAGE_SIZE = 112
LAYERS = 4
TRAIN = 1024
BATCH = 32
EPOCHS = 3
LR = 3e-4
MEMORY_FACTOR = 20  # ASI must save at least this factor of vanilla's measured activation bytes
MAX_DROP = 0.02  # top-1 ASI may lose against vanilla
CHANCE = 0.1


def _model_and_start():
    torch.manual_seed(0)
    model = build_model("efficientnet_lite0", weights="imagenet", num_classes=10)
    return model, first_block(model, last_conv_names(model, LAYERS))


@pytest.fixture(scope="module")
def transfer():
    """The pretrained model, its cut block, and the digits' features entering the fine-tuned tail."""
    model, start = _model_and_start()
    train = load_dataset("mnist-digits", split="train")
    train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:TRAIN])
    test = load_dataset("mnist-digits", split="test")
    return (model, start, cache_features(model, start, train, image_size=IMAGE_SIZE),
            cache_features(model, start, test, image_size=IMAGE_SIZE), test)


@pytest.fixture(scope="module")
def few():
    """The same cut over a few test digits in a scrambled order: two whole cache batches and a short one."""
    model, start = _model_and_start()
    test = load_dataset("mnist-digits", split="test")
    test = test.subset(torch.randperm(len(test), generator=torch.Generator().manual_seed(2))[:2 * CACHE_BATCH + 9])
    return model, start, cache_features(model, start, test, image_size=IMAGE_SIZE), test


def _fine_tune(transfer, method, ranks=None):
    model, start, train, test, _ = transfer
    torch.manual_seed(0)
    tail, names = prepared_tail(model, layers=LAYERS, start=start, method=method, ranks=ranks)
    result, _, _ = fine_tune(tail, train, test, layer_names=names, epochs=EPOCHS, batch_size=BATCH, lr=LR, seed=0)
    return result, names


# A minute here, most of it EfficientNet's features for 2,000 digits at 112 px: an accuracy check (the
# benchmark in small), where ASI's gradients are checked exactly by test_asi_* in the default stage.
@pytest.mark.slow
def test_asi_keeps_vanilla_top1_at_a_twentieth_of_its_activation_memory(transfer):
    model, start, train, _, _ = transfer
    vanilla, names = _fine_tune(transfer, "vanilla")
    frozen, _ = _fine_tune(transfer, HEAD_ONLY)
    assert vanilla["top1"] > CHANCE + 0.7, f"vanilla fine-tuning did not learn: top-1 {vanilla['top1']:.3f}"
    assert vanilla["top1"] > frozen["top1"] + 0.05, (
        f"training the convs is worth little here (vanilla {vanilla['top1']:.3f}, head only {frozen['top1']:.3f}): "
        "parity would prove nothing")

    calibration = calibration_batches(train, batch_size=BATCH, count=2, seed=0)
    planning_tail, _ = prepared_tail(model, layers=LAYERS, start=start)
    plan = plan_ranks(planning_tail, names, calibration, vanilla["convs_bytes"] // MEMORY_FACTOR,
                      model_name="efficientnet_lite0")
    asi, _ = _fine_tune(transfer, "asi-only", plan.targets())

    assert asi["convs_bytes"] * MEMORY_FACTOR <= vanilla["convs_bytes"], (
        f"ASI saved {asi['convs_bytes']} B against vanilla's {vanilla['convs_bytes']} B")
    assert asi["top1"] >= vanilla["top1"] - MAX_DROP, (
        f"ASI top-1 {asi['top1']:.4f} against vanilla's {vanilla['top1']:.4f} (ranks {plan.targets()})")


def test_cached_features_give_the_full_models_logits(few):
    model, start, cached, test = few
    x, _ = next(batches(test, batch_size=16, image_size=IMAGE_SIZE))
    with torch.no_grad():
        torch.testing.assert_close(Tail(model, start)(cached.features[:16]), model(x), rtol=1e-4, atol=1e-4)


def test_cached_rows_follow_the_dataset_order(few):
    """Row i of the cache is image i's features with image i's label, in every cache batch (the short
    last one too): checked against the prefix run on that image alone."""
    model, start, cached, test = few
    assert isinstance(cached, Cached) and len(cached) == len(test) == cached.features.shape[0]
    images = torch.cat([x for x, _ in batches(test, batch_size=len(test), image_size=IMAGE_SIZE)])
    rows = [0, 1, CACHE_BATCH - 1, CACHE_BATCH, 2 * CACHE_BATCH - 1, 2 * CACHE_BATCH, len(test) - 1]
    for i in rows:
        alone = prefix_features(model, start, images[i:i + 1])[0]
        torch.testing.assert_close(cached.features[i], alone, rtol=1e-4, atol=1e-4, msg=f"row {i}")
        assert int(cached.labels[i]) == int(test.labels[i])
    # the rows differ from each other (so a row in the wrong place would not pass), and so do their labels
    assert not torch.allclose(cached.features[rows[0]], cached.features[rows[-1]], rtol=1e-2, atol=1e-2)
    assert len(set(cached.labels[rows].tolist())) > 1
