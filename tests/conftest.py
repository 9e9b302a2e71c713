import io
import json
import sys
from pathlib import Path

import cloudpickle
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, Context, Message

from odl_fed.config.fleet import load_fleet
from odl_fed.config.profile import get_profile
from odl_fed.federation.client_app import handle_train
from odl_fed.federation.job_assets import client_data
from odl_fed.federation.recorder import read_rounds
from odl_fed.federation.simulation import simulate
from odl_fed.planning.device_plan import plan_client
from odl_fed.training.models import build_model

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules

ROOT = Path(__file__).resolve().parent.parent
# Fixtures that start a simulated fleet (Flower's simulation engine, Ray): a test using one is marked
# `fleet`, and `make test-unit` leaves it out.
FLEET_FIXTURES = {"federated_run"}
# What pytest itself may add to the repository root, and `build/` (the images' wheelhouse, which the
# compose stage makes there on purpose: `make wheelhouse` and the Dockerfiles read it); anything else new
# there after a session is runtime state a test left behind (e.g. `:flwr-in-memory-state:` or `*.db`
# from a SuperLink started without `--database`, `.odl-fed/` or `.flwr/` from a run that used the
# project's defaults).
ROOT_OWN = {".pytest_cache", "__pycache__", "build"}
_ROOT_BEFORE = pytest.StashKey[set]()
_LEFT = pytest.StashKey[list]()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if FLEET_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.fleet)


def root_entries(root: Path = ROOT) -> set[str]:
    """The names in the repository root, tracked or not, ignored or not (what `git status --ignored`
    would show there, and the tracked files too)."""
    return {path.name for path in root.iterdir()} - ROOT_OWN


def left_behind(before: set[str], after: set[str]) -> list[str]:
    return sorted(after - before)


def pytest_sessionstart(session):
    session.config.stash[_ROOT_BEFORE] = root_entries()


def pytest_sessionfinish(session, exitstatus):
    before = session.config.stash.get(_ROOT_BEFORE, None)
    left = [] if before is None else left_behind(before, root_entries())
    if left:
        session.config.stash[_LEFT] = left
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    left = config.stash.get(_LEFT, None)
    if left:
        terminalreporter.write_sep("=", "runtime state left in the repository root", red=True, bold=True)
        terminalreporter.write_line(
            f"the session left {', '.join(map(repr, left))} in {ROOT}: a test wrote runtime state there (a "
            "SuperLink without --database, a default out-dir or plan cache); give it a path under tmp_path and "
            "delete the entries (if another process made them meanwhile, rerun). The session fails.", red=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-300)).item()


CORRUPTED = ("rpi4-1", 2)  # this client's reply in this round carries a NaN


def corrupting_train(msg: Message, context: Context, run_config) -> Message:
    """The real client, with one reply damaged on its way to the server."""
    reply = handle_train(msg, context, run_config)
    client = reply.content.config_records["client"]["client"]
    if (client, int(msg.content["config"]["server-round"])) == CORRUPTED and "arrays" in reply.content:
        state = reply.content["arrays"].to_torch_state_dict()
        next(iter(state.values())).view(-1)[0] = float("nan")
        reply.content["arrays"] = ArrayRecord(torch_state_dict=state)
    return reply


@pytest.fixture(scope="session")
def federated_run(tmp_path_factory):
    """A real federated run in Flower's simulation engine (3 rounds, 5 mixed clients, one refused,
    one starved, one reply corrupted; the server and the clients evaluate), with its console view
    captured as a non-terminal sees it."""
    # The backbone is random here (pretraining it would take minutes on 2 cores): the head and the
    # last convs learn from its features; the demo fleet starts from a pretrained one.
    root = tmp_path_factory.mktemp("federation")
    job = {"model": "resnet18", "layers": 2, "method": "asi", "rounds": 3, "clients-per-round": 5,
           "local-epochs": 1, "batch-size": 32, "lr": 0.001, "image-size": 32, "dataset": "mnist-digits",
           "partition": "iid", "seed": 0, "examples-per-client": 300, "eval-examples": 600,
           "eval-fraction": 0.05}  # both evaluate (the default): each client holds out 40 of its 800
    devices = root / "devices.yaml"
    fleet_file = root / "fleet.yaml"

    def write(activation_memory: int) -> None:
        devices.write_text(yaml.safe_dump({"starved": {"ram": "1GiB", "train-memory": "512MiB",
                                                       "activation-memory": activation_memory,
                                                       "runtime-memory": 0, "cores": 1, "relative-speed": 0.5}}))
        fleet_file.write_text(yaml.safe_dump({"devices": [{"device": "rpi4", "count": 2},
                                                          {"device": "phone", "count": 1},
                                                          {"device": "starved", "count": 1},
                                                          {"device": "tiny", "count": 1}], "job": job}))

    write(2**20)
    fleet = load_fleet(fleet_file, device_files=(devices,))
    torch.manual_seed(fleet.job.seed)
    model = build_model("resnet18", num_classes=10)
    roomy = plan_client(model, model_name="resnet18", profile=get_profile("rpi4"), method="asi", layers=2,
                        batch_size=32, data=client_data(fleet.job, 0, 5), image_size=32)
    # A device with room for about half of the activations a roomy device plans.
    write(roomy.predicted_activation_bytes // 2)
    out = root / "out"
    console = io.StringIO()
    log = simulate({"fleet": str(fleet_file), "devices-file": str(devices), "out-dir": str(out),
                    "plan-cache": str(root / "plans")}, progress=console, train=corrupting_train)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    return {"log": log, "out": out, "start": lines[0], "rounds": read_rounds(log), "end": lines[-1], "roomy": roomy,
            "console": console.getvalue(), "fleet": fleet_file, "devices": devices, "root": root}
