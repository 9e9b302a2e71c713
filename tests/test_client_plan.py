"""Client plans from device profiles: different devices, different plans; nothing fits, a refusal."""

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

from odl_fed.client_plan import PlanRefused, plan_client
from odl_fed.data import batches, load_dataset
from odl_fed.models import build_model, prepare_finetune
from odl_fed.profile import get_profile
from odl_fed.saved_memory import SavedTensorMeter
from odl_fed.task import apply_method

MiB = 2**20


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    return build_model("mobilenet_v2", num_classes=10), load_dataset("digits", split="train")


def _plan(setting, profile, method="asi", layers=4, batch=32):
    model, data = setting
    return plan_client(model, model_name="mobilenet_v2", profile=profile, method=method, layers=layers,
                       batch_size=batch, data=data, image_size=32)


def test_roomy_and_tight_devices_get_different_plans_that_fit(setting):
    roomy = _plan(setting, get_profile("rpi4"))
    assert roomy.batch_size == 32 and len(roomy.layers) == 4
    # A device with just room for the fixed costs plus a few hundred KB of activations.
    tight_memory = roomy.fixed_bytes + 300_000
    tight = _plan(setting, dataclasses.replace(get_profile("phone"), name="tight", train_memory=tight_memory))
    assert tight.predicted_activation_bytes <= tight.activation_budget
    assert tight.to_dict() != roomy.to_dict()
    assert sum(map(sum, tight.ranks.values())) < sum(map(sum, roomy.ranks.values()))


def test_predicted_activation_bytes_are_what_a_step_saves(setting):
    model, data = setting
    plan = _plan(setting, get_profile("rpi4"))
    model = build_model("mobilenet_v2", num_classes=10)
    model.load_state_dict(setting[0].state_dict())
    prepare_finetune(model, layers=len(plan.layers))
    apply_method(model, "asi", plan.ranks)
    x, y = next(batches(data, batch_size=plan.batch_size, image_size=32))
    with SavedTensorMeter(exclude=model.parameters()) as meter:
        F.cross_entropy(model(x), y)
    assert meter.nbytes == plan.predicted_activation_bytes


def test_vanilla_retreats_to_a_smaller_batch_before_fewer_layers(setting):
    roomy_vanilla = _plan(setting, get_profile("rpi4"), method="vanilla")
    needed = roomy_vanilla.fixed_bytes + roomy_vanilla.predicted_activation_bytes
    profile = dataclasses.replace(get_profile("phone"), name="half", train_memory=needed - 1)
    plan = _plan(setting, profile, method="vanilla")
    assert plan.batch_size < 32 and len(plan.layers) == 4


def test_nothing_fits_is_a_clear_refusal(setting):
    with pytest.raises(PlanRefused, match=re.escape("device 'tiny': no asi setting of mobilenet_v2 fits its "
                                                    "train-memory of 1.00 MiB (the model's weights alone take")):
        _plan(setting, get_profile("tiny"), layers=2)


def test_a_device_that_holds_the_weights_but_not_the_step_is_told_the_smallest_need(setting):
    weights = sum(t.numel() * t.element_size() for t in [*setting[0].parameters(), *setting[0].buffers()])
    profile = dataclasses.replace(get_profile("phone"), name="watch", train_memory=weights + 100_000)
    with pytest.raises(PlanRefused, match=r"device 'watch': .*the smallest setting tried, 1 layer\(s\) at batch 4: "
                                          r"fixed costs [0-9.]+ MiB \(weights, gradients"):
        _plan(setting, profile, layers=2)
