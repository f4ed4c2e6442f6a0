"""A bf16 matrix-vector product for the CPU at decode, compiled with numba when it is installed.

At decode an expert sees one token (or a few), so its matmuls are GEMVs whose time is the time to read the
weights from RAM. torch's bf16 ``F.linear`` on the CPU reads them at 0.4-0.7 of the machine's read bandwidth
where its f32 GEMV (MKL) reads at about 1.0 (BENCHMARKS.md, "Expert kernels on CPU"): its bf16 path is held
back by computing, not by memory. ``bf16_linear`` reads each bf16 weight as the top half of an f32 (a bf16 is
an f32 with its low 16 bits cut off: shifting its bits left by 16 gives that f32 exactly) and accumulates in f32,
as torch's bf16 matmul does, over row blocks run in parallel; only its output is rounded to bf16. It takes 1 to
``MAX_TOKENS`` tokens and a weight [out, in] with contiguous rows, or one stored transposed [in, out].

Without numba, ``available()`` is False and callers keep ``F.linear``. The kernels are compiled on first use
(``compile_kernels``; cached on disk by numba, so later processes load them in a fraction of a second).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch

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
    """Whether ``bf16_linear`` takes these: bf16 on the CPU, 1 to ``MAX_TOKENS`` tokens, a weight with
    contiguous rows ([out, in], or [in, out] with ``transposed``) whose inner size matches x's."""
    tokens = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.dtype == weight.dtype == torch.bfloat16 and x.device.type == weight.device.type == "cpu"
            and weight.dim() == 2 and 1 <= tokens <= MAX_TOKENS and weight.stride(-1) == 1
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


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, *, transposed: bool = False) -> torch.Tensor:
    """``F.linear(x, weight)`` (or ``x @ weight`` with ``transposed``) for bf16 on the CPU at 1 to ``MAX_TOKENS``
    tokens (``fits``): x [..., in] -> [..., out], summed in f32 and rounded to bf16 once. Needs numba."""
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
    return y.to(torch.bfloat16).view(*x.shape[:-1], -1)


_numba_threads: list[int] = []  # the count last handed to numba


def _threads() -> int:
    """torch's thread count (what the user set), within numba's pool; handed to numba when it changes."""
    import numba

    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if _numba_threads != [threads]:
        numba.set_num_threads(threads)
        _numba_threads[:] = [threads]
    return threads
