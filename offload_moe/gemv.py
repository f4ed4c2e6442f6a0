"""A bf16 matrix-vector product for the CPU at decode, compiled with numba when it is installed.

At decode an expert sees one token (or a few), so its matmuls are GEMVs whose time is the time to read the
weights from RAM. torch's bf16 ``F.linear`` on the CPU reads them at 0.4-0.7 of the machine's read bandwidth
where its f32 GEMV (MKL) reads at about 1.0 (BENCHMARKS.md, "Expert kernels on CPU"): its bf16 path is held
back by computing, not by memory. ``bf16_linear`` reads each bf16 weight as the top half of an f32 (a bf16 is
an f32 with its low 16 bits cut off: shifting its bits left by 16 gives that f32 exactly) and accumulates in f32,
as torch's bf16 matmul does, over row blocks run in parallel; only its output is rounded to bf16. It takes 1 to
``MAX_TOKENS`` tokens and a contiguous weight [out, in], or one stored transposed [in, out].

Whether it beats torch's kernel depends on the machine, so ``use`` asks a verdict per weight shape (``choose``):
a short calibration (``calibrate``: both kernels, alternately, over a few hundred MiB of weights) the first time a
shape is seen on a machine, then kept in a small JSON file (``cache_path``), keyed by CPU model, torch and numba
versions, thread count, shape and dtype. ``$OFFLOAD_MOE_GEMV`` overrides it: ``auto`` (the default), ``on`` (use it
wherever it fits, without timing) or ``off``. Without numba, ``available()`` is False and callers keep ``F.linear``.
The kernels are compiled by ``compile_kernels`` (which ``kernels.prepare_cpu_kernels`` calls at load; numba keeps
them on disk, so later processes load them in about a second).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import memory
from .atomic import atomic_write
from .errors import ConfigError, OutputError
from .values import format_bytes

log = logging.getLogger(__name__)

MAX_TOKENS = 4  # beyond this a matmul is no longer bound by reading the weights; torch's kernels do better


@functools.cache
def _kernels():
    try:
        from . import _gemv_numba
    except ImportError:  # numba is optional: pip install 'offload_moe[fast]'
        return None
    return _gemv_numba


def available() -> bool:
    """Whether numba is installed, so that ``bf16_linear`` can run."""
    return _kernels() is not None


def fits(x: torch.Tensor, weight: torch.Tensor, *, transposed: bool = False) -> bool:
    """Whether ``bf16_linear`` takes these: bf16 on the CPU, 1 to ``MAX_TOKENS`` tokens, a contiguous weight
    ([out, in], or [in, out] with ``transposed``: the layouts the kernels are compiled for) whose inner size
    matches x's."""
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.dtype == weight.dtype == torch.bfloat16 and x.device.type == weight.device.type == "cpu"
            and weight.dim() == 2 and 1 <= tokens <= MAX_TOKENS and weight.is_contiguous()
            and weight.shape[0 if transposed else 1] == x.shape[-1] and not x.requires_grad
            and not weight.requires_grad)


def compile_kernels() -> bool:
    """Compile (or load from numba's disk cache) every kernel on a tiny problem, so that no later call waits on
    the compiler; False without numba."""
    if not available():
        return False
    w = torch.zeros(8, 8, dtype=torch.bfloat16)
    for tokens in (1, MAX_TOKENS):
        x = torch.zeros(tokens, 8, dtype=torch.bfloat16)
        bf16_linear(x, w)
        bf16_linear(x, w, transposed=True)
    return True


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                transposed: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` (or ``x @ weight + bias`` with ``transposed``) for bf16 on the CPU at 1 to
    ``MAX_TOKENS`` tokens (``fits``): x [..., in] -> [..., out], summed (bias included) in f32 and rounded to bf16
    once. Needs numba."""
    with _one_at_a_time:  # numba's workqueue pool takes one caller at a time (_gemv_numba._prefer_workqueue)
        return _bf16_linear(x, weight, bias, transposed)


_one_at_a_time = threading.Lock()


def _bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    kernels = _kernels()
    threads = _threads()
    x2 = x.reshape(-1, x.shape[-1])  # [T, in]
    tokens = x2.shape[0]
    bits = weight.view(torch.int16).numpy().view(np.uint16)  # a view: the weight's bytes are read where they lie
    if transposed:
        xf = x2.float().numpy()
        partial = np.empty((threads, tokens, weight.shape[1]), np.float32)  # [B, T, out]
        kernels._cols(bits, xf, partial, threads)
        y = torch.from_numpy(partial).sum(0) if threads > 1 else torch.from_numpy(partial[0])
    else:
        if tokens == 1:
            xf = x2.float().numpy()
            out = np.empty((1, weight.shape[0]), np.float32)
            kernels._rows_1(bits, xf, out, threads)
        else:
            xf = np.zeros((MAX_TOKENS, x2.shape[1]), np.float32)
            xf[:tokens] = x2.float().numpy()
            out = np.empty((MAX_TOKENS, weight.shape[0]), np.float32)
            kernels._rows_4(bits, xf, out, threads)
        y = torch.from_numpy(out[:tokens])
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.bfloat16).view(*x.shape[:-1], -1)


_handed = threading.local()  # the count last handed to numba, per Python thread (numba keeps one per thread)


def _threads() -> int:
    """torch's thread count (what the user set), within numba's pool; handed to numba when it changes (the call
    costs several microseconds, so not every time)."""
    import numba

    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if getattr(_handed, "threads", None) != threads:
        numba.set_num_threads(threads)
        _handed.threads = threads
    return threads


# ---- choosing it -------------------------------------------------------------------------------------------

ENV = "OFFLOAD_MOE_GEMV"
MODES = ("auto", "on", "off")
CALIBRATION_BYTES = 256 * 2**20  # weights each kernel streams per round: well past the caches that matter
CALIBRATION_ROUNDS = 5
CALIBRATION_COPIES = 64  # at most: a tiny weight is timed in cache rather than for many thousand calls
# a calibration needs this much room (memory.memory_room: MemAvailable, a cgroup's limit) beside what it allocates,
# CALIBRATION_BYTES: in a process near its limit, timing would be what pushes it over (a memory cgroup kills it)
CALIBRATION_ROOM = 4 * CALIBRATION_BYTES
MIN_SPEEDUP = 1.05  # below this (noise, or a tie) torch's kernel stays: it is the reference path
_FILE_VERSION = 1
_verdicts: dict[tuple, bool] = {}  # this process's verdicts, by (shape, transposed, token class, threads)


def mode() -> str:
    """``$OFFLOAD_MOE_GEMV``: ``auto`` (default), ``on`` or ``off``; another value is a ``ConfigError``."""
    value = os.environ.get(ENV, "").strip().lower() or "auto"
    if value not in MODES:
        raise ConfigError(f"${ENV}={os.environ[ENV]!r} is not one of {', '.join(MODES)}; unset it or pick one")
    return value


def wanted() -> bool:
    """Whether ``use`` may pick the kernel at all: numba is installed and ``$OFFLOAD_MOE_GEMV`` is not ``off``."""
    return mode() != "off" and available()


def use(x: torch.Tensor, weight: torch.Tensor, *, transposed: bool = False) -> bool:
    """Whether to compute ``x`` times ``weight`` with ``bf16_linear``: it ``fits``, it is ``wanted``, and (in
    ``auto`` mode) ``choose`` found it faster on this machine for this shape."""
    if not fits(x, weight, transposed=transposed):  # the cheap tests first
        return False
    chosen = mode()
    if chosen == "off" or not available():
        return False
    tokens = x.numel() // x.shape[-1]
    return chosen == "on" or choose(tuple(weight.shape), transposed=transposed, tokens=_token_class(tokens))


def cache_path() -> Path:
    """The verdicts file: ``$OFFLOAD_MOE_CACHE_DIR/kernels.json``, else under ``$XDG_CACHE_HOME`` (default
    ``~/.cache``) in ``offload-moe/``."""
    folder = os.environ.get("OFFLOAD_MOE_CACHE_DIR")
    if folder:
        return Path(folder) / "kernels.json"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "offload-moe" / "kernels.json"


def choose(shape: tuple[int, int], *, transposed: bool = False, tokens: int = 1,
           calibrate_fn: Callable[..., dict] | None = None) -> bool:
    """Whether ``bf16_linear`` beats torch on this machine for a bf16 weight of ``shape`` (as stored: [out, in],
    or [in, out] with ``transposed``) at torch's thread count, for one token (``tokens`` 1) or 2 to ``MAX_TOKENS``
    (``tokens`` ``MAX_TOKENS``, timed at that many: its kernel differs): from this process's verdicts, else the
    cache file's, else a calibration (``calibrate``, or ``calibrate_fn``), whose verdict is added to the file. A
    file that cannot be read as verdicts is ignored and written anew; one that cannot be written only logs."""
    memo = (shape, transposed, tokens, torch.get_num_threads())  # every call asks: no file key built for a known one
    if memo in _verdicts:
        return _verdicts[memo]
    key = _key(shape, transposed, tokens)
    path = cache_path()
    entries = _read(path)
    if key in entries and isinstance(entries[key].get("gemv"), bool):
        _verdicts[memo] = entries[key]["gemv"]
        return _verdicts[memo]
    if calibrate_fn is None:
        room = memory.memory_room()
        if room.available < CALIBRATION_ROOM:  # not timed now, and nothing saved: a roomier process times it
            log.info("bf16 GEMV for %s not timed: %s left (%s), under the %s a calibration wants; torch's kernel "
                     "is used", shape, format_bytes(room.available), room.bound, format_bytes(CALIBRATION_ROOM))
            _verdicts[memo] = False
            return False
    found = (calibrate_fn or calibrate)(shape, transposed=transposed, tokens=tokens)
    _verdicts[memo] = bool(found["gemv"])
    entries = _read(path)  # again: another process may have added verdicts meanwhile
    entries[key] = {**found, "date": time.strftime("%Y-%m-%d")}
    try:
        atomic_write(path, json.dumps({"version": _FILE_VERSION, "verdicts": entries}, indent=1).encode())
    except OutputError as e:
        log.warning("bf16 GEMV verdict not saved (%s); it will be measured again in the next process", e)
    log.info("bf16 GEMV for %s%s at %d token(s): %s (%.2fx torch's)", shape, " transposed" if transposed else "",
             tokens, "used" if found["gemv"] else "not used", found["speedup"])
    return _verdicts[memo]


def calibrate(shape: tuple[int, int], *, transposed: bool = False, tokens: int = 1,
              timer: Callable[[], float] = time.perf_counter, working_set: int = CALIBRATION_BYTES,
              rounds: int = CALIBRATION_ROUNDS) -> dict:
    """Time torch's bf16 kernel and ``bf16_linear`` at ``tokens`` tokens over copies of a weight of ``shape`` that
    add up to ``working_set`` bytes or more (two at least, ``CALIBRATION_COPIES`` at most), so both read from RAM as
    at decode. A weight larger than half of ``working_set`` (an ``lm_head`` [vocab, H]) is timed on its first rows,
    as many as fill that half: as far past the caches, without allocating copies of the whole weight at load. Each
    round times one pass of torch's, then one of ours (``timer`` before and after each). Returns {"gemv": the median
    round's speedup >= MIN_SPEEDUP, "speedup": that ratio, "rounds": rounds}."""
    rows, cols = shape
    rows = min(rows, max(1, working_set // (4 * cols)))  # two copies at least: each within half the working set
    copies = min(CALIBRATION_COPIES, max(2, -(-working_set // (2 * rows * cols))))
    weights = torch.empty(copies, rows, cols, dtype=torch.bfloat16).fill_(0.01)  # written: real pages
    x = torch.full((tokens, rows if transposed else cols), 0.5, dtype=torch.bfloat16)
    theirs = (lambda w: x @ w) if transposed else (lambda w: F.linear(x, w))

    def ours(w):
        return bf16_linear(x, w, transposed=transposed)

    def one_pass(fn) -> float:
        start = timer()
        for w in weights:
            fn(w)
        return timer() - start

    with torch.inference_mode():
        theirs(weights[0]), ours(weights[0])  # warm-up: torch's primitives, numba's threads
        ratios = []
        for _ in range(rounds):
            torch_s, ours_s = one_pass(theirs), one_pass(ours)
            ratios.append(torch_s / max(ours_s, 1e-12))
    speedup = statistics.median(ratios)
    return {"gemv": speedup >= MIN_SPEEDUP, "speedup": round(speedup, 3), "rounds": rounds}


def _token_class(tokens: int) -> int:
    return 1 if tokens == 1 else MAX_TOKENS  # one kernel for one token, another for 2 to MAX_TOKENS


def _key(shape: tuple[int, int], transposed: bool, tokens: int) -> str:
    import numba

    layout = "[in, out]" if transposed else "[out, in]"
    return (f"{_cpu_model()} | torch {torch.__version__} | numba {numba.__version__} | {torch.get_num_threads()} "
            f"threads | bf16 {shape[0]}x{shape[1]} {layout} | {tokens} token{'s' if tokens > 1 else ''}")


@functools.cache
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _read(path: Path) -> dict[str, dict]:
    """The file's verdicts, or none when it is missing or not what this module writes."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring the bf16 GEMV verdicts in %s (%s); they will be measured again", path, e)
        return {}
    entries = data.get("verdicts") if isinstance(data, dict) and data.get("version") == _FILE_VERSION else None
    if not isinstance(entries, dict):
        log.warning("ignoring the bf16 GEMV verdicts in %s (not a version-%d verdicts file); they will be measured "
                    "again", path, _FILE_VERSION)
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, dict)}
