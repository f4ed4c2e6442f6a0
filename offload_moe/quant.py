"""Quantized weight formats: pure tensor functions that unpack them (and pack offload_moe's own), no I/O.

The store hands in the tensors it read; each function checks their dtypes and shapes against each other and
raises ``CheckpointError`` naming the tensor (``name``, which the caller makes "file: tensor") when they disagree.
A weight matrix is [out, in] (rows are output features), with any leading dimensions (e.g. experts) kept.

MXFP4 (gpt-oss; ``quant_method: "mxfp4"``)
    ``X_blocks`` uint8 [..., out, in/32, 16]: each byte two FP4 E2M1 values, the low nibble first (column 2k),
    the high nibble second (column 2k+1). A nibble is sign (bit 3), 2 exponent bits, 1 mantissa bit:
    ``FP4_VALUES[nibble]``. ``X_scales`` uint8 [..., out, in/32]: one E8M0 exponent a group of 32 columns, the
    scale ``2**(byte - 127)``, applied as transformers' ``torch.ldexp`` applies it (so 255, E8M0's NaN, scales
    by 2**128 rather than giving NaN). gpt-oss's parameters are the transpose: ``gate_up_proj`` [E, H, 2I] from
    blocks [E, 2I, H/32, 16]. 4.25 bits a weight.

Block-scaled FP8 (DeepSeek-V3, Qwen3 FP8; ``quant_method: "fp8"``, ``weight_block_size: [bm, bn]``)
    ``X.weight`` float8_e4m3fn [out, in]; ``X.weight_scale_inv`` float32 [ceil(out/bm), ceil(in/bn)], or
    UE8M0 (uint8 or float8_e8m0fnu, meaning ``2**(byte - 127)``) with ``scale_fmt: "ue8m0"``.
    ``w[i, j] = q[i, j] * scale_inv[i // bm, j // bn]``: a partial last block uses the same entry. (transformers
    5.24's CPU loader, ``Fp8Dequantize``, instead takes the block as ``out // scale rows``, wrong for a partial
    block: 160 rows with 128-row blocks become two 80-row blocks.) About 8 bits a weight.

int8 (offload_moe's own, for bf16/fp16 checkpoints)
    ``q`` int8 [..., out, in], symmetric: ``w = q * scale[..., out, None]``, ``scale`` float32 [..., out] the
    largest magnitude of the row over 127; ``q`` in -127..127. The layout of ``torch._weight_int8pack_mm``.

int4 (offload_moe's own)
    Asymmetric per group of ``group_size`` columns of a row: ``w = (code - 8) * scale + zero``, codes 0..15,
    ``scale = (max - min) / 15``, ``zero = min + 8 * scale``. Stored as torch's CPU int4 kernel
    (``torch._weight_int4pack_mm_for_cpu``) takes it on AVX-512, so it computes from the bytes as they lie:
    ``packed`` uint8 [..., out, in/2] in tiles of 64 rows (``pack_int4_tiles``), ``scales_and_zeros``
    [..., in/group_size, out, 2] (a group's scale, then its zero). On AVX2 and plain CPUs torch's kernel reads
    another tile layout (``Int4Layout``); ``convert_int4_tiles`` rearranges the stored bytes into it.
    ``group_size`` must be even and divide ``in``; ``out`` must be even (the kernel wants a multiple of 16 and
    groups of 32, 64, 128 or 256).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from .errors import CheckpointError, ConfigError

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32  # columns sharing one E8M0 scale
E8M0_BIAS = 127
INT8_MAX = 127
INT4_LEVELS = 15  # codes 0..15
INT4_MID = 8
INT4_KERNEL_GROUPS = (256, 128, 64, 32)  # the group sizes torch's CPU int4 kernel takes
DEFAULT_GROUP_SIZE = 64  # int4's columns per scale and zero, unless asked otherwise
FP8_BLOCK = (128, 128)
INT4_CHUNK = 2**20  # the most float32 values int4 dequantizes through at once into a 16-bit weight
_FP4_PAIRS = torch.tensor([(FP4_VALUES[b & 0x0F], FP4_VALUES[b >> 4]) for b in range(256)])  # a byte's two values
_TABLES: dict[tuple, torch.Tensor] = {}  # (table, device, dtype) -> the table there: made once, not per weight


def _table(kind: torch.dtype | str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A lookup table on ``device`` in ``dtype``, cached: ``"fp4"``, each byte's two FP4 values [256, 2]; a float8
    dtype, its 256 values [256]. Made on the CPU (every value is exact in 16 bits), copied once per device."""
    key = (kind, device, dtype)
    table = _TABLES.get(key)
    if table is None:
        values = _FP4_PAIRS if kind == "fp4" else torch.arange(256, dtype=torch.uint8).view(kind)
        table = _TABLES[key] = values.to(dtype).to(device)
    return table


# -- MXFP4 ---------------------------------------------------------------------------------------------------
def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *,
                     name: str = "MXFP4 tensor", out: torch.Tensor | None = None) -> torch.Tensor:
    """``blocks`` uint8 [..., out, G, 16] and ``scales`` uint8 [..., out, G] -> [..., out, 32 G] in ``dtype``,
    rows as stored (gpt-oss's parameter is the transpose). Equal, bit for bit, to transformers'
    ``convert_moe_packed_tensors`` transposed: each value scaled in float32 as ``torch.ldexp`` does, rounded once.
    ``out`` (contiguous, floating): written in place and returned, through no float32 copy of the weight."""
    _expect_dtype(blocks, torch.uint8, f"{name} (blocks)")
    _expect_dtype(scales, torch.uint8, f"{name} (scales)")
    if blocks.dim() < 3 or blocks.shape[-1] != MXFP4_GROUP // 2 or blocks.shape[:-1] != scales.shape:
        raise CheckpointError(
            f"{name}: MXFP4 blocks of shape {list(blocks.shape)} need scales of shape {list(blocks.shape[:-1])} "
            f"and a last dimension of {MXFP4_GROUP // 2} bytes, but the scales have shape {list(scales.shape)}; "
            "the checkpoint is corrupted or not MXFP4"
        )
    exponent = scales.to(torch.int32) - E8M0_BIAS  # [..., out, G], -127..128
    # 2**128 (byte 255) overflows float32 where ldexp does not: scale by 2**min(e, 127), then by 2**max(e - 127, 0).
    # Each product is exact (or overflows as ldexp's does), so the result equals ldexp's bit for bit, with no
    # look at the values (a device sync).
    low = torch.exp2(exponent.clamp(max=E8M0_BIAS).float())[..., None]
    high = torch.exp2((exponent - E8M0_BIAS).clamp(min=0).float())[..., None]
    if out is not None and out.is_contiguous():
        # FP4 values are exact in any float dtype; a float32 scale times them rounds once, as below
        torch.index_select(_table("fp4", out.device, out.dtype), 0, blocks.reshape(-1).int(),
                           out=out.view(-1, 2))  # [..., out, G * 16, 2]: each byte's two columns
        out.view(*scales.shape, MXFP4_GROUP).mul_(low).mul_(high)
        return out
    values = torch.nn.functional.embedding(blocks.int(), _table("fp4", blocks.device, torch.float32)).flatten(-2)
    w = values.mul_(low).mul_(high).flatten(-2).to(dtype)  # [..., out, G * 32]: exact, as ldexp, and faster
    return w if out is None else out.copy_(w)


# -- block FP8 -----------------------------------------------------------------------------------------------
def dequantize_fp8_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = FP8_BLOCK,
                          dtype: torch.dtype = torch.bfloat16, *, name: str = "FP8 weight",
                          out: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` float8 [..., out, in] and ``scale_inv`` [..., ceil(out/bm), ceil(in/bn)] -> [..., out, in] in
    ``dtype``: ``w[i, j] = q[i, j] * scale_inv[i // bm, j // bn]``, computed in float32 and rounded once (as
    DeepSeek's ``weight_dequant``); a partial last block uses its scale entry. ``out`` (contiguous, 16 or 32
    bits): written in place and returned; where the blocks tile the weight, through no float32 copy of it."""
    if weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise CheckpointError(f"{name}: dtype {_dtype_name(weight.dtype)}, but a block-FP8 weight is float8_e4m3fn; "
                              "the checkpoint is corrupted or its quantization_config does not describe it")
    bm, bn = check_fp8_block(block, name)
    if weight.dim() < 2:
        raise CheckpointError(f"{name}: shape {list(weight.shape)}, but a block-FP8 weight is a matrix")
    rows, cols = weight.shape[-2:]
    want = (*weight.shape[:-2], math.ceil(rows / bm), math.ceil(cols / bn))
    if tuple(scale_inv.shape) != want:
        raise CheckpointError(
            f"{name}: weight_scale_inv has shape {list(scale_inv.shape)}, but a weight of shape "
            f"{list(weight.shape)} in blocks of [{bm}, {bn}] needs {list(want)}; the checkpoint is corrupted or "
            "its weight_block_size is not the one it was written with"
        )
    if out is not None and out.is_contiguous() and rows % bm == 0 and cols % bn == 0 and out.dtype.itemsize >= 2:
        # q is exact in 16 bits (read through a table of its 256 values: faster than torch's float8 cast); a
        # float32 scale times it rounds once, as below
        torch.index_select(_table(weight.dtype, out.device, out.dtype), 0, weight.reshape(-1).view(torch.uint8).int(),
                           out=out.view(-1))
        tiles = out.view(*want[:-2], want[-2], bm, want[-1], bn)
        tiles.mul_(_scale_values(scale_inv, name)[..., :, None, :, None])
        return out
    scale = _scale_values(scale_inv, name).repeat_interleave(bm, dim=-2)[..., :rows, :]  # [..., out, in blocks]
    padded = torch.nn.functional.pad(weight.float(), (0, want[-1] * bn - cols))  # whole column blocks
    w = (padded.unflatten(-1, (want[-1], bn)) * scale[..., None]).flatten(-2)[..., :cols].to(dtype).contiguous()
    return w if out is None else out.copy_(w)


def _scale_values(scale_inv: torch.Tensor, name: str) -> torch.Tensor:
    """Scales as float32: UE8M0 bytes (uint8 or float8_e8m0fnu) mean 2**(byte - 127)."""
    if scale_inv.dtype == torch.uint8:
        return torch.exp2(scale_inv.float() - E8M0_BIAS)
    if scale_inv.is_floating_point():
        return scale_inv.float()
    raise CheckpointError(f"{name}: weight_scale_inv has dtype {_dtype_name(scale_inv.dtype)}; block-FP8 scales "
                          "are float32, bfloat16 or UE8M0 (uint8); the checkpoint is corrupted")


def check_fp8_block(block: object, name: str, error: type[Exception] = CheckpointError) -> tuple[int, int]:
    """``weight_block_size`` as (rows, columns); anything but two whole numbers, 1 or more, raises ``error``
    naming ``name``."""
    if (not isinstance(block, (tuple, list)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise error(f"{name}: weight_block_size = {block!r} must be two whole numbers, 1 or more, "
                    "such as [128, 128]; the config is corrupted")
    return block[0], block[1]


# -- int8, per output channel ----------------------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [..., out, in] -> (int8 [..., out, in], float32 scale [..., out]), symmetric per row: each
    weight is off by at most half its row's scale."""
    _expect_float(w, "quantize_int8")
    w = w.float()
    amax = w.abs().amax(dim=-1)  # [..., out]
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scale[..., None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *,
                    name: str = "int8 weight", out: torch.Tensor | None = None) -> torch.Tensor:
    """``q`` int8 [..., out, in] and ``scale`` [..., out] -> [..., out, in] in ``dtype``: each product in float32,
    rounded once to ``dtype``. ``out`` (floating, that shape): written in place and returned, with no copy."""
    _expect_dtype(q, torch.int8, name)
    if q.dim() < 2 or tuple(scale.shape) != tuple(q.shape[:-1]):
        raise CheckpointError(f"{name}: scales of shape {list(scale.shape)} do not match an int8 weight of shape "
                              f"{list(q.shape)}, which needs {list(q.shape[:-1])}; the store is corrupted")
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    return torch.mul(q, scale.float()[..., None], out=out)  # computed in float32, written in out's dtype


# -- int4, group-wise asymmetric -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Int4Layout:
    """How torch's CPU int4 kernel wants a packed int4 weight [out, in/2] laid out: it differs by the CPU code torch
    runs (``torch.backends.cpu.get_cpu_capability()``, lowered by ``ATEN_CPU_CAPABILITY``). Rows go in tiles of
    ``tile``, each tile column by column: for each column k, ``tile / 2`` bytes, byte d holding rows d (low nibble)
    and d + tile/2 (high) with ``halves``, else rows 2d and 2d + 1. A last tile of r < ``tile`` rows holds, for
    each column, r/2 bytes of rows 2m (low) and 2m + 1 (high). offload_moe stores ``AVX512``."""

    name: str
    tile: int
    halves: bool


AVX512 = Int4Layout("avx512", 64, True)  # the stored layout (format version 1): rows d and d + 32 in a byte
AVX2 = Int4Layout("avx2", 32, True)  # rows d and d + 16
DEFAULT = Int4Layout("default", 32, False)  # rows 2d and 2d + 1 (torch's plain C++ code)
INT4_LAYOUTS = (AVX512, AVX2, DEFAULT)


def quantize_int4(w: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [..., out, in] -> (packed uint8 [..., out, in/2] in torch's CPU tile layout (``pack_int4_tiles``),
    scales-and-zeros float32 [..., in/group_size, out, 2]): each group of ``group_size`` columns spans its
    min..max in 16 levels, so each weight is off by at most half its group's scale."""
    _expect_float(w, "quantize_int4")
    check_group_size(group_size, w.shape[-1])
    if w.shape[-2] % 2:
        raise ConfigError(f"int4 packs rows in pairs, and this weight has {w.shape[-2]} rows; use bits=8")
    groups = w.float().unflatten(-1, (-1, group_size))  # [..., out, G, group]
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = torch.where(high > low, (high - low) / INT4_LEVELS, torch.ones_like(low))
    zeros = low + INT4_MID * scales
    codes = torch.round((groups - zeros[..., None]) / scales[..., None] + INT4_MID).clamp(0, INT4_LEVELS)
    codes = codes.to(torch.uint8).flatten(-2)  # [..., out, in]
    return pack_int4_tiles(codes), torch.stack((scales, zeros), -1).transpose(-3, -2).contiguous()


def dequantize_int4(packed: torch.Tensor, scales_and_zeros: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *,
                    name: str = "int4 weight", out: torch.Tensor | None = None,
                    layout: Int4Layout = AVX512) -> torch.Tensor:
    """``packed`` uint8 [..., out, in/2] (tiles) and ``scales_and_zeros`` [..., G, out, 2] -> [..., out, in] in
    ``dtype``, the group size being in / G: ``(code - 8) * scale``, then ``+ zero``, each in float32, rounded once
    to ``dtype``. ``out`` (floating, that shape): written in place and returned; a 16-bit one through float32
    chunks of at most ``INT4_CHUNK`` values, a float32 one directly. ``layout``: the bytes' (``Int4Layout``)."""
    _expect_dtype(packed, torch.uint8, name)
    sz = scales_and_zeros
    rows, cols = (packed.shape[-2], 2 * packed.shape[-1]) if packed.dim() >= 2 else (0, 0)
    groups = sz.shape[-3] if sz.dim() >= 3 else 0
    fits = (sz.dim() == packed.dim() + 1 and sz.shape[:-3] == packed.shape[:-2] and sz.shape[-2:] == (rows, 2)
            and groups > 0 and cols % groups == 0 and (cols // groups) % 2 == 0 and rows % 2 == 0)
    if packed.dim() < 2 or not fits:
        raise CheckpointError(
            f"{name}: scales_and_zeros of shape {list(sz.shape)} do not fit a packed int4 weight of shape "
            f"{list(packed.shape)} ({rows} rows, {cols} columns): they need shape "
            f"[{', '.join(map(str, (*packed.shape[:-2], 'G', rows, 2)))}], G dividing the columns into even groups, "
            "and the rows must be even; the store is corrupted"
        )
    if out is None:
        out = torch.empty((*packed.shape[:-1], cols), dtype=dtype, device=packed.device)
    elif not out.is_contiguous():
        return out.copy_(dequantize_int4(packed, sz, out.dtype, name=name, layout=layout))
    # addcmul would do it in one pass, but may fuse the multiply and add (one rounding, not two): not bit-equal
    codes = unpack_int4_tiles(packed, layout).view(torch.int8).sub_(INT4_MID)
    codes = codes.view(-1, groups, cols // groups)  # [N, G, group]
    scale, zero = (t[..., None].reshape(-1, groups, 1) for t in sz.float().transpose(-3, -2).unbind(-1))
    target = out.unflatten(-1, (groups, cols // groups)).view(-1, groups, cols // groups)
    if out.dtype == torch.float32:
        torch.mul(codes, scale, out=target)
        target.add_(zero)
        return out
    step = max(1, INT4_CHUNK // cols)  # rows a float32 chunk holds
    products = torch.empty((min(step, codes.shape[0]), groups, cols // groups), device=out.device)
    for start in range(0, codes.shape[0], step):
        stop = min(start + step, codes.shape[0])
        chunk = torch.mul(codes[start:stop], scale[start:stop], out=products[: stop - start])
        torch.add(chunk, zero[start:stop], out=target[start:stop])
    return out


def pack_int4_tiles(codes: torch.Tensor, layout: Int4Layout = AVX512) -> torch.Tensor:
    """Codes uint8 0..15 [..., out, in] (``out`` even) -> uint8 [..., out, in/2] in ``layout`` (``Int4Layout``), by
    default the bytes ``torch._convert_weight_to_int4pack_for_cpu`` makes on an AVX-512 CPU, which offload_moe
    stores. A tile's bytes depend only on its rows, so row blocks concatenate."""
    *lead, out, cols = codes.shape
    full = out - out % layout.tile
    half = layout.tile // 2
    tiles = codes[..., :full, :].unflatten(-2, (-1, 2, half) if layout.halves else (-1, half, 2))
    if layout.halves:  # [..., T, high?, tile/2, in]
        tiles = tiles[..., 0, :, :] | (tiles[..., 1, :, :] << 4)
    else:  # [..., T, tile/2, high?, in]
        tiles = tiles[..., 0, :] | (tiles[..., 1, :] << 4)
    tiles = tiles.transpose(-1, -2)  # [..., T, in, tile/2]
    tail = codes[..., full:, :].unflatten(-2, (-1, 2))  # [..., r/2, 2, in]
    tail = (tail[..., 0, :] | (tail[..., 1, :] << 4)).transpose(-1, -2)  # [..., in, r/2]
    return torch.cat((tiles.reshape(*lead, full, cols // 2), tail.reshape(*lead, out - full, cols // 2)), -2)


def unpack_int4_tiles(packed: torch.Tensor, layout: Int4Layout = AVX512) -> torch.Tensor:
    """``pack_int4_tiles`` undone: uint8 [..., out, in/2] in ``layout`` -> codes uint8 [..., out, in]."""
    *lead, out, half = packed.shape
    full = out - out % layout.tile
    nibbles = torch.stack((packed & 0x0F, packed >> 4), -1)  # [..., out, in/2, 2]: each byte's low, high
    tiles = nibbles[..., :full, :, :].reshape(*lead, -1, 2 * half, layout.tile // 2, 2)  # [..., T, in, tile/2, high?]
    tiles = tiles.movedim(-3, -1)  # [..., T, tile/2, high?, in]: rows 2d, 2d + 1 ...
    tiles = (tiles.transpose(-3, -2) if layout.halves else tiles).reshape(*lead, full, 2 * half)  # ... or d, d + tile/2
    tail = nibbles[..., full:, :, :].reshape(*lead, 2 * half, (out - full) // 2, 2)  # [..., in, r/2, high?]
    return torch.cat((tiles, tail.movedim(-3, -1).reshape(*lead, out - full, 2 * half)), -2)


def convert_int4_tiles(packed: torch.Tensor, layout: Int4Layout, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """A stored (``AVX512``) int4 weight uint8 [out, in/2] -> the same weight in ``layout``, written into ``out``
    (contiguous, that shape, not overlapping ``packed``) or a new tensor, and returned.

    Into tiles of 32 rows (``AVX2``, ``DEFAULT``) the nibbles move by byte-wise operations on int64 words, with no
    unpacking: a 64-row tile's low nibbles are its rows 0..31 (byte b of a column holds row b) and its high nibbles
    rows 32..63, so each tile of 32 rows pairs the low (or the high) nibbles of two bytes. A last tile of fewer rows
    (and any other layout, or a big-endian machine) goes through the codes."""
    rows, half = packed.shape
    if out is None:
        out = torch.empty_like(packed)
    if layout == AVX512:
        return out.copy_(packed)
    words = layout.tile == AVX512.tile // 2 and sys.byteorder == "little"  # int16 lanes read a byte pair low first
    full = rows - rows % AVX512.tile if words else 0
    if full:
        _split_tiles(packed[:full].view(-1, 2 * half, 32), out[:full].view(-1, 2, 2 * half, 16), layout.halves)
    if full < rows:
        out[full:] = pack_int4_tiles(unpack_int4_tiles(packed[full:]), layout)
    return out


_LOW_NIBBLES = 0x0F0F0F0F0F0F0F0F  # of each byte of an int64 word
_HIGH_NIBBLES_OF_EVEN_BYTES = 0x00F000F000F000F0
CONVERT_CHUNK = 2**21  # bytes of 64-row tiles converted together (at least one tile): few torch calls (each may wake
# torch's threads), and temporaries of a few MiB that stay in cache


def _split_tiles(src: torch.Tensor, dst: torch.Tensor, halves: bool) -> None:
    """AVX-512 tiles ``src`` [T, in, 32] (a column's 32 bytes) -> tiles of 32 rows ``dst`` [T, 2, in, 16]. A new
    byte pairs two old ones, ``a`` (low nibble) and ``b``: bytes c and c + 16 of a column (``halves``), or 2c and
    2c + 1; the first new tile takes ``a_lo | b_lo << 4``, the second ``a_hi | b_hi << 4``. One delta swap (exchange
    a's high nibble with b's low one) makes both, on int64 words of contiguous bytes."""
    tiles, cols = src.shape[0], src.shape[1]
    n = min(max(1, CONVERT_CHUNK // (32 * cols)), tiles)
    scratch = None if halves else torch.empty(n, cols * 4, dtype=torch.int64)  # [n, in x 32 bytes]
    swap = torch.empty(n, cols * 2 if halves else cols * 4, dtype=torch.int64)
    for start in range(0, tiles, n):
        stop = min(start + n, tiles)
        if halves:  # gather the a bytes into the first new tile, the b bytes into the second, then swap in place
            d = dst[start:stop]
            d.copy_(src[start:stop].unflatten(-1, (2, 16)).transpose(1, 2))
            a, b = (t.flatten(1).view(torch.int64) for t in d.unbind(1))  # [n, in x 2] words each
            t = torch.bitwise_right_shift(a, 4, out=swap[: stop - start]).bitwise_xor_(b).bitwise_and_(_LOW_NIBBLES)
            b.bitwise_xor_(t)
            a.bitwise_xor_(t.bitwise_left_shift_(4))
        else:  # a and b are adjacent bytes: swap within 16-bit lanes of a copy, then deal even and odd bytes out
            w = scratch[: stop - start]
            w.view(torch.uint8).view(-1, cols, 32).copy_(src[start:stop])
            t = torch.bitwise_right_shift(w, 4, out=swap[: stop - start]).bitwise_xor_(w)
            t.bitwise_and_(_HIGH_NIBBLES_OF_EVEN_BYTES)
            w.bitwise_xor_(t).bitwise_xor_(t.bitwise_left_shift_(4))
            lanes = w.view(torch.int16).view(stop - start, -1)  # [n, in x 16]: a | b << 8, little-endian
            dst[start:stop, 0].view(stop - start, -1).copy_(lanes)  # a cast to uint8 keeps the low byte
            dst[start:stop, 1].view(stop - start, -1).copy_(lanes.bitwise_right_shift_(8))


def check_group_size(group_size: object, cols: int | None = None, where: str = "the weight") -> int:
    """int4's group size, refused (``ConfigError``) unless it is an even whole number and, given ``cols``, divides
    the input columns of ``where``, with a group size that does: 256, 128, 64 or 32 (which torch's CPU int4
    kernel takes) if one does, else the largest even divisor. Returns it."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ConfigError(f"group_size = {group_size!r} must be an even number of input columns per int4 scale and "
                          f"zero, such as 32, 64 or 128 (default {DEFAULT_GROUP_SIZE})")
    if cols is not None and cols % group_size:
        fits = [g for g in INT4_KERNEL_GROUPS if cols % g == 0]
        fits = fits or [g for g in range(cols, 1, -1) if cols % g == 0 and g % 2 == 0]
        if not fits:
            hint = "no even group_size does: an odd width cannot be packed two codes a byte"
        elif fits[0] in INT4_KERNEL_GROUPS:
            hint = f"choose a group_size that does, e.g. {fits[0]} (use {fits[0]}: torch's CPU int4 kernel takes it)"
        else:
            hint = (f"choose a group_size that does, e.g. {fits[0]} (use {fits[0]}: the largest even divisor; torch's "
                    f"CPU int4 kernel takes only {', '.join(map(str, INT4_KERNEL_GROUPS))}, so it is dequantized to compute)")
        raise ConfigError(f"{where} has {cols} input columns, which groups of {group_size} do not divide; {hint}")
    return group_size


# -- checks ----------------------------------------------------------------------------------------------------
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _expect_dtype(t: torch.Tensor, dtype: torch.dtype, name: str) -> None:
    if t.dtype != dtype:
        raise CheckpointError(f"{name}: dtype {_dtype_name(t.dtype)}, but this format stores {_dtype_name(dtype)}; "
                              "the checkpoint is corrupted or its quantization_config does not describe it")


def _expect_float(w: torch.Tensor, what: str) -> None:
    if not w.is_floating_point() or w.dtype.itemsize < 2 or w.dim() < 2:
        raise ConfigError(f"{what} takes a bf16, fp16 or fp32 matrix [out, in], not a {_dtype_name(w.dtype)} "
                          f"tensor of shape {list(w.shape)}")
