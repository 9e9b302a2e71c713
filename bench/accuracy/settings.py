"""The accuracy benchmark's settings: the YAML file read once into frozen dataclasses, and the method names."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from bench.settings import check_keys, read_settings
from odl_fed.planning.ranks import WEIGHTINGS
from odl_fed.schema import METHOD_NAMES, MethodName

__all__ = ["HEAD_ONLY", "ASI_ONLY", "ASI_INT8", "ASI_PAPER", "PLANNER", "METHODS", "SCHEDULES", "WEIGHTINGS",
           "PretrainSpec", "Case", "Settings", "load_settings"]

# The benchmark's own rows, which odl_fed.training.methods does not hold:
HEAD_ONLY = "head-only"  # the convs frozen, the head trained
ASI_PAPER = "asi-paper-grid"  # pure ASI with ranks planned on the paper's grid (one threshold for every mode)
BENCH_ONLY = (HEAD_ONLY, ASI_PAPER)
# The registry's methods (odl_fed.schema.METHOD_NAMES), by their names there:
ASI_ONLY = MethodName.ASI_ONLY  # pure ASI on every trained conv, at ranks planned on the default grid
ASI_INT8 = MethodName.ASI_INT8  # pure ASI, its Tucker forms stored in 8 bits, at ranks planned for those bytes
PLANNER = MethodName.ASI  # the planner's choice: plan_ranks(exact=True), layers kept exact where the budget allows
# Every method a group can run; hosvd and the paper grid run at the reference budgets only (asi-fp16 has its
# own benchmark, bench/asi_storage.py).
METHODS = (MethodName.VANILLA, MethodName.GRADFILT, HEAD_ONLY, ASI_ONLY, ASI_INT8, PLANNER, MethodName.HOSVD,
           ASI_PAPER)
if unknown := sorted(set(METHODS) - set(BENCH_ONLY) - set(METHOD_NAMES)):
    raise ImportError(f"bench.accuracy.settings.METHODS names {unknown}, which the methods registry "
                      f"(odl_fed.schema.METHOD_NAMES: {list(METHOD_NAMES)}) does not hold")
SCHEDULES = ("constant", "cosine")  # the learning rate over the epochs (fine_tune's ``schedule``)
DEFAULT_VALIDATION = 0.1  # the share of the training set held out to choose a learning rate


@dataclass(frozen=True)
class PretrainSpec:
    """A backbone trained here (``odl-fed pretrain``) before it is fine-tuned on the case's dataset."""

    dataset: str
    image_size: int
    train: int
    test: int
    epochs: int
    batch: int = 32
    lr: float = 1e-3


@dataclass(frozen=True)
class Case:
    """One transfer problem. ``lrs`` maps a method to the learning rates to check (by validation
    top-1, on a split carved from the training set); a method not in it trains at ``lr``."""

    name: str
    model: str
    dataset: str
    image_size: int
    train: int
    test: int
    epochs: int
    lr: float
    layers: tuple[int, ...]
    weights: str | None = None
    pretrain: PretrainSpec | None = None
    title: str = ""
    lrs: Mapping[str, tuple[float, ...]] = field(default_factory=dict)

    def __post_init__(self):
        if self.weights and self.pretrain:
            raise ValueError(f"case {self.name!r}: give weights or pretrain, not both")
        for key in ("image_size", "train", "test", "epochs"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"case {self.name!r}: {key.replace('_', '-')} must be a positive integer, "
                                 f"but got {value!r}")
        if not self.layers or any(n < 1 for n in self.layers):
            raise ValueError(f"case {self.name!r}: layers must be positive integers, but got {list(self.layers)}")
        for method, rates in self.lrs.items():
            if method not in METHODS:
                raise ValueError(f"case {self.name!r}: lrs: method must be one of {list(METHODS)}, "
                                 f"but got {method!r}")
            if not rates or any(isinstance(r, bool) or not isinstance(r, (int, float)) or r <= 0 for r in rates):
                raise ValueError(f"case {self.name!r}: lrs: {method}: learning rates must be a non-empty list of "
                                 f"positive numbers, but got {list(rates)}")

    def lr_candidates(self, method: str) -> tuple[float, ...]:
        """The learning rates ``method`` may train at (one: no check)."""
        return tuple(self.lrs.get(method, (self.lr,)))


@dataclass(frozen=True)
class Settings:
    cases: tuple[Case, ...]
    budgets: tuple[float, ...]  # fractions of vanilla's measured conv activation bytes
    reference_budgets: tuple[float, ...]  # the budgets that also run HOSVD and the paper grid
    batch: int
    radius: int
    calibration_batches: int
    timing_steps: int
    compression_repeats: int
    threads: int
    seed: int  # the data's seed: subsets, pretraining, cached features, the planner's batches, the lr check's split
    seeds: tuple[int, ...] = ()  # the training runs' seeds (batch order); () means (seed,)
    methods: tuple[str, ...] = METHODS
    validation: float = DEFAULT_VALIDATION
    # The budget at which a budgeted method's learning rate is checked, then used at every budget
    # (None: checked at each budget on its own)
    lr_check_budget: float | None = None
    schedule: str = "constant"  # every method's learning rate over the epochs
    weighting: str = "absolute"  # how the planner sums the layers' gradient errors (every budgeted row)

    def __post_init__(self):
        if not self.budgets or any(not 0 < b < 1 for b in self.budgets):
            raise ValueError(f"budgets must be fractions of vanilla's bytes in (0, 1), but got {list(self.budgets)}")
        if any(not 0 < b < 1 for b in self.reference_budgets):
            raise ValueError(f"reference-budgets must be fractions of vanilla's bytes in (0, 1), "
                             f"but got {list(self.reference_budgets)}")
        if not self.seeds:
            object.__setattr__(self, "seeds", (self.seed,))
        if len(set(self.seeds)) < len(self.seeds):
            raise ValueError(f"seeds must differ, but got {list(self.seeds)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods must be among {list(METHODS)}, but got {unknown}")
        if "vanilla" not in self.methods:
            raise ValueError(f"methods must include 'vanilla' (every ratio is to it), but got {list(self.methods)}")
        if "hosvd" in self.methods and ASI_ONLY not in self.methods:
            raise ValueError("methods: hosvd runs at asi-only's ranks and is timed against its layers: "
                             f"add '{ASI_ONLY}', or drop hosvd")
        if self.lr_check_budget is not None and self.lr_check_budget not in self.budgets:
            raise ValueError(f"lr-check-budget must be one of budgets {list(self.budgets)}, "
                             f"but got {self.lr_check_budget!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, but got {self.schedule!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}, but got {self.weighting!r}")
        if not 0 < self.validation < 1:
            raise ValueError(f"validation must be a fraction of the training set in (0, 1), "
                             f"but got {self.validation!r}")


REQUIRED_KEYS = ("cases", "budgets", "reference-budgets", "batch", "radius", "calibration-batches", "timing-steps",
                 "compression-repeats", "threads", "seed")
SETTING_KEYS = (*REQUIRED_KEYS, "seeds", "methods", "validation", "lr-check-budget", "schedule", "weighting",
                "quick")
CASE_KEYS = tuple(f.name.replace("_", "-") for f in fields(Case) if f.name != "name")
PRETRAIN_KEYS = tuple(f.name.replace("_", "-") for f in fields(PretrainSpec))


def _merge(base: dict, override: Mapping) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, Mapping) and isinstance(
            merged.get(key), Mapping) else value
    return merged


def _snake(mapping: Mapping) -> dict:
    return {key.replace("-", "_"): value for key, value in mapping.items()}


def load_settings(path: Path, *, quick: bool = False) -> Settings:
    """The YAML settings; ``quick`` applies its ``quick:`` overrides. Unknown keys name the file and key."""
    raw = read_settings(path)
    check_keys(str(path), raw, SETTING_KEYS)
    overrides = raw.pop("quick", None) or {}
    check_keys(f"{path}: quick", overrides, SETTING_KEYS)
    if quick:
        raw = _merge(raw, overrides)
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise SystemExit(f"error: {path}: missing setting(s) {missing}")
    cases = []
    for name, spec in raw["cases"].items():
        check_keys(f"{path}: case {name}", spec, CASE_KEYS)
        spec = _snake(spec)
        if spec.get("pretrain") is not None:
            check_keys(f"{path}: case {name}: pretrain", spec["pretrain"], PRETRAIN_KEYS)
            spec["pretrain"] = PretrainSpec(**_snake(spec["pretrain"]))
        if spec.get("lrs") is not None:
            check_keys(f"{path}: case {name}: lrs", spec["lrs"], METHODS)
            spec["lrs"] = {method: tuple(rates) if isinstance(rates, (list, tuple)) else (rates,)
                           for method, rates in spec["lrs"].items()}
        spec["layers"] = tuple(spec["layers"])
        try:
            cases.append(Case(name=name, **spec))
        except TypeError as error:
            raise SystemExit(f"error: {path}: case {name}: {error}") from None
    settings = {k.replace("-", "_"): v for k, v in raw.items() if k != "cases"}
    settings["budgets"] = tuple(float(b) for b in settings["budgets"])
    settings["reference_budgets"] = tuple(float(b) for b in settings["reference_budgets"])
    for key in ("seeds", "methods"):
        if key in settings:
            settings[key] = tuple(settings[key])
    return Settings(cases=tuple(cases), **settings)
