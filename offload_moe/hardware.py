"""Hardware profiles: TOML files in ``profiles/`` giving a machine's budgets and settings.

A profile fills in what a user did not say: ``device``, ``device_memory``, ``host_memory``,
``dtype``, ``policy``, the prefetch settings and ``io``, how experts are read. Explicit arguments
always win over the profile.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from .errors import BudgetError, ConfigError

FIELDS = ("description", "device", "device_memory", "host_memory", "dtype", "policy", "prefetch",
          "prefetch_margin", "prefetch_depth", "io")


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
    io: str | None = None  # how experts are read: direct, dontneed, buffered or (CPU) mmap


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
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"profile file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"profile {path} is not valid TOML: {e}") from None
    except (OSError, UnicodeDecodeError) as e:  # a folder, an unreadable or a binary file
        raise ConfigError(f"profile {path} cannot be read ({e}); pass a UTF-8 .toml file or a profile name") from None
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError(f"profile {path} has unknown setting(s) {', '.join(unknown)}; known: {', '.join(FIELDS)}")
    missing = [k for k in ("description", "device", "device_memory") if k not in data]
    if missing:
        raise ConfigError(f"profile {path} lacks {', '.join(missing)}")
    for key, value in data.items():
        want = int if key in ("prefetch_margin", "prefetch_depth") else str
        if not isinstance(value, want) or isinstance(value, bool):
            raise ConfigError(f"profile {path}: {key} = {value!r} should be {'an integer' if want is int else 'a string'}")
    from .prefetch import PREDICTORS

    if data.get("prefetch", "none").lower() not in PREDICTORS:
        raise ConfigError(f"profile {path}: prefetch = {data['prefetch']!r} is not a predictor; use one of {', '.join(PREDICTORS)}")
    from .safetensors_io import IO_MODES

    if data.get("io", "direct") not in IO_MODES:
        raise ConfigError(f"profile {path}: io = {data['io']!r} is not an I/O mode; use one of {', '.join(IO_MODES)}")
    if data.get("io") == "mmap" and data.get("host_memory") is not None:
        raise ConfigError(f"profile {path}: host_memory adds nothing with io = 'mmap' (the page cache is the spare-RAM "
                          "tier); remove one of them")
    if data.get("io") == "mmap" and not str(data["device"]).lower().startswith("cpu"):
        raise ConfigError(f"profile {path}: io = 'mmap' needs device = 'cpu' (it computes experts from the mapped "
                          "checkpoint); use 'direct' for a GPU")
    from .config import parse_bytes, parse_dtype
    from .policies import POLICIES

    if data.get("policy", "lru").lower() not in set(POLICIES) - {"belady"}:
        raise ConfigError(f"profile {path}: policy = {data['policy']!r} is not an eviction policy for a running model; "
                          f"use one of {', '.join(sorted(set(POLICIES) - {'belady'}))}")
    try:
        parse_dtype(data.get("dtype"))
        for key in ("device_memory", "host_memory"):
            if key in data:
                parse_bytes(data[key], key)
    except (BudgetError, ConfigError) as e:
        raise ConfigError(f"profile {path}: {e}") from None
    if data.get("prefetch_margin", 0) < 0 or data.get("prefetch_depth", 1) < 1:
        raise ConfigError(f"profile {path}: prefetch_margin must be 0 or more and prefetch_depth at least 1")
    return Profile(name=path.stem, **data)
