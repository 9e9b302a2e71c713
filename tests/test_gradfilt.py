"""Gradient filtering behind the same layers: exact at radius 1, pooled memory, clear limits."""

import copy
import re

import pytest
import torch
from torch import nn

from conftest import relative_error
from odl_fed.asi import ASIConv2d, ASILinear, inject_asi
from odl_fed.asi.variants import GradFilterVariant
from odl_fed.training.saved_memory import SavedTensorMeter
from test_asi_gradients import CONV_CASES, _conv, _grads


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_gradfilt_radius_one_equals_autograd(case):
    vanilla = _conv(case, torch.float64)
    layer = ASIConv2d.from_conv(copy.deepcopy(vanilla), ranks=None, variant=GradFilterVariant(radius=1))
    x = torch.randn(4, vanilla.in_channels, *CONV_CASES[case][-1], dtype=torch.float64)
    grad_output = torch.randn_like(vanilla(x))
    for got, want in zip(_grads(layer, x, grad_output), _grads(vanilla, x, grad_output)):
        assert (got is None and want is None) or relative_error(got, want) <= 1e-10


def test_gradfilt_token_linear_radius_one_equals_autograd():
    vanilla = nn.Linear(12, 5, dtype=torch.float64)
    layer = ASILinear.from_linear(copy.deepcopy(vanilla), ranks=None, variant=GradFilterVariant(radius=1))
    x = torch.randn(3, 10, 12, dtype=torch.float64)
    grad_output = torch.randn(3, 10, 5, dtype=torch.float64)
    for got, want in zip(_grads(layer, x, grad_output), _grads(vanilla, x, grad_output)):
        assert relative_error(got, want) <= 1e-10


# Stride-1 convs (the paper's last layers): a smooth input is what radius 2 assumes. Strided convs
# run (the pooled geometry is kept) but their taps shift against the patches: a coarse estimate.
@pytest.mark.parametrize("stride, padding", [(1, 1), (1, 0), (2, 1)])
def test_gradfilt_saves_the_pooled_input_and_approximates_smooth_gradients(stride, padding):
    conv = nn.Conv2d(8, 8, 3, stride=stride, padding=padding, dtype=torch.float64)
    layer = ASIConv2d.from_conv(copy.deepcopy(conv), ranks=None, variant="gradfilt")  # radius 2
    x = torch.nn.functional.interpolate(torch.randn(4, 8, 7, 7, dtype=torch.float64), size=(14, 14),
                                        mode="bilinear", align_corners=False)  # smooth maps: what r=2 assumes
    with SavedTensorMeter(exclude=layer.parameters()) as meter:
        y = layer(x)
    assert meter.nbytes == 4 * 8 * 7 * 7 * 8  # float64, pooled 2x2
    grad_output = torch.ones_like(y)
    y.backward(grad_output)
    conv(x).backward(grad_output)
    assert layer.weight.grad.shape == conv.weight.grad.shape
    if stride == 1:
        assert relative_error(layer.weight.grad, conv.weight.grad) < 0.5


def test_gradfilt_takes_no_ranks_and_needs_a_pooled_mode():
    with pytest.raises(ValueError, match=re.escape("variant 'gradfilt' takes no ranks, but got ranks=(2, 2, 2, 2)")):
        ASIConv2d.from_conv(nn.Conv2d(3, 3, 3), ranks=(2, 2, 2, 2), variant="gradfilt")
    with pytest.raises(ValueError, match=re.escape("gradfilt radius must be a positive integer, but got radius=0")):
        GradFilterVariant(radius=0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    assert inject_asi(model, {"2": None}, variant="gradfilt") == ["2"]
    model(torch.randn(2, 3, 9, 9)).sum().backward()
    assert model[2].weight.grad is not None
