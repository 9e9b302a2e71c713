"""Device profiles: built-ins, user overrides, and errors that name the file and the field."""

import re

import pytest

from odl_fed.config.profile import ProfileError, get_profile, load_profiles


def test_builtin_profiles_cover_the_fleet_devices():
    profiles = load_profiles()
    assert {"rpi4", "rpi5", "jetson-nano", "phone", "tiny"} <= set(profiles)
    tiny = profiles["tiny"]
    assert tiny.train_memory <= 1024 * 1024 and tiny.runtime_memory == 0  # MCU scale
    for profile in profiles.values():
        assert profile.train_memory + profile.runtime_memory <= profile.ram


def test_user_file_overrides_fields_and_adds_devices(tmp_path):
    user = tmp_path / "devices.yaml"
    user.write_text("rpi4:\n  train-memory: 256MiB\n"
                    "pi-zero:\n  ram: 512MiB\n  train-memory: 64MiB\n  runtime-memory: 300MiB\n"
                    "  cores: 1\n  relative-speed: 0.2\n")
    profiles = load_profiles(user)
    assert profiles["rpi4"].train_memory == 256 * 2**20 and profiles["rpi4"].cores == 4
    assert profiles["pi-zero"].ram == 512 * 2**20


@pytest.mark.parametrize("text, message", [
    ("rpi4:\n  trian-memory: 1GiB\n", "device 'rpi4': unknown field 'trian-memory' (did you mean 'train-memory'?)"),
    ("board:\n  ram: 1GiB\n", "device 'board': missing field(s) train-memory, runtime-memory, cores, relative-speed"),
    ("rpi4:\n  cores: 0\n", "device 'rpi4': cores must be a positive integer, but got 0"),
    ("rpi4:\n  ram: lots\n", "device 'rpi4': ram must be a positive size"),
    ("rpi4:\n  train-memory: 8GiB\n", "device 'rpi4': train-memory (8589934592 B) plus runtime-memory"),
    ("- rpi4\n", "expected a mapping of device name -> fields"),
])
def test_profile_mistakes_name_the_file_device_and_field(tmp_path, text, message):
    user = tmp_path / "mine.yaml"
    user.write_text(text)
    with pytest.raises(ProfileError, match=re.escape(message)) as info:
        load_profiles(user)
    assert str(user) in str(info.value)


def test_unknown_device_and_missing_file(tmp_path):
    with pytest.raises(ProfileError, match=re.escape("unknown device 'rpi3' (did you mean 'rpi5'?); known devices:")):
        get_profile("rpi3")
    with pytest.raises(ProfileError, match=re.escape(f"device profile file {tmp_path / 'x.yaml'} does not exist")):
        load_profiles(tmp_path / "x.yaml")


def test_an_optional_activation_memory_cap_is_parsed_and_checked(tmp_path):
    path = tmp_path / "devices.yaml"
    path.write_text("sram-board:\n  ram: 1GiB\n  train-memory: 256MiB\n  runtime-memory: 0\n  cores: 2\n"
                    "  relative-speed: 0.5\n  activation-memory: 300KB\n")
    profiles = load_profiles(path)
    assert profiles["sram-board"].activation_memory == 300_000 and profiles["rpi4"].activation_memory is None
    path.write_text(path.read_text().replace("300KB", "lots"))
    with pytest.raises(ProfileError, match="device 'sram-board': activation-memory must be a positive size"):
        load_profiles(path)
