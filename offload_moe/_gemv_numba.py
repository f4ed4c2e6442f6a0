"""The numba kernels of ``gemv`` (imported only where numba is installed): bf16 weights read as uint16 bits, widened
to f32 in registers, multiplied and summed in f32. ``fastmath`` lets the sums be reordered into vector lanes."""

import os

import numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic


def _prefer_workqueue() -> None:
    """numba's own thread pool rather than OpenMP, unless the user chose (``$NUMBA_THREADING_LAYER``) or a pool
    already runs. numba's OpenMP is a second OpenMP runtime beside torch's: on a busy 2-core VM each waited on the
    other's spinning threads, and a DeepSeek-V2-Lite expert took 40 ms with it against 3.6 ms (BENCHMARKS.md).
    That pool takes one caller at a time: ``gemv`` serialises its calls."""
    if "NUMBA_THREADING_LAYER" in os.environ or numba.config.THREADING_LAYER != "default":
        return
    try:
        numba.threading_layer()  # raises until a pool has started
    except ValueError:
        numba.config.THREADING_LAYER = "workqueue"


_prefer_workqueue()


@intrinsic
def _as_f32(typingctx, bits):
    """An integer's low 32 bits read as an f32: a register move, which the loops vectorize."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        v = args[0]
        if bits.bitwidth != 32:  # numba widens uint32 arithmetic to 64 bits
            v = builder.trunc(v, context.get_value_type(types.uint32))
        return builder.bitcast(v, context.get_value_type(types.float32))
    return types.float32(bits), codegen


_jit = numba.njit(parallel=True, fastmath=True, nogil=True, cache=True)


# Each thread reads several rows side by side: one sequential stream per thread leaves the memory system idle
# between the prefetcher's requests (0.5 of the read bandwidth on the 2-core VM of BENCHMARKS.md), 8 streams keep
# it busy (0.85-0.95). Rows left over (fewer than a group) are read one at a time.


@numba.njit(inline="always", fastmath=True)
def _bf16(bits):  # a bf16 (uint16 bits) -> its f32, exactly
    return _as_f32(np.uint32(bits) << np.uint32(16))


@_jit
def _rows_1(w, x, y, blocks):  # w uint16 [N, K] (bf16 bits), x f32 [1, K], y f32 [1, N]
    n, k = w.shape
    per = ((n + blocks - 1) // blocks + 7) // 8 * 8  # rows a block, a multiple of 8
    for b in prange(blocks):
        row, stop = b * per, min(n, (b + 1) * per)
        while row + 8 <= stop:
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
            for j in range(k):
                xj = x[0, j]
                s0 += _bf16(w[row, j]) * xj
                s1 += _bf16(w[row + 1, j]) * xj
                s2 += _bf16(w[row + 2, j]) * xj
                s3 += _bf16(w[row + 3, j]) * xj
                s4 += _bf16(w[row + 4, j]) * xj
                s5 += _bf16(w[row + 5, j]) * xj
                s6 += _bf16(w[row + 6, j]) * xj
                s7 += _bf16(w[row + 7, j]) * xj
            y[0, row], y[0, row + 1], y[0, row + 2], y[0, row + 3] = s0, s1, s2, s3
            y[0, row + 4], y[0, row + 5], y[0, row + 6], y[0, row + 7] = s4, s5, s6, s7
            row += 8
        for r in range(row, stop):
            s = np.float32(0.0)
            for j in range(k):
                s += _bf16(w[r, j]) * x[0, j]
            y[0, r] = s


@_jit
def _rows_4(w, x, y, blocks):  # w uint16 [N, K], x f32 [4, K] (unused rows zero), y f32 [4, N]
    n, k = w.shape
    per = ((n + blocks - 1) // blocks + 3) // 4 * 4
    for b in prange(blocks):
        row, stop = b * per, min(n, (b + 1) * per)
        while row + 4 <= stop:  # 4 rows x 4 tokens: 16 sums, each weight widened once
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
            c0 = c1 = c2 = c3 = d0 = d1 = d2 = d3 = np.float32(0.0)
            for j in range(k):
                x0, x1, x2, x3 = x[0, j], x[1, j], x[2, j], x[3, j]
                v = _bf16(w[row, j])
                a0 += v * x0
                a1 += v * x1
                a2 += v * x2
                a3 += v * x3
                v = _bf16(w[row + 1, j])
                b0 += v * x0
                b1 += v * x1
                b2 += v * x2
                b3 += v * x3
                v = _bf16(w[row + 2, j])
                c0 += v * x0
                c1 += v * x1
                c2 += v * x2
                c3 += v * x3
                v = _bf16(w[row + 3, j])
                d0 += v * x0
                d1 += v * x1
                d2 += v * x2
                d3 += v * x3
            y[0, row], y[1, row], y[2, row], y[3, row] = a0, a1, a2, a3
            y[0, row + 1], y[1, row + 1], y[2, row + 1], y[3, row + 1] = b0, b1, b2, b3
            y[0, row + 2], y[1, row + 2], y[2, row + 2], y[3, row + 2] = c0, c1, c2, c3
            y[0, row + 3], y[1, row + 3], y[2, row + 3], y[3, row + 3] = d0, d1, d2, d3
            row += 4
        for r in range(row, stop):
            for t in range(4):
                s = np.float32(0.0)
                for j in range(k):
                    s += _bf16(w[r, j]) * x[t, j]
                y[t, r] = s


@_jit
def _cols(w, x, partial, blocks):  # w uint16 [K, N] (a weight stored [in, out]), x f32 [T, K], partial f32 [B, T, N]
    k, n = w.shape
    tokens = x.shape[0]
    per = ((k + blocks - 1) // blocks + 7) // 8 * 8
    for b in prange(blocks):  # each block reads whole rows of w into its own partial sums
        acc = partial[b]
        acc[:] = 0
        i, stop = b * per, min(k, (b + 1) * per)
        while i + 8 <= stop:
            for t in range(tokens):
                x0, x1, x2, x3 = x[t, i], x[t, i + 1], x[t, i + 2], x[t, i + 3]
                x4, x5, x6, x7 = x[t, i + 4], x[t, i + 5], x[t, i + 6], x[t, i + 7]
                for j in range(n):
                    acc[t, j] += (_bf16(w[i, j]) * x0 + _bf16(w[i + 1, j]) * x1 + _bf16(w[i + 2, j]) * x2
                                  + _bf16(w[i + 3, j]) * x3 + _bf16(w[i + 4, j]) * x4 + _bf16(w[i + 5, j]) * x5
                                  + _bf16(w[i + 6, j]) * x6 + _bf16(w[i + 7, j]) * x7)
            i += 8
        for r in range(i, stop):
            for t in range(tokens):
                xr = x[t, r]
                for j in range(n):
                    acc[t, j] += _bf16(w[r, j]) * xr
