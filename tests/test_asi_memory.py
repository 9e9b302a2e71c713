"""What the compressed layers hold for backward, counted by saved_tensors_hooks."""

import math

import pytest
import torch
from torch import nn

from odl_fed.asi import ASIConv2d, ASILinear, BitMaskReLU, FrozenBatchNorm2d, inject_asi, tucker_numel
from odl_fed.training.saved_memory import SavedTensorMeter


def _saved_bytes(module, x):
    with SavedTensorMeter(exclude=module.parameters()) as meter:
        module(x).sum()
    return meter.nbytes


@pytest.mark.parametrize(
    "conv, shape, ranks",
    [
        (nn.Conv2d(32, 64, 1), (16, 32, 14, 14), (2, 4, 3, 3)),
        (nn.Conv2d(48, 48, 3, padding=1, groups=48), (16, 48, 14, 14), (4, 8, 2, 2)),
        (nn.Conv2d(16, 24, 3, stride=2, padding=(1, 2)), (8, 16, 15, 13), (3, 5, 4, 4)),
    ],
    ids=["1x1", "depthwise", "strided"],
)
def test_conv_saves_exactly_the_tucker_form(conv, shape, ranks):
    x = torch.randn(*shape, requires_grad=True)  # needs an input gradient: the weight is saved too
    asi = ASIConv2d.from_conv(conv, ranks=ranks)
    saved = _saved_bytes(asi, x)
    assert saved == tucker_numel(shape, ranks) * x.element_size()
    assert saved < math.prod(shape) * x.element_size() / 20
    vanilla = _saved_bytes(conv, x)
    assert vanilla == math.prod(shape) * x.element_size()  # the reference really holds its input


@pytest.mark.parametrize("shape, ranks", [((64, 256), (2, 4)), ((16, 50, 128), (2, 8, 12))], ids=["BxC", "BxLxC"])
def test_linear_saves_exactly_the_tucker_form(shape, ranks):
    lin = nn.Linear(shape[-1], 32)
    x = torch.randn(*shape, requires_grad=True)
    saved = _saved_bytes(ASILinear.from_linear(lin, ranks=ranks), x)
    assert saved == tucker_numel(shape, ranks) * x.element_size()
    assert saved < math.prod(shape) * x.element_size() / 10


def test_frozen_input_layer_saves_only_the_tucker_form_and_no_weight():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    asi = ASIConv2d.from_conv(conv, ranks=(2, 2, 2, 2))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        asi(torch.randn(4, 8, 6, 6))  # input does not require grad: the weight is not needed
    assert all(not isinstance(t, nn.Parameter) and t.data_ptr() != conv.weight.data_ptr() for t in saved)
    assert sum(t.numel() for t in saved) == tucker_numel((4, 8, 6, 6), (2, 2, 2, 2))


def test_companions_save_a_scale_and_a_bit_mask():
    x = torch.randn(8, 32, 7, 7, requires_grad=True)
    bn = FrozenBatchNorm2d(32)
    assert _saved_bytes(bn, x) == 32 * 4  # the per-channel scale, nothing of x
    relu6 = BitMaskReLU(upper=6.0)
    assert _saved_bytes(relu6, x) == math.ceil(x.numel() / 8)  # one bit per element
    vanilla = nn.Sequential(nn.BatchNorm2d(32).eval(), nn.ReLU6())
    assert _saved_bytes(vanilla, x) >= 2 * x.numel() * 4


def test_whole_fine_tuned_block_holds_far_less_than_vanilla():
    def block():
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(16, 96, 1, bias=False), nn.BatchNorm2d(96), nn.ReLU6(inplace=True),
            nn.Conv2d(96, 96, 3, padding=1, groups=96, bias=False), nn.BatchNorm2d(96), nn.ReLU6(inplace=True),
            nn.Conv2d(96, 32, 1, bias=False), nn.BatchNorm2d(32),
        ).eval()

    x = torch.randn(32, 16, 7, 7)
    vanilla = block()
    asi = block()
    swapped = inject_asi(asi, {"0": (2, 4, 2, 2), "3": (2, 4, 2, 2), "6": (2, 4, 2, 2)})
    assert swapped == ["0", "1", "2", "3", "4", "5", "6", "7"]
    with SavedTensorMeter(exclude=vanilla.parameters()) as v:
        vanilla(x)
    with SavedTensorMeter(exclude=asi.parameters()) as a:
        asi(x)
    assert v.nbytes > 40 * a.nbytes, (v.nbytes, a.nbytes)


def test_meter_splits_bytes_by_module_and_counts_shared_storage_once():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1))
    x = torch.randn(2, 4, 9, 9)
    modules = {"conv0": model[0], "relu": model[1], "conv2": model[2]}
    with SavedTensorMeter(exclude=model.parameters(), modules=modules) as meter:
        model(x)
    # ReLU saves its output, which is also conv2's input: held once, attributed to both.
    assert meter.nbytes_of(["relu"]) == meter.nbytes_of(["conv2"]) == 2 * 8 * 7 * 7 * 4
    assert meter.nbytes_of(["conv0"]) == x.numel() * 4
    assert meter.nbytes == meter.nbytes_of(["conv0", "relu", "conv2"]) == (2 * 8 * 7 * 7 + x.numel()) * 4
