"""Hardware profiles: TOML files in ``profiles/`` giving a machine's budgets and settings.

A profile fills in what a user did not say: ``device``, ``device_memory``, ``host_memory``,
``dtype``, ``policy``, the prefetch settings and ``io``, how experts are read. Explicit arguments
always win over the profile: ``OffloadConfig.from_profile(profile, **overrides)`` builds the settings
``load`` runs with from ``Profile.settings()``.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import BudgetError, ConfigError
from .files import read_text
from .policies import POLICIES
from .values import PREDICTORS, check_io, parse_bytes, parse_dtype, shown

FIELDS = ("description", "device", "device_memory", "host_memory", "dtype", "policy", "prefetch",
          "prefetch_margin", "prefetch_depth", "io")
INT_FIELDS = {"prefetch_margin": (0, 4096), "prefetch_depth": (1, 1024)}  # beyond any model's experts and layers
PROFILE_LIMIT = 2**20  # a profile is a dozen short lines
DEVICE = re.compile(r"(cpu|cuda(:[0-9]{1,4})?)\Z")


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    device: str
    device_memory: str
    host_memory: str | None = None  # pinned warm tier; None: experts come straight from disk
    dtype: str | None = None
    policy: str | None = None
    prefetch: str | None = None
    prefetch_margin: int | None = None
    prefetch_depth: int | None = None
    io: str | None = None  # how experts are read: auto, direct, dontneed, buffered or (CPU) mmap

    def settings(self) -> dict[str, str | int]:
        """The ``OffloadConfig`` settings this profile gives (those it leaves out keep their defaults)."""
        return {k: v for k, v in asdict(self).items() if k not in ("name", "description") and v is not None}


def profiles_folder() -> Path:
    """``offload_moe/profiles`` in an installed package, the top-level ``profiles/`` in a source tree."""
    here = Path(__file__).parent
    installed = here / "profiles"
    return installed if installed.is_dir() else here.parent / "profiles"


def _bundled() -> dict[str, Path]:
    return {p.stem: p for p in sorted(profiles_folder().glob("*.toml"))}


def list_profiles() -> list[Profile]:
    """Every bundled profile, by name."""
    return [read_profile(path) for _, path in sorted(_bundled().items())]


def get_profile(name_or_path: str | Path) -> Profile:
    """A bundled profile by name (``gpu-24gb``) or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        return read_profile(path)
    bundled = _bundled()
    if str(name_or_path) not in bundled:
        raise ConfigError(f"no hardware profile named {str(name_or_path)!r}; known: {', '.join(sorted(bundled))} "
                          "(or pass the path of a .toml file)")
    return read_profile(bundled[str(name_or_path)])


def read_profile(path: Path) -> Profile:
    """The profile in the TOML file ``path``, every setting checked; any fault is a ConfigError naming the
    file and the setting. The file is read as untrusted data: a regular file of at most ``PROFILE_LIMIT`` bytes."""
    data = _parse_toml(path)
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError(f"profile {path} has unknown setting(s) {', '.join(shown(k) for k in unknown[:5])}; "
                          f"known: {', '.join(FIELDS)}")
    missing = [k for k in ("description", "device", "device_memory") if k not in data]
    if missing:
        raise ConfigError(f"profile {path} lacks {', '.join(missing)}")
    for key, value in data.items():
        want = int if key in INT_FIELDS else str
        if not isinstance(value, want) or isinstance(value, bool):
            raise ConfigError(f"profile {path}: {key} = {shown(value)} should be {'an integer' if want is int else 'a string'}")
    _check_choices(data, path)
    try:
        parse_dtype(data.get("dtype"))
        for key in ("device_memory", "host_memory"):
            if key in data:
                parse_bytes(data[key], key)
    except (BudgetError, ConfigError) as e:
        raise ConfigError(f"profile {path}: {e}") from None
    for key, (low, high) in INT_FIELDS.items():
        if key in data and not low <= data[key] <= high:
            raise ConfigError(f"profile {path}: {key} = {shown(data[key])} must be {low}..{high}")
    return Profile(name=path.stem, **data)


def _parse_toml(path: Path) -> dict:
    text = read_text(path, "profile", ConfigError, PROFILE_LIMIT)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"profile {path} is not valid TOML: {e}") from None
    except (ValueError, RecursionError):  # an integer of thousands of digits; arrays nested thousands deep
        raise ConfigError(f"profile {path} cannot be parsed: it holds a number thousands of digits long or values "
                          "nested thousands deep, where a profile holds a few short settings") from None


def _check_choices(data: dict, path: Path) -> None:
    """Settings that name one of a few choices: device, prefetch, io (checked as ``OffloadConfig`` checks it), policy."""
    if not DEVICE.match(data["device"]):
        raise ConfigError(f"profile {path}: device = {shown(data['device'])} is not a device; use 'cpu', 'cuda' or 'cuda:N'")
    if data.get("prefetch", "none").lower() not in PREDICTORS:
        raise ConfigError(f"profile {path}: prefetch = {shown(data['prefetch'])} is not a predictor; use one of {', '.join(PREDICTORS)}")
    try:
        check_io(data.get("io", "auto"), host_memory=data.get("host_memory") is not None,
                 device=torch.device(data["device"]))
    except ConfigError as e:
        raise ConfigError(f"profile {path}: {e}") from None
    running = sorted(set(POLICIES) - {"belady"})
    if data.get("policy", "lru").lower() not in running:
        raise ConfigError(f"profile {path}: policy = {shown(data['policy'])} is not an eviction policy for a running "
                          f"model; use one of {', '.join(running)}")
