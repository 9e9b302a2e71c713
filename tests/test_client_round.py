"""One client's round without Flower: plan, train within budgets, report; refusals, FedProx, plan cache."""

import dataclasses

import pytest
import torch

from odl_fed.client_round import OK, REFUSED, PlanCache, run_client_round
from odl_fed.job import client_data, global_model, trained_state
from odl_fed.fleet import JobSpec
from odl_fed.profile import get_profile

JOB = JobSpec(model="mobilenet_v2", layers=2, method="asi", rounds=1, clients_per_round=2, local_epochs=1,
              batch_size=16, lr=1e-2, image_size=32, dataset="digits", dirichlet_alpha=None, seed=0,
              examples_per_client=64)


@pytest.fixture(scope="module")
def start():
    data = client_data(JOB, 0, 4)
    model, convs = global_model(JOB, num_classes=data.num_classes)
    return data, {k: v.clone() for k, v in trained_state(model).items()}, convs


def test_a_round_trains_the_global_layers_and_reports_its_budgets(start):
    data, state, convs = start
    outcome = run_client_round(JOB, get_profile("rpi4"), state, client="rpi4-0", data=data)
    assert outcome.status == OK and outcome.client == "rpi4-0" and outcome.device == "rpi4"
    assert set(outcome.arrays) == set(state) == {f"{c}.weight" for c in convs} | {"classifier.1.weight",
                                                                                   "classifier.1.bias"}
    assert all(not torch.equal(outcome.arrays[k], state[k]) for k in state)
    m = outcome.metrics
    assert m["num-examples"] == len(data) == 64
    assert 0 < m["activation-bytes"] < m["step-saved-bytes"] <= m["planned-activation-bytes"]
    assert 0 <= m["peak-memory"] <= m["memory-budget"] < m["train-memory"] == get_profile("rpi4").train_memory
    assert m["train-flops"] == m["flops-per-step"] * 4 > 0
    assert outcome.plan["batch_size"] == 16 and outcome.plan["layers"] == convs


def test_fedprox_adds_its_proximal_term_to_the_local_objective(start):
    data, state, _ = start
    free = run_client_round(JOB, get_profile("rpi4"), state, client="a", data=data)
    held = run_client_round(JOB, get_profile("rpi4"), state, client="b", data=data, proximal_mu=10.0)
    same = run_client_round(JOB, get_profile("rpi4"), state, client="c", data=data)
    assert all(torch.equal(free.arrays[k], same.arrays[k]) for k in state)  # a round is deterministic
    assert any(not torch.equal(free.arrays[k], held.arrays[k]) for k in state)


def test_a_device_that_cannot_hold_the_model_is_refused_not_raised(start):
    data, state, _ = start
    outcome = run_client_round(JOB, get_profile("tiny"), state, client="tiny-9", data=data)
    assert outcome.status == REFUSED and outcome.arrays is None
    assert "device 'tiny'" in outcome.error and "weights alone take" in outcome.error


def test_a_plan_is_made_once_per_device_and_kept_on_disk(start, tmp_path):
    data, state, _ = start
    first = PlanCache(tmp_path)
    a = run_client_round(JOB, get_profile("phone"), state, client="phone-1", data=data, cache=first)
    assert a.metrics["plan-cached"] == 0 and len(list(tmp_path.glob("*.json"))) == 1
    again = PlanCache(tmp_path)  # a new process on the same device
    b = run_client_round(JOB, get_profile("phone"), state, client="phone-1", data=data, cache=again)
    assert b.metrics["plan-cached"] == 1 and again.hits == 1 and b.plan == a.plan
    other = dataclasses.replace(get_profile("phone"), train_memory=get_profile("phone").train_memory // 2)
    assert PlanCache.key(JOB, other) != PlanCache.key(JOB, get_profile("phone"))


def test_the_server_sending_other_layers_is_a_clear_error(start):
    data, state, _ = start
    with pytest.raises(ValueError, match="client rpi4-0: the server sent layers"):
        run_client_round(JOB, get_profile("rpi4"), {"x.weight": torch.zeros(1)}, client="rpi4-0", data=data)
