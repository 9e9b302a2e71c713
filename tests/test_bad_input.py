"""Bad input met while the package was reorganised: each is one clear error line, never a traceback."""

import subprocess
import sys

import pytest
import yaml

from odl_fed.cli import main
from odl_fed.deploy.certs import CA_CERT, SERVER_KEY

JOB = {"model": "resnet18", "layers": 1, "method": "asi", "rounds": 1, "clients-per-round": 1, "local-epochs": 1,
       "batch-size": 8, "lr": 0.001, "image-size": 32, "dataset": "digits"}


@pytest.mark.process  # `odl-fed simulate` in a child python
def test_a_fleet_with_more_clients_than_examples_is_one_line_with_no_child_traceback(tmp_path):
    """1,500 clients for the 1,437 training digits: the preflight says so before any partition is made
    (the partitioning child process used to print its own traceback first)."""
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"devices": [{"device": "tiny", "count": 1500}], "job": JOB}))
    done = subprocess.run([sys.executable, "-m", "odl_fed.cli", "simulate", "--fleet", str(fleet), "--out-dir",
                           str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"odl-fed simulate: error: {fleet}: devices: 1500 clients split 1437 examples of digits into shares of 0; "
        f"this dataset can feed at most 143 clients (10 examples each)"]
    assert not (tmp_path / "out").exists()


def _certs(args, capsys) -> tuple[int, str]:
    code = main(["certs", *map(str, args)])
    return code, capsys.readouterr().err.strip()


def test_certs_over_an_empty_directory_where_a_file_belongs_is_repaired_with_force(tmp_path, capsys):
    """What Docker leaves when a bind-mounted file is missing: an empty directory at the file's path."""
    (tmp_path / CA_CERT).mkdir()
    code, err = _certs([tmp_path, "--nodes", "1"], capsys)
    assert code == 2 and err == (f"odl-fed certs: error: {tmp_path / CA_CERT} is a directory where the file "
                                 f"{CA_CERT} belongs (Docker makes one where a bind-mounted file is missing): "
                                 f"remove it (rmdir {tmp_path / CA_CERT}) or run again with --force")
    code, err = _certs([tmp_path, "--nodes", "1", "--force"], capsys)
    assert code == 0 and err == ""
    assert (tmp_path / CA_CERT).read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_certs_force_leaves_a_directory_with_something_in_it_and_says_so(tmp_path, capsys):
    stand_in = tmp_path / SERVER_KEY
    stand_in.mkdir()
    (stand_in / "keep.txt").write_text("not ours")
    code, err = _certs([tmp_path, "--nodes", "1", "--force"], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"{stand_in} is a directory where the file {SERVER_KEY} belongs" in err and "it is not empty" in err
    assert (stand_in / "keep.txt").read_text() == "not ours"


@pytest.mark.parametrize("force", [[], ["--force"]])
def test_certs_into_a_path_that_is_a_file_is_one_error(tmp_path, capsys, force):
    target = tmp_path / "certs"
    target.write_text("a file")
    code, err = _certs([target, "--nodes", "1", *force], capsys)
    assert code == 2 and err == f"odl-fed certs: error: {target} is a file, not a directory: give odl-fed certs " \
                                f"a directory to write in"
