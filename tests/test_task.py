"""The plain-torch fine-tuning loop on real digits: methods, measured bytes, learning."""

import re

import pytest
import torch
from torch import nn

from odl_fed.asi import freeze_except
from odl_fed.training.data import batches, load_dataset
from odl_fed.training.task import apply_method, evaluate, train_epoch, train_steps


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU6(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()


@pytest.mark.parametrize("method, ranks", [("vanilla", {}), ("asi", {"3": (8, 8, 4, 4), "6": (8, 8, 4, 4)})])
def test_training_on_real_digits_learns_and_reports_measured_bytes(method, ranks):
    train, test = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    model = _model()
    apply_method(model, method, ranks)
    freeze_except(model, ["3", "6", "11"])
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    before = evaluate(model, test, batch_size=256, image_size=16)
    results = [train_epoch(model, train, optimizer=optimizer, batch_size=32, image_size=16,
                           measured_layers=["3", "6"], seed=e) for e in range(6)]
    after = evaluate(model, test, batch_size=256, image_size=16)
    assert results[-1]["loss"] < 0.7 * results[0]["loss"]
    assert after["accuracy"] > before["accuracy"] + 0.3
    assert results[0]["examples"] == len(train)
    input_bytes = 32 * 16 * 16 * 16 * 4 + 32 * 32 * 8 * 8 * 4  # the two trained convs' inputs, float32
    if method == "vanilla":
        assert results[0]["activation_bytes"] == input_bytes
    else:
        assert results[0]["activation_bytes"] < input_bytes / 20


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ValueError, match=re.escape("method must be one of ['vanilla', 'asi', 'asi-only', 'hosvd', "
                                                   "'gradfilt', 'asi-fp16', 'asi-int8'], "
                                                   "but got method='lora'")):
        apply_method(_model(), "lora", {})


def test_train_epoch_is_train_steps_over_its_shuffled_batches():
    train = load_dataset("digits", split="train")
    results, heads = [], []
    for loop in ("train_epoch", "train_steps"):
        model = _model()
        freeze_except(model, ["6", "11"])
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
        if loop == "train_epoch":
            result = train_epoch(model, train, optimizer=optimizer, batch_size=64, image_size=16,
                                 measured_layers=["6"], seed=3)
        else:
            result = train_steps(model, batches(train, batch_size=64, image_size=16, shuffle=True, seed=3),
                                 optimizer=optimizer, measured_layers=["6"])
        result.pop("seconds")
        results.append(result)
        heads.append(model[11].weight.detach().clone())
    assert results[0] == results[1] and results[0]["activation_bytes"] > 0
    assert torch.equal(heads[0], heads[1])


def test_train_steps_without_batches_is_a_clear_error():
    model = _model()
    with pytest.raises(ValueError, match=re.escape("no batches to train on")):
        train_steps(model, [], optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
