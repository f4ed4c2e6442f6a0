"""The numba kernels of ``gemv`` (imported only where numba is installed): bf16 weights read as uint16 bits, widened
to f32 in registers, multiplied and summed in f32. ``fastmath`` lets the sums be reordered into vector lanes."""

import numba
import numpy as np
from numba import prange, types
from numba.extending import intrinsic


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


@_jit
def _rows_1(w, x, y, blocks):  # w uint16 [N, K] (bf16 bits), x f32 [1, K], y f32 [1, N]
    n, k = w.shape
    per = (n + blocks - 1) // blocks
    for b in prange(blocks):
        for row in range(b * per, min(n, (b + 1) * per)):
            s = np.float32(0.0)
            for j in range(k):
                s += _as_f32(np.uint32(w[row, j]) << np.uint32(16)) * x[0, j]
            y[0, row] = s


@_jit
def _rows_4(w, x, y, blocks):  # w uint16 [N, K], x f32 [4, K] (unused rows zero), y f32 [4, N]
    n, k = w.shape
    per = (n + blocks - 1) // blocks
    for b in prange(blocks):
        for row in range(b * per, min(n, (b + 1) * per)):
            s0 = s1 = s2 = s3 = np.float32(0.0)
            for j in range(k):
                v = _as_f32(np.uint32(w[row, j]) << np.uint32(16))  # each weight read and widened once
                s0 += v * x[0, j]
                s1 += v * x[1, j]
                s2 += v * x[2, j]
                s3 += v * x[3, j]
            y[0, row] = s0
            y[1, row] = s1
            y[2, row] = s2
            y[3, row] = s3


@_jit
def _cols(w, x, partial, blocks):  # w uint16 [K, N] (a weight stored [in, out]), x f32 [T, K], partial f32 [B, T, N]
    k, n = w.shape
    t = x.shape[0]
    per = (k + blocks - 1) // blocks
    for b in prange(blocks):  # each block reads whole rows of w (contiguous), into its own partial sums
        acc = partial[b]
        acc[:] = 0
        for i in range(b * per, min(k, (b + 1) * per)):
            for tt in range(t):
                xi = x[tt, i]
                for j in range(n):
                    acc[tt, j] += _as_f32(np.uint32(w[i, j]) << np.uint32(16)) * xi
