"""One client's round without Flower: plan, train within budgets, report; refusals, a breach and the
retreat after it, FedProx, the plan cache, warm bases across rounds, the baselines."""

import dataclasses
import json

import pytest
import torch

from odl_fed.config.job import JobSpec
from odl_fed.config.profile import get_profile
from odl_fed.federation import client_round
from odl_fed.federation.client_round import MEMORY_EXCEEDED, OK, REFUSED, PlanCache, run_client_round
from odl_fed.federation.job_assets import client_data, global_model, trained_state

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
    assert m["exact-layers"] == 2 and m["attempts"] == 1 and outcome.attempts[0]["status"] == OK
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
    relative = dataclasses.replace(JOB, rank_weighting="relative")  # another weighting, another plan
    assert PlanCache.key(relative, get_profile("phone")) != PlanCache.key(JOB, get_profile("phone"))


def _plan_in_process(directory: str) -> tuple[int, float, dict]:
    data = client_data(JOB, 1, 4)
    model, _ = global_model(JOB, num_classes=data.num_classes)
    outcome = run_client_round(JOB, get_profile("rpi5"), trained_state(model), client="rpi5-1", data=data,
                               cache=PlanCache(directory))
    return outcome.metrics["plan-cached"], outcome.metrics["plan-time"], outcome.plan


@pytest.mark.process  # a pool of two spawned processes
def test_two_processes_needing_one_plan_make_it_once(tmp_path):
    """Simulated actors share the on-disk cache: the second waits for the first's plan and reads it."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        results = pool.map(_plan_in_process, [str(tmp_path)] * 2)
    assert sorted(cached for cached, _, _ in results) == [0, 1]
    assert results[0][2] == results[1][2] and len(list(tmp_path.glob("*.json"))) == 1


def test_a_plan_counts_its_step_flops_once_per_process(start, monkeypatch):
    data, state, _ = start
    warm_ups = []
    real = client_round.warm_up
    monkeypatch.setattr(client_round, "warm_up", lambda *a, **k: warm_ups.append(1) or real(*a, **k))
    cache = PlanCache()
    first = run_client_round(JOB, get_profile("rpi4"), state, client="rpi4-0", data=data, cache=cache)
    second = run_client_round(JOB, get_profile("rpi4"), state, client="rpi4-1", data=data, cache=cache)
    assert len(warm_ups) == 1 and len(cache.step_flops) == 1
    assert second.metrics["flops-per-step"] == first.metrics["flops-per-step"] > 0


def test_the_server_sending_other_layers_is_a_clear_error(start):
    data, state, _ = start
    with pytest.raises(ValueError, match="client rpi4-0: the server sent layers"):
        run_client_round(JOB, get_profile("rpi4"), {"x.weight": torch.zeros(1)}, client="rpi4-0", data=data)


def _squeezed(start, tmp_path, fraction):
    """A device whose cached plan (made for a roomy one) says batch 16 fits, with room for ``fraction`` of it."""
    data, state, _ = start
    cache = PlanCache(tmp_path)
    roomy = run_client_round(JOB, get_profile("rpi4"), state, client="rpi4-0", data=data, cache=cache)
    plan = cache.get(PlanCache.key(JOB, get_profile("rpi4")))
    squeezed = dataclasses.replace(get_profile("rpi4"), name="squeezed",
                                   train_memory=plan.weights_bytes + int(plan.measured_need * fraction))
    cache.put(PlanCache.key(JOB, squeezed), dataclasses.replace(plan, device="squeezed",
                                                                train_memory=squeezed.train_memory))
    return cache, squeezed, roomy


def test_a_breach_retreats_within_the_round_and_the_cache_keeps_the_smaller_plan(start, tmp_path):
    data, state, _ = start
    cache, squeezed, roomy = _squeezed(start, tmp_path, 0.5)
    outcome = run_client_round(JOB, squeezed, state, client="squeezed-1", data=data, cache=cache)
    first = outcome.attempts[0]
    assert (first["status"] == MEMORY_EXCEEDED and first["batch-size"] == 16
            and first["peak-memory"] > first["memory-budget"])
    if outcome.status == OK:  # it retreated to a setting that holds
        last = outcome.attempts[-1]
        assert last["status"] == OK and (last["batch-size"], last["layers"]) < (16, 2) or last["layers"] < 2
        assert outcome.metrics["peak-memory"] <= outcome.metrics["memory-budget"]
        assert outcome.metrics["attempts"] == len(outcome.attempts) >= 2
        assert cache.get(PlanCache.key(JOB, squeezed)).batch_size == last["batch-size"]
        assert set(outcome.arrays) == set(roomy.arrays)  # every travelling layer comes back
    else:
        assert outcome.status == MEMORY_EXCEEDED and "retreating" in outcome.error


def test_a_breach_with_no_time_left_is_reported_not_retried(start, tmp_path):
    data, state, _ = start
    cache, squeezed, _ = _squeezed(start, tmp_path, 0.5)
    outcome = run_client_round(JOB, squeezed, state, client="squeezed-1", data=data, cache=cache, deadline=0.01)
    assert outcome.status == MEMORY_EXCEEDED and outcome.arrays is None and len(outcome.attempts) == 1
    assert "training memory" in outcome.error and "s left of the round" in outcome.error
    assert outcome.metrics["peak-memory"] > outcome.metrics["memory-budget"]


def test_a_damaged_cache_file_and_another_planner_version_plan_again(start, tmp_path, monkeypatch):
    data, state, _ = start
    first = PlanCache(tmp_path)
    run_client_round(JOB, get_profile("phone"), state, client="phone-1", data=data, cache=first)
    (path,) = tmp_path.glob("*.json")
    path.write_text(path.read_text()[:40])  # cut mid-way, as a crash would leave it
    again = run_client_round(JOB, get_profile("phone"), state, client="phone-1", data=data, cache=PlanCache(tmp_path))
    assert again.status == OK and again.metrics["plan-cached"] == 0
    assert json.loads(path.read_text())["device"] == "phone"  # overwritten with a whole plan
    key = PlanCache.key(JOB, get_profile("phone"))
    monkeypatch.setattr(client_round, "PLANNER_VERSION", client_round.PLANNER_VERSION + 1)
    assert PlanCache.key(JOB, get_profile("phone")) != key


def test_bases_kept_from_one_round_start_the_next_warm(start):
    data, state, _ = start
    capped = dataclasses.replace(get_profile("rpi4"), name="capped", activation_memory=60_000)
    job = dataclasses.replace(JOB, method="asi-only")
    first = run_client_round(job, capped, state, client="capped-0", data=data)
    assert first.status == OK and first.bases and first.metrics["warm-bases"] == 0
    assert all(k.rsplit(".", 1)[0] in first.plan["layers"]
               for k in {k.rsplit(".basis_", 1)[0] + ".x" for k in first.bases})
    second = run_client_round(job, capped, first.arrays, client="capped-0", data=data, bases=first.bases,
                              server_round=2)
    assert second.status == OK and second.metrics["warm-bases"] == len(first.bases)
    cold = run_client_round(job, capped, first.arrays, client="capped-0", data=data, server_round=2)
    assert cold.metrics["warm-bases"] == 0


def test_8_bit_asi_planned_with_relative_errors_trains_rounds_within_its_plan(start):
    data, state, _ = start
    capped = dataclasses.replace(get_profile("rpi4"), name="capped", activation_memory=60_000)
    job = dataclasses.replace(JOB, method="asi-int8", rank_weighting="relative")
    first = run_client_round(job, capped, state, client="capped-0", data=data)
    assert first.status == OK and first.plan["method"] == "asi-int8"
    assert any(ranks is not None for ranks in first.plan["ranks"].values())  # the cap makes it compress
    m = first.metrics
    assert 0 < m["activation-bytes"] < m["step-saved-bytes"] <= m["planned-activation-bytes"]
    assert 0 <= m["peak-memory"] <= m["memory-budget"]
    assert first.bases and all(b.dtype == torch.float32 for b in first.bases.values())  # bases stay float32
    second = run_client_round(job, capped, first.arrays, client="capped-0", data=data, bases=first.bases,
                              server_round=2)
    assert second.status == OK and second.metrics["warm-bases"] == len(first.bases)


@pytest.mark.parametrize("method", ["hosvd", "gradfilt"])
def test_the_baselines_run_a_round(start, method):
    data, state, _ = start
    outcome = run_client_round(dataclasses.replace(JOB, method=method), get_profile("rpi4"), state,
                               client="rpi4-0", data=data)
    assert outcome.status == OK and outcome.plan["method"] == method
    assert 0 < outcome.metrics["activation-bytes"] < outcome.metrics["step-saved-bytes"]


def test_the_model_is_built_once_per_process_and_each_client_gets_its_own_copy():
    from odl_fed.federation.job_assets import _model_template
    from odl_fed.training.models import build_model

    _model_template.cache_clear()
    first, _ = global_model(JOB, num_classes=10)
    after_first = torch.random.get_rng_state()
    with torch.no_grad():
        next(first.parameters()).add_(1.0)  # a client's changes stay in its copy
    second, convs = global_model(JOB, num_classes=10)
    assert _model_template.cache_info().misses == 1 and _model_template.cache_info().hits == 1
    assert torch.equal(torch.random.get_rng_state(), after_first)  # dropout draws as after a build
    torch.manual_seed(JOB.seed)
    built = build_model(JOB.model, num_classes=10)
    assert torch.equal(torch.random.get_rng_state(), after_first)
    assert all(torch.equal(a, b) for a, b in zip(second.state_dict().values(), built.state_dict().values()))
    assert not torch.equal(next(first.parameters()), next(second.parameters()))
    assert {n for n, p in second.named_parameters() if p.requires_grad} == \
        {f"{c}.weight" for c in convs} | {"classifier.1.weight", "classifier.1.bias"}


def test_a_process_reuses_one_working_model_reset_to_the_built_values_for_each_client():
    from odl_fed.asi import ASIConv2d
    from odl_fed.federation.job_assets import client_model
    from odl_fed.training.task import apply_method

    first, convs = client_model(JOB, num_classes=10)
    fresh, _ = global_model(JOB, num_classes=10)
    with torch.no_grad():
        for p in first.parameters():
            p.add_(1.0)  # a client trained (and a frozen value changed, which no client does)
    apply_method(first, "asi", {c: (4, 4, 1, 1) for c in convs})  # left wrapped, as after a crash
    first.get_submodule(convs[0]).weight.grad = torch.ones_like(first.get_submodule(convs[0]).weight)
    second, again = client_model(JOB, num_classes=10)
    assert second is first and again == convs
    assert not any(isinstance(m, ASIConv2d) for m in second.modules())  # its layers taken out
    for (name, a), (_, b) in zip(second.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert all(p.grad is None for p in second.parameters())
    assert {n for n, p in second.named_parameters() if p.requires_grad} == \
        {n for n, p in fresh.named_parameters() if p.requires_grad}


def test_a_client_holds_out_the_same_part_every_round_and_never_trains_on_it():
    import dataclasses

    from odl_fed.federation.job_assets import client_held_out, held_out_positions, split_held_out

    job = dataclasses.replace(JOB, evaluation="both", eval_fraction=0.25, examples_per_client=None)
    train, held = held_out_positions(400, job, salt=3)
    assert len(held) == 100 and len(train) == 300 and not set(train) & set(held)
    assert max(held) - min(held) > 200  # drawn from the whole share, not its tail
    assert all((a == b).all() for a, b in zip((train, held), held_out_positions(400, job, salt=3)))  # every round
    assert not (held == held_out_positions(400, job, salt=4)[1]).all()  # another client, another draw
    capped = dataclasses.replace(job, examples_per_client=64, eval_examples=30)
    train, held = held_out_positions(400, capped, salt=3)
    assert list(train) == list(range(64)) and len(held) == 30 and min(held) >= 64  # trains as with no evaluation
    assert held_out_positions(400, dataclasses.replace(job, evaluation="server"))[1].size == 0
    assert held_out_positions(1, job)[1].size == 0  # nothing left to train on otherwise
    data = client_data(JOB, 0, 4)  # JOB: evaluation both (the default), 64 examples a client
    own_train, own_held = split_held_out(data, job)
    assert len(own_train) + len(own_held) == len(data) and len(own_held) == 16
    held_data = client_held_out(JOB, 0, 4)
    assert len(held_data) == 72 and held_data.num_classes == data.num_classes  # a fifth of its share of 360
    assert client_held_out(dataclasses.replace(JOB, evaluation="server"), 0, 4) is None
