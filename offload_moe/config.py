"""Every runtime setting of ``load`` and ``offload_experts`` in one frozen ``OffloadConfig``, checked once.

An ``OffloadConfig`` holds where experts compute (device, dtype), how much memory they get (the budgets), how
they are chosen to stay (policy), predicted (prefetch) and read (io, readers, read_timeout). It is built
directly, from a hardware profile plus overrides (``OffloadConfig.from_profile``), or by ``load`` and
``offload_experts`` from their keyword arguments; every value is checked when it is built, before any
file is read, with an error that names the setting.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from .errors import BudgetError, ConfigError
from .hardware import Profile, get_profile
from .policies import make_policy
from .prefetch import Predictor
from .values import (  # noqa: F401 - parse_device, MAX_BYTES, check_io: imported from here by the rest of the package
    MAX_BYTES,
    PREDICTORS,
    check_count,
    check_io,
    check_prefetch_reach,
    format_bytes,
    parse_bytes,
    parse_device,
    parse_dtype,
    shown,
)

MIN_CACHE_EXPERTS = 2  # one expert computing while the next one loads
MAX_READ_TIMEOUT = 86_400  # seconds; a read that takes a day has failed


def memory_total(device: torch.device) -> int:
    """All the memory ``device`` has: the GPU's for CUDA, the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return psutil.virtual_memory().total


def check_within(nbytes: int, setting: str, device: torch.device, total: int | None = None) -> None:
    """Refuse ``nbytes`` for ``setting`` when ``device`` (a CUDA device, or the CPU's RAM) has less memory in all.
    A budget is refused, not clamped: a budget the machine cannot hold is a mistake (a profile for another
    machine, a typo), and quietly using less would hide it."""
    total = memory_total(device) if total is None else total
    if nbytes > total:
        where = "RAM" if device.type == "cpu" else str(device)
        raise BudgetError(f"{setting} asks for {format_bytes(nbytes)}, more than the {format_bytes(total)} this "
                          f"machine's {where} has in all; give at most that, less what the rest of the model needs")


def check_read_timeout(value: float | None) -> None:
    """``None`` (wait forever) or a finite number of seconds in (0, ``MAX_READ_TIMEOUT``]."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_READ_TIMEOUT:
        raise ConfigError(f"read_timeout={shown(value)} must be a number of seconds above 0 and at most "
                          f"{MAX_READ_TIMEOUT:,} (a day), or None to wait forever")


@dataclass(frozen=True)
class Budget:
    """How many expert slots the hot tier gets, from ``cache_experts`` or ``cache_memory``."""

    cache_experts: int | None = None
    cache_memory: str | int | None = None

    def __post_init__(self) -> None:
        if self.cache_experts is not None and self.cache_memory is not None:
            raise BudgetError("give either cache_experts or cache_memory, not both")
        if self.cache_experts is not None and (isinstance(self.cache_experts, bool) or not isinstance(self.cache_experts, int)):
            raise BudgetError(f"cache_experts={shown(self.cache_experts)} must be a whole number of experts")
        if self.cache_memory is not None:
            parse_bytes(self.cache_memory, "cache_memory")

    def slots(self, expert_bytes: int, total_experts: int, default_bytes: int, device: torch.device | None = None) -> int:
        """Expert slots for experts of ``expert_bytes``; with ``device``, a budget that machine cannot hold is refused."""
        if self.cache_experts is not None:
            n = self.cache_experts
            source = f"cache_experts={shown(n)}"
            asked = min(max(n, 0), total_experts) * expert_bytes
        else:
            nbytes = default_bytes if self.cache_memory is None else parse_bytes(self.cache_memory, "cache_memory")
            n = nbytes // max(expert_bytes, 1)
            source = f"cache_memory={shown(self.cache_memory)}" if self.cache_memory is not None else "the free memory"
            asked = nbytes if self.cache_memory is not None else 0
        if n < MIN_CACHE_EXPERTS:
            raise BudgetError(
                f"{source} gives {shown(n)} expert slot(s) of {format_bytes(expert_bytes)} each; offload_moe needs at "
                f"least {MIN_CACHE_EXPERTS} (one computing while the next loads). Raise the budget."
            )
        if device is not None:
            check_within(asked, source, device)
        return min(n, total_experts)


@dataclass(frozen=True)
class OffloadConfig:
    """The runtime settings of an offloaded model, checked when built (a bad one raises the error naming it).

    ``device``: where the dense weights and the expert slots live (``cpu``, ``cuda``, ``cuda:N``).
    ``dtype``: the compute dtype; None: the checkpoint's (``load``) or the experts' (``offload_experts``).
    Budgets: ``cache_experts`` slots or ``cache_memory`` bytes (``"6GiB"``) for the device slots, or neither:
    then ``device_memory`` (a profile's budget for the whole model) is planned into slots by both verbs
    (``attach.check_assembly``), and without it half the free memory is used. ``host_memory``: a warm tier of host RAM, with ``host_policy``.
    ``policy``: the eviction policy (``lru``, ``lfu``, ``fifo``, ``random``, ``forecast``, ``token-forecast``), seeded by ``seed``.
    ``prefetch``: ``none``, ``gate``, ``transition``, ``hybrid`` or a ``prefetch.Predictor`` of your own,
    naming top-k plus ``prefetch_margin`` experts for the next ``prefetch_depth`` layers.
    ``io``: ``auto`` (the default: ``mmap`` on CPU where the memory the process may use holds the experts, or 1.5x
    the slots, else ``direct``; ``memory.choose_io``), ``direct``, ``dontneed``, ``buffered`` or (CPU) ``mmap``; ``readers`` threads read the disk; a
    layer waits at most ``read_timeout`` seconds for one expert (None: forever).
    ``profile``: the hardware profile the settings came from (``from_profile`` sets it), for messages only.
    None for ``device``, the policies, the prefetch settings or ``io`` means their default.
    """

    device: str | torch.device | None = "cpu"
    dtype: str | torch.dtype | None = None
    cache_experts: int | None = None
    cache_memory: str | int | None = None
    device_memory: str | int | None = None
    host_memory: str | int | None = None
    host_policy: str | None = "lru"
    policy: str | None = "lru"
    prefetch: str | Predictor | None = "none"
    prefetch_margin: int | None = 1
    prefetch_depth: int | None = 1
    io: str | None = "auto"
    readers: int = 2
    read_timeout: float | None = 120.0
    seed: int = 0
    profile: Profile | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name, default in _DEFAULTS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        if self.profile is not None and not isinstance(self.profile, Profile):
            raise ConfigError(f"profile={shown(self.profile)} is not a hardware profile; build the config with "
                              "OffloadConfig.from_profile(name or path, ...)")
        object.__setattr__(self, "device", parse_device(self.device))
        object.__setattr__(self, "dtype", parse_dtype(self.dtype))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed={shown(self.seed)} must be a whole number")
        for name in ("policy", "host_policy"):
            _check_policy(name, getattr(self, name), self.seed)
            object.__setattr__(self, name, getattr(self, name).lower())
        object.__setattr__(self, "prefetch", _checked_prefetch(self.prefetch))
        check_prefetch_reach(self.prefetch_margin, self.prefetch_depth)
        check_count("readers", self.readers, 1, "at least 1")
        origin = (f" (io='mmap' comes from hardware profile {self.profile.name!r})"
                  if self.profile is not None and self.profile.io == "mmap" else "")
        check_io(self.io, host_memory=self.host_memory is not None, device=self.device, origin=origin)
        check_read_timeout(self.read_timeout)
        Budget(self.cache_experts, self.cache_memory)
        for name in ("host_memory", "device_memory"):
            if getattr(self, name) is not None:
                parse_bytes(getattr(self, name), name)

    @classmethod
    def from_profile(cls, profile: str | Path | Profile, **overrides: object) -> OffloadConfig:
        """The settings of hardware ``profile`` (a bundled name such as ``gpu-24gb``, a TOML path, or a
        ``Profile``), with ``overrides`` on top. An override of None leaves the profile's value, as an option
        not given on the command line does."""
        check_names(overrides, "OffloadConfig.from_profile")
        hw = profile if isinstance(profile, Profile) else get_profile(profile)
        settings = hw.settings()
        given = {k: v for k, v in overrides.items() if v is not None or k not in settings}
        return cls(**{**settings, **given, "profile": hw})

    def prefetch_from_profile(self) -> bool:
        """Whether ``prefetch`` is the hardware profile's choice (so a message can say how to override it)."""
        chosen = self.profile.prefetch if self.profile is not None else None
        return chosen is not None and self.prefetch == chosen.lower()


_NONE_IS_DEFAULT = ("device", "host_policy", "policy", "prefetch", "prefetch_margin", "prefetch_depth", "io")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(OffloadConfig) if f.name in _NONE_IS_DEFAULT}
SETTINGS = tuple(f.name for f in dataclasses.fields(OffloadConfig))  # "profile" takes a name or path in load


def configure(config: OffloadConfig | None, overrides: dict[str, object], where: str,
              own: tuple[str, ...] = ()) -> OffloadConfig:
    """The configuration ``where`` (``load``, ``offload_experts``) runs with: ``config`` (default: the
    defaults) with ``overrides`` on top; ``profile=`` (a name or path) in place of ``config`` fills in
    what the overrides leave out, as ``OffloadConfig.from_profile`` does. ``own``: the caller's other
    options, listed when an option is unknown."""
    check_names(overrides, where, own)
    overrides = dict(overrides)
    profile = overrides.pop("profile", None)
    if config is None:
        return OffloadConfig.from_profile(profile, **overrides) if profile is not None else OffloadConfig(**overrides)
    if not isinstance(config, OffloadConfig):
        raise ConfigError(f"{where}(config={shown(config)}): config takes an offload_moe.OffloadConfig; give the "
                          "settings as keyword arguments, or build one with OffloadConfig(...)")
    if profile is not None:
        raise ConfigError(f"{where}() got both config= and profile=; give one, or build the config from the "
                          "profile with OffloadConfig.from_profile(profile, ...)")
    return dataclasses.replace(config, **overrides) if overrides else config


def check_names(options: dict[str, object], where: str, own: tuple[str, ...] = ()) -> None:
    """Refuse an option that is no setting, naming it (and the setting it may be a typo of) and listing
    the ones there are."""
    unknown = sorted(set(options) - set(SETTINGS))
    if not unknown:
        return
    close = difflib.get_close_matches(unknown[0], SETTINGS + own, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    also = f"; {where} also takes {', '.join(own)}" if own else ""
    raise ConfigError(f"{where}() got unknown option(s) {', '.join(shown(k) for k in unknown[:5])}{hint}; "
                      f"the settings are {', '.join(SETTINGS)}{also}")


def _check_policy(setting: str, name: object, seed: int) -> None:
    if not isinstance(name, str):
        raise ConfigError(f"{setting}={shown(name)} is not an eviction policy name; "
                          "use lru, lfu, fifo, random, forecast or token-forecast")
    make_policy(name, seed=seed)  # fails on an unknown name


def _checked_prefetch(prefetch: object) -> str | Predictor:
    if isinstance(prefetch, Predictor):
        return prefetch
    name = prefetch.lower() if isinstance(prefetch, str) else prefetch
    if name not in PREDICTORS:
        raise ConfigError(f"prefetch={shown(prefetch)} is not a predictor; use one of {', '.join(PREDICTORS)} "
                          "(or a prefetch.Predictor)")
    return name
