"""Contraction orders of the compressed conv: cheaper than the fixed order, exact on every path.

The FLOPs are counted by ``torch.utils.flop_counter`` (``odl_fed.training.flops.count_flops``) on the
layer shapes the accuracy benchmark trains at its planner's ranks (batch kept whole):
EfficientNet-Lite0 at 224 px (7x7 maps; the depthwise conv's input is 9x9 after its static
padding) and MobileNetV2 at 128 px (4x4 maps), batch 32. The "naive" order is the one used before
the orders were chosen: ``expand``, with the identity basis of every kept-whole mode multiplied.
"""

import copy
import math

import pytest
import torch
from torch import nn

from conftest import relative_error
from odl_fed.asi import ASIConv2d, tucker_numel
from odl_fed.asi import layers as asi_layers
from odl_fed.asi.tucker import (
    TuckerForm,
    contraction_flops,
    contraction_order,
    expand,
    orthonormalize,
    product_steps,
    tucker_core,
)
from odl_fed.asi.weight_grad import (
    CONV2D_ORDERS,
    ORDER_TIE_RATIO,
    Conv2dGeometry,
    conv2d_output_size,
    conv2d_weight_flops,
    conv2d_weight_from_tucker,
    conv2d_weight_order,
)
from odl_fed.training.flops import count_flops
from odl_fed.training.saved_memory import SavedTensorMeter

# name: (input shape, C_out, kernel, groups, padding)
LAYERS = {
    "effnet.expand": ((32, 192, 7, 7), 1152, 1, 1, 0),
    "effnet.depthwise": ((32, 1152, 9, 9), 1152, 3, 1152, 0),
    "effnet.project": ((32, 1152, 7, 7), 320, 1, 1, 0),
    "effnet.head": ((32, 320, 7, 7), 1280, 1, 1, 0),
    "mnv2.expand": ((32, 160, 4, 4), 960, 1, 1, 0),
    "mnv2.depthwise": ((32, 960, 4, 4), 960, 3, 960, 1),
    "mnv2.project": ((32, 960, 4, 4), 320, 1, 1, 0),
    "mnv2.head": ((32, 320, 4, 4), 1280, 1, 1, 0),
}
# (layer, planned ranks, the order expected, chosen FLOPs at most this fraction of the naive order's)
PLANNED = [
    ("effnet.expand", (32, 51, 4, 4), "project", 0.5),
    ("effnet.expand", (32, 24, 3, 2), "project", 0.5),
    ("effnet.depthwise", (32, 7, 2, 2), "reconstruct", 0.5),
    ("effnet.depthwise", (32, 1, 1, 1), "expand", 0.9),
    ("effnet.project", (32, 8, 7, 7), "project", 0.9),
    ("effnet.project", (32, 1, 1, 1), "project", 0.7),
    ("effnet.head", (32, 52, 3, 3), "project", 0.5),
    ("effnet.head", (32, 26, 2, 2), "project", 0.5),
    ("effnet.head", (32, 15, 2, 1), "project", 0.5),
    ("mnv2.expand", (32, 11, 4, 4), "project", 0.9),
    ("mnv2.expand", (32, 6, 2, 2), "project", 0.9),
    ("mnv2.depthwise", (32, 7, 4, 4), "reconstruct", 0.5),
    ("mnv2.depthwise", (32, 3, 4, 4), "reconstruct", 0.5),
    ("mnv2.project", (32, 1, 1, 1), "project", 0.9),
    ("mnv2.project", (32, 1, 4, 4), "project", 0.9),
    ("mnv2.head", (32, 4, 1, 1), "project", 0.5),
    ("mnv2.head", (32, 12, 4, 4), "project", 0.9),
    ("mnv2.head", (32, 6, 2, 2), "project", 0.5),
]


def _geometry(name):
    _, _, _, groups, padding = LAYERS[name]
    return Conv2dGeometry((1, 1), (padding, padding), (1, 1), groups)


def _weight_shape(name):
    shape, c_out, k, groups, _ = LAYERS[name]
    return torch.Size((c_out, shape[1] // groups, k, k))


def _form(shape, ranks, *, identity_for_whole=False, dtype=torch.float32):
    """A Tucker form at ``ranks`` (None factors for whole modes, or their identity: the old form)."""
    factors = tuple(
        (torch.eye(d, dtype=dtype) if identity_for_whole else None) if k == d
        else orthonormalize(torch.randn(d, k, dtype=dtype))
        for d, k in zip(shape, ranks)
    )
    return TuckerForm(torch.randn(*ranks, dtype=dtype), factors)


def _grad_output(shape, name, dtype=torch.float32):
    weight_shape = _weight_shape(name)
    size = conv2d_output_size(shape[2:], weight_shape[2:], _geometry(name))
    return torch.randn(shape[0], weight_shape[0], *size, dtype=dtype)


@pytest.mark.parametrize("name, ranks, expected, bound", PLANNED,
                         ids=[f"{n}-{'x'.join(map(str, r))}" for n, r, _, _ in PLANNED])
def test_chosen_order_costs_fewer_flops_than_the_naive_order(name, ranks, expected, bound):
    shape = LAYERS[name][0]
    weight_shape, geometry = _weight_shape(name), _geometry(name)
    dy = _grad_output(shape, name)
    order = conv2d_weight_order(shape, ranks, weight_shape, geometry)
    assert order == expected
    naive_form = _form(shape, ranks, identity_for_whole=True)
    naive, _ = count_flops(lambda: conv2d_weight_from_tucker(naive_form, dy, weight_shape, geometry, "expand"))
    form = TuckerForm(naive_form.core, tuple(None if u is not None and u.shape[0] == u.shape[1] else u
                                             for u in naive_form.factors))
    chosen, _ = count_flops(lambda: conv2d_weight_from_tucker(form, dy, weight_shape, geometry, order))
    assert chosen <= bound * naive


@pytest.mark.parametrize("name, ranks", [(n, r) for n, r, _, _ in PLANNED],
                         ids=[f"{n}-{'x'.join(map(str, r))}" for n, r, _, _ in PLANNED])
def test_analytic_flops_match_the_flop_counter_for_every_order(name, ranks):
    shape = LAYERS[name][0]
    weight_shape, geometry = _weight_shape(name), _geometry(name)
    form, dy = _form(shape, ranks), _grad_output(shape, name)
    costs = conv2d_weight_flops(shape, ranks, weight_shape, geometry)
    assert set(costs) == ({"expand", "project", "reconstruct"} if weight_shape[2:] == (1, 1)
                          else {"expand", "reconstruct"})
    for order, analytic in costs.items():
        counted, _ = count_flops(lambda: conv2d_weight_from_tucker(form, dy, weight_shape, geometry, order))
        assert counted == analytic, order
    chosen = conv2d_weight_order(shape, ranks, weight_shape, geometry)
    assert costs[chosen] <= ORDER_TIE_RATIO * min(costs.values())


@pytest.mark.parametrize("name, ranks", [(n, r) for n, r, _, _ in PLANNED][::3])
def test_core_order_is_the_cheapest_and_skips_kept_whole_modes(name, ranks):
    shape = LAYERS[name][0]
    x = torch.randn(*shape)
    form = _form(shape, ranks)
    order = contraction_order(shape, ranks)
    assert all(m != 0 for step in order for m in step)  # the batch is kept whole: never contracted
    counted, _ = count_flops(lambda: tucker_core(x, form.factors, order))
    assert counted == contraction_flops(shape, ranks, order)
    steps = product_steps(shape, [m for m, (d, k) in enumerate(zip(shape, ranks)) if k < d])
    import itertools

    assert counted == min(contraction_flops(shape, ranks, o) for o in itertools.permutations(steps))
    with_identity = _form(shape, ranks, identity_for_whole=True)
    naive, _ = count_flops(lambda: tucker_core(x, with_identity.factors, [(m,) for m in range(4)]))
    assert counted < naive


# Exactness at full rank, float64, for every order and every way of holding a full-rank mode:
# (in, out, kernel, stride, padding, dilation, groups, H x W)
CONVS = {
    "1x1": (6, 5, 1, 1, 0, 1, 1, (5, 4)),
    "1x1-stride2-pad1": (6, 5, 1, 2, 1, 1, 1, (7, 6)),
    "1x1-stride-2x1-pad-0x2": (4, 3, 1, (2, 1), (0, 2), 1, 1, (5, 5)),
    "3x3-pad1": (4, 6, 3, 1, 1, 1, 1, (6, 5)),
    "3x3-stride2-dilation2": (4, 4, 3, 2, 2, 2, 1, (9, 8)),
    "grouped": (6, 4, 3, 1, 1, 1, 2, (5, 5)),
    "depthwise": (6, 6, 3, 1, 1, 1, 6, (6, 6)),
    "depthwise-multiplier2": (4, 8, 3, 1, 0, 1, 4, (6, 7)),
}
# which modes hold a (rotated, full-rank) factor; the others are kept whole (None)
HOLDINGS = {"all whole": (), "batch whole": (1, 2, 3), "spatial whole": (0, 1), "channel whole": (0, 2, 3),
            "all rotated": (0, 1, 2, 3)}


@pytest.mark.parametrize("holding", list(HOLDINGS))
@pytest.mark.parametrize("case", list(CONVS))
def test_every_order_is_exact_at_full_rank(case, holding):
    cin, cout, k, s, p, d, g, size = CONVS[case]
    conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, dtype=torch.float64)
    x = torch.randn(3, cin, *size, dtype=torch.float64)
    y = conv(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    factors = tuple(orthonormalize(torch.randn(n, n, dtype=torch.float64)) if m in HOLDINGS[holding] else None
                    for m, n in enumerate(x.shape))
    form = TuckerForm(tucker_core(x, factors), factors)
    geometry = Conv2dGeometry(conv.stride, conv.padding, conv.dilation, conv.groups)
    orders = conv2d_weight_flops(x.shape, x.shape, conv.weight.shape, geometry)
    assert ("project" in orders) == (k == 1 and g == 1)
    for order in orders:
        got = conv2d_weight_from_tucker(form, dy, conv.weight.shape, geometry, order)
        assert relative_error(got, conv.weight.grad) <= 1e-10, order


def test_project_order_refuses_a_conv_it_does_not_fit():
    form = _form((2, 4, 5, 5), (2, 4, 5, 5), dtype=torch.float64)
    with pytest.raises(ValueError, match=r"order 'project' is for 1x1 convs with groups=1"):
        conv2d_weight_from_tucker(form, torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.Size((4, 1, 3, 3)),
                                  Conv2dGeometry((1, 1), (1, 1), (1, 1), 4), "project")
    with pytest.raises(ValueError, match=r"order must be one of"):
        conv2d_weight_from_tucker(form, torch.randn(2, 4, 5, 5, dtype=torch.float64), torch.Size((4, 4, 1, 1)),
                                  Conv2dGeometry((1, 1), (0, 0), (1, 1), 1), "transpose")


@pytest.mark.parametrize("factored", [(), (2,), (2, 3), (0, 1, 2, 3), (1, 3)])
def test_expand_inverts_the_core_with_fused_spatial_steps(factored):
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    factors = tuple(orthonormalize(torch.randn(d, d, dtype=torch.float64)) if m in factored else None
                    for m, d in enumerate(x.shape))
    assert relative_error(expand(tucker_core(x, factors), factors), x) <= 1e-12


def test_layer_chooses_its_orders_once_per_input_shape(monkeypatch):
    calls = []
    choose = asi_layers.conv2d_weight_order
    monkeypatch.setattr(asi_layers, "conv2d_weight_order", lambda *a: calls.append(a) or choose(*a))
    asi = ASIConv2d.from_conv(nn.Conv2d(8, 16, 1), ranks=(None, 3, 2, 2))
    for _ in range(3):
        asi(torch.randn(4, 8, 5, 5)).sum().backward()
    assert len(calls) == 1
    asi(torch.randn(2, 8, 5, 5)).sum().backward()  # another batch size: another shape, chosen once more
    assert len(calls) == 2
    cached = asi.contraction_orders((4, 8, 5, 5), (4, 3, 2, 2))
    assert len(calls) == 2 and cached.weight == choose((4, 8, 5, 5), (4, 3, 2, 2), asi.weight.shape, asi.geometry)


def test_a_kept_whole_mode_saves_no_basis():
    conv = nn.Conv2d(16, 24, 1)
    shape, ranks = (8, 16, 7, 7), (8, 4, 7, 3)  # batch and height kept whole
    asi = ASIConv2d.from_conv(conv, ranks=ranks)
    with SavedTensorMeter(exclude=asi.parameters()) as meter:
        asi(torch.randn(*shape)).sum()
    assert meter.nbytes == (math.prod(ranks) + 16 * 4 + 7 * 3) * 4 == tucker_numel(shape, ranks) * 4
    assert asi.basis_batch is None and asi.basis_height is None and asi.basis_channel.shape == (16, 4)


def test_orders_table_lists_every_order():
    assert set(CONV2D_ORDERS) == {"expand", "project", "reconstruct"}


@pytest.mark.parametrize("padding, folded", [((1, 1, 1, 1), True), ((2, 2, 0, 0), True), ((0, 1, 0, 1), False)],
                         ids=["symmetric", "width-only", "asymmetric"])
def test_static_zero_padding_is_folded_when_symmetric_and_stays_exact(padding, folded):
    conv = nn.Conv2d(6, 6, 3, groups=6, dtype=torch.float64)  # EfficientNet's depthwise conv: padding 0 ...
    pad = nn.ZeroPad2d(padding)  # ... after a static "same" padding
    asi = ASIConv2d.from_conv(copy.deepcopy(conv), ranks=(None,) * 4, pre_padding=pad)
    assert (asi.pre_padding is None) == folded
    x = torch.randn(4, 6, 7, 7, dtype=torch.float64)
    y = conv(pad(x))
    dy = torch.randn_like(y)
    y.backward(dy)
    asi(x).backward(dy)
    assert relative_error(asi.weight.grad, conv.weight.grad) <= 1e-10
    with SavedTensorMeter(exclude=asi.parameters()) as meter:
        asi(x.float().double())
    held = x.shape if folded else pad(x).shape
    assert meter.nbytes == math.prod(held) * 8  # full rank, every mode whole: the (un)padded input itself
