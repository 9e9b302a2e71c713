"""The Tucker building blocks: Gram matrices, the warm iteration, HOSVD, the core."""

import pytest
import torch

from conftest import relative_error
from odl_fed.asi.tucker import (
    TuckerForm,
    energy_ranks,
    hosvd,
    leading_subspace,
    mode_gram,
    mode_grams,
    orthonormalize,
    reconstruct,
    subspace_iteration,
    tucker_core,
    tucker_numel,
)


def _unfold(x, mode):
    return x.movedim(mode, 0).reshape(x.shape[mode], -1)


@pytest.mark.parametrize("shape", [(6, 10, 7, 7), (5, 4, 20, 30), (3, 8), (4, 5, 6)])
def test_mode_grams_equal_the_unfoldings_grams(shape):
    x = torch.randn(*shape, dtype=torch.float64)
    grams = mode_grams(x, range(len(shape)))
    for mode in range(len(shape)):
        unfolded = _unfold(x, mode)
        torch.testing.assert_close(grams[mode], unfolded @ unfolded.T)
        torch.testing.assert_close(mode_gram(x, mode), unfolded @ unfolded.T)


def test_warm_iteration_converges_to_the_leading_subspace():
    torch.manual_seed(1)
    x = reconstruct(TuckerForm(torch.randn(3, 3, 3, dtype=torch.float64) * 10,
                               tuple(torch.randn(d, 3, dtype=torch.float64) for d in (20, 30, 12))))
    x = x + 0.1 * torch.randn_like(x)
    bases = [orthonormalize(torch.randn(d, 3, dtype=torch.float64)) for d in x.shape]
    for _ in range(6):
        bases = subspace_iteration(x, bases)
    for mode, u in enumerate(bases):
        exact = leading_subspace(x, mode, 3)
        # the same subspace: the projections agree
        torch.testing.assert_close(u @ u.T, exact @ exact.T, atol=1e-8, rtol=0)


def test_hosvd_is_exact_at_full_rank_and_holds_the_tucker_size():
    x = torch.randn(4, 5, 6, 7, dtype=torch.float64)
    form = hosvd(x, x.shape)
    assert relative_error(reconstruct(form), x) < 1e-12
    small = hosvd(x, (2, 3, 2, 2))
    assert small.numel() == tucker_numel(x.shape, (2, 3, 2, 2)) == 2 * 3 * 2 * 2 + 4 * 2 + 5 * 3 + 6 * 2 + 7 * 2
    assert 0 < relative_error(reconstruct(small), x) < 1


def test_core_contraction_order_does_not_change_the_core():
    x = torch.randn(6, 7, 8, dtype=torch.float64)
    factors = [orthonormalize(torch.randn(d, 3, dtype=torch.float64)) for d in x.shape]
    expected = torch.einsum("abc,ai,bj,ck->ijk", x, *factors)
    torch.testing.assert_close(tucker_core(x, factors), expected)


def test_energy_ranks_keep_the_asked_energy():
    x = reconstruct(TuckerForm(torch.randn(2, 2, 2, dtype=torch.float64),
                               tuple(torch.randn(d, 2, dtype=torch.float64) for d in (10, 12, 14))))
    assert energy_ranks(x, 0.999999) == (2, 2, 2)
    assert energy_ranks(x, 0.01) == (1, 1, 1)
