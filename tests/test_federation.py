"""A real federated run in Flower's simulation engine: mixed devices, real offline data, a pretrained
backbone; it learns, every client keeps to its budgets, and bad clients never stop the round."""

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CORRUPTED


@pytest.fixture
def run(federated_run):  # the run is made once for this module and the dashboard's tests (conftest.py)
    return federated_run


def _clients(run, status=None):
    return [c for r in run["rounds"][1:] for c in r["clients"] if status is None or c["status"] == status]


def test_the_federated_run_learns(run):
    accuracy = [r["global"]["accuracy"] for r in run["rounds"]]
    assert [r["round"] for r in run["rounds"]] == [0, 1, 2, 3]
    assert accuracy[-1] >= accuracy[0] + 0.15, accuracy
    assert accuracy[-1] > accuracy[1] > accuracy[0], accuracy
    assert run["end"]["event"] == "end" and run["end"]["final_accuracy"] == accuracy[-1]
    trained = torch.load(run["out"] / "trained_layers.pt")
    assert sorted(trained) == sorted(["layer4.1.conv1.weight", "layer4.1.conv2.weight", "fc.weight", "fc.bias"])


def test_heterogeneous_devices_get_different_plans(run):
    plans = {c["device"]: c["plan"] for c in _clients(run, "ok")}
    assert {"rpi4", "phone", "starved"} <= set(plans)
    assert plans["starved"]["ranks"] != plans["rpi4"]["ranks"]
    assert all(r is None for r in plans["rpi4"]["ranks"].values())  # a roomy device keeps its layers exact
    assert any(r is not None for r in plans["starved"]["ranks"].values())
    assert plans["starved"]["predicted_activation_bytes"] < run["roomy"].predicted_activation_bytes
    assert plans["starved"]["predicted_activation_bytes"] <= plans["starved"]["activation_budget"] \
        < plans["rpi4"]["predicted_activation_bytes"]


def test_every_client_stays_inside_both_budgets(run):
    ok = _clients(run, "ok")
    assert len(ok) >= 3 * 4 - 1
    for c in ok:
        # exact count: what the step saved for backward, against the plan and its budget
        assert 0 < c["step-saved-bytes"] <= c["planned-activation-bytes"] <= c["plan"]["activation_budget"], c
        assert c["activation-bytes"] < c["step-saved-bytes"]
        # psutil: the guard's peak against its budget (the device's train-memory less the weights)
        assert 0 <= c["peak-memory"] <= c["memory-budget"] < c["train-memory"], c
        assert c["guard-samples"] > 0 and c["train-flops"] > 0 and c["num-examples"] == 300
        assert 0 < c["plan"]["measured_need"] + c["plan"]["margin"] <= c["memory-budget"]
        assert c["attempts"] == 1  # no breach after a plan said it fits


def test_a_device_too_small_is_refused_clearly_and_the_round_aggregates_the_others(run):
    for r in run["rounds"][1:]:
        (tiny,) = [c for c in r["clients"] if c["device"] == "tiny"]
        assert tiny["status"] == "refused"
        assert "device 'tiny': no asi setting of resnet18 fits its train-memory of 1.00 MiB" in tiny["reason"]
        assert r["aggregated"] >= 3


def test_a_malformed_reply_is_rejected_and_the_run_goes_on(run):
    client, server_round = CORRUPTED
    (entry,) = [c for c in run["rounds"][server_round]["clients"] if c["client"] == client]
    assert entry["status"] == "rejected" and "NaN" in entry["reason"]
    assert run["rounds"][server_round]["aggregated"] == 3  # rpi4-0, phone, starved
    assert all(np.isfinite(t).all() for t in torch.load(run["out"] / "trained_layers.pt").values())


def test_bytes_sent_per_round_are_the_trained_layers_parameter_bytes(run):
    trained = run["start"]["trained_bytes"]
    assert trained == 4 * (2 * 512 * 512 * 9 + 10 * 512 + 10)
    assert trained < run["start"]["model_bytes"] / 2
    for r in run["rounds"][1:]:
        assert r["clients-asked"] == 5 and r["bytes-down"] == 5 * trained
        assert r["bytes-up"] == r["aggregated"] * trained
        assert all(c["bytes-up"] == trained for c in r["clients"] if c["status"] == "ok")
        assert trained < r["record-bytes-down"] / 5 < trained + 4096  # Flower's headers are small


def test_plans_are_cached_per_device_after_the_first_round(run):
    later = [c for r in run["rounds"][2:] for c in r["clients"] if c["status"] == "ok"]
    assert later and all(c["plan-cached"] == 1 for c in later)
    assert len(list(Path(run["log"]).parent.parent.joinpath("plans").glob("*.json"))) == 3  # rpi4, phone, starved


@pytest.mark.slow  # a second simulated fleet (Ray starts again): about a minute
def test_a_simulated_fleet_whose_server_has_no_held_out_split_is_scored_by_its_clients(tmp_path, monkeypatch):
    """``evaluation: clients`` in Flower's simulation engine: the server process cannot read any held-out
    split (the clients, in Ray's worker processes, read their training shares), and the run still ends,
    each round scored by the clients before and after their fine-tuning."""
    import io
    import json

    import yaml

    from odl_fed.federation import job_assets
    from odl_fed.federation.recorder import read_rounds
    from odl_fed.federation.simulation import simulate

    job = {"model": "resnet18", "layers": 2, "method": "asi", "rounds": 2, "clients-per-round": 2,
           "local-epochs": 1, "batch-size": 16, "lr": 0.01, "image-size": 32, "dataset": "mnist-digits",
           "partition": "iid", "seed": 0, "examples-per-client": 64, "eval-examples": 48, "evaluation": "clients"}
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"devices": [{"device": "rpi4", "count": 2}], "job": job}))
    read = job_assets._dataset

    def train_split_only(name, split):
        if split != "train":
            raise AssertionError(f"the server read the {split} split of {name}")
        return read(name, split)

    monkeypatch.setattr(job_assets, "_dataset", train_split_only)
    console = io.StringIO()
    log = simulate({"fleet": str(fleet), "out-dir": str(tmp_path / "out"), "plan-cache": str(tmp_path / "plans")},
                   progress=console)
    rounds = read_rounds(log)
    end = json.loads(log.read_text().splitlines()[-1])
    assert [r["round"] for r in rounds] == [0, 1, 2] and end["event"] == "end" and end["final_accuracy"] is None
    assert all(r["global"] == {} for r in rounds)
    for r in rounds[1:]:
        assert [c["status"] for c in r["clients"]] == ["ok", "ok"]
        assert all(0 <= c["eval-acc-before"] <= 1 and 0 <= c["eval-acc-after"] <= 1 and c["eval-examples"] == 48
                   for c in r["clients"])
        assert r["client-eval"]["clients"] == 2 and r["client-eval"]["examples"] == 96
    lines = console.getvalue().splitlines()
    assert lines[1].startswith("round 0/2 | starting model: not evaluated on the server (the clients evaluate)")
    assert "| no server evaluation | clients' top-1 " in lines[2] and lines[-1].startswith("done: clients' top-1 ")
