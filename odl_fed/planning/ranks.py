"""From an activation-memory budget to per-layer ASI ranks (the paper's rank planning).

On a few calibration batches, every trained layer's input is decomposed exactly (an HOSVD by mode
eigendecomposition, done once per layer and batch); for each explained-variance threshold ``eps``
of a grid, the ranks that keep ``eps`` of each mode's energy give the layer's compressed bytes
and its perplexity ``||dW_lowrank - dW_exact||_F`` (with ``relative``: divided by
``||dW_exact||_F``). One option per layer is then chosen to minimise
summed perplexity with summed bytes within the budget: a multiple-choice knapsack solved by
dynamic programming over a discretised budget. Same inputs, same plan.

Besides the thresholds, every layer has its lossless option where it is smaller than the input
(the full-rank Tucker form, ranks :func:`full_ranks`, perplexity 0) and,
with ``exact=True`` (the ``asi`` method: "ASI where the
budget needs it"), the option of staying exact: plain backprop, its whole input saved. Exact
options cost the most and lose nothing, so the knapsack keeps layers exact while the budget
allows and compresses the least sensitive ones first.

The torch part (:func:`calibrate`: options from calibration batches) is apart from the pure
choice (:func:`plan_from_options`: options -> knapsack -> :class:`RankPlan`).

Three grids (``grid=``):

- ``"paper"``: one threshold for every mode, as in the paper;
- ``"mixed"``: each threshold also offered with the batch and/or spatial (token) modes kept
  whole; the knapsack picks among all;
- ``"batch-whole"`` (default): the mixed options that keep the batch mode whole, falling back to
  ``"mixed"`` when none of them fits the budget.

Why keep the batch whole: a trained layer's bytes are mostly its channel basis (``C x K_c``),
so a whole batch costs a little more core; and the batch mode is the one mode with no memory
from step to step (each batch holds other examples), whose truncation to 2-8 ranks averages each
example's pairing of input and output gradient away. The perplexity does not see that loss (the
batch-mean part of the gradient dominates its norm) but top-1 does; measured in
docs/accuracy.md.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import Tensor, nn
from torch.nn.grad import conv2d_weight

from odl_fed.asi.layers import conv_geometry
from odl_fed.asi.storage import tucker_nbytes
from odl_fed.asi.tucker import TuckerForm, mode_spectra, ranks_for_energy, tucker_core, tucker_numel
from odl_fed.asi.weight_grad import conv2d_weight_from_tucker, linear_weight_from_tucker
from odl_fed.config import names
from odl_fed.config.units import parse_bytes

__all__ = [
    "DEFAULT_THRESHOLDS",
    "WEIGHTINGS",
    "LayerOption",
    "LayerPlan",
    "RankPlan",
    "BudgetTooSmallError",
    "parse_bytes",
    "calibrate",
    "choose",
    "plan_from_options",
    "plan_ranks",
    "full_ranks",
]

DEFAULT_THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Where the grid cannot meet a budget, it is extended: down for tight budgets, up for loose ones.
LOWER_THRESHOLDS = (0.05, 0.1, 0.2, 0.3)
UPPER_THRESHOLDS = (0.95, 0.98, 0.99)
KNAPSACK_RESOLUTION = 4096  # budget units of the dynamic programme
GRIDS = names.GRIDS
# How the knapsack sums the layers' gradient errors: "absolute" (the paper's; plan_ranks's default)
# or "relative" (each over its exact gradient's norm: plan_ranks(relative=True)).
WEIGHTINGS = names.WEIGHTINGS



class BudgetTooSmallError(ValueError):
    """No choice of thresholds fits the budget; the message says the minimum that would."""


@dataclass(frozen=True)
class LayerOption:
    """One way to hold one layer's input: a threshold's Tucker ranks (``whole`` names the modes kept
    uncompressed), the lossless full-rank Tucker form (``eps == 1``), or the input itself (``exact``)."""

    eps: float
    ranks: tuple[int, ...]
    nbytes: int
    perplexity: float
    whole: tuple[str, ...] = ()
    exact: bool = False


@dataclass(frozen=True)
class LayerPlan:
    name: str
    eps: float
    ranks: tuple[int, ...]
    nbytes: int
    perplexity: float
    whole: tuple[str, ...] = ()
    exact: bool = False  # the layer stays as it is (plain backprop): ``ranks`` is then its input's shape


@dataclass(frozen=True)
class RankPlan:
    """Per-layer ranks chosen under a budget; serialises to a small JSON file."""

    model: str
    budget_bytes: int
    batch_size: int
    layers: tuple[LayerPlan, ...]
    options: Mapping[str, tuple[LayerOption, ...]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def total_bytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    @property
    def total_perplexity(self) -> float:
        return sum(layer.perplexity for layer in self.layers)

    def targets(self) -> dict[str, tuple[int, ...] | None]:
        """``{layer: ranks}``, None for a layer kept exact
        (:meth:`odl_fed.training.methods.Method.apply` takes them)."""
        return {layer.name: None if layer.exact else layer.ranks for layer in self.layers}

    @property
    def exact_layers(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers if layer.exact)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "budget_bytes": self.budget_bytes,
            "batch_size": self.batch_size,
            "total_bytes": self.total_bytes,
            "layers": [asdict(layer) | {"ranks": list(layer.ranks), "whole": list(layer.whole)}
                       for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> RankPlan:
        """The inverse of :meth:`to_dict` (raises KeyError/TypeError/ValueError on a malformed dict)."""
        return cls(
            model=data["model"], budget_bytes=int(data["budget_bytes"]), batch_size=int(data["batch_size"]),
            layers=tuple(LayerPlan(name=entry["name"], eps=float(entry["eps"]),
                                   ranks=tuple(int(r) for r in entry["ranks"]),
                                   nbytes=int(entry["nbytes"]), perplexity=float(entry["perplexity"]),
                                   whole=tuple(str(m) for m in entry.get("whole", ())),
                                   exact=bool(entry.get("exact", False)))
                         for entry in data["layers"]),
        )

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, *, model: str | None = None, layers: Sequence[str] | None = None) -> RankPlan:
        """Load a plan; with ``model``/``layers`` given, a plan made for another model is refused."""
        path = Path(path)
        try:
            plan = cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(f"plan file {path} does not exist") from None
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as error:
            raise ValueError(f"plan file {path} is not a rank plan ({type(error).__name__}: {error})") from None
        if model is not None and plan.model != model:
            raise ValueError(f"plan file {path} was made for model {plan.model!r}, not {model!r}")
        if layers is not None and [layer.name for layer in plan.layers] != list(layers):
            raise ValueError(f"plan file {path} plans layers {[layer.name for layer in plan.layers]}, "
                             f"but the model trains {list(layers)}")
        return plan


def _static_padding(layer: nn.Module) -> nn.Module | None:
    pad = getattr(layer, "static_padding", None)
    return pad if isinstance(layer, nn.Conv2d) and isinstance(pad, nn.Module) else None


def _weight_grad(layer: nn.Module, form: TuckerForm, grad_output: Tensor) -> Tensor:
    if isinstance(layer, nn.Conv2d):
        geometry, _ = conv_geometry(layer, _static_padding(layer))
        return conv2d_weight_from_tucker(form, grad_output, layer.weight.shape, geometry)
    return linear_weight_from_tucker(form, grad_output)


def _exact_weight_grad(layer: nn.Module, x: Tensor, grad_output: Tensor) -> Tensor:
    if isinstance(layer, nn.Conv2d):
        g, _ = conv_geometry(layer, _static_padding(layer))
        return conv2d_weight(x, layer.weight.shape, grad_output, g.stride, g.padding, g.dilation, g.groups)
    return grad_output.reshape(-1, grad_output.shape[-1]).T @ x.reshape(-1, x.shape[-1])


def _as_modes(layer: nn.Module, x: Tensor, grad_output: Tensor) -> tuple[Tensor, Tensor]:
    """A linear layer's token inputs ``(B, L1, ..., C)`` as ``(B, L, C)``, as ASILinear sees them."""
    if isinstance(layer, nn.Linear) and x.dim() > 3:
        return x.reshape(x.shape[0], -1, x.shape[-1]), grad_output.reshape(x.shape[0], -1, grad_output.shape[-1])
    return x, grad_output


def whole_mode_choices(layer: nn.Module, ndim: int) -> list[dict[str, tuple[int, ...]]]:
    """The ways to keep non-feature modes whole: ``[{}, {"batch": (0,)}, {"spatial": (2, 3)}, both]``.

    A conv input is (B, C, H, W); a linear input (B, C) or (B, L, C), its feature mode last.
    """
    if isinstance(layer, nn.Conv2d):
        groups = {"batch": (0,), "spatial": (2, 3)}
    else:
        groups = {"batch": (0,), "tokens": (1,)} if ndim == 3 else {"batch": (0,)}
    names = list(groups)
    return [{n: groups[n] for n in subset} for k in range(len(names) + 1)
            for subset in itertools.combinations(names, k)]


def _padded_input(module: nn.Module, x: Tensor) -> Tensor:
    """What the compressed conv holds: its input after a static padding it cannot fold into its own."""
    pad = _static_padding(module)
    if pad is None:
        return x
    _, left = conv_geometry(module, pad)
    return x if left is None else left(x)


def full_ranks(shape: Sequence[int]) -> tuple[int, ...]:
    """The ranks at which a Tucker form is lossless: each mode's unfolding has rank at most
    ``min(d_n, prod(other dims))``."""
    total = math.prod(shape)
    return tuple(min(d, total // d) for d in shape)


def exact_option(shape: Sequence[int], itemsize: int) -> LayerOption:
    """The layer kept as it is: plain backprop saves its whole input."""
    return LayerOption(eps=1.0, ranks=tuple(shape), nbytes=math.prod(shape) * itemsize, perplexity=0.0,
                       exact=True)


def calibrate(
    model: nn.Module,
    layer_names: Sequence[str],
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    batch_size: int | None = None,
    whole_modes: bool = True,
    exact: bool = False,
    storage_itemsize: int | None = None,
    relative: bool = False,
) -> dict[str, list[LayerOption]]:
    """Each layer's options (ranks, bytes, perplexity) at each threshold, averaged over ``batches``.

    With ``whole_modes``, each threshold is offered again with the batch and/or spatial (token)
    modes kept whole (:func:`whole_mode_choices`); options with equal ranks are merged. Every
    layer also gets its lossless full-rank Tucker option (:func:`full_ranks`), and with ``exact``
    the option of staying exact (:func:`exact_option`). The model runs plain backprop here (the
    layers must not be swapped yet). Bytes are counted at ``batch_size`` (default: the
    calibration batch), the batch the plan will train with, and a Tucker form's at
    ``storage_itemsize`` bytes per number when the variant stores it narrower than the input
    (16-bit storage: 2; 8-bit: 1, plus its per-slice scales); an exact layer holds its input as it is.
    With ``relative``, a perplexity is divided by the norm of the layer's exact dW, so that every
    layer's error counts in proportion to its own gradient (see :func:`plan_ranks`).
    """
    modules = dict(model.named_modules())
    missing = [n for n in layer_names if n not in modules]
    if missing:
        raise KeyError(f"layers {missing} are not in the model {type(model).__name__}")
    layers = {n: modules[n] for n in layer_names}
    for name, layer in layers.items():
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"layer {name!r} is a {type(layer).__name__}; plannable layers: Conv2d, Linear")
    seen: dict[str, dict] = {n: {} for n in layers}

    def capture(name):
        def hook(module, args, output):
            # what the compressed layer packs: the input, after a padding the conv applies itself
            # (EfficientNet's static "same" padding) unless the layer folds it into the conv's own
            seen[name]["x"] = _padded_input(module, args[0]).detach()
            # what the plain layer saves when the plan keeps it exact: its input after any static padding
            pad = _static_padding(module)
            seen[name]["exact_shape"] = tuple((args[0] if pad is None else pad(args[0])).shape)
            # a tensor hook (not a module backward hook) tolerates in-place ops after the layer
            output.register_hook(lambda grad: seen[name].__setitem__("dy", grad.detach()))

        return hook

    handles = [layer.register_forward_hook(capture(name)) for name, layer in layers.items()]
    sums: dict[str, dict[tuple, list]] = {n: {} for n in layers}
    try:
        for inputs, targets in batches:
            for layer in layers.values():
                layer.weight.requires_grad_(True)
            loss_fn(model(inputs), targets).backward()
            for name, layer in layers.items():
                x, dy = _as_modes(layer, seen[name]["x"], seen[name]["dy"])
                x = x.contiguous()
                reference = _exact_weight_grad(layer, x, dy)
                scale = reference.norm().item() if relative else 1.0
                spectra = mode_spectra(x)
                choices = whole_mode_choices(layer, x.dim()) if whole_modes else [{}]
                for eps in thresholds:
                    energy_ranks = ranks_for_energy(spectra, eps)
                    for whole in choices:
                        kept = {m for modes in whole.values() for m in modes}
                        ranks = tuple(x.shape[m] if m in kept else r for m, r in enumerate(energy_ranks))
                        factors = tuple(None if k == d else vectors[:, :k].to(x.dtype).contiguous()  # None: whole
                                        for (_, vectors), k, d in zip(spectra, ranks, x.shape))
                        form = TuckerForm(tucker_core(x, factors), factors)
                        error = (_weight_grad(layer, form, dy) - reference).norm().item() / (scale or 1.0)
                        key = (eps, tuple(whole))
                        entry = sums[name].setdefault(key, [[], 0.0, 0, x.shape, x.element_size(), kept])
                        entry[0].append(ranks)
                        entry[1] += error
                        entry[2] += 1
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
    options = {}
    for name in layers:
        if not sums[name]:
            raise ValueError("calibration needs at least one batch, but got none")
        opts: dict[tuple[int, ...], LayerOption] = {}
        for (eps, whole), (ranks_seen, error_sum, count, shape, itemsize, kept) in sorted(sums[name].items()):
            shape = (batch_size or shape[0], *shape[1:])
            # the largest rank any calibration batch needed (a kept mode: whole), capped at the training shape
            ranks = tuple(shape[m] if m in kept else min(max(r[m] for r in ranks_seen), shape[m])
                          for m in range(len(shape)))
            option = LayerOption(eps=eps, ranks=ranks, nbytes=tucker_nbytes(shape, ranks, storage_itemsize or itemsize),
                                 perplexity=error_sum / count, whole=whole)
            if ranks not in opts or option.perplexity < opts[ranks].perplexity:
                opts[ranks] = option
        lossless = full_ranks(shape)
        if tucker_numel(shape, lossless) < math.prod(shape):  # else it holds more than the input itself
            opts[lossless] = LayerOption(eps=1.0, ranks=lossless,
                                         nbytes=tucker_nbytes(shape, lossless, storage_itemsize or itemsize),
                                         perplexity=0.0, whole=("all",))
        exact_shape = seen[name]["exact_shape"]
        extra = [exact_option((batch_size or exact_shape[0], *exact_shape[1:]), itemsize)] if exact else []
        options[name] = extra + sorted(opts.values(), key=_option_order)
    return options


def _option_order(option: LayerOption) -> tuple:
    return (not option.exact, option.eps, len(option.whole), option.whole)


def choose(options: Mapping[str, Sequence[LayerOption]], budget_bytes: int,
           *, resolution: int = KNAPSACK_RESOLUTION) -> dict[str, LayerOption]:
    """One option per layer minimising summed perplexity with summed bytes <= ``budget_bytes``.

    A multiple-choice knapsack by dynamic programming. Each option's bytes are rounded *up* to
    budget units (``budget / resolution``), so a returned plan always fits the exact budget.
    """
    names = list(options)
    minimum = sum(min(o.nbytes for o in options[n]) for n in names)
    if minimum > budget_bytes:
        raise BudgetTooSmallError(
            f"activation budget {budget_bytes} B is below the smallest plan for layers {names}: "
            f"it needs at least {minimum} B ({minimum / 1024:.1f} KiB)"
        )
    unit = max(1, math.ceil(budget_bytes / resolution))
    capacity = budget_bytes // unit
    inf = float("inf")
    best = [0.0] * (capacity + 1)  # best[c]: least perplexity of the layers so far within c units
    picks: list[list[int]] = []
    for name in names:
        weights = [math.ceil(o.nbytes / unit) for o in options[name]]
        new = [inf] * (capacity + 1)
        pick = [-1] * (capacity + 1)
        for c in range(capacity + 1):
            for j, (w, o) in enumerate(zip(weights, options[name])):
                if w <= c and best[c - w] + o.perplexity < new[c]:
                    new[c] = best[c - w] + o.perplexity
                    pick[c] = j
        best = new
        picks.append(pick)
    if best[capacity] == inf:
        raise BudgetTooSmallError(
            f"activation budget {budget_bytes} B is too small once rounded to {unit} B units for "
            f"layers {names}: it needs at least {minimum} B"
        )
    chosen: dict[str, LayerOption] = {}
    c = capacity
    for name, pick in zip(reversed(names), reversed(picks)):
        option = options[name][pick[c]]
        chosen[name] = option
        c -= math.ceil(option.nbytes / unit)
    return {name: chosen[name] for name in names}


def plan_from_options(options: Mapping[str, Sequence[LayerOption]], budget_bytes: int, *, batch_size: int,
                      model_name: str, grid: str = "batch-whole") -> RankPlan:
    """The pure choice: each layer's options -> the knapsack -> a plan (no torch runs here).

    With ``grid="batch-whole"``, the options that keep the batch mode whole (the exact and lossless
    ones among them) are tried first, and all options only when those cannot fit.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {list(GRIDS)}, but got grid={grid!r}")
    chosen = None
    if grid == "batch-whole":
        kept = {n: [o for o in opts if o.ranks[0] == batch_size] for n, opts in options.items()}
        if all(kept.values()) and sum(min(o.nbytes for o in opts) for opts in kept.values()) <= budget_bytes:
            chosen = choose(kept, budget_bytes)
    chosen = chosen or choose(options, budget_bytes)
    layers = tuple(LayerPlan(name=n, eps=o.eps, ranks=o.ranks, nbytes=o.nbytes, perplexity=o.perplexity,
                             whole=o.whole, exact=o.exact) for n, o in chosen.items())
    return RankPlan(model=model_name, budget_bytes=budget_bytes, batch_size=batch_size, layers=layers,
                    options={n: tuple(o) for n, o in options.items()})


def plan_ranks(
    model: nn.Module,
    layer_names: Sequence[str],
    batches: Sequence[tuple[Tensor, Tensor]],
    budget: str | int,
    *,
    model_name: str = "",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    batch_size: int | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
    grid: str = "batch-whole",
    exact: bool = False,
    storage_itemsize: int | None = None,
    relative: bool = False,
) -> RankPlan:
    """The best per-layer ranks for an activation ``budget`` (bytes, or a size like ``"200KB"``).

    Calibration (:func:`calibrate`, torch) then the choice (:func:`plan_from_options`, pure). The
    threshold grid is extended downwards when even its cheapest choice does not fit, and upwards
    when its dearest threshold choice leaves budget unused. ``grid`` is one of :data:`GRIDS` (see
    the module's docstring). With ``exact``, a layer may also stay exact (ranks None in
    :meth:`RankPlan.targets`): the knapsack keeps the most sensitive layers exact when it can.
    ``storage_itemsize``: bytes per number the variant stores its Tucker forms in (None: the
    input's), so a 16-bit storage buys about twice the rank for the same budget.
    ``relative``: weigh each layer's perplexity by its exact gradient's norm (relative errors
    summed) instead of summing the paper's absolute perplexities. Adam (the clients' optimizer)
    scales each parameter's step by its own gradient's size, so a layer with a small gradient moves
    as far as one with a large gradient, and summed absolute errors starve such layers of rank.
    Measured (docs/accuracy.md, "Beyond the paper"): on the hard problem it kept 5-6 more points of
    the conv gain at 1/50 (3 seeds); on the parity test's problem its plan at 1/20 fell 2.1 pp
    short of vanilla in one run where the absolute plan stays within 2 pp, so it is not the default.
    """
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {list(GRIDS)}, but got grid={grid!r}")
    whole_modes = grid != "paper"
    budget_bytes = parse_bytes(budget)
    batch_size = batch_size or batches[0][0].shape[0]
    levels = sorted(set(thresholds))
    options = calibrate(model, layer_names, batches, loss_fn=loss_fn, thresholds=levels, batch_size=batch_size,
                        whole_modes=whole_modes, exact=exact, storage_itemsize=storage_itemsize,
                        relative=relative)
    graded = {n: [o for o in opts if o.eps < 1.0] or opts for n, opts in options.items()}
    cheapest = sum(min(o.nbytes for o in opts) for opts in graded.values())
    dearest = sum(max(o.nbytes for o in opts) for opts in graded.values())
    extra = [e for e in LOWER_THRESHOLDS if e < levels[0]] if cheapest > budget_bytes else []
    extra += [e for e in UPPER_THRESHOLDS if e > levels[-1]] if dearest < budget_bytes else []
    if extra:
        more = calibrate(model, layer_names, batches, loss_fn=loss_fn, thresholds=extra, batch_size=batch_size,
                         whole_modes=whole_modes, storage_itemsize=storage_itemsize, relative=relative)
        options = {n: _merge_options(options[n], more[n]) for n in options}
    return plan_from_options(options, budget_bytes, batch_size=batch_size,
                             model_name=model_name or type(model).__name__, grid=grid)


def _merge_options(first: Sequence[LayerOption], second: Sequence[LayerOption]) -> list[LayerOption]:
    """Both lists' options, one per (ranks, exact): the one with the lower perplexity."""
    merged: dict[tuple, LayerOption] = {}
    for option in [*first, *second]:
        key = (option.ranks, option.exact)
        if key not in merged or option.perplexity < merged[key].perplexity:
            merged[key] = option
    return sorted(merged.values(), key=_option_order)
