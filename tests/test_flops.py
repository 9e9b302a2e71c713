"""FLOP counting: factorisations are counted, grouped conv gradients are not over-counted."""

import torch
from torch import nn

from odl_fed.training.flops import count_flops


def test_qr_and_eigh_are_counted():
    a = torch.randn(100, 4)
    total, per_op = count_flops(lambda: torch.linalg.qr(a))
    assert per_op["aten.linalg_qr"] == total == int(4 * 100 * 4 * 4 - 4 * 4**3 / 3)
    _, per_op = count_flops(lambda: torch.linalg.eigh(a.T @ a))
    assert per_op["aten._linalg_eigh"] == 9 * 4**3


def test_depthwise_conv_backward_costs_what_its_forward_costs():
    conv = nn.Conv2d(64, 64, 3, padding=1, groups=64)
    x = torch.randn(4, 64, 8, 8, requires_grad=True)
    forward = 2 * 4 * 8 * 8 * 64 * 9
    _, per_op = count_flops(lambda: conv(x).sum().backward())
    assert per_op["aten.convolution"] == forward
    assert per_op["aten.convolution_backward"] == 2 * forward  # input and weight gradients
