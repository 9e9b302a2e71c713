"""The accuracy benchmark's settings: the seeds config as issue 12 asks for it, and errors that say what to fix."""

import re
from pathlib import Path

import pytest
import torch

from bench.accuracy.run import _over_seeds
from bench.accuracy.settings import load_settings
from bench.accuracy.train import fine_tune, validation_split
from bench.tail import Cached

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "bench"


def test_the_default_config_runs_one_seed_and_every_method():
    settings = load_settings(CONFIGS / "accuracy.yaml")
    assert settings.seeds == (settings.seed,) and "gradfilt" in settings.methods
    assert all(case.lr_candidates("vanilla") == (case.lr,) for case in settings.cases)


def test_the_seeds_config_is_the_issues_setting():
    settings = load_settings(CONFIGS / "accuracy_seeds.yaml")
    (case,) = settings.cases
    assert (case.model, case.dataset, case.layers) == ("efficientnet_lite0", "fashion-mnist", (4,))
    assert settings.seeds == (0, 1, 2) and settings.budgets == (0.02, 0.01, 0.005)
    assert set(settings.methods) == {"vanilla", "head-only", "asi-only", "asi"}
    assert len(case.lr_candidates("asi-only")) > 1 and case.lr_candidates("asi") == case.lr_candidates("asi-only")
    assert case.epochs > 3


@pytest.mark.parametrize("line, message", [
    ("methods: [asi-only]", "methods must include 'vanilla' (every ratio is to it), but got ['asi-only']"),
    ("methods: [vanilla, lora]", "methods must be among ['vanilla', 'gradfilt', 'head-only', 'asi-only', 'asi-int8', "
                                 "'asi', 'hosvd', 'asi-paper-grid'], but got ['lora']"),
    ("schedule: step", "schedule must be one of ['constant', 'cosine'], but got 'step'"),
    ("weighting: squared", "weighting must be one of ['absolute', 'relative'], but got 'squared'"),
    ("seeds: [0, 0]", "seeds must differ, but got [0, 0]"),
    ("validation: 1.5", "validation must be a fraction of the training set in (0, 1), but got 1.5"),
])
def test_bad_settings_name_what_to_fix(tmp_path, line, message):
    config = tmp_path / "bench.yaml"
    config.write_text((CONFIGS / "accuracy_seeds.yaml").read_text().split("quick:")[0] + line + "\n")
    with pytest.raises(ValueError, match=re.escape(message)):
        load_settings(config)


def test_a_learning_rate_for_an_unknown_method_is_named(tmp_path):
    config = tmp_path / "bench.yaml"
    text = (CONFIGS / "accuracy_seeds.yaml").read_text().split("quick:")[0]
    config.write_text(text.replace("      asi: [0.0001, 0.0003, 0.001]", "      asi: []"))
    with pytest.raises(ValueError, match=re.escape("case 'effnet-fashion': lrs: asi: learning rates must be a "
                                                   "non-empty list of positive numbers, but got []")):
        load_settings(config)


def test_the_validation_split_is_carved_from_the_training_set_without_overlap():
    data = Cached(torch.arange(100.0).view(100, 1), torch.arange(100), 0.0)
    fit, held = validation_split(data, 0.1, seed=0)
    assert len(held) == 10 and len(fit) == 90
    assert sorted(fit.labels.tolist() + held.labels.tolist()) == list(range(100))
    assert torch.equal(validation_split(data, 0.1, seed=0)[1].labels, held.labels)  # the same split every time


def test_seeds_give_the_mean_and_the_sample_spread():
    runs = [{"top1": t, "epoch_top1": [t - 0.1, t], "train_losses": [1.0], "train_seconds": 1.0, "convs_bytes": 7}
            for t in (0.8, 0.9, 0.7)]
    row = _over_seeds(runs, [0, 1, 2])
    assert row["top1"] == pytest.approx(0.8) and row["top1_std"] == pytest.approx(0.1)
    assert row["epoch_top1"] == pytest.approx([0.7, 0.8]) and row["convs_bytes"] == 7
    assert [s["seed"] for s in row["seeds"]] == [0, 1, 2]


def test_the_cosine_config_lowers_the_rate_and_runs_8_bit_asi_at_the_targets_budget():
    settings = load_settings(CONFIGS / "accuracy_cosine.yaml")
    assert settings.schedule == "cosine" and settings.budgets == (0.01,) and "asi-int8" in settings.methods
    assert load_settings(CONFIGS / "accuracy_seeds.yaml").schedule == "constant"


@pytest.mark.parametrize("schedule, last_rate", [("constant", 0.1), ("cosine", 0.0)])
def test_the_cosine_schedule_lowers_the_rate_each_epoch_to_zero(schedule, last_rate):
    torch.manual_seed(0)
    data = Cached(torch.randn(64, 3), torch.randint(0, 2, (64,)), 0.0)
    model = torch.nn.Linear(3, 2)
    result, optimizer, _ = fine_tune(model, data, data, layer_names=[], epochs=4, batch_size=16, lr=0.1, seed=0,
                                     schedule=schedule)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(last_rate, abs=1e-12) and result["schedule"] == schedule
    with pytest.raises(ValueError, match=re.escape("schedule must be one of ['constant', 'cosine'], but got 'linear'")):
        fine_tune(model, data, data, layer_names=[], epochs=1, batch_size=16, lr=0.1, seed=0, schedule="linear")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("accuracy*.yaml")), ids=lambda p: p.name)
def test_every_committed_accuracy_config_loads(path):
    settings = load_settings(path)  # a wrong key or value raises, naming the file
    assert settings.cases and all(rate > 0 for case in settings.cases for method in settings.methods
                                  for rate in case.lr_candidates(method))


def test_the_rates_configs_check_every_rate_under_the_cosine_and_the_relative_one_weighs_relative():
    rates = load_settings(CONFIGS / "accuracy_cosine_rates.yaml")
    assert rates.schedule == "cosine" and set(rates.cases[0].lrs) == {"vanilla", "asi-only", "asi-int8"}
    relative = load_settings(CONFIGS / "accuracy_cosine_relative.yaml")
    assert relative.weighting == "relative" and relative.schedule == "cosine" and "asi-int8" in relative.methods
