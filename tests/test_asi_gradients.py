"""ASI layers against autograd: exact at full rank, converging to HOSVD at low rank."""

import copy

import pytest
import torch
from torch import nn

from conftest import relative_error
from odl_fed.asi import ASIConv2d, ASILinear, hosvd
from odl_fed.asi.tucker import TuckerForm, orthonormalize, tucker_core
from odl_fed.asi.weight_grad import Conv2dGeometry, conv2d_weight_from_tucker, linear_weight_from_tucker

# (in, out, kernel, stride, padding, dilation, groups, bias, input H x W)
CONV_CASES = {
    "1x1": (8, 12, 1, 1, 0, 1, 1, True, (7, 7)),
    "3x3-pad1": (6, 10, 3, 1, 1, 1, 1, True, (9, 8)),
    "stride2": (6, 8, 3, 2, 1, 1, 1, False, (11, 10)),
    "stride-2x1-kernel-2x3": (4, 6, (2, 3), (2, 1), 0, 1, 1, True, (9, 9)),
    "pad-1x2": (5, 7, 3, 1, (1, 2), 1, 1, True, (8, 6)),
    "dilation2": (4, 6, 3, 1, 2, 2, 1, True, (10, 9)),
    "dilation-2x1-stride2": (4, 4, 3, 2, (2, 1), (2, 1), 1, False, (12, 9)),
    "groups2": (8, 6, 3, 1, 1, 1, 2, True, (7, 8)),
    "groups4-stride2": (8, 12, 3, 2, 1, 1, 4, False, (9, 9)),
    "depthwise": (9, 9, 3, 1, 1, 1, 9, True, (7, 7)),
    "depthwise-multiplier2-stride2": (6, 12, 5, 2, 2, 1, 6, False, (11, 11)),
    "depthwise-no-bias": (6, 6, 3, 1, 1, 1, 6, False, (8, 8)),
}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}


def _conv(case, dtype):
    cin, cout, k, s, p, d, g, bias, _ = CONV_CASES[case]
    return nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, groups=g, bias=bias, dtype=dtype)


def _grads(module, x, grad_output):
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    module(x).backward(grad_output)
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return x.grad, base.weight.grad, None if base.bias is None else base.bias.grad


def _assert_same_grads(asi, vanilla, x, dtype):
    grad_output = torch.randn_like(vanilla(x))
    for got, want in zip(_grads(asi, x, grad_output), _grads(vanilla, x, grad_output)):
        if want is None:
            assert got is None
        else:
            assert relative_error(got, want) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_full_rank_equals_autograd(case, dtype):
    vanilla = _conv(case, dtype)
    asi = ASIConv2d.from_conv(copy.deepcopy(vanilla), ranks=(None, None, None, None))
    x = torch.randn(5, vanilla.in_channels, *CONV_CASES[case][-1], dtype=dtype)
    _assert_same_grads(asi, vanilla, x, dtype)
    _assert_same_grads(asi, vanilla, x + 0.1 * torch.randn_like(x), dtype)  # a warm second step


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv_weight_from_rotated_full_tucker_equals_autograd(case, dtype):
    """Full-rank factors that are not the identity: every contraction of the backward is exercised."""
    conv = _conv(case, dtype)
    x = torch.randn(5, conv.in_channels, *CONV_CASES[case][-1], dtype=dtype)
    factors = [orthonormalize(torch.randn(d, d, dtype=dtype)) for d in x.shape]
    form = TuckerForm(tucker_core(x, factors), tuple(factors))
    y = conv(x.requires_grad_())
    grad_output = torch.randn_like(y)
    y.backward(grad_output)
    geometry = Conv2dGeometry(conv.stride, conv.padding, conv.dilation, conv.groups)
    got = conv2d_weight_from_tucker(form, grad_output, conv.weight.shape, geometry)
    assert relative_error(got, conv.weight.grad) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(9, 12), (4, 7, 12), (3, 2, 5, 12)], ids=["BxC", "BxLxC", "BxL1xL2xC"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_linear_full_rank_equals_autograd(shape, bias, dtype):
    vanilla = nn.Linear(12, 5, bias=bias, dtype=dtype)
    ranks = (None,) * min(len(shape), 3)
    asi = ASILinear.from_linear(copy.deepcopy(vanilla), ranks=ranks)
    x = torch.randn(*shape, dtype=dtype)
    _assert_same_grads(asi, vanilla, x, dtype)
    _assert_same_grads(asi, vanilla, x * 1.1, dtype)


@pytest.mark.parametrize("shape", [(9, 12), (4, 7, 12)], ids=["BxC", "BxLxC"])
def test_linear_weight_from_rotated_full_tucker_equals_autograd(shape):
    lin = nn.Linear(12, 5, dtype=torch.float64)
    x = torch.randn(*shape, dtype=torch.float64)
    factors = [orthonormalize(torch.randn(d, d, dtype=torch.float64)) for d in x.shape]
    form = TuckerForm(tucker_core(x, factors), tuple(factors))
    y = lin(x)
    grad_output = torch.randn_like(y)
    y.backward(grad_output)
    assert relative_error(linear_weight_from_tucker(form, grad_output), lin.weight.grad) <= 1e-10


def _low_rank_input(batch=16, channels=24, size=8, rank=4, noise=0.05):
    """A realistic activation: few dominant components per mode plus noise."""
    core = torch.randn(rank, rank, rank, rank, dtype=torch.float64)
    factors = [torch.randn(d, rank, dtype=torch.float64) for d in (batch, channels, size, size)]
    x = TuckerForm(core, tuple(factors))
    from odl_fed.asi.tucker import reconstruct

    full = reconstruct(x)
    return full + noise * full.std() * torch.randn_like(full)


def _weight_grad_error(conv, ranks, x, variant="asi", steps=1):
    asi = ASIConv2d.from_conv(copy.deepcopy(conv), ranks=ranks, variant=variant)
    vanilla = copy.deepcopy(conv)
    y = vanilla(x)
    grad_output = torch.randn_like(y)
    y.backward(grad_output)
    for _ in range(steps):
        asi.zero_grad()
        asi(x).backward(grad_output)
    return relative_error(asi.weight.grad, vanilla.weight.grad)


def _decaying_input(shape=(16, 24, 8, 8), decay=0.6):
    """Every mode's spectrum decays geometrically, as trained CNN activations' do."""
    from odl_fed.asi.tucker import reconstruct

    weights = [decay ** torch.arange(d, dtype=torch.float64) for d in shape]
    core = torch.randn(*shape, dtype=torch.float64)
    for mode, w in enumerate(weights):
        core = core * w.view([-1 if m == mode else 1 for m in range(len(shape))])
    factors = tuple(orthonormalize(torch.randn(d, d, dtype=torch.float64)) for d in shape)
    return reconstruct(TuckerForm(core, factors))


def test_conv_low_rank_error_shrinks_as_ranks_grow():
    conv = nn.Conv2d(24, 16, 3, padding=1, dtype=torch.float64)
    x = _decaying_input()
    errors = [_weight_grad_error(conv, (r, r, r, r), x) for r in (1, 2, 3, 4, 6, 8)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1 * errors[0]
    assert _weight_grad_error(conv, (None,) * 4, x) < 1e-12


def test_linear_low_rank_error_shrinks_as_ranks_grow():
    lin = nn.Linear(32, 8, dtype=torch.float64)
    x = _decaying_input((24, 10, 32))
    errors = []
    for r in (1, 2, 4, 8):
        asi = ASILinear.from_linear(copy.deepcopy(lin), ranks=(r, r, r))
        vanilla = copy.deepcopy(lin)
        grad_output = torch.randn(24, 10, 8, dtype=torch.float64)
        vanilla(x).backward(grad_output)
        asi(x).backward(grad_output)
        errors.append(relative_error(asi.weight.grad, vanilla.weight.grad))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("start", ["exact", "random"])
def test_warm_started_asi_tracks_truncated_hosvd_on_a_drifting_input(start):
    """After a few warm steps on a slowly drifting input, ASI's dW error is within 10% of HOSVD's.

    ``exact`` is the layer's own start (the first step's leading subspaces); ``random`` starts
    from random bases, as the paper does, so the iteration itself has to converge.
    """
    conv = nn.Conv2d(24, 16, 3, padding=1, dtype=torch.float64)
    ranks = (3, 4, 3, 3)
    asi = ASIConv2d.from_conv(copy.deepcopy(conv), ranks=ranks)
    if start == "random":
        for mode, dim, rank in zip(asi.modes, (16, 24, 8, 8), ranks):
            setattr(asi, f"basis_{mode}", orthonormalize(torch.randn(dim, rank, dtype=torch.float64)))
    x = _low_rank_input(noise=0.3)
    drift = _low_rank_input(noise=0.3)
    grad_output = torch.randn(16, 16, 8, 8, dtype=torch.float64)
    for step in range(8):
        x_t = x + 0.02 * step * drift
        asi.zero_grad()
        asi(x_t).backward(grad_output)
        exact = copy.deepcopy(conv)
        exact(x_t).backward(grad_output)
        form = hosvd(x_t, ranks)
        geometry = Conv2dGeometry(conv.stride, conv.padding, conv.dilation, conv.groups)
        hosvd_grad = conv2d_weight_from_tucker(form, grad_output, conv.weight.shape, geometry)
        asi_error = relative_error(asi.weight.grad, exact.weight.grad)
        hosvd_error = relative_error(hosvd_grad, exact.weight.grad)
    assert hosvd_error > 1e-3  # the ranks really truncate
    assert asi_error <= 1.10 * hosvd_error, (asi_error, hosvd_error)


def test_input_gradient_is_exact_at_any_rank():
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=2, dtype=torch.float64)
    asi = ASIConv2d.from_conv(copy.deepcopy(conv), ranks=(1, 1, 1, 1))
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    grad_output = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    got = _grads(asi, x, grad_output)[0]
    want = _grads(conv, x, grad_output)[0]
    assert relative_error(got, want) <= 1e-12
