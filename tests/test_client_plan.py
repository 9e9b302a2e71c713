"""Client plans from device profiles: exact where the budget allows, compressed where it must, a measured
trial that holds, the order of retreat, refusals that say the smallest need; every model the project builds."""

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from odl_fed.config.profile import get_profile
from odl_fed.planning.device_plan import PlanRefused, Setting, measure_training, next_setting, plan_client
from odl_fed.training.data import batches, load_dataset
from odl_fed.training.models import MODELS, build_model, prepare_finetune
from odl_fed.training.saved_memory import SavedTensorMeter
from odl_fed.training.task import apply_method

IMAGE = 16


def small_cnn() -> nn.Module:
    """A CNN of the shape the planner meets (conv, BatchNorm, ReLU/ReLU6; a Linear head), small enough
    that every test here plans in seconds; every real model gets its plan in the last test."""
    torch.manual_seed(0)
    blocks = []
    for c_in, c_out, kernel, stride, act in [(3, 16, 3, 2, nn.ReLU), (16, 32, 3, 1, nn.ReLU6),
                                             (32, 64, 3, 2, nn.ReLU), (64, 64, 1, 1, nn.ReLU6),
                                             (64, 96, 3, 1, nn.ReLU)]:
        blocks += [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out), act()]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10)).eval()


@pytest.fixture(scope="module")
def setting():
    data = load_dataset("digits", split="train")
    return small_cnn(), data.subset(torch.arange(330))  # 10 batches of 32 and a short one


@pytest.fixture(scope="module")
def roomy(setting):
    return _plan(setting, get_profile("rpi4"))


def _plan(setting, profile, method="asi", layers=4, batch=32, **kwargs):
    model, data = setting
    return plan_client(model, model_name="small-cnn", profile=profile, method=method, layers=layers,
                       batch_size=batch, data=data, image_size=IMAGE, **kwargs)


def _saved_by_a_step(setting, plan, method="asi"):
    """What a real step with the plan in place saves for backward: the trained convs', and in all."""
    model = small_cnn()
    model.load_state_dict(setting[0].state_dict())
    convs = prepare_finetune(model, layers=len(plan.layers))
    apply_method(model, method, plan.ranks)
    x, y = next(batches(setting[1], batch_size=plan.batch_size, image_size=IMAGE))
    modules = {name: model.get_submodule(name) for name in convs}
    with SavedTensorMeter(exclude=model.parameters(), modules=modules) as meter:
        F.cross_entropy(model(x), y)
    return meter.nbytes_of(modules), meter.nbytes


def test_a_roomy_device_keeps_every_layer_exact_and_saves_what_vanilla_saves(setting, roomy):
    assert roomy.batch_size == 32 and len(roomy.layers) == 4
    assert roomy.ranks == {name: None for name in roomy.layers} and roomy.rank_plan is None
    convs, total = _saved_by_a_step(setting, roomy)
    vanilla_convs, _ = _saved_by_a_step(setting, roomy, method="vanilla")
    assert convs == vanilla_convs > 0  # exact layers hold their whole input, as plain backprop does
    assert total == roomy.predicted_activation_bytes


def test_an_activation_cap_compresses_only_what_it_must(setting, roomy):
    exact_convs, _ = _saved_by_a_step(setting, roomy)
    rest = roomy.predicted_activation_bytes - exact_convs
    capped = dataclasses.replace(get_profile("rpi4"), name="capped", activation_memory=rest + exact_convs // 2)
    plan = _plan(setting, capped)
    assert plan.batch_size == 32 and len(plan.layers) == 4 and plan.rank_plan is not None
    compressed = [name for name, ranks in plan.ranks.items() if ranks is not None]
    # half the exact bytes: some layers compressed, and at least one kept exact (here the last, '12')
    assert 0 < len(compressed) < 4, plan.ranks
    assert plan.exact_layers == tuple(name for name in plan.layers if name not in compressed) != ()
    convs, total = _saved_by_a_step(setting, plan)
    assert convs <= exact_convs // 2 and total == plan.predicted_activation_bytes <= plan.activation_budget
    pure = _plan(setting, capped, method="asi-only")
    assert all(ranks is not None for ranks in pure.ranks.values())  # asi-only compresses every layer


def test_a_fleets_relative_weighting_reaches_the_rank_planner(setting, roomy):
    exact_convs, _ = _saved_by_a_step(setting, roomy)
    rest = roomy.predicted_activation_bytes - exact_convs
    capped = dataclasses.replace(get_profile("rpi4"), name="capped", activation_memory=rest + exact_convs // 8)
    absolute, relative = (_plan(setting, capped, method="asi-only", relative=r, calibration_batches=1)
                          for r in (False, True))
    for name, options in absolute.rank_plan.options.items():
        # the same options, each layer's perplexities divided by one number: its exact gradient's norm
        # on the one calibration batch
        pairs = [(a.perplexity, r.perplexity) for a, r in zip(options, relative.rank_plan.options[name])
                 if a.perplexity > 0]
        assert pairs and [a.ranks for a in options] == [r.ranks for r in relative.rank_plan.options[name]]
        norm = pairs[0][0] / pairs[0][1]
        assert norm != pytest.approx(1.0) and all(a / r == pytest.approx(norm, rel=1e-6) for a, r in pairs)


def test_the_measured_trial_is_what_the_plan_must_fit(setting, roomy):
    assert roomy.trial_steps >= 8 and roomy.measured_need > 0 and roomy.margin >= 0
    assert roomy.weights_bytes + roomy.measured_need + roomy.margin <= roomy.train_memory
    # A device with room for a quarter of what the trial needed retreats to a smaller setting, or is refused.
    short = dataclasses.replace(get_profile("rpi4"), name="short",
                                train_memory=roomy.weights_bytes + roomy.measured_need // 4)
    try:
        plan = _plan(setting, short)
    except PlanRefused as refused:
        assert "a measured trial needs" in str(refused) or "fixed costs" in str(refused)
    else:
        assert plan.setting != roomy.setting
        assert plan.weights_bytes + plan.measured_need + plan.margin <= short.train_memory


def test_the_trial_leaves_the_model_as_it_came(setting):
    model, data = setting
    convs = prepare_finetune(model, layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trial = measure_training(model, "asi", {name: (32, 4, 2, 2) for name in convs}, data=data, batch_size=32,
                             image_size=IMAGE, lr=0.1)
    assert len(trial.step_peaks) >= 8 and trial.need == max(trial.step_peaks) and trial.reclaims > 0
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(model.get_submodule(name)).__name__ == "Conv2d" for name in convs)
    assert all(type(m).__name__ in ("BatchNorm2d", "ReLU", "ReLU6") for m in model if not list(m.parameters())
               and not isinstance(m, (nn.AdaptiveAvgPool2d, nn.Flatten)))


def test_the_order_of_retreat_is_batch_then_layers_then_ranks(roomy):
    order, plan = [], roomy
    setting = plan.setting
    while setting is not None:
        order.append(setting)
        plan = dataclasses.replace(plan, layers=plan.layers[:setting.layers], batch_size=setting.batch_size,
                                   activation_scale=setting.activation_scale)
        setting = next_setting(plan, layers=4, batch_size=32)
    assert order[:5] == [Setting(4, 32), Setting(4, 16), Setting(4, 8), Setting(4, 4), Setting(3, 32)]
    assert order[-3:] == [Setting(1, 4), Setting(1, 4, 0.5), Setting(1, 4, 0.25)]


def test_vanilla_retreats_to_a_smaller_batch_before_fewer_layers(setting):
    at_32 = _plan(setting, get_profile("rpi4"), method="vanilla")
    at_16 = _plan(setting, get_profile("rpi4"), method="vanilla", batch=16)
    assert at_16.measured_need < at_32.measured_need
    between = at_32.weights_bytes + (at_16.measured_need + at_16.margin + at_32.measured_need) // 2
    plan = _plan(setting, dataclasses.replace(get_profile("phone"), name="between", train_memory=between),
                 method="vanilla")
    assert plan.batch_size < 32 and len(plan.layers) == 4


@pytest.mark.parametrize("method", ["hosvd", "gradfilt"])
def test_the_baselines_plan_through_the_same_steps(setting, method):
    plan = _plan(setting, get_profile("rpi4"), method=method, layers=2)
    assert plan.method == method and plan.trial_steps >= 8 and len(plan.layers) == 2
    if method == "hosvd":  # a baseline compresses every layer
        assert all(ranks is not None for ranks in plan.ranks.values())
    else:
        assert all(ranks is None for ranks in plan.ranks.values())
    _, total = _saved_by_a_step(setting, plan, method=method)
    assert total == plan.predicted_activation_bytes


def test_nothing_fits_is_a_clear_refusal(setting):
    tiny = dataclasses.replace(get_profile("tiny"), train_memory=50_000)
    with pytest.raises(PlanRefused, match=re.escape("device 'tiny': no asi setting of small-cnn fits its "
                                                    "train-memory of 0.05 MiB (the model's weights alone take")):
        _plan(setting, tiny, layers=2)


def test_a_device_that_holds_the_weights_but_not_the_step_is_told_the_smallest_need(setting):
    weights = sum(t.numel() * t.element_size() for t in [*setting[0].parameters(), *setting[0].buffers()])
    profile = dataclasses.replace(get_profile("phone"), name="watch", train_memory=weights + 20_000)
    with pytest.raises(PlanRefused, match=r"device 'watch': .*the smallest setting tried, 1 layer\(s\) at batch 4, "
                                          r"0.25 of the activation budget: .*(fixed costs|measured trial)"):
        _plan(setting, profile, layers=2)


@pytest.mark.sweep  # 14 plans with measured trials, half a minute together
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("layers", [1, 4])
def test_every_model_the_project_builds_gets_a_plan(name, layers):
    torch.manual_seed(0)
    model = build_model(name, num_classes=10)
    data = load_dataset("digits", split="train").subset(torch.arange(64))
    exact = plan_client(model, model_name=name, profile=get_profile("rpi5"), method="asi", layers=layers,
                        batch_size=16, data=data, image_size=32)
    assert len(exact.layers) == layers and exact.exact_layers == exact.layers
    # Half the exact bytes for the trained convs: the planner compresses (EfficientNet's padded convs too).
    convs = prepare_finetune(model, layers=layers)
    apply_method(model, "vanilla", {})
    x, y = next(batches(data, batch_size=16, image_size=32))
    modules = {n: model.get_submodule(n) for n in convs}
    with SavedTensorMeter(exclude=model.parameters(), modules=modules) as meter:
        F.cross_entropy(model(x), y)
    rest = exact.predicted_activation_bytes - meter.nbytes_of(modules)
    capped = dataclasses.replace(get_profile("rpi5"), name="capped",
                                 activation_memory=rest + meter.nbytes_of(modules) // 2)
    plan = plan_client(model, model_name=name, profile=capped, method="asi", layers=layers, batch_size=16,
                       data=data, image_size=32, calibration_batches=1)
    assert plan.rank_plan is not None and plan.predicted_activation_bytes <= plan.activation_budget
    assert any(ranks is not None for ranks in plan.ranks.values())


def test_training_with_each_plan_gives_the_accuracy_ordering_expected(setting, roomy):
    """Real digits: the exact plan learns best, a plan squeezed to a few percent of the exact bytes
    less well, and the convs frozen (head only) worst."""
    from odl_fed.training.task import evaluate, make_optimizer, train_epoch

    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    exact_convs, _ = _saved_by_a_step(setting, roomy)
    rest = roomy.predicted_activation_bytes - exact_convs
    squeezed = _plan(setting, dataclasses.replace(get_profile("rpi4"), name="squeezed",
                                                  activation_memory=rest + exact_convs // 30))
    assert squeezed.batch_size == 32 and squeezed.rank_plan is not None

    def top1(plan, frozen_convs=False):
        model = small_cnn()
        convs = prepare_finetune(model, layers=4)
        if frozen_convs:
            for name in convs:
                model.get_submodule(name).requires_grad_(False)
        else:
            apply_method(model, "asi", plan.ranks)
        optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        for epoch in range(4):
            train_epoch(model, train, optimizer=optimizer, batch_size=32, image_size=IMAGE, seed=epoch)
        return evaluate(model, test, batch_size=256, image_size=IMAGE)["accuracy"]

    exact, compressed, head_only = top1(roomy), top1(squeezed), top1(roomy, frozen_convs=True)
    print(f"top-1: exact {exact:.3f}, compressed {compressed:.3f}, head only {head_only:.3f}")
    assert exact >= compressed - 0.01 and compressed > head_only + 0.05, (exact, compressed, head_only)
