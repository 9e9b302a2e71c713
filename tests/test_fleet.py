"""Fleet files: the shipped ones load; mistakes name the file and the field."""

import re
from pathlib import Path

import pytest

from odl_fed.fleet import FleetError, load_fleet

FLEETS = Path(__file__).resolve().parent.parent / "configs" / "fleets"


def test_shipped_fleets_load():
    demo = load_fleet(FLEETS / "demo.yaml")
    assert demo.num_clients == 4 and [p.name for p in demo.client_profiles()] == ["rpi4", "rpi4", "phone", "tiny"]
    mixed = load_fleet(FLEETS / "mixed.yaml")
    assert mixed.num_clients >= 50 and len({g.profile.name for g in mixed.groups}) == 5
    assert mixed.job.dirichlet_alpha == 0.3


@pytest.mark.parametrize("change, message", [
    (("device: tiny", "device: rpi3"), "devices[2].device: unknown device 'rpi3' (did you mean 'rpi5'?)"),
    (("count: 1}", "count: -1}"), "devices[1].count: must be a positive integer, but got -1"),
    (("  rounds: 3", "  roudns: 3"), "job: unknown field 'roudns' (did you mean 'rounds'?)"),
    (("  method: asi", "  method: lora"), "job.method: must be one of ['vanilla', 'asi', 'asi-only', 'hosvd', "
                                          "'gradfilt'], but got 'lora'"),
    (("  lr: 0.001", "  lr: fast"), "job.lr: must be a positive finite number, but got 'fast'"),
    (("  lr: 0.001", "  lr: .inf"), "job.lr: must be a positive finite number, but got inf"),
    (("  lr: 0.001", "  lr: .nan"), "job.lr: must be a positive finite number, but got nan"),
    (("  partition: iid", "  partition: {dirichlet: 0}"), "job.partition: must be 'iid' or {dirichlet: ALPHA} with a "
                                                          "finite ALPHA > 0"),
    (("  partition: iid", "  partition: {dirichlet: .inf}"), "job.partition: must be 'iid' or {dirichlet: ALPHA}"),
    (("clients-per-round: 4", "clients-per-round: 9"), "job.clients-per-round is 9, but the fleet has 4 clients"),
    (("  batch-size: 32\n", ""), "job: missing field(s) batch-size"),
])
def test_fleet_mistakes_name_the_file_and_field(tmp_path, change, message):
    text = (FLEETS / "demo.yaml").read_text()
    assert change[0] in text
    path = tmp_path / "fleet.yaml"
    path.write_text(text.replace(change[0], change[1]))
    with pytest.raises(FleetError, match=re.escape(message)) as info:
        load_fleet(path)
    assert str(path) in str(info.value)


def test_missing_fleet_file(tmp_path):
    with pytest.raises(FleetError, match=re.escape(f"fleet file {tmp_path / 'none.yaml'} does not exist")):
        load_fleet(tmp_path / "none.yaml")
