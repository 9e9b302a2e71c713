"""The names a fleet file, a run config or the command line may use: plain tuples, no torch.

Each registry that gives a name its meaning checks, when it is imported, that it holds exactly these
names (:mod:`odl_fed.training.models`, :mod:`odl_fed.training.data`, :mod:`odl_fed.training.methods`,
:mod:`odl_fed.planning.ranks`), so a fleet is checked in the config layer without building anything and
the two lists cannot drift apart.
"""

from __future__ import annotations

from odl_fed.schema import METHOD_NAMES

__all__ = ["MODELS", "DATASETS", "NAMED_DATASETS", "LOCAL_DATASET", "METHODS", "WEIGHTINGS", "GRIDS", "STRATEGIES",
           "EVALUATIONS", "check_registry"]

# odl_fed.training.models: torchvision's CNNs, then EfficientNet-Lite0 with its packaged weights
MODELS = ("mobilenet_v2", "mobilenet_v3_small", "resnet18", "resnet34", "efficientnet_lite0")
# odl_fed.training.data: the datasets it loads by name (each client gets a partition of one) ...
NAMED_DATASETS = ("fashion-mnist", "mnist-digits", "digits", "cifar10", "flowers102", "oxford-pets", "imagefolder")
# ... and each board's own image folder (odl_fed.training.local_data: `python -m odl_fed.client --data DIR`)
LOCAL_DATASET = "local"
DATASETS = (*NAMED_DATASETS, LOCAL_DATASET)  # what a fleet's job.dataset may name
# odl_fed.training.methods (the names travel in the round log too, hence the schema)
METHODS = METHOD_NAMES
# odl_fed.planning.ranks: how the knapsack sums the layers' gradient errors, and its option grids
WEIGHTINGS = ("absolute", "relative")
GRIDS = ("batch-whole", "mixed", "paper")
# odl_fed.federation.strategy
STRATEGIES = ("fedavg", "fedprox", "fedadam")
# who evaluates the global model (a job's `evaluation`): the server on its held-out split, the clients on
# the part of their own data they hold out, or both (odl_fed.federation.server_app, client_round)
EVALUATIONS = ("server", "clients", "both")


def check_registry(kind: str, names, registry) -> None:
    """Raise ImportError when a registry's names differ from the config layer's (a name added on one side only)."""
    if tuple(names) != tuple(registry):
        raise ImportError(f"the {kind} registry holds {list(registry)}, but odl_fed.config.names lists {list(names)}: "
                          f"add or remove the name in both")
