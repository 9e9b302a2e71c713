"""Tucker forms of activations: warm-started subspace iteration, exact HOSVD, the core.

Pure tensor functions, no autograd state. A tensor ``x`` of shape ``(d_0, ..., d_{N-1})`` is
read in its own memory layout: mode ``n`` is the middle axis of the view ``(A, d_n, Z)`` with
``A = prod(d_:n)`` and ``Z = prod(d_n+1:)``, so no mode is ever permuted into a copy. On CPU the
compression is memory-bound (it reads the activation once per pass), so each mode uses the
product that reads it the fewest times: its small Gram matrix in one pass when ``d_n`` is
small, otherwise the pair ``X_(n) (X_(n)^T U)`` in two passes with ``K_n`` columns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "TuckerForm",
    "mode_view",
    "mode_gram",
    "orthonormalize",
    "subspace_iteration",
    "leading_subspace",
    "tucker_core",
    "hosvd",
    "energy_ranks",
    "reconstruct",
    "tucker_numel",
]

# A mode this small (or at most twice its rank) is iterated through its Gram matrix, in one pass.
GRAM_MODE_MAX_DIM = 16


@dataclass(frozen=True)
class TuckerForm:
    """``x ~= core x_0 U_0 x_1 U_1 ...``: a core ``(K_0, ..., K_{N-1})`` and factors ``(d_n, K_n)``."""

    core: Tensor
    factors: tuple[Tensor, ...]

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(u.shape[1] for u in self.factors)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(u.shape[0] for u in self.factors)

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.core, *self.factors)

    def numel(self) -> int:
        return self.core.numel() + sum(u.numel() for u in self.factors)


def tucker_numel(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Numbers held by a Tucker form: ``prod(K_n) + sum(d_n * K_n)``."""
    return math.prod(ranks) + sum(d * k for d, k in zip(shape, ranks, strict=True))


def mode_view(x: Tensor, mode: int) -> Tensor:
    """``x`` as ``(A, d_mode, Z)`` without a copy (``x`` must be contiguous)."""
    shape = x.shape
    return x.view(math.prod(shape[:mode]), shape[mode], math.prod(shape[mode + 1:]))


def mode_gram(x: Tensor, mode: int) -> Tensor:
    """``X_(n) X_(n)^T``, ``(d_n, d_n)``, in one pass over ``x``."""
    t = mode_view(x, mode)  # (A, d, Z)
    a, _, z = t.shape
    if a == 1:
        m = t[0]  # (d, Z)
        return m @ m.T
    if z == 1:
        m = t[..., 0]  # (A, d)
        return m.T @ m
    return torch.bmm(t, t.transpose(1, 2)).sum(0)  # (A, d, d) -> (d, d)


def _mode_times_gram(x: Tensor, mode: int, u: Tensor) -> Tensor:
    """``X_(n) (X_(n)^T U)``, ``(d_n, K)``, in two passes over ``x`` with ``K`` columns."""
    t = mode_view(x, mode)  # (A, d, Z)
    a, _, z = t.shape
    if a == 1:
        m = t[0]  # (d, Z)
        return m @ (m.T @ u)  # (Z, K) -> (d, K)
    if z == 1:
        m = t[..., 0]  # (A, d)
        return m.T @ (m @ u)  # (A, K) -> (d, K)
    w = torch.matmul(u.T, t)  # (K, d) @ (A, d, Z) -> (A, K, Z)
    return torch.matmul(t, w.transpose(1, 2)).sum(0)  # (A, d, K) -> (d, K)


def orthonormalize(y: Tensor) -> Tensor:
    """Orthonormal basis of the columns of ``y`` by a reduced QR (in float32 for half types)."""
    if y.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.qr(y.float()).Q.to(y.dtype)
    return torch.linalg.qr(y).Q


def uses_gram(dim: int, rank: int) -> bool:
    """Whether mode ``(dim, rank)`` is cheaper through its Gram matrix than through two passes."""
    return dim <= GRAM_MODE_MAX_DIM or dim <= 2 * rank


def subspace_iteration(x: Tensor, mode: int, previous: Tensor) -> Tensor:
    """One warm-started subspace-iteration step: ``orth(X_(n) X_(n)^T U_prev)``, ``(d_n, K)``."""
    dim, rank = previous.shape
    if rank >= dim:
        # A full-rank basis is any orthogonal matrix; keep the warm one.
        return previous
    if uses_gram(dim, rank):
        y = mode_gram(x, mode) @ previous
    else:
        y = _mode_times_gram(x, mode, previous)
    return orthonormalize(y)


def leading_subspace(x: Tensor, mode: int, rank: int) -> Tensor:
    """Exact dominant ``rank``-dimensional column space of ``X_(n)``, ``(d_n, rank)``.

    Eigenvectors of the mode's Gram matrix, largest first: one exact truncated-HOSVD factor.
    """
    gram = mode_gram(x, mode)
    work = gram.double() if gram.dtype != torch.float64 else gram
    _, vectors = torch.linalg.eigh(work)  # ascending eigenvalues
    return vectors[:, -rank:].flip(-1).to(x.dtype).contiguous()


def energy_ranks(x: Tensor, eps: float) -> tuple[int, ...]:
    """Smallest per-mode ranks whose leading singular values keep ``eps`` of each mode's energy."""
    ranks = []
    for mode in range(x.dim()):
        eigenvalues = torch.linalg.eigvalsh(mode_gram(x, mode).double()).flip(-1).clamp_min(0)
        cumulative = eigenvalues.cumsum(0) / eigenvalues.sum().clamp_min(torch.finfo(torch.float64).tiny)
        ranks.append(int(torch.searchsorted(cumulative, torch.tensor(eps, dtype=torch.float64)).item()) + 1)
    return tuple(min(r, d) for r, d in zip(ranks, x.shape))


def tucker_core(x: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """``x x_0 U_0^T x_1 U_1^T ...``, contracting the mode that shrinks ``x`` most first."""
    core = x
    order = sorted(range(x.dim()), key=lambda n: factors[n].shape[1] / factors[n].shape[0])
    for mode in order:
        u = factors[mode]  # (d_n, K_n)
        t = mode_view(core.contiguous(), mode)  # (A, d_n, Z)
        reduced = torch.matmul(u.T, t)  # (A, K_n, Z)
        shape = list(core.shape)
        shape[mode] = u.shape[1]
        core = reduced.reshape(shape)
    return core.contiguous()


def hosvd(x: Tensor, ranks: Sequence[int]) -> TuckerForm:
    """Exact truncated HOSVD of ``x`` at ``ranks`` (the reference the warm iteration tracks)."""
    x = x.contiguous()
    factors = tuple(leading_subspace(x, n, k) for n, k in enumerate(ranks))
    return TuckerForm(tucker_core(x, factors), factors)


def reconstruct(form: TuckerForm) -> Tensor:
    """The full tensor a Tucker form stands for (tests and diagnostics only)."""
    full = form.core
    for mode, u in enumerate(form.factors):
        t = mode_view(full.contiguous(), mode)  # (A, K_n, Z)
        shape = list(full.shape)
        shape[mode] = u.shape[0]
        full = torch.matmul(u, t).reshape(shape)  # (A, d_n, Z)
    return full
