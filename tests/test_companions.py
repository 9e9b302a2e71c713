"""FrozenBatchNorm2d and BitMaskReLU against autograd, and the bit packing under them."""

import pytest
import torch
from torch import nn

from odl_fed.asi.companions import BitMaskReLU, FrozenBatchNorm2d, pack_bits, unpack_bits


def test_pack_bits_covers_every_byte_and_odd_lengths():
    values = torch.arange(256)
    bits = ((values.unsqueeze(-1) >> torch.arange(8)) & 1).bool().reshape(-1)
    assert torch.equal(pack_bits(bits), values.to(torch.uint8))
    assert torch.equal(unpack_bits(pack_bits(bits), bits.numel()), bits)
    for n in (1, 7, 9, 1001):
        mask = torch.rand(n) > 0.5
        assert pack_bits(mask).numel() == -(-n // 8)
        assert torch.equal(unpack_bits(pack_bits(mask), n), mask)


@pytest.mark.parametrize("module, upper", [(nn.ReLU(), None), (nn.ReLU6(), 6.0), (nn.Hardtanh(0.0, 3.0), 3.0)])
def test_bit_mask_relu_matches_autograd(module, upper):
    masked = BitMaskReLU.from_module(module)
    assert masked.upper == upper
    x = torch.randn(4, 5, 6, 7, dtype=torch.float64) * 4
    x[0, 0, 0, :3] = torch.tensor([0.0, 6.0, 3.0], dtype=torch.float64)  # the interval's edges
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_output = torch.randn_like(x)
    y1, y2 = masked(x1), module(x2)
    y1.backward(grad_output)
    y2.backward(grad_output)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


def test_frozen_batchnorm_matches_eval_batchnorm():
    bn = nn.BatchNorm2d(6, dtype=torch.float64)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    bn.eval().requires_grad_(False)
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_output = torch.randn_like(x)
    y1, y2 = frozen(x1), bn(x2)
    y1.backward(grad_output)
    y2.backward(grad_output)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(x1.grad, x2.grad)
    torch.testing.assert_close(frozen.to_batchnorm()(x), y2)
    # same state-dict keys as the BatchNorm it replaces (num_batches_tracked is dropped on load)
    frozen.load_state_dict(bn.state_dict())
    assert set(frozen.state_dict()) == set(bn.state_dict()) - {"num_batches_tracked"}
