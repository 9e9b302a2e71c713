"""`odl-fed simulate` and the run config: a user's mistake is one clear line, before Ray starts."""

import pytest
import yaml

from odl_fed.cli import main
from odl_fed.config.run import RunSettings

JOB = {"model": "resnet18", "layers": 2, "method": "asi", "rounds": 1, "clients-per-round": 1, "local-epochs": 1,
       "batch-size": 8, "lr": 0.001, "image-size": 32, "dataset": "digits"}


@pytest.mark.parametrize("fleet, words", [
    ({"devices": [{"device": "rpi4", "count": -1}], "job": JOB}, ["devices[0].count", "-1"]),
    ({"devices": [{"device": "rpi4"}], "job": JOB | {"methd": "asi"}}, ["'methd'", "did you mean 'method'"]),
    ({"devices": [{"device": "rpi4"}], "job": JOB | {"weights": "missing/backbone.pt"}},
     ["job.weights", "missing/backbone.pt does not exist", "odl-fed pretrain"]),
    ({"devices": [{"device": "rpi4"}], "job": JOB | {"strategy": "fedprox", "server-lr": 0.1}},
     ["server-lr", "only applies to strategy 'fedadam'"]),
    ({"devices": [{"device": "rpi4"}], "job": JOB | {"layers": 21}},
     ["job.layers", "resnet18 has 20 convs, so layers must be from 1 to 20, but got 21"]),
    ({"devices": [{"device": "rpi4"}], "job": JOB | {"model": "efficientnet_lite0", "image-size": 4}},
     ["job.image-size", "efficientnet_lite0 cannot take 4x4 images"]),
    ({"devices": [{"device": "rpi4", "count": 200}], "job": JOB},
     ["devices: 200 clients split 1437 examples of digits into shares of 7", "at most 143 clients"]),
    ({"devices": [{"device": "rpi4"}], "job": JOB | {"lr": float("inf")}}, ["job.lr", "finite", "inf"]),
])
def test_a_bad_fleet_is_one_error_line_naming_file_and_field(tmp_path, capsys, fleet, words):
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet))
    assert main(["simulate", "--fleet", str(path), "--out-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("odl-fed simulate: error: ") and str(path) in err
    for word in words:
        assert word in err
    assert not (tmp_path / "out").exists()


def test_a_missing_fleet_file_is_named(tmp_path, capsys):
    assert main(["simulate", "--fleet", str(tmp_path / "nope.yaml"), "--no-progress"]) == 2
    assert f"fleet file {tmp_path / 'nope.yaml'} does not exist" in capsys.readouterr().err


def test_run_config_rejects_an_unknown_key_with_a_suggestion():
    with pytest.raises(ValueError, match="unknown key 'out-dri' \\(did you mean 'out-dir'\\?\\)"):
        RunSettings.from_config({"out-dri": "x"})


def test_run_config_paths_are_absolute_and_an_empty_cache_means_memory_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = RunSettings.from_config({"fleet": "f.yaml", "plan-cache": ""})
    assert settings.fleet_path == tmp_path / "f.yaml" and settings.plan_cache is None
    assert settings.out_dir == tmp_path / "runs" / "latest"


def test_a_fleet_this_machine_cannot_simulate_says_how_many_it_can(tmp_path, capsys):
    devices = tmp_path / "devices.yaml"
    devices.write_text(yaml.safe_dump({"huge": {"ram": "4096GiB", "train-memory": "2048GiB", "runtime-memory": 0,
                                                "cores": 4, "relative-speed": 1}}))
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"devices": [{"device": "huge", "count": 2}], "job": JOB}))
    assert main(["simulate", "--fleet", str(path), "--devices", str(devices), "--cpus", "2", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "simulating 2 clients at once needs about" in err and "it can simulate 0 at once" in err
