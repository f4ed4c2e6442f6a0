"""The values a setting may take, and a value parsed as a user writes it: sizes, dtypes, devices.

A leaf module: the option checks (``config``), the hardware profiles (``hardware``) and the modules that
implement each choice (I/O modes in ``safetensors_io``, predictors in ``prefetch``) import these from here.
Eviction policies are a registry instead (``policies.POLICIES``): a user may add one.
"""

from __future__ import annotations

import math
import re
import reprlib

import torch

from .errors import BudgetError, ConfigError, DeviceError

READ_MODES = ("buffered", "dontneed", "direct", "mmap")  # how experts are read (safetensors_io.FileReader)
IO_MODES = ("auto", *READ_MODES)  # a setting: "auto" becomes one of READ_MODES at assembly (memory.choose_io)
PREDICTORS = ("none", "gate", "transition", "hybrid")  # prefetch predictors by name (prefetch.make_predictor)
MAX_BYTES = 2**60  # 1 EiB: a budget above this is a typo, not a machine

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


class _Short(reprlib.Repr):
    """``reprlib``'s bounded repr (strings and other values cut to ``limit`` characters, containers to a few items
    and levels), a cut string's length said, and a number too long to print named by its digits."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxstring, self.maxother, self.maxlist, self.maxdict = limit, limit, 8, 4

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 128:  # Python refuses to print one of more than 4,300 digits
            return f"a number of {int(x.bit_length() * 0.30103) + 1} digits"
        return super().repr_int(x, level)

    def repr_str(self, x: str, level: int) -> str:
        text = super().repr_str(x, level)
        return text if len(x) <= self.maxstring else f"{text} ({len(x)} characters)"


def shown(value: object, limit: int = 40) -> str:
    """``value`` for a message, cut short: a setting, or a value read from a file, may be megabytes long, nested
    thousands deep, or a number of thousands of digits (which Python cannot print). Strings and other values
    are cut to about ``limit`` characters (40: a setting; tensor names read from a file get 200)."""
    return _Short(limit).repr(value)


def check_count(setting: str, value: object, low: int, bound: str) -> None:
    """A whole number of at least ``low`` (``bound`` says it in words), else a ConfigError naming ``setting``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{setting}={shown(value)} must be a whole number, {bound}")
    if value < low:
        raise ConfigError(f"{setting}={value} must be {bound}")


def check_prefetch_reach(margin: object, depth: object) -> None:
    """``prefetch_margin`` (extra experts named, 0 or more) and ``prefetch_depth`` (layers ahead, at least 1)."""
    check_count("prefetch_margin", margin, 0, "0 or more")
    check_count("prefetch_depth", depth, 1, "at least 1 layer")


def check_io(io: object, *, host_memory: bool = False, device: torch.device | None = None, origin: str = "") -> None:
    """Refuse an unknown I/O mode, and ``io="mmap"`` off the CPU or beside a warm tier (the page cache plays
    that part). ``io="auto"`` goes anywhere: it chooses a mode that suits the device and the tiers.
    ``origin`` says where the setting came from (a hardware profile)."""
    if io not in IO_MODES:
        raise ConfigError(f"io={shown(io)} is not an I/O mode; use one of {', '.join(IO_MODES)}")
    if io == "mmap" and device is not None and device.type != "cpu":
        raise ConfigError(
            f"io='mmap' computes missing experts in place from the mapped files, which needs device='cpu' "
            f"(got {device}){origin}; on {device.type} use io='auto' (the default), 'direct', 'dontneed' or 'buffered'"
        )
    if io == "mmap" and host_memory:
        raise ConfigError(
            "host_memory adds nothing with io='mmap': missing experts are computed from the mapped checkpoint, "
            "and the page cache already keeps them in spare RAM; leave host_memory out, or use io='auto' or 'direct'"
        )


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


