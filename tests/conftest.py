import io
import json
import sys

import cloudpickle
import pytest
import torch
import yaml
from flwr.app import ArrayRecord, Context, Message

from odl_fed.federation.client_app import handle_train
from odl_fed.planning.device_plan import plan_client
from odl_fed.spec.fleet import load_fleet
from odl_fed.federation.job_assets import client_data
from odl_fed.training.models import build_model
from odl_fed.spec.profile import get_profile
from odl_fed.federation.recorder import read_rounds
from odl_fed.federation.simulation import simulate

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules


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
    one starved, one reply corrupted), with its console view captured as a non-terminal sees it."""
    # The backbone is random here (pretraining it would take minutes on 2 cores): the head and the
    # last convs learn from its features; the demo fleet starts from a pretrained one.
    root = tmp_path_factory.mktemp("federation")
    job = {"model": "resnet18", "layers": 2, "method": "asi", "rounds": 3, "clients-per-round": 5,
           "local-epochs": 1, "batch-size": 32, "lr": 0.001, "image-size": 32, "dataset": "mnist-digits",
           "partition": "iid", "seed": 0, "examples-per-client": 300, "eval-examples": 600}
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
