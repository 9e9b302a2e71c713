"""Fleet files: the shipped ones load; mistakes name the file and the field."""

import re
from pathlib import Path

import pytest
import torch

from odl_fed.config.fleet import FleetError, load_fleet

FLEETS = Path(__file__).resolve().parent.parent / "configs" / "fleets"


def test_shipped_fleets_load():
    demo = load_fleet(FLEETS / "demo.yaml")
    assert demo.num_clients == 4 and [p.name for p in demo.client_profiles()] == ["rpi4", "rpi4", "phone", "tiny"]
    mixed = load_fleet(FLEETS / "mixed.yaml")
    assert mixed.num_clients >= 50 and len({g.profile.name for g in mixed.groups}) == 5
    assert mixed.job.dirichlet_alpha == 0.3
    assert demo.job.rank_weighting == "absolute"  # the paper's, unless a fleet says rank-weighting: relative


@pytest.mark.parametrize("change, message", [
    (("device: tiny", "device: rpi3"), "devices[2].device: unknown device 'rpi3' (did you mean 'rpi5'?)"),
    (("count: 1}", "count: -1}"), "devices[1].count: must be a positive integer, but got -1"),
    (("  rounds: 3", "  roudns: 3"), "job: unknown field 'roudns' (did you mean 'rounds'?)"),
    (("  method: asi", "  method: lora"), "job.method: must be one of ['vanilla', 'asi', 'asi-only', 'hosvd', "
                                          "'gradfilt', 'asi-fp16', 'asi-int8'], but got 'lora'"),
    (("  lr: 0.001", "  lr: fast"), "job.lr: must be a positive finite number, but got 'fast'"),
    (("  lr: 0.001", "  lr: .inf"), "job.lr: must be a positive finite number, but got inf"),
    (("  lr: 0.001", "  lr: .nan"), "job.lr: must be a positive finite number, but got nan"),
    (("  partition: iid", "  partition: {dirichlet: 0}"), "job.partition: must be 'iid' or {dirichlet: ALPHA} with a "
                                                          "finite ALPHA > 0"),
    (("  partition: iid", "  partition: {dirichlet: .inf}"), "job.partition: must be 'iid' or {dirichlet: ALPHA}"),
    (("clients-per-round: 4", "clients-per-round: 9"), "job.clients-per-round is 9, but the fleet has 4 clients"),
    (("  batch-size: 32\n", ""), "job: missing field(s) batch-size"),
    (("  method: asi\n", "  method: asi\n  rank-weighting: relativ\n"),
     "job.rank-weighting: must be one of ['absolute', 'relative'], but got 'relativ' (did you mean 'relative'?)"),
    (("  method: asi\n", "  method: asi\n  evaluation: client\n"),
     "job.evaluation: must be one of ['server', 'clients', 'both'], but got 'client' (did you mean 'clients'?)"),
    (("  method: asi\n", "  method: asi\n  evaluation: true\n"),
     "job.evaluation: must be one of ['server', 'clients', 'both'], but got True"),
    (("  method: asi\n", "  method: asi\n  eval-fraction: 1.5\n"),
     "job.eval-fraction: must be a number between 0 and 1 (the share of each client's data it holds out), "
     "but got 1.5"),
    (("  method: asi\n", "  method: asi\n  evaluation: server\n  eval-fraction: 0.1\n"),
     "job.eval-fraction: only applies when clients evaluate, but evaluation is 'server'"),
])
def test_fleet_mistakes_name_the_file_and_field(tmp_path, change, message):
    text = (FLEETS / "demo.yaml").read_text()
    assert change[0] in text
    path = tmp_path / "fleet.yaml"
    path.write_text(text.replace(change[0], change[1]))
    with pytest.raises(FleetError, match=re.escape(message)) as info:
        load_fleet(path)
    assert str(path) in str(info.value)


def test_who_evaluates_defaults_to_both_where_the_server_has_a_held_out_split(tmp_path):
    demo = load_fleet(FLEETS / "demo.yaml").job  # a named dataset: the server holds its test split
    assert (demo.evaluation, demo.eval_fraction, demo.server_evaluates, demo.clients_evaluate) == ("both", 0.2, True,
                                                                                                   True)
    path = tmp_path / "fleet.yaml"
    path.write_text((FLEETS / "demo.yaml").read_text().replace("  method: asi\n", "  method: asi\n"
                                                               "  evaluation: clients\n  eval-fraction: 0.25\n"))
    job = load_fleet(path).job
    assert (job.evaluation, job.eval_fraction, job.server_evaluates, job.clients_evaluate) == ("clients", 0.25, False,
                                                                                               True)


def test_missing_fleet_file(tmp_path):
    with pytest.raises(FleetError, match=re.escape(f"fleet file {tmp_path / 'none.yaml'} does not exist")):
        load_fleet(tmp_path / "none.yaml")


def test_a_random_model_whose_frozen_part_passes_nothing_is_warned_about(tmp_path):
    """Random MobileNetV2 with frozen BatchNorm hands its last convs ~1e-8 at 32 px (measured by a
    hook on the real forward); a pretrained checkpoint (demo.yaml) gets no warning."""
    from odl_fed.planning.preflight import DEAD_SIGNAL, check_signal
    from odl_fed.training.models import build_model, frozen_signal

    mixed = load_fleet(FLEETS / "mixed.yaml")
    assert mixed.job.weights is None and mixed.job.model == "mobilenet_v2"
    torch.manual_seed(mixed.job.seed)
    spread = frozen_signal(build_model("mobilenet_v2"), layers=mixed.job.layers, image_size=mixed.job.image_size)
    assert 0 <= spread < DEAD_SIGNAL
    warning = check_signal(mixed)
    assert warning.startswith(f"{mixed.path}: job.weights: a randomly initialised mobilenet_v2")
    assert f"{spread:.1e}" in warning and "odl-fed pretrain" in warning
    assert frozen_signal(build_model("resnet18"), layers=2, image_size=32) > DEAD_SIGNAL  # residuals carry it
    assert check_signal(load_fleet(FLEETS / "demo.yaml")) is None  # job.weights given: nothing to check
