"""Budgets, devices and dtypes as a user gives them, parsed once and checked early."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .errors import BudgetError, ConfigError, DeviceError
from .safetensors_io import IO_MODES

MIN_CACHE_EXPERTS = 2  # one expert computing while the next one loads
MAX_BYTES = 2**60  # 1 EiB: a budget above this is a typo, not a machine
MAX_READ_TIMEOUT = 86_400  # seconds; a read that takes a day has failed

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: str | int | float, setting: str = "memory") -> int:
    """``"6GiB"``, ``"512MB"``, ``"1.5g"`` or a number of bytes -> bytes; a positive, finite size of at
    most ``MAX_BYTES``, else a BudgetError naming ``setting``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise BudgetError(f"{setting}={shown(value)} is not a size; give bytes or a string like '6GiB'")
    if isinstance(value, str):
        m = _SIZE.match(value)
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise BudgetError(f"{setting}={shown(value)} is not a size; write it like '6GiB', '512MiB' or '12GB'")
        number = m.group(1)
        n = float(number) * _UNITS[unit] if len(number) <= 30 else math.inf  # more digits: beyond MAX_BYTES anyway
    else:
        n = value
    if isinstance(n, float) and math.isnan(n):
        raise BudgetError(f"{setting}={shown(value)} is not a number; give a size like '6GiB'")
    if n <= 0:
        raise BudgetError(f"{setting}={shown(value)} must be a positive size")
    if n > MAX_BYTES:
        raise BudgetError(f"{setting}={shown(value)} is more than {format_bytes(MAX_BYTES)}, beyond any machine; "
                          "give a size like '6GiB'")
    return int(n)


def shown(value: object) -> str:
    """``value`` for a message, cut short: a number of 4,000 digits is not worth printing in full (nor can
    Python print one of more than 4,300)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"a number of {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}... ({len(text)} characters)"


def memory_total(device: torch.device) -> int:
    """All the memory ``device`` has: the GPU's for CUDA, the machine's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import psutil

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


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} EiB"


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

    def slots(self, expert_bytes: int, total_experts: int, default_bytes: int, device: torch.device | None = None) -> int:
        """Expert slots for experts of ``expert_bytes``; with ``device``, a budget that machine cannot hold is refused."""
        if self.cache_experts is not None and self.cache_memory is not None:
            raise BudgetError("give either cache_experts or cache_memory, not both")
        if self.cache_experts is not None:
            if isinstance(self.cache_experts, bool) or not isinstance(self.cache_experts, int):
                raise BudgetError(f"cache_experts={shown(self.cache_experts)} must be a whole number of experts")
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
