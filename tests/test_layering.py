"""The package's layering, checked over its import graph (every import, at module level or inside a
function): the config layer imports no torch, only the federation and deploy layers import flwr, and no
layer imports one above it. The data's way through the layers is drawn in docs/architecture.md."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "odl_fed"

# Lowest first: a module may import its own layer and the layers before it, never one after it.
LAYERS = ("schema", "config", "asi", "training", "planning", "federation", "deploy", "entries")
# The dashboard reads the round log: it sits beside the stack, imports only what a log's reader needs,
# and is imported by the layers that write or show a run (the server, the deploy entries, the CLI).
DASHBOARD_MAY_IMPORT = {"schema", "config", "dashboard"}
DASHBOARD_USERS = {"federation", "deploy", "entries"}
# Third-party packages by the layers allowed to import them.
ONLY_IN = {"torch": set(LAYERS) - {"schema", "config"} | {"dashboard"},
           "torchvision": set(LAYERS) - {"schema", "config"},
           "flwr": {"federation", "deploy"}}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "odl_fed":
        raise ValueError(module)
    if len(parts) == 1 or parts[1] in ("cli", "client", "server", "__main__"):
        return "entries"
    return parts[1]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, package: Path = PACKAGE) -> list[tuple[str, int]]:
    """Every module this file imports (absolute names; relative imports resolved), with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, package)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((target, node.lineno))
            if target == "odl_fed":  # `from odl_fed import schema`
                found += [(f"odl_fed.{alias.name}", node.lineno) for alias in node.names]
    return found


def violations(package: Path = PACKAGE) -> list[str]:
    """Every import that breaks the layering, as ``file:line: what``."""
    found = []
    for path in sorted(package.rglob("*.py")):
        here = layer_of(module_name(path, package))
        for target, line in imports_of(path, package):
            where = f"{path.relative_to(package.parent)}:{line}"
            top = target.split(".")[0]
            if top in ONLY_IN and here not in ONLY_IN[top]:
                found.append(f"{where}: the {here} layer imports {target}")
            if top != "odl_fed" or target == "odl_fed":
                continue
            there = layer_of(target)
            if here == "dashboard" and there not in DASHBOARD_MAY_IMPORT:
                found.append(f"{where}: the dashboard imports {target} (the {there} layer)")
            elif there == "dashboard" and here not in DASHBOARD_USERS | {"dashboard"}:
                found.append(f"{where}: the {here} layer imports the dashboard's {target}")
            elif "dashboard" not in (here, there) and LAYERS.index(there) > LAYERS.index(here):
                found.append(f"{where}: the {here} layer imports {target}, of the {there} layer above it")
    return found


def test_every_module_belongs_to_a_layer():
    unknown = {layer_of(module_name(p)) for p in PACKAGE.rglob("*.py")} - set(LAYERS) - {"dashboard"}
    assert not unknown, f"folders with no place in LAYERS: {sorted(unknown)}"


def test_no_layer_imports_one_above_it_and_flwr_and_torch_stay_where_they_belong():
    assert violations() == []


def test_the_check_catches_an_arrow_that_points_back_up(tmp_path):
    """The same check on a copy of the package with one wrong import added in each direction it forbids."""
    copy = tmp_path / "odl_fed"
    subprocess.run(["cp", "-r", str(PACKAGE), str(copy)], check=True)
    (copy / "config" / "wrong.py").write_text("import torch\nfrom odl_fed.training import models\n")
    (copy / "dashboard" / "wrong.py").write_text("from odl_fed.federation.recorder import RoundRecorder\n")
    (copy / "training" / "wrong.py").write_text("from flwr.app import Message\n")
    found = violations(copy)
    assert found == ["odl_fed/config/wrong.py:1: the config layer imports torch",
                     "odl_fed/config/wrong.py:2: the config layer imports odl_fed.training, "
                     "of the training layer above it",
                     "odl_fed/dashboard/wrong.py:1: the dashboard imports odl_fed.federation.recorder "
                     "(the federation layer)",
                     "odl_fed/training/wrong.py:1: the training layer imports flwr.app"]


@pytest.mark.parametrize("module", ["odl_fed.schema", "odl_fed.config.fleet", "odl_fed.config.run",
                                    "odl_fed.config.node", "odl_fed.config.machine"])
def test_the_config_layer_loads_without_torch_or_flwr(module):
    """Imported in a fresh interpreter, nothing it pulls in (at any depth) is torch or flwr."""
    code = (f"import sys, {module}; heavy = sorted({{m.split('.')[0] for m in sys.modules}} & "
            f"{{'torch', 'torchvision', 'flwr', 'numpy'}}); print(heavy)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=PACKAGE.parent)
    assert done.stdout.strip() == "[]", done.stdout
