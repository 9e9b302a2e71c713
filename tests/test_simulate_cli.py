"""`odl-fed simulate` and the run config: a user's mistake is one clear line, before Ray starts."""

import pytest
import yaml

from odl_fed.cli import main
from odl_fed.run_config import RunSettings

JOB = {"model": "resnet18", "layers": 2, "method": "asi", "rounds": 1, "clients-per-round": 1, "local-epochs": 1,
       "batch-size": 8, "lr": 0.001, "image-size": 32, "dataset": "digits"}


@pytest.mark.parametrize("fleet, words", [
    ({"devices": [{"device": "rpi4", "count": -1}], "job": JOB}, ["devices[0].count", "-1"]),
    ({"devices": [{"device": "rpi4"}], "job": JOB | {"methd": "asi"}}, ["'methd'", "did you mean 'method'"]),
    ({"devices": [{"device": "rpi4"}], "job": JOB | {"weights": "missing/backbone.pt"}},
     ["job.weights", "missing/backbone.pt does not exist", "odl-fed pretrain"]),
    ({"devices": [{"device": "rpi4"}], "job": JOB | {"strategy": "fedprox", "server-lr": 0.1}},
     ["server-lr", "only applies to strategy 'fedadam'"]),
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
