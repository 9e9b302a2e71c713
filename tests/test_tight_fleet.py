"""A fleet of tight devices (1.1x-1.3x of what their setting needs, and one far below) in Flower's
simulation engine: plans hold (no breach after a plan said it fits), the budget is used well, and a
device that cannot train is refused at plan time with the smallest need."""

import pytest

from bench import tight_fleet

pytestmark = pytest.mark.fleet  # one run of its own in Flower's simulation engine (its fleet is the test)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return tight_fleet.run(tmp_path_factory.mktemp("tight"), rounds=2)


def test_every_client_round_trains_or_is_refused_at_plan_time(result):
    assert len(result["clients"]) == 2 * (len(tight_fleet.FACTORS) + 1)
    for c in result["clients"]:
        assert c["status"] in ("ok", "refused"), c
        if c["status"] == "ok":
            assert c["attempts"] == 1, c  # no breach after the plan said it fits
        else:
            assert "no asi setting of mobilenet_v2 fits" in c["reason"] and "smallest setting tried" in c["reason"], c
    assert result["breaches_after_plan"] == 0
    assert sum(c["status"] == "ok" for c in result["clients"]) >= 2 * len(tight_fleet.FACTORS)


def test_each_trained_client_stays_within_its_budget_and_uses_it_well(result):
    for c in result["clients"]:
        if c["status"] == "ok":
            assert 0 < c["peak-memory"] <= c["memory-budget"] < c["train-memory"], c
    assert result["mean_peak_over_budget"] >= 0.7, result["peak_over_budget"]


def test_the_starved_device_is_refused_or_trains_a_smaller_setting(result):
    starved = [c for c in result["clients"] if c["device"] == "starved"]
    assert all(c["status"] == "refused" or (c["batch-size"], c["layers-trained"]) < (16, 2) for c in starved), starved
