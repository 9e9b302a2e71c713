"""Tucker forms of activations: warm-started subspace iteration, exact HOSVD, the core.

Pure tensor functions, no autograd state. A tensor ``x`` of shape ``(d_0, ..., d_{N-1})`` is
read in its own memory layout: mode ``n`` is the middle axis of the view ``(A, d_n, Z)`` with
``A = prod(d_:n)`` and ``Z = prod(d_n+1:)``, so no mode is ever permuted into a copy. On CPU the
compression is memory-bound (it reads the activation once per pass), so each mode uses the
product that reads it the fewest times: its small Gram matrix in one pass when ``d_n`` is
small, otherwise the pair ``X_(n) (X_(n)^T U)`` in two passes with ``K_n`` columns.

A mode kept whole (``K_n == d_n``) has no factor: ``None`` stands for its identity basis, which
is neither stored nor multiplied by (the planner keeps the batch mode whole by default).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "TuckerForm",
    "mode_view",
    "mode_gram",
    "mode_grams",
    "orthonormalize",
    "subspace_iteration",
    "leading_subspace",
    "tucker_core",
    "Step",
    "product_steps",
    "contraction_order",
    "contraction_flops",
    "expansion_order",
    "expansion_flops",
    "expand",
    "hosvd",
    "hosvd_factors",
    "energy_ranks",
    "mode_spectra",
    "ranks_for_energy",
    "reconstruct",
    "tucker_numel",
]

# A mode this small (or at most twice its rank) is iterated through its Gram matrix, in one pass:
# on CPU one (d x rest) @ (rest x d) GEMM beats two skinny ones with K columns up to about here.
GRAM_MODE_MAX_DIM = 64
# Trailing small modes (a conv's height and width) whose sizes multiply to at most this share one
# Gram matrix of their joint unfolding, one GEMM, instead of many tiny batched ones.
JOINT_GRAM_MAX_SIZE = 256
# Trailing modes whose sizes multiply to at most this are contracted (and expanded) in one step,
# through the Kronecker product of their factors (:func:`product_steps`).
JOINT_PRODUCT_MAX_SIZE = 256


@dataclass(frozen=True)
class TuckerForm:
    """``x ~= core x_0 U_0 x_1 U_1 ...``: a core ``(K_0, ..., K_{N-1})`` and factors ``(d_n, K_n)``.

    A factor ``None`` is the identity of a mode kept whole (``K_n == d_n``), not stored.
    """

    core: Tensor
    factors: tuple[Tensor | None, ...]

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(self.core.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(k if u is None else u.shape[0] for u, k in zip(self.factors, self.core.shape, strict=True))

    def tensors(self) -> tuple[Tensor | None, ...]:
        return (self.core, *self.factors)

    def numel(self) -> int:
        return self.core.numel() + sum(u.numel() for u in self.factors if u is not None)


def tucker_numel(shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Numbers held by a Tucker form: ``prod(K_n) + sum(d_n * K_n)`` over the modes not kept whole."""
    return math.prod(ranks) + sum(d * k for d, k in zip(shape, ranks, strict=True) if k < d)



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


def mode_grams(x: Tensor, modes: Sequence[int]) -> dict[int, Tensor]:
    """Gram matrices of several modes; trailing small modes come from one joint Gram (one pass)."""
    wanted = set(modes)
    shape, last = x.shape, x.dim()
    start = last
    while start > 1 and start - 1 in wanted and math.prod(shape[start - 1:]) <= JOINT_GRAM_MAX_SIZE:
        start -= 1
    grams = {}
    if last - start >= 2:
        flat = x.reshape(-1, math.prod(shape[start:]))  # (A, d_s * ... * d_N-1)
        joint = (flat.T @ flat).view(*shape[start:], *shape[start:])
        letters = "abcdefghijklmnopqrstuvwxyz"
        block = last - start
        for i, mode in enumerate(range(start, last)):
            rows = list(letters[:block])
            cols = list(rows)
            cols[i] = letters[block]  # partial trace over every trailing mode but this one
            grams[mode] = torch.einsum(f"{''.join(rows)}{''.join(cols)}->{rows[i]}{cols[i]}", joint)
    for mode in wanted - set(grams):
        grams[mode] = mode_gram(x, mode)
    return grams


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


def subspace_iteration(x: Tensor, previous: Sequence[Tensor | None], modes: Sequence[int] | None = None
                       ) -> list[Tensor | None]:
    """One warm-started subspace-iteration step per mode: ``orth(X_(n) X_(n)^T U_n)``, each ``(d_n, K_n)``.

    Only ``modes`` (default: every mode) are iterated; the others, a mode kept whole (None) and a
    mode whose basis is square (full rank: any orthogonal basis is exact there) keep what they were given.
    """
    modes = range(len(previous)) if modes is None else modes
    active = [n for n in modes if previous[n] is not None and previous[n].shape[1] < previous[n].shape[0]]
    grams = mode_grams(x, [n for n in active if uses_gram(*previous[n].shape)])
    bases = list(previous)
    for mode in active:
        u = previous[mode]
        y = grams[mode] @ u if mode in grams else _mode_times_gram(x, mode, u)  # (d_n, K_n)
        bases[mode] = orthonormalize(y)
    return bases


def leading_subspace(x: Tensor, mode: int, rank: int, gram: Tensor | None = None) -> Tensor:
    """Exact dominant ``rank``-dimensional column space of ``X_(n)``, ``(d_n, rank)``.

    Eigenvectors of the mode's Gram matrix, largest first: one exact truncated-HOSVD factor.
    """
    gram = mode_gram(x, mode) if gram is None else gram
    work = gram.double()
    _, vectors = torch.linalg.eigh(work)  # ascending eigenvalues
    return vectors[:, -rank:].flip(-1).to(x.dtype).contiguous()


def mode_spectra(x: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per mode: eigenvalues (descending, float64) and eigenvectors of the mode's Gram matrix."""
    grams = mode_grams(x, range(x.dim()))
    spectra = []
    for mode in range(x.dim()):
        values, vectors = torch.linalg.eigh(grams[mode].double())
        spectra.append((values.flip(0).clamp_min(0), vectors.flip(1)))
    return spectra


def ranks_for_energy(spectra: Sequence[tuple[Tensor, Tensor]], eps: float) -> tuple[int, ...]:
    """Smallest per-mode ranks whose leading singular values keep ``eps`` of each mode's energy."""
    ranks = []
    for values, _ in spectra:
        cumulative = values.cumsum(0) / values.sum().clamp_min(torch.finfo(torch.float64).tiny)
        k = int(torch.searchsorted(cumulative, torch.tensor(eps, dtype=torch.float64)).item()) + 1
        ranks.append(min(k, values.numel()))
    return tuple(ranks)


def energy_ranks(x: Tensor, eps: float) -> tuple[int, ...]:
    """The ranks of ``x`` that keep ``eps`` of each mode's energy."""
    return ranks_for_energy(mode_spectra(x), eps)


Step = tuple[int, ...]  # modes contracted (or expanded) together: one mode, or two adjacent ones


def product_steps(shape: Sequence[int], modes: Sequence[int]) -> list[Step]:
    """``modes`` as product steps: each alone, but the two trailing modes together (one step with
    the Kronecker product of their factors) when both are in ``modes`` and their sizes multiply to
    at most :data:`JOINT_PRODUCT_MAX_SIZE`.

    Costs a few more FLOPs than two steps, but it is one GEMM with ``K_h * K_w`` columns instead of
    two with 1-9 columns, which on CPU run several times slower than their FLOPs say.
    """
    last = len(shape) - 1
    if last >= 2 and last - 1 in modes and last in modes and shape[last - 1] * shape[last] <= JOINT_PRODUCT_MAX_SIZE:
        return [(m,) for m in modes if m < last - 1] + [(last - 1, last)]
    return [(m,) for m in modes]


def _factored_modes(shape: Sequence[int], ranks: Sequence[int]) -> list[int]:
    return [n for n, (d, k) in enumerate(zip(shape, ranks, strict=True)) if k < d]


def contraction_flops(shape: Sequence[int], ranks: Sequence[int], order: Sequence[Step]) -> int:
    """FLOPs of contracting a ``shape`` tensor to ``ranks``, one step of ``order`` after another.

    A step over modes ``S`` of a tensor of ``N`` numbers costs ``2 N prod(K_S)`` and leaves
    ``N prod(K_S) / prod(d_S)`` numbers.
    """
    current, flops = list(shape), 0
    for step in order:
        flops += 2 * math.prod(current) * math.prod(ranks[m] for m in step)
        for m in step:
            current[m] = ranks[m]
    return flops


def contraction_order(shape: Sequence[int], ranks: Sequence[int], modes: Sequence[int] | None = None
                      ) -> tuple[Step, ...]:
    """The order of the :func:`product_steps` of ``modes`` (default: those with ``K_n < d_n``) that
    contracts ``shape`` to ``ranks`` in the fewest FLOPs.

    Tensors here have at most 4 modes (24 orders): every order is costed, once per layer shape.
    """
    steps = product_steps(shape, _factored_modes(shape, ranks) if modes is None else modes)
    return min(itertools.permutations(steps), key=lambda order: contraction_flops(shape, ranks, order))


def expansion_flops(shape: Sequence[int], ranks: Sequence[int], order: Sequence[Step]) -> int:
    """FLOPs of expanding a ``ranks`` core back to ``shape``, one step of ``order`` after another:
    the contraction's count run the other way (from ``ranks`` to ``shape``)."""
    return contraction_flops(ranks, shape, order)


def expansion_order(shape: Sequence[int], ranks: Sequence[int], modes: Sequence[int] | None = None
                    ) -> tuple[Step, ...]:
    """The order of the :func:`product_steps` of ``modes`` (default: those with ``K_n < d_n``) that
    expands a ``ranks`` core to ``shape`` in the fewest FLOPs."""
    steps = product_steps(shape, _factored_modes(shape, ranks) if modes is None else modes)
    return min(itertools.permutations(steps), key=lambda order: expansion_flops(shape, ranks, order))


def _step_factor(factors: Sequence[Tensor | None], step: Step) -> Tensor:
    """The factor of a step: a mode's own, or the Kronecker product of two adjacent modes' factors
    (rows ``(h, w)`` and columns ``(k_h, k_w)`` in the tensor's row-major order)."""
    if len(step) == 1:
        return factors[step[0]]
    first, second = (factors[m] for m in step)  # (d_a, K_a) (d_b, K_b)
    return (first[:, None, :, None] * second[None, :, None, :]).reshape(  # (d_a, d_b, K_a, K_b)
        first.shape[0] * second.shape[0], first.shape[1] * second.shape[1])


def _step_view(x: Tensor, step: Step) -> Tensor:
    """``x`` as ``(A, prod(d_step), Z)`` without a copy (the step's modes are adjacent)."""
    shape = x.shape
    return x.view(math.prod(shape[:step[0]]), math.prod(shape[m] for m in step), math.prod(shape[step[-1] + 1:]))


def _times(t: Tensor, u: Tensor) -> Tensor:
    """``u`` applied to the middle axis of ``t`` ``(A, d, Z)``: ``(d', d) @ (A, d, Z) -> (A, d', Z)``,
    as one GEMM when ``A`` or ``Z`` is 1."""
    a, _, z = t.shape
    if a == 1:
        return (u @ t[0]).unsqueeze(0)  # (d', d) @ (d, Z)
    if z == 1:
        return (t[..., 0] @ u.T).unsqueeze(-1)  # (A, d) @ (d, d')
    return torch.matmul(u, t)  # broadcast over A


def tucker_core(x: Tensor, factors: Sequence[Tensor | None], order: Sequence[Step] | None = None) -> Tensor:
    """``x x_0 U_0^T x_1 U_1^T ...`` (None: a mode kept whole, skipped).

    ``order``: the product steps, in order (default: :func:`contraction_order`, the fewest FLOPs).
    """
    core = x.contiguous()
    if order is None:
        ranks = [x.shape[n] if u is None else u.shape[1] for n, u in enumerate(factors)]
        order = contraction_order(x.shape, ranks, [n for n, u in enumerate(factors) if u is not None])
    for step in order:
        u = _step_factor(factors, step)  # (d_step, K_step)
        shape = list(core.shape)
        for m in step:
            shape[m] = factors[m].shape[1]
        core = _times(_step_view(core, step), u.T).reshape(shape)  # (A, d, Z) -> (A, K, Z)
    return core.contiguous()


def hosvd_factors(x: Tensor, ranks: Sequence[int]) -> tuple[Tensor | None, ...]:
    """The factors of an exact truncated HOSVD of contiguous ``x`` (None where a rank is full: kept whole)."""
    grams = mode_grams(x, [n for n, k in enumerate(ranks) if k < x.shape[n]])
    return tuple(leading_subspace(x, n, k, grams[n]) if n in grams else None for n, k in enumerate(ranks))


def hosvd(x: Tensor, ranks: Sequence[int]) -> TuckerForm:
    """Exact truncated HOSVD of ``x`` at ``ranks`` (the reference the warm iteration tracks)."""
    x = x.contiguous()
    factors = hosvd_factors(x, ranks)
    return TuckerForm(tucker_core(x, factors), factors)


def expand(core: Tensor, factors: Sequence[Tensor | None], order: Sequence[Step] | None = None) -> Tensor:
    """``core x_0 U_0 x_1 U_1 ...`` (None: a mode kept whole, skipped), in the product steps
    ``order`` (default: :func:`expansion_order`, the fewest FLOPs)."""
    full = core.contiguous()
    if order is None:
        shape = [k if u is None else u.shape[0] for u, k in zip(factors, core.shape, strict=True)]
        order = expansion_order(shape, core.shape, [n for n, u in enumerate(factors) if u is not None])
    for step in order:
        u = _step_factor(factors, step)  # (d_step, K_step)
        shape = list(full.shape)
        for m in step:
            shape[m] = factors[m].shape[0]
        full = _times(_step_view(full, step), u).reshape(shape)  # (A, K, Z) -> (A, d, Z)
    return full


def reconstruct(form: TuckerForm) -> Tensor:
    """The full tensor a Tucker form stands for."""
    return expand(form.core, form.factors)
