"""Budgets, devices and dtypes as a user gives them, parsed once and checked early."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import BudgetError, ConfigError, DeviceError
from .safetensors_io import IO_MODES

MIN_CACHE_EXPERTS = 2  # one expert computing while the next one loads

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: str | int | float, setting: str = "memory") -> int:
    """``"6GiB"``, ``"512MB"``, ``"1.5g"`` or a number of bytes -> bytes."""
    if isinstance(value, bool):
        raise BudgetError(f"{setting}={value!r} is not a size; give bytes or a string like '6GiB'")
    if isinstance(value, (int, float)):
        n = int(value)
    else:
        m = _SIZE.match(str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise BudgetError(f"{setting}={value!r} is not a size; write it like '6GiB', '512MiB' or '12GB'")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise BudgetError(f"{setting}={value!r} must be a positive size")
    return n


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(value: str | torch.dtype | None) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = _DTYPES.get(str(value).lower().removeprefix("torch."))
    if dtype is None:
        raise ConfigError(f"dtype={value!r} is not supported; use one of float32, bfloat16, float16")
    return dtype


def parse_device(value: str | torch.device) -> torch.device:
    """Check that ``value`` names a device this machine has."""
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise DeviceError(f"device={value!r} is not a device name; use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"device={value!r}: offload_moe runs on 'cpu' or 'cuda' devices")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device={value!r} was asked for, but torch sees no CUDA GPU here "
            f"(torch {torch.__version__}); use device='cpu' or install a CUDA build of torch"
        )
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise DeviceError(
            f"device={value!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"numbered 0 to {torch.cuda.device_count() - 1}"
        )
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Budget:
    """How many expert slots the hot tier gets, from ``cache_experts`` or ``cache_memory``."""

    cache_experts: int | None = None
    cache_memory: str | int | None = None

    def slots(self, expert_bytes: int, total_experts: int, default_bytes: int) -> int:
        if self.cache_experts is not None and self.cache_memory is not None:
            raise BudgetError("give either cache_experts or cache_memory, not both")
        if self.cache_experts is not None:
            if isinstance(self.cache_experts, bool) or not isinstance(self.cache_experts, int):
                raise BudgetError(f"cache_experts={self.cache_experts!r} must be a whole number of experts")
            n = self.cache_experts
            source = f"cache_experts={n}"
        else:
            nbytes = default_bytes if self.cache_memory is None else parse_bytes(self.cache_memory, "cache_memory")
            n = nbytes // max(expert_bytes, 1)
            source = f"cache_memory={self.cache_memory!r}" if self.cache_memory is not None else "the free memory"
        if n < MIN_CACHE_EXPERTS:
            raise BudgetError(
                f"{source} gives {n} expert slot(s) of {format_bytes(expert_bytes)} each; offload_moe needs at "
                f"least {MIN_CACHE_EXPERTS} (one computing while the next loads). Raise the budget."
            )
        return min(n, total_experts)


def check_io(io: str, *, host_memory: bool = False, device: torch.device | None = None, origin: str = "") -> None:
    """Refuse an unknown I/O mode, and ``io="mmap"`` off the CPU or beside a warm tier (the page cache plays
    that part). ``origin`` says where the setting came from (a hardware profile)."""
    if io not in IO_MODES:
        raise ConfigError(f"io={io!r} is not an I/O mode; use one of {', '.join(IO_MODES)}")
    if io == "mmap" and device is not None and device.type != "cpu":
        raise ConfigError(
            f"io='mmap' computes missing experts in place from the mapped files, which needs device='cpu' "
            f"(got {device}){origin}; on {device.type} use io='direct' (the default), 'dontneed' or 'buffered'"
        )
    if io == "mmap" and host_memory:
        raise ConfigError(
            "host_memory adds nothing with io='mmap': missing experts are computed from the mapped checkpoint, "
            "and the page cache already keeps them in spare RAM; leave host_memory out, or use io='direct'"
        )
