"""The federated job a fleet runs: what model, which layers, which method, how many rounds, on what data.

It is the ``job`` mapping of a fleet file (:mod:`odl_fed.config.fleet`), checked field by field in plain
Python: names are checked against :mod:`odl_fed.config.names`, and whether the model can train ``layers``
convs on ``image-size`` images is checked by :mod:`odl_fed.planning.preflight` before a run starts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields

from odl_fed.config import names
from odl_fed.config.errors import JobError
from odl_fed.config.suggest import did_you_mean

__all__ = ["JobSpec", "JobError", "STRATEGIES", "parse_job", "job_mapping"]


@dataclass(frozen=True)
class JobSpec:
    model: str
    layers: int
    method: str
    rounds: int
    clients_per_round: int
    local_epochs: int
    batch_size: int
    lr: float
    image_size: int
    dataset: str
    dirichlet_alpha: float | None
    seed: int
    weights: str | None = None
    strategy: str = "fedavg"
    proximal_mu: float = 0.0
    server_lr: float = 0.0
    examples_per_client: int | None = None
    eval_examples: int | None = None
    min_clients: int = 1  # fewer connected clients than this and a round is skipped
    # how the clients' rank planner sums the layers' gradient errors (odl_fed.config.names.WEIGHTINGS)
    rank_weighting: str = "absolute"
    # dataset "local" (each board's own image folder): the class sub-folder names, in label order
    classes: tuple[str, ...] | None = None
    # who evaluates (odl_fed.config.names.EVALUATIONS) and what share of its data each client holds out
    evaluation: str = "both"
    eval_fraction: float = 0.2

    @property
    def server_evaluates(self) -> bool:
        return self.evaluation in ("server", "both")

    @property
    def clients_evaluate(self) -> bool:
        return self.evaluation in ("clients", "both")


STRATEGIES = names.STRATEGIES
_POSITIVE_INTS = ("layers", "rounds", "clients-per-round", "local-epochs", "batch-size", "image-size")
_OPTIONAL_INTS = ("examples-per-client", "eval-examples", "min-clients")
_CHOICES = {"model": names.MODELS, "method": names.METHODS, "dataset": names.DATASETS}
_STRATEGY_KEYS = {"proximal-mu": ("fedprox", 0.01), "server-lr": ("fedadam", 0.01)}
_JOB_KEYS = (*_POSITIVE_INTS, *_CHOICES, "lr", "partition", "seed", "weights", "strategy", *_STRATEGY_KEYS,
             *_OPTIONAL_INTS, "rank-weighting", "classes")
_REQUIRED = (*_POSITIVE_INTS, *_CHOICES, "lr")
_EVALUATION_KEYS = ("evaluation", "eval-fraction")  # federated evaluation: see _evaluation below
_JOB_KEYS += _EVALUATION_KEYS


def parse_job(raw, where: str) -> JobSpec:
    """A fleet's ``job`` mapping, checked field by field (``where`` starts every error: the file and ``job``)."""
    job = _parse_training(raw, where)
    return dataclasses.replace(job, **_evaluation(raw, where, dataset=job.dataset))


def _parse_training(raw, where: str) -> JobSpec:
    if not isinstance(raw, Mapping):
        raise JobError(f"{where}: expected a mapping, got {type(raw).__name__}")
    for key in raw:
        if key not in _JOB_KEYS:
            raise JobError(f"{where}: unknown field {key!r}{did_you_mean(key, _JOB_KEYS)}")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise JobError(f"{where}: missing field(s) {', '.join(missing)}")
    for key in _POSITIVE_INTS:
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise JobError(f"{where}.{key}: must be a positive integer, but got {value!r}")
    for key, options in _CHOICES.items():
        if raw[key] not in options:
            raise JobError(f"{where}.{key}: must be one of {list(options)}, but got {raw[key]!r}"
                             f"{did_you_mean(raw[key], options)}")
    _positive_number(raw["lr"], f"{where}.lr")
    for key in _OPTIONAL_INTS:
        value = raw.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise JobError(f"{where}.{key}: must be a positive integer, but got {value!r}")
    strategy = raw.get("strategy", "fedavg")
    if strategy not in STRATEGIES:
        raise JobError(f"{where}.strategy: must be one of {list(STRATEGIES)}, but got {strategy!r}"
                         f"{did_you_mean(strategy, STRATEGIES)}")
    knobs = {}
    for key, (owner, default) in _STRATEGY_KEYS.items():
        if key in raw and strategy != owner:
            raise JobError(f"{where}.{key}: only applies to strategy {owner!r}, but strategy is {strategy!r}")
        knobs[key] = _positive_number(raw.get(key, default), f"{where}.{key}") if strategy == owner else 0.0
    partition = raw.get("partition", "iid")
    if partition == "iid":
        alpha = None
    elif isinstance(partition, Mapping) and set(partition) == {"dirichlet"} and \
            isinstance(partition["dirichlet"], (int, float)) and 0 < partition["dirichlet"] < math.inf:
        alpha = float(partition["dirichlet"])
    else:
        raise JobError(f"{where}.partition: must be 'iid' or {{dirichlet: ALPHA}} with a finite ALPHA > 0, "
                         f"but got {partition!r}")
    seed = raw.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise JobError(f"{where}.seed: must be an integer, but got {seed!r}")
    weights = raw.get("weights")
    if weights is not None and not isinstance(weights, str):
        raise JobError(f"{where}.weights: must be a file path, but got {weights!r}")
    weighting = raw.get("rank-weighting", "absolute")
    if weighting not in names.WEIGHTINGS:
        raise JobError(f"{where}.rank-weighting: must be one of {list(names.WEIGHTINGS)}, but got {weighting!r}"
                         f"{did_you_mean(str(weighting), names.WEIGHTINGS)}")
    return JobSpec(model=raw["model"], layers=raw["layers"], method=raw["method"], rounds=raw["rounds"],
                   clients_per_round=raw["clients-per-round"], local_epochs=raw["local-epochs"],
                   batch_size=raw["batch-size"], lr=float(raw["lr"]), image_size=raw["image-size"],
                   dataset=raw["dataset"], dirichlet_alpha=alpha, seed=seed, weights=weights, strategy=strategy,
                   proximal_mu=knobs["proximal-mu"], server_lr=knobs["server-lr"],
                   examples_per_client=raw.get("examples-per-client"), eval_examples=raw.get("eval-examples"),
                   min_clients=raw.get("min-clients", 1), rank_weighting=weighting,
                   classes=_classes(raw, where))


def _positive_number(value, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        raise JobError(f"{where}: must be a positive finite number, but got {value!r}")
    return float(value)


def job_mapping(job: JobSpec) -> dict:
    """The fleet-file mapping that :func:`parse_job` reads back into ``job`` (what the server sends each
    node with its instruction, so a board needs no copy of the fleet file)."""
    raw = {}
    for field in fields(job):
        value, key = getattr(job, field.name), field.name.replace("_", "-")
        if field.name == "dirichlet_alpha":
            if job.dataset != names.LOCAL_DATASET:  # a board's own images are not partitioned
                raw["partition"] = "iid" if value is None else {"dirichlet": value}
        elif key == "eval-fraction" and not job.clients_evaluate:
            continue  # refused with evaluation: server
        elif key in _STRATEGY_KEYS:
            if job.strategy == _STRATEGY_KEYS[key][0]:
                raw[key] = value
        elif value is not None:
            raw[key] = list(value) if isinstance(value, tuple) else value
    return raw


def _classes(raw: Mapping, where: str) -> tuple[str, ...] | None:
    """``classes``: required with ``dataset: local`` (every board maps its sub-folders to labels by this
    list, so labels agree across boards and the model gets one output per class), refused otherwise;
    ``partition`` does not apply to a board's own images."""
    local = raw["dataset"] == names.LOCAL_DATASET
    if not local:
        if "classes" in raw:
            raise JobError(f"{where}.classes: only applies to dataset {names.LOCAL_DATASET!r} (each board's own "
                           f"image folder); {raw['dataset']!r} has its own classes")
        return None
    if "partition" in raw:
        raise JobError(f"{where}.partition: does not apply to dataset {names.LOCAL_DATASET!r}: each board trains "
                       f"on its own images (python -m odl_fed.client --data DIR)")
    classes = raw.get("classes")
    if classes is None:
        raise JobError(f"{where}.classes: dataset {names.LOCAL_DATASET!r} needs classes: [name, ...], the class "
                       f"sub-folder names of the boards' --data folders, in label order")
    if isinstance(classes, list):  # YAML reads a folder named 0 as a number
        classes = [str(c) if isinstance(c, int) and not isinstance(c, bool) else c for c in classes]
    if not isinstance(classes, list) or len(classes) < 2 or not all(
            isinstance(c, str) and c.strip() and c == c.strip() and "/" not in c and not c.startswith(".")
            for c in classes):
        raise JobError(f"{where}.classes: must be a list of at least 2 folder names (no '/', not starting with '.'), "
                       f"but got {classes!r}")
    repeated = sorted({c for c in classes if classes.count(c) > 1})
    if repeated:
        raise JobError(f"{where}.classes: {repeated} listed more than once")
    return tuple(classes)


# Datasets whose server holds no held-out split (a board's own images): their clients evaluate.
_NO_SERVER_SPLIT = ("local",)


def _evaluation(raw: Mapping, where: str, *, dataset: str) -> dict:
    """``evaluation`` (server, clients or both; by default both where the server has a held-out split,
    else clients) and ``eval-fraction`` (the share of each client's data it holds out, in (0, 1))."""
    server_split = dataset not in _NO_SERVER_SPLIT
    mode = raw.get("evaluation", "both" if server_split else "clients")
    if mode not in names.EVALUATIONS:
        raise JobError(f"{where}.evaluation: must be one of {list(names.EVALUATIONS)}, but got {mode!r}"
                       f"{did_you_mean(str(mode), names.EVALUATIONS)}")
    if mode != "clients" and not server_split:
        raise JobError(f"{where}.evaluation: {mode!r} needs a held-out split on the server, and dataset "
                       f"{dataset!r} has none; use 'clients'")
    fraction = raw.get("eval-fraction", JobSpec.eval_fraction)
    if "eval-fraction" in raw and mode == "server":
        raise JobError(f"{where}.eval-fraction: only applies when clients evaluate, but evaluation is 'server'")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise JobError(f"{where}.eval-fraction: must be a number between 0 and 1 (the share of each client's "
                       f"data it holds out), but got {fraction!r}")
    return {"evaluation": mode, "eval_fraction": float(fraction)}
