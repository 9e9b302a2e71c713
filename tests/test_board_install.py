"""What a board installs: `pip install .` (or a wheel) brings only what the client needs, the wheel carries
every file the package reads, and on aarch64 torch stays where a Raspberry Pi 4 can run it."""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# Packages a board has no use for: the named datasets' stack, Ray, the dashboard's plots. (This machine's
# x86 CUDA build of torch imports triton itself; a board's CPU build has none.)
NOT_ON_A_BOARD = {"datasets", "flwr_datasets", "pyarrow", "pandas", "sklearn", "mlxtend", "ray", "matplotlib",
                  "tensorboard", "efficientnet_lite_pytorch"}


def _board_requirements(machine: str) -> dict[str, Requirement]:
    """pyproject's dependencies that apply on a Linux machine of this kind (markers evaluated), by name."""
    environment = {"platform_machine": machine, "sys_platform": "linux", "platform_system": "Linux",
                   "python_version": "3.11", "python_full_version": "3.11.2", "implementation_name": "cpython"}
    found = {}
    for text in PROJECT["dependencies"]:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            assert requirement.name not in found, f"two requirements of {requirement.name} apply on {machine}"
            found[requirement.name] = requirement
    return found


def test_a_board_needs_only_torch_torchvision_flwr_pyyaml_psutil_and_pillow():
    for machine in ("aarch64", "x86_64"):
        assert set(_board_requirements(machine)) == {"torch", "torchvision", "flwr", "pyyaml", "psutil", "pillow"}


def test_on_aarch64_torch_stays_below_2_10_and_on_x86_the_pinned_build_is_allowed():
    """PyPI's aarch64 torch 2.10 stops at import on a Cortex-A72 and 2.11+ at the first conv (and pulls
    CUDA 13); 2.9.1 with torchvision 0.24.1 trains there (docs/deployment.md)."""
    board = _board_requirements("aarch64")
    assert Version("2.9.1") in board["torch"].specifier and Version("0.24.1") in board["torchvision"].specifier
    assert Version("2.10.0") not in board["torch"].specifier and Version("2.15.0") not in board["torch"].specifier
    assert Version("0.25.0") not in board["torchvision"].specifier
    x86 = _board_requirements("x86_64")
    assert Version("2.14.1") in x86["torch"].specifier and Version("0.29.1") in x86["torchvision"].specifier


@pytest.mark.process  # a fresh interpreter imports the client's entry and its ClientApp
def test_the_clients_import_chain_loads_nothing_a_board_does_not_install():
    code = ("import sys, odl_fed.client, odl_fed.federation.client_app, odl_fed.deploy.supernode; "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = set(done.stdout.split())
    assert {"torch", "flwr", "yaml", "psutil"} <= loaded
    assert not loaded & NOT_ON_A_BOARD, sorted(loaded & NOT_ON_A_BOARD)


@pytest.mark.process  # builds a wheel and a fresh venv, and runs it outside the checkout
def test_the_wheel_installs_outside_the_checkout_and_finds_its_device_profiles(tmp_path):
    source = tmp_path / "source"  # a copy: the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "odl_fed", source / "odl_fed", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheels"), str(source)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "wheels").glob("odl_fed-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "odl_fed/config/devices.yaml" in names
    packaged = {n for n in names if n.startswith("odl_fed/")}
    in_tree = {p.relative_to(ROOT).as_posix() for p in (ROOT / "odl_fed").rglob("*")
               if p.is_file() and "__pycache__" not in p.parts}
    assert packaged == in_tree, f"files the package holds but the wheel lacks: {sorted(in_tree - packaged)}"

    board = tmp_path / "board"
    subprocess.run([sys.executable, "-m", "venv", str(board)], check=True, timeout=120)
    # Only the wheel and the config layer's one dependency: the profile lookup needs nothing else.
    subprocess.run([str(board / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel),
                    "pyyaml"], check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("from odl_fed.config.profile import BUILTIN_PROFILES, get_profile; p = get_profile('rpi4'); "
            "print(BUILTIN_PROFILES); print(p.name, p.ram, p.train_memory)")
    done = subprocess.run([str(board / "bin" / "python"), "-c", code], cwd=elsewhere, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    path, profile = done.stdout.splitlines()
    assert Path(path).is_relative_to(board) and "site-packages" in path
    assert profile.split()[0] == "rpi4" and int(profile.split()[1]) > 0
