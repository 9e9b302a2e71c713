"""Device profiles: what a device lets fine-tuning use, validated once at load.

Built-in profiles live in ``odl_fed/config/devices.yaml`` (installed with the package);
user files add profiles or override fields of
built-in ones. Every mistake names the file, the profile and the field, with the nearest valid
name where one is close.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from odl_fed.config.suggest import did_you_mean
from odl_fed.config.units import parse_bytes

__all__ = ["DeviceProfile", "ProfileError", "BUILTIN_PROFILES", "PROFILE_KEYS", "load_profiles", "get_profile",
           "profile_from_fields", "profile_fields"]

BUILTIN_PROFILES = Path(__file__).resolve().with_name("devices.yaml")  # package data: in the wheel too
_SIZE_FIELDS = ("ram", "train-memory", "runtime-memory", "activation-memory")
_OPTIONAL = ("description", "activation-memory")


class ProfileError(ValueError):
    """A device profile that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class DeviceProfile:
    """One kind of device. Sizes are bytes."""

    name: str
    ram: int
    train_memory: int
    runtime_memory: int
    cores: int
    relative_speed: float
    description: str = ""
    activation_memory: int | None = None  # an optional cap on the bytes held for backward

    def __post_init__(self):
        if self.train_memory + self.runtime_memory > self.ram:
            raise ProfileError(f"device {self.name!r}: train-memory ({self.train_memory} B) plus runtime-memory "
                               f"({self.runtime_memory} B) exceed its ram ({self.ram} B)")


_KEYS = tuple(f.name.replace("_", "-") for f in fields(DeviceProfile) if f.name != "name")
PROFILE_KEYS = _KEYS  # a profile's fields as written in files and node configs (kebab-case)


def _profile(name: str, entry: Mapping, source: str) -> DeviceProfile:
    where = f"{source}: device {name!r}"
    if not isinstance(entry, Mapping):
        raise ProfileError(f"{where}: expected a mapping of fields, got {type(entry).__name__}")
    for key in entry:
        if key not in _KEYS:
            raise ProfileError(f"{where}: unknown field {key!r}{did_you_mean(str(key), _KEYS)}; "
                               f"valid: {', '.join(_KEYS)}")
    missing = [k for k in _KEYS if k not in entry and k not in _OPTIONAL]
    if missing:
        raise ProfileError(f"{where}: missing field(s) {', '.join(missing)}")
    values = {}
    for key in _KEYS:
        if key == "activation-memory" and entry.get(key) is None:
            continue
        value = entry.get(key, "")
        try:
            if key in _SIZE_FIELDS:
                values[key] = parse_bytes(value, what=key, allow_zero=key == "runtime-memory")
            elif key == "cores":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"cores must be a positive integer, but got {value!r}")
                values[key] = value
            elif key == "relative-speed":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                    raise ValueError(f"relative-speed must be a positive finite number, but got {value!r}")
                values[key] = float(value)
            else:
                values[key] = str(value)
        except ValueError as error:
            raise ProfileError(f"{where}: {error}") from None
    try:
        return DeviceProfile(name=name, **{k.replace("-", "_"): v for k, v in values.items()})
    except ProfileError as error:
        raise ProfileError(f"{source}: {error}") from None


def _read(path: Path) -> Mapping:
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"device profile file {path} does not exist") from None
    except yaml.YAMLError as error:
        raise ProfileError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, Mapping):
        raise ProfileError(f"{path}: expected a mapping of device name -> fields")
    return data


def load_profiles(*paths: str | Path, builtin: str | Path = BUILTIN_PROFILES) -> dict[str, DeviceProfile]:
    """The built-in profiles, then each file's: a new name adds a profile, a known one overrides fields."""
    raw: dict[str, dict] = {name: dict(entry) for name, entry in _read(Path(builtin)).items()}
    sources = {name: str(builtin) for name in raw}
    for path in map(Path, paths):
        for name, entry in _read(path).items():
            if name in raw and isinstance(entry, Mapping):
                raw[name] = {**raw[name], **entry}
            else:
                raw[name] = entry
            sources[name] = str(path)
    return {name: _profile(str(name), entry, sources[name]) for name, entry in raw.items()}


def get_profile(name: str, profiles: Mapping[str, DeviceProfile] | None = None) -> DeviceProfile:
    profiles = load_profiles() if profiles is None else profiles
    if name not in profiles:
        raise ProfileError(f"unknown device {name!r}{did_you_mean(name, profiles)}; "
                           f"known devices: {', '.join(profiles)}")
    return profiles[name]


def profile_from_fields(name: str, entry: Mapping, *, source: str) -> DeviceProfile:
    """A profile from its kebab-case fields (a node config carries them), checked like a file's."""
    return _profile(name, entry, source)


def profile_fields(profile: DeviceProfile) -> dict[str, int | float | str]:
    """The profile's kebab-case fields, sizes in bytes (what a SuperNode's node config carries)."""
    out = {}
    for key in _KEYS:
        value = getattr(profile, key.replace("-", "_"))
        if value is not None and key != "description":
            out[key] = value
    return out
