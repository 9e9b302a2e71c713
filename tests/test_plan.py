"""Rank planning: the knapsack against brute force, plans that fit, files that round-trip."""

import itertools
import random
import re

import pytest
import torch
from torch import nn

from odl_fed.planning.ranks import BudgetTooSmallError, LayerOption, RankPlan, choose, parse_bytes, plan_ranks


def _brute_force(options, budget):
    best = None
    for combo in itertools.product(*options.values()):
        if sum(o.nbytes for o in combo) <= budget:
            cost = sum(o.perplexity for o in combo)
            best = cost if best is None or cost < best else best
    return best


@pytest.mark.parametrize("seed", range(25))
def test_knapsack_matches_brute_force(seed):
    rng = random.Random(seed)
    options = {
        f"layer{i}": [LayerOption(eps=j / 10, ranks=(j,), nbytes=rng.randint(1, 60), perplexity=rng.uniform(0, 10))
                      for j in range(rng.randint(1, 5))]
        for i in range(rng.randint(1, 4))
    }
    minimum = sum(min(o.nbytes for o in opts) for opts in options.values())
    budget = rng.randint(minimum, minimum + 120)
    chosen = choose(options, budget)
    assert sum(o.nbytes for o in chosen.values()) <= budget
    assert sum(o.perplexity for o in chosen.values()) == pytest.approx(_brute_force(options, budget))
    with pytest.raises(BudgetTooSmallError, match=re.escape(f"it needs at least {minimum} B")):
        choose(options, minimum - 1)


@pytest.mark.parametrize("text, expected", [("200KB", 200_000), ("1.5MiB", 1_572_864), ("4096", 4096),
                                            (" 2 kib ", 2048), (300, 300)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["abc", "0", "-5KB", "12 parsecs", 0, -1, True, ""])
def test_bad_budgets_are_clear_errors(bad):
    with pytest.raises(ValueError, match=re.escape("budget must be a positive size like 200KB or 1.5MiB")) as info:
        parse_bytes(bad)
    assert repr(bad) in str(info.value)


def _model_and_batches():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU6(inplace=True),
        nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 5),
    ).eval()
    prototypes = torch.randn(5, 3, 16, 16)
    batches = []
    for _ in range(2):
        y = torch.randint(0, 5, (16,))
        batches.append((prototypes[y] + 0.5 * torch.randn(16, 3, 16, 16), y))
    return model, batches


def test_plan_fits_the_budget_and_more_budget_means_less_perplexity():
    model, batches = _model_and_batches()
    layers = ["2", "5", "9"]
    plans = [plan_ranks(model, layers, batches, budget, model_name="tiny") for budget in ("3KB", "8KB", "40KB")]
    for plan, budget in zip(plans, (3000, 8000, 40000)):
        assert plan.total_bytes <= budget
        assert [layer.name for layer in plan.layers] == layers
    assert plans[0].total_perplexity >= plans[1].total_perplexity >= plans[2].total_perplexity
    assert plans[0].total_perplexity > plans[2].total_perplexity
    # a budget that the whole grid leaves unused extends it upwards
    loose = plan_ranks(model, layers, batches, "1MB", model_name="tiny")
    assert min(layer.eps for layer in loose.layers if layer.name != "9") > 0.9  # the head is rank 1 at any eps
    assert loose.total_perplexity < plans[2].total_perplexity


def test_plan_is_deterministic_and_round_trips(tmp_path):
    model, batches = _model_and_batches()
    first = plan_ranks(model, ["2", "5"], batches, "6KB", model_name="tiny")
    second = plan_ranks(model, ["2", "5"], batches, "6KB", model_name="tiny")
    assert first == second
    path = first.save(tmp_path / "plan.json")
    loaded = RankPlan.load(path, model="tiny", layers=["2", "5"])
    assert loaded == first and loaded.targets() == first.targets()
    with pytest.raises(ValueError, match=re.escape(f"plan file {path} was made for model 'tiny', not 'resnet18'")):
        RankPlan.load(path, model="resnet18")
    with pytest.raises(FileNotFoundError, match="plan file .*missing.json does not exist"):
        RankPlan.load(tmp_path / "missing.json")


def test_budget_below_the_cheapest_plan_says_the_minimum():
    model, batches = _model_and_batches()
    with pytest.raises(BudgetTooSmallError, match=r"it needs at least \d+ B"):
        plan_ranks(model, ["2", "5", "9"], batches, 50)


def test_planned_ranks_drive_the_layers():
    from odl_fed.asi import inject_asi
    from odl_fed.training.saved_memory import SavedTensorMeter

    model, batches = _model_and_batches()
    plan = plan_ranks(model, ["2", "5"], batches, "6KB", model_name="tiny")
    inject_asi(model, plan.targets())
    model.requires_grad_(True)
    with SavedTensorMeter(exclude=model.parameters(), modules={"2": model[2], "5": model[5]}) as meter:
        model(batches[0][0])
    assert meter.nbytes_of(["2", "5"]) <= plan.total_bytes


def test_whole_modes_widen_the_paper_grid_and_never_plan_worse(tmp_path):
    model, batches = _model_and_batches()
    layers = ["2", "5"]
    for budget in ("4KB", "8KB", "20KB"):
        paper = plan_ranks(model, layers, batches, budget, model_name="tiny", grid="paper")
        wider = plan_ranks(model, layers, batches, budget, model_name="tiny", grid="mixed")
        assert all(o.whole in ((), ("all",)) for opts in paper.options.values() for o in opts)  # ("all",): lossless
        assert wider.total_bytes <= parse_bytes(budget)
        assert wider.total_perplexity <= paper.total_perplexity + 1e-9
    options = wider.options["2"]
    kept = [o for o in options if o.whole == ("batch",)]
    assert kept and all(o.ranks[0] == batches[0][0].shape[0] for o in kept)
    spatial = [o for o in options if "spatial" in o.whole]
    assert spatial and all(o.ranks[2:] == (16, 16) for o in spatial)
    assert len({o.ranks for o in options}) == len(options)  # equal ranks are one option
    loaded = RankPlan.load(wider.save(tmp_path / "plan.json"))
    assert loaded == wider and [layer.whole for layer in loaded.layers] == [layer.whole for layer in wider.layers]


def test_whole_mode_choices_follow_the_layer():
    from odl_fed.planning.ranks import whole_mode_choices

    assert whole_mode_choices(nn.Conv2d(3, 4, 3), 4) == [{}, {"batch": (0,)}, {"spatial": (2, 3)},
                                                         {"batch": (0,), "spatial": (2, 3)}]
    assert whole_mode_choices(nn.Linear(3, 4), 2) == [{}, {"batch": (0,)}]
    assert whole_mode_choices(nn.Linear(3, 4), 3)[-1] == {"batch": (0,), "tokens": (1,)}


def test_the_default_grid_keeps_the_batch_whole_when_it_fits():
    model, batches = _model_and_batches()
    batch = batches[0][0].shape[0]
    roomy = plan_ranks(model, ["2", "5"], batches, "20KB", model_name="tiny")
    assert all(layer.ranks[0] == batch for layer in roomy.layers)
    assert roomy.total_bytes <= 20_000
    mixed_minimum = sum(min(o.nbytes for o in opts) for opts in roomy.options.values())
    whole_minimum = sum(min(o.nbytes for o in opts if o.ranks[0] == batch) for opts in roomy.options.values())
    assert mixed_minimum < whole_minimum
    tight = plan_ranks(model, ["2", "5"], batches, whole_minimum - 1, model_name="tiny")  # falls back to mixed
    assert tight.total_bytes < whole_minimum and any(layer.ranks[0] < batch for layer in tight.layers)
    with pytest.raises(ValueError,
                       match=r"grid must be one of \['batch-whole', 'mixed', 'paper'\], but got grid='full'"):
        plan_ranks(model, ["2"], batches, "20KB", grid="full")


def test_relative_weighting_divides_each_layers_perplexity_by_its_exact_gradient_norm():
    from odl_fed.planning.ranks import calibrate

    model, batches = _model_and_batches()
    layers = ["2", "5", "9"]
    absolute = calibrate(model, layers, batches[:1])  # the default
    relative = calibrate(model, layers, batches[:1], relative=True)
    # the exact weight gradients, by plain backprop on the same batch
    model.zero_grad(set_to_none=True)
    for name in layers:
        model.get_submodule(name).weight.requires_grad_(True)
    nn.functional.cross_entropy(model(batches[0][0]), batches[0][1]).backward()
    norms = {name: model.get_submodule(name).weight.grad.norm().item() for name in layers}
    model.zero_grad(set_to_none=True)
    assert len({round(n, 6) for n in norms.values()}) == 3  # the layers' gradients differ in size
    for name in layers:
        assert [o.ranks for o in relative[name]] == [o.ranks for o in absolute[name]]
        for a, r in zip(absolute[name], relative[name]):
            assert r.perplexity == pytest.approx(a.perplexity / norms[name], rel=1e-4, abs=1e-9)
    plan = plan_ranks(model, layers, batches, "8KB", model_name="tiny", relative=True)
    assert plan.total_bytes <= 8000
    assert all(layer.perplexity <= 1.5 for layer in plan.layers)  # a relative error, not a gradient's size
