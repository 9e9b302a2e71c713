"""ASI modules as a trainer uses them: batches change, eval runs, state saves, models train."""

import copy
import re

import pytest
import torch
from torch import nn

from conftest import relative_error
from odl_fed.asi import (
    ASIConv2d,
    ASILinear,
    BitMaskReLU,
    FrozenBatchNorm2d,
    LayerNotFoundError,
    freeze_except,
    inject_asi,
    last_conv_names,
    restore_model,
)
from odl_fed.training.saved_memory import SavedTensorMeter


def test_batch_size_change_caps_the_batch_rank_and_keeps_the_other_bases_warm():
    asi = ASIConv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), ranks=(4, 3, 2, 2))
    asi(torch.randn(16, 8, 6, 6)).sum().backward()
    channel_basis = asi.basis_channel
    asi(torch.randn(3, 8, 6, 6)).sum().backward()  # a short last batch
    assert asi.last_ranks == (3, 3, 2, 2)
    assert asi.basis_batch is None  # the short batch is kept whole: no basis is formed for it
    assert asi.basis_channel.shape == channel_basis.shape
    asi(torch.randn(16, 8, 6, 6)).sum().backward()  # back to full batches
    assert asi.last_ranks == (4, 3, 2, 2) and asi.basis_batch.shape == (16, 4)


def test_changed_batch_gradient_stays_exact_at_full_rank():
    conv = nn.Conv2d(4, 6, 3, padding=1, dtype=torch.float64)
    asi = ASIConv2d.from_conv(copy.deepcopy(conv), ranks=(None,) * 4)
    for batch in (8, 3, 8):
        x = torch.randn(batch, 4, 5, 5, dtype=torch.float64)
        asi.zero_grad()
        conv.zero_grad()
        asi(x).sum().backward()
        conv(x).sum().backward()
        assert relative_error(asi.weight.grad, conv.weight.grad) < 1e-10


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "frozen_weight"])
def test_no_weight_gradient_means_no_compression(context):
    conv = nn.Conv2d(4, 6, 3, padding=1)
    asi = ASIConv2d.from_conv(conv, ranks=(2, 2, 2, 2)).eval()
    x = torch.randn(5, 4, 7, 7)
    if context == "frozen_weight":
        conv.requires_grad_(False)
        with SavedTensorMeter() as meter:
            y = asi(x)
        assert meter.nbytes == 0
    else:
        with getattr(torch, context)():
            y = asi(x)
    assert asi.basis_batch is None and asi.last_ranks is None
    torch.testing.assert_close(y, conv(x))


def test_forward_output_is_exact_at_low_rank():
    conv = nn.Conv2d(4, 6, 3, padding=1)
    lin = nn.Linear(6, 3)
    x = torch.randn(5, 4, 7, 7)
    torch.testing.assert_close(ASIConv2d.from_conv(conv, ranks=(1, 1, 1, 1))(x), conv(x))
    tokens = torch.randn(2, 9, 6)
    torch.testing.assert_close(ASILinear.from_linear(lin, ranks=(1, 1, 1))(tokens), lin(tokens))


def test_state_dict_round_trip_keeps_the_warm_bases():
    asi = ASIConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1), ranks=(2, 3, 2, 2))
    asi(torch.randn(8, 4, 7, 7)).sum().backward()
    state = asi.state_dict()
    assert {"base_layer.weight", "base_layer.bias", "basis_batch", "basis_channel"} <= set(state)
    fresh = ASIConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1), ranks=(2, 3, 2, 2))
    fresh.load_state_dict(state)
    for mode in asi.modes:
        torch.testing.assert_close(getattr(fresh, f"basis_{mode}"), getattr(asi, f"basis_{mode}"))
    torch.testing.assert_close(fresh.weight, asi.weight)
    # the other way: a state without bases loads into a warm layer and resets it
    asi.load_state_dict(ASIConv2d.from_conv(nn.Conv2d(4, 6, 3, padding=1), ranks=(2, 3, 2, 2)).state_dict())
    assert asi.basis_batch is None


def test_parameters_are_shared_with_the_original_layer():
    conv = nn.Conv2d(4, 6, 3)
    asi = ASIConv2d.from_conv(conv, ranks=(2, 2, 2, 2))
    assert asi.weight is conv.weight and list(asi.parameters()) == list(conv.parameters())
    asi(torch.randn(3, 4, 8, 8)).sum().backward()
    assert conv.weight.grad is not None and conv.bias.grad is not None


def _small_problem():
    """Four classes of noisy prototype images: their activations are low rank, as real ones are."""
    torch.manual_seed(0)
    prototypes = torch.randn(4, 3, 12, 12)
    y = torch.arange(96) % 4
    x = prototypes[y] * (1 + 0.3 * torch.randn(96, 1, 1, 1)) + torch.randn(96, 3, 12, 12)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU6(),
        nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4),
    )
    return model, x, y


def test_model_with_swapped_layers_trains():
    model, x, y = _small_problem()
    trained = ["3", "6", "11"]
    swapped = inject_asi(model, {"3": (4, 8, 3, 3), "6": (4, 8, 3, 3), "11": (4, 8)})
    assert swapped == ["3", "4", "5", "6", "7", "8", "11"]
    assert isinstance(model[4], FrozenBatchNorm2d) and isinstance(model[5], BitMaskReLU)
    assert isinstance(model[1], nn.BatchNorm2d)  # before the fine-tuned part: untouched
    freeze_except(model, trained)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.02)
    losses = []
    for epoch in range(10):
        for i in range(0, 96, 32):
            loss = nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses
    assert model[0].weight.grad is None  # frozen stays frozen


def test_restore_model_gives_back_the_original_layers():
    model, x, _ = _small_problem()
    model.eval()
    expected = model(x)
    inject_asi(model, {"3": (2, 2, 2, 2)})
    restored = restore_model(model)
    assert restored == ["3", "4", "5", "7", "8"]
    assert type(model[3]) is nn.Conv2d and type(model[4]) is nn.BatchNorm2d and type(model[5]) is nn.ReLU6
    torch.testing.assert_close(model.eval()(x), expected)


def test_last_conv_names_follow_forward_order():
    model, _, _ = _small_problem()
    assert last_conv_names(model, 2) == ["3", "6"]
    with pytest.raises(ValueError, match=re.escape("count must be an integer from 1 to 3")):
        last_conv_names(model, 4)


@pytest.mark.parametrize(
    "ranks, message",
    [
        ((2, 0, 2, 2), "the channel rank must be a positive integer or None, but got 0"),
        ((2, 2.5, 2, 2), "the channel rank must be a positive integer or None, but got 2.5"),
        ((2, 2, 2), "ranks must be a sequence of 4 values, one per mode ('batch', 'channel', 'height', 'width')"),
        ("2222", "ranks must be a sequence of 4 values"),
        ((True, 2, 2, 2), "the batch rank must be a positive integer or None, but got True"),
    ],
)
def test_bad_ranks_name_the_layer_and_the_value(ranks, message):
    model, _, _ = _small_problem()
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        inject_asi(model, {"3": ranks})
    assert "'3'" in str(info.value)
    assert type(model[3]) is nn.Conv2d  # nothing was changed


def test_unknown_and_unsupported_layers_are_clear_errors():
    model, _, _ = _small_problem()
    with pytest.raises(LayerNotFoundError, match=re.escape("layer 'features.3' is not in the model Sequential")):
        inject_asi(model, {"features.3": (2, 2, 2, 2)})
    with pytest.raises(TypeError, match=re.escape(
            "layer '4' is a torch.nn.modules.batchnorm.BatchNorm2d, which cannot be compressed; "
            "supported layer types: torch.nn.Conv2d, Conv2dStaticSamePadding (EfficientNet), torch.nn.Linear")):
        inject_asi(model, {"3": (2, 2, 2, 2), "4": (2, 2, 2, 2)})
    assert type(model[3]) is nn.Conv2d  # all targets are checked before any swap
    inject_asi(model, {"3": (2, 2, 2, 2)})
    with pytest.raises(ValueError, match="already a ASIConv2d"):
        inject_asi(model, {"3": (2, 2, 2, 2)})


def test_linear_input_with_the_wrong_number_of_modes_is_a_clear_error():
    asi = ASILinear.from_linear(nn.Linear(6, 3), ranks=(2, 2), name="head")
    with pytest.raises(ValueError, match=re.escape("ASILinear 'head': ranks (2, 2) are for inputs with modes "
                                                   "('batch', 'channel'), but got an input of shape (2, 4, 6)")):
        asi(torch.randn(2, 4, 6))


def test_unsupported_padding_mode_is_refused():
    with pytest.raises(ValueError, match=re.escape("padding_mode must be one of ['zeros'], but got "
                                                   "padding_mode='reflect'")):
        ASIConv2d.from_conv(nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect"), ranks=(1, 1, 1, 1))
