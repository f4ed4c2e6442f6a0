"""quant.py: MXFP4 and block-FP8 dequantized bit for bit as transformers' own functions do, the partial-block
rule of FP8, offload_moe's int8/int4 round trips within half a step, their packing layouts (checked against
torch's CPU kernels), and a clear error for every shape that does not fit."""

from __future__ import annotations

import pytest
import torch

from offload_moe.errors import CheckpointError, ConfigError
from offload_moe.quant import (
    AVX2,
    AVX512,
    DEFAULT,
    FP4_VALUES,
    INT4_LAYOUTS,
    convert_int4_tiles,
    dequantize_fp8_blocks,
    dequantize_int4,
    dequantize_int8,
    dequantize_mxfp4,
    pack_int4_tiles,
    quantize_int4,
    quantize_int8,
    unpack_int4_tiles,
)
from tiny_models import encode_fp8_blocks, encode_mxfp4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = {4: torch.int32, 2: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit: -0.0 is not 0.0, and NaNs must sit in the same places with the same payload."""
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(BITS[a.element_size()]), b.contiguous().view(BITS[b.element_size()]))


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- MXFP4 ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top", [254, 255])  # 255 (E8M0's NaN) takes another path: 2**128 overflows float32
@pytest.mark.parametrize("dtype", DTYPES)
def test_mxfp4_equals_transformers_bit_for_bit_over_every_byte_and_scale(dtype, top):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = generator()
    blocks = torch.randint(0, 256, (3, 40, 4, 16), dtype=torch.uint8, generator=g)
    blocks[0, :16, 0] = torch.arange(256, dtype=torch.uint8).view(16, 16)  # every byte at least once
    scales = torch.randint(0, top + 1, (3, 40, 4), dtype=torch.uint8, generator=g)
    scales[1:].view(-1)[:top + 1] = torch.arange(top + 1, dtype=torch.uint8)  # every exponent up to top
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, cols, rows]: the parameter layout
    ours = dequantize_mxfp4(blocks, scales, dtype)  # [E, rows, cols]: the stored rows
    assert ours.shape == (3, 40, 128)
    assert same_bits(ours.transpose(1, 2), theirs)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mxfp4_every_exponent_and_value_equals_ldexp_bit_for_bit_into_out_or_not(dtype):
    """All 256 E8M0 bytes x 16 FP4 values, as ``torch.ldexp`` in float32 rounded once (transformers' rule): the
    two-step scale (2**min(e, 127), then 2**max(e - 127, 0)) never overflows where ldexp does not."""
    nibbles = torch.arange(16, dtype=torch.uint8)
    blocks = (nibbles[0::2] | (nibbles[1::2] << 4)).repeat(256, 2).view(256, 1, 16)  # each row: values 0..15, twice
    scales = torch.arange(256, dtype=torch.uint8).view(256, 1)
    values = torch.tensor(FP4_VALUES).repeat(2)  # [32]
    want = torch.ldexp(values.expand(256, 32), (scales.to(torch.int32) - 127).expand(256, 32)).to(dtype)
    assert same_bits(dequantize_mxfp4(blocks, scales, dtype), want)
    out = torch.full((256, 32), 7.0, dtype=dtype)
    assert dequantize_mxfp4(blocks, scales, dtype, out=out) is out and same_bits(out, want)


def test_dequantizing_reuses_its_lookup_tables():
    from offload_moe import quant

    blocks, scales = torch.zeros(4, 1, 16, dtype=torch.uint8), torch.full((4, 1), 127, dtype=torch.uint8)
    q, s = fp8_case((16, 16), (16, 16))
    for _ in range(2):
        dequantize_mxfp4(blocks, scales, out=torch.empty(4, 32, dtype=torch.bfloat16))
        dequantize_fp8_blocks(q, s, (16, 16), out=torch.empty(16, 16, dtype=torch.bfloat16))
        tables = dict(quant._TABLES)
    assert ("fp4", torch.device("cpu"), torch.bfloat16) in tables
    assert (torch.float8_e4m3fn, torch.device("cpu"), torch.bfloat16) in tables
    dequantize_mxfp4(blocks, scales, out=torch.empty(4, 32, dtype=torch.bfloat16))
    assert all(quant._TABLES[key] is table for key, table in tables.items())


def test_mxfp4_layout_low_nibble_first_and_a_scale_per_32_columns():
    blocks = torch.zeros(1, 2, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x2F  # low nibble 0xF = -6, high nibble 0x2 = 1.0
    blocks[0, 1, 15] = 0x90  # low nibble 0 = +0, high nibble 0x9 = -0.5
    scales = torch.tensor([[127, 129]], dtype=torch.uint8)  # 2**0 for columns 0..31, 2**2 for 32..63
    w = dequantize_mxfp4(blocks, scales, torch.float32)
    assert w.shape == (1, 64)
    assert w[0, :2].tolist() == [-6.0, 1.0]
    assert w[0, 62:].tolist() == [0.0, -0.5 * 4]
    assert w[0, 2:62].abs().sum() == 0
    assert FP4_VALUES[0x9] == -0.5


def test_mxfp4_round_trips_values_it_can_hold():
    g = generator(1)
    levels = torch.tensor(FP4_VALUES)[torch.randint(0, 16, (6, 64), generator=g)]
    w = levels * torch.exp2(torch.randint(-4, 4, (6, 2), generator=g).float()).repeat_interleave(32, 1)
    blocks, scales = encode_mxfp4(w)
    assert torch.equal(dequantize_mxfp4(blocks, scales, torch.float32), w)


@pytest.mark.parametrize(("blocks", "scales"), [
    ((4, 2, 16), (4, 3)),  # a group without its scale
    ((4, 2, 15), (4, 2)),  # 30 values a group, not 32
    ((2, 16), (2,)),  # no rows
])
def test_mxfp4_shapes_that_do_not_fit_name_the_tensor(blocks, scales):
    with pytest.raises(CheckpointError, match="model.safetensors: layers.0.gate_up_proj_blocks.*shape"):
        dequantize_mxfp4(torch.zeros(blocks, dtype=torch.uint8), torch.zeros(scales, dtype=torch.uint8),
                         name="model.safetensors: layers.0.gate_up_proj_blocks")


def test_mxfp4_of_another_dtype_is_refused():
    with pytest.raises(CheckpointError, match="x.*dtype int8.*uint8"):
        dequantize_mxfp4(torch.zeros(4, 2, 16, dtype=torch.int8), torch.zeros(4, 2, dtype=torch.uint8), name="x")


# -- block FP8 -----------------------------------------------------------------------------------------------
def fp8_case(shape, block, seed=0):
    g = generator(seed)
    w = torch.randn(shape, generator=g) * 3
    if len(shape) == 2:
        return encode_fp8_blocks(w, block)
    pairs = [encode_fp8_blocks(m, block) for m in w]
    return torch.stack([q for q, _ in pairs]), torch.stack([s for _, s in pairs])


def rule(q: torch.Tensor, scale_inv: torch.Tensor, block) -> torch.Tensor:
    """The rule written out element by element: w[i, j] = q[i, j] * scale_inv[i // bm, j // bn]."""
    out = torch.empty(q.shape)
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            out[i, j] = q[i, j].float() * scale_inv[i // block[0], j // block[1]]
    return out


def test_fp8_follows_the_rule_on_a_weight_ending_in_partial_blocks():
    q, s = fp8_case((160, 300), (128, 128))  # 128 + 32 rows, 128 + 128 + 44 columns
    assert s.shape == (2, 3)
    assert torch.equal(dequantize_fp8_blocks(q, s, (128, 128), torch.float32), rule(q, s, (128, 128)))


@pytest.mark.parametrize("shape", [(160, 300), (4, 24, 40), (256, 384)])
def test_fp8_equals_transformers_dequantize_fp8_weight_and_rounds_once(shape):
    """transformers' ``_dequantize_fp8_weight`` (its backward pass) follows the rule. In bf16 it rounds the scale
    to bf16 before multiplying; we round once, from float32, as DeepSeek's ``weight_dequant`` does."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    block = (128, 128) if len(shape) == 2 else (16, 16)
    q, s = fp8_case(shape, block)
    exact = _dequantize_fp8_weight(q, s, list(block), torch.float32)
    assert same_bits(dequantize_fp8_blocks(q, s, block, torch.float32), exact)
    for dtype in (torch.bfloat16, torch.float16):
        assert same_bits(dequantize_fp8_blocks(q, s, block, dtype), exact.to(dtype))


def test_fp8_equals_transformers_loader_where_blocks_divide_and_differs_where_its_rule_is_wrong():
    """transformers 5.24's CPU loader (``Fp8Dequantize._dequantize_one``) takes the block as rows // scale rows.
    Where the blocks divide the weight that is the rule; for 160 rows with 128-row blocks it uses 80-row blocks,
    so rows 80..127 get the second block's scale. We follow the rule (the previous two tests)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    loader = Fp8Dequantize(None)
    q, s = fp8_case((256, 384), (128, 128))
    assert same_bits(dequantize_fp8_blocks(q, s, (128, 128), torch.float32), loader._dequantize_one(q, s, torch.float32))
    q, s = fp8_case((160, 256), (128, 128), seed=2)
    ours = dequantize_fp8_blocks(q, s, (128, 128), torch.float32)
    theirs = loader._dequantize_one(q, s, torch.float32)
    assert torch.equal(ours[:80], theirs[:80]) and torch.equal(ours[128:], theirs[128:])
    assert not torch.equal(ours[80:128], theirs[80:128]), "transformers fixed partial blocks: update this note"
    assert torch.equal(theirs[80:128], rule(q, s.repeat_interleave(2, 0)[1:3], (80, 128))[80:128])


def test_fp8_ue8m0_scales_mean_powers_of_two():
    q, s = fp8_case((40, 24), (16, 16))
    exponents = torch.randint(120, 135, s.shape, dtype=torch.uint8, generator=generator(3))
    powers = torch.exp2(exponents.float() - 127)
    expected = dequantize_fp8_blocks(q, powers, (16, 16), torch.float32)
    assert torch.equal(dequantize_fp8_blocks(q, exponents, (16, 16), torch.float32), expected)
    assert torch.equal(dequantize_fp8_blocks(q, exponents.view(torch.float8_e8m0fnu), (16, 16), torch.float32), expected)


@pytest.mark.parametrize(("scale_shape", "block"), [((1, 3), (128, 128)), ((2, 2), (128, 128)), ((10, 18), (16, 16)),
                                                    ((2, 3, 1), (128, 128))])
def test_fp8_scales_that_do_not_match_their_weight_name_it(scale_shape, block):
    q, _ = fp8_case((160, 300), (128, 128))
    with pytest.raises(CheckpointError, match=r"shard.safetensors: l.0.e.3.up_proj.weight: weight_scale_inv has shape"):
        dequantize_fp8_blocks(q, torch.ones(scale_shape), block, name="shard.safetensors: l.0.e.3.up_proj.weight")


@pytest.mark.parametrize("block", [(0, 128), (128,), (128, 1.5), "128", (True, 128)])
def test_fp8_a_block_size_that_is_not_two_positive_numbers_is_refused(block):
    q, s = fp8_case((160, 300), (128, 128))
    with pytest.raises(CheckpointError, match="w: weight_block_size"):
        dequantize_fp8_blocks(q, s, block, name="w")


@pytest.mark.parametrize(("weight", "scale"), [(torch.zeros(4, 4), torch.ones(1, 1)),
                                               (torch.zeros(4, 4, dtype=torch.float8_e4m3fn), torch.ones(1, 1, dtype=torch.int32)),
                                               (torch.zeros(4, dtype=torch.float8_e4m3fn), torch.ones(1))])
def test_fp8_of_another_dtype_or_rank_is_refused(weight, scale):
    with pytest.raises(CheckpointError, match="^w: "):
        dequantize_fp8_blocks(weight, scale, (128, 128), name="w")


# -- int8 ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(64, 256), (3, 24, 40), (7, 13)])
def test_int8_round_trip_is_within_half_a_step(shape):
    w = torch.randn(shape, generator=generator(4)) * torch.rand(shape[:-1] + (1,), generator=generator(5)) * 4
    w[..., 0, :] = 0  # a row of zeros keeps scale 1 and codes 0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == w.shape[:-1] and scale.dtype == torch.float32
    assert q.abs().max() <= 127 and (q[..., 0, :] == 0).all()
    back = dequantize_int8(q, scale, torch.float32)
    assert ((back - w).abs() <= scale[..., None] / 2 * (1 + 1e-6)).all()
    assert (q.abs().amax(-1)[..., 1:] == 127).all()  # each row uses the whole range
    assert dequantize_int8(q, scale).dtype == torch.bfloat16


def test_int8_layout_is_the_one_torch_weight_int8pack_mm_takes():
    w = torch.randn(64, 256, generator=generator(6))
    x = torch.randn(3, 256, generator=generator(7)).bfloat16()
    q, scale = quantize_int8(w)
    reference = x.float() @ dequantize_int8(q, scale, torch.float32).T
    kernel = torch._weight_int8pack_mm(x, q, scale.bfloat16()).float()
    assert torch.allclose(kernel, reference, rtol=2e-2, atol=0.2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_into_out_is_bit_equal_to_the_float32_product_rounded_once(dtype):
    q, scale = quantize_int8(torch.randn(2, 48, 70, generator=generator(20)))
    want = (q.float() * scale.float()[..., None]).to(dtype)
    assert same_bits(dequantize_int8(q, scale, dtype), want)
    out = torch.empty(2, 48, 70, dtype=dtype)
    assert dequantize_int8(q, scale, dtype, out=out) is out and same_bits(out, want)
    wide = torch.zeros(2, 48, 80, dtype=dtype)  # a view with gaps between its rows
    dequantize_int8(q, scale, dtype, out=wide[..., :70])
    assert same_bits(wide[..., :70], want) and not wide[..., 70:].any()


def test_int8_scales_that_do_not_match_name_the_tensor():
    q, _ = quantize_int8(torch.randn(8, 16))
    with pytest.raises(CheckpointError, match="experts/3.down: scales of shape"):
        dequantize_int8(q, torch.ones(16), name="experts/3.down")


@pytest.mark.parametrize("w", [torch.ones(4, 4, dtype=torch.int32), torch.ones(8), torch.ones(4, 4).to(torch.float8_e4m3fn)])
def test_int8_takes_a_floating_matrix_only(w):
    with pytest.raises(ConfigError, match="quantize_int8"):
        quantize_int8(w)


# -- int4 ----------------------------------------------------------------------------------------------------
ON_AVX512 = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() != "AVX512",
                            reason="torch's CPU int4 layout is the stored one on AVX-512 only")


@pytest.mark.parametrize(("shape", "group"), [((64, 256), 128), ((3, 24, 40), 8), ((6, 96), 32), ((2, 6), 2),
                                              ((2, 80, 64), 32)])
def test_int4_round_trip_is_within_half_a_group_step(shape, group):
    w = torch.randn(shape, generator=generator(8)) + torch.rand(shape[:-1] + (1,), generator=generator(9)) * 5
    w[..., 0, :group] = 0.25  # a constant group: scale 1, every code 8, exact
    packed, scales_and_zeros = quantize_int4(w, group)
    groups = shape[-1] // group
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], shape[-1] // 2)
    assert scales_and_zeros.shape == (*shape[:-2], groups, shape[-2], 2)
    back = dequantize_int4(packed, scales_and_zeros, torch.float32)
    step = scales_and_zeros[..., 0].transpose(-1, -2).repeat_interleave(group, -1)
    assert ((back - w).abs() <= step / 2 + 1e-5 * w.abs().amax()).all()
    assert torch.equal(back[..., 0, :group], w[..., 0, :group])


def test_int4_packs_a_pair_of_rows_a_byte_column_by_column_below_a_tile():
    w = torch.tensor([[0.0, 15.0, 3.0, 8.0], [15.0, 0.0, 8.0, 3.0]])  # one group each spanning 0..15: code = value
    packed, scales_and_zeros = quantize_int4(w, 4)
    assert scales_and_zeros.tolist() == [[[1.0, 8.0], [1.0, 8.0]]]
    assert packed.flatten().tolist() == [0x0 | 0xF << 4, 0xF | 0x0 << 4, 0x3 | 0x8 << 4, 0x8 | 0x3 << 4]
    assert torch.equal(dequantize_int4(packed, scales_and_zeros, torch.float32), w)


def test_int4_tiles_of_64_rows_pair_rows_d_with_d_plus_32():
    codes = (torch.arange(64)[:, None] % 16).expand(64, 2).to(torch.uint8)  # row r holds code r % 16
    packed = pack_int4_tiles(codes).flatten()  # column 0: 32 bytes, then column 1
    assert packed[:32].tolist() == [d % 16 | (d % 16) << 4 for d in range(32)] and torch.equal(packed[32:], packed[:32])
    assert torch.equal(unpack_int4_tiles(pack_int4_tiles(codes)), codes)


@ON_AVX512
@pytest.mark.parametrize("rows", [16, 48, 64, 80, 192, 240])
def test_int4_bytes_are_the_ones_torch_packs_for_its_cpu_kernel(rows):
    codes = torch.randint(0, 16, (rows, 96), generator=generator(12)).to(torch.uint8)
    theirs = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    assert torch.equal(pack_int4_tiles(codes), theirs.view(rows, 48))
    assert torch.equal(unpack_int4_tiles(theirs.view(rows, 48)), codes)


@ON_AVX512
def test_int4_kernel_computes_from_the_stored_tensors_as_they_are():
    w = torch.randn(128, 256, generator=generator(10))
    x = torch.randn(3, 256, generator=generator(11)).bfloat16()
    packed, scales_and_zeros = quantize_int4(w, 64)
    kernel = torch._weight_int4pack_mm_for_cpu(x, packed, 64, scales_and_zeros.bfloat16()).float()
    reference = x.float() @ dequantize_int4(packed, scales_and_zeros.bfloat16(), torch.float32).T
    assert torch.allclose(kernel, reference, rtol=2e-2, atol=0.2)


@pytest.mark.parametrize(("cols", "group", "match"), [(40, 128, "use 40"), (96, 64, "use 32"), (2880, 128, "use 64"), (6, 4, "use 6"), (7, 2, "odd"),
                                                      (64, 3, "even"), (64, 0, "even"), (64, True, "even")])
def test_int4_a_group_size_that_does_not_divide_is_refused_with_one_that_does(cols, group, match):
    with pytest.raises(ConfigError, match=f"group_size.*{match}"):
        quantize_int4(torch.randn(4, cols), group)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_into_out_is_bit_equal_to_the_float32_rule(monkeypatch, dtype, scale_dtype):
    """``(code - 8) * scale``, then ``+ zero``, each rounded in float32, then once to ``dtype``: whether written
    into ``out`` or not, in one float32 chunk or several, into a contiguous ``out`` or a view with gaps."""
    from offload_moe import quant

    packed, sz = quantize_int4(torch.randn(3, 80, 96, generator=generator(21)), 32)
    sz = sz.to(scale_dtype)
    codes = unpack_int4_tiles(packed).unflatten(-1, (3, 32)).float()
    scale, zero = sz.float().transpose(-3, -2).unbind(-1)
    want = ((codes - 8) * scale[..., None] + zero[..., None]).flatten(-2).to(dtype)
    for chunk in (2**20, 500):  # 500 values: five rows a chunk, a short last one
        monkeypatch.setattr(quant, "INT4_CHUNK", chunk)
        assert same_bits(dequantize_int4(packed, sz, dtype), want)
        out = torch.empty(3, 80, 96, dtype=dtype)
        assert dequantize_int4(packed, sz, dtype, out=out) is out and same_bits(out, want)
        wide = torch.zeros(3, 80, 100, dtype=dtype)
        dequantize_int4(packed, sz, dtype, out=wide[..., :96])
        assert same_bits(wide[..., :96], want) and not wide[..., 96:].any()


LAYOUT_ROWS = [2, 16, 30, 32, 48, 64, 80, 96, 112, 176, 240]  # whole tiles of 64 and 32, and every kind of last tile


@pytest.mark.parametrize("layout", INT4_LAYOUTS, ids=lambda layout: layout.name)
def test_int4_layouts_pair_rows_as_torch_does_on_each_cpu(layout):
    """AVX-512: rows d and d + 32 of a 64-row tile in a byte; AVX2: d and d + 16 of a 32-row tile; plain: 2d and
    2d + 1. A last tile of fewer rows pairs rows 2m and 2m + 1. Column by column within a tile."""
    rows = 2 * layout.tile + 16
    codes = (torch.arange(rows)[:, None] % 16 + torch.zeros(rows, 2, dtype=torch.long)).to(torch.uint8)  # row r: r % 16
    packed = pack_int4_tiles(codes, layout)
    half = layout.tile // 2
    first = packed.flatten()[:half].tolist()  # the first tile's column 0
    pair = (lambda d: (d, d + half)) if layout.halves else (lambda d: (2 * d, 2 * d + 1))
    assert first == [codes[pair(d)[0], 0] | codes[pair(d)[1], 0] << 4 for d in range(half)]
    tail = packed.flatten()[2 * layout.tile:].view(2, 8)  # the last 16 rows: 8 bytes a column
    assert tail[0].tolist() == [codes[2 * layout.tile + 2 * m, 0] | codes[2 * layout.tile + 2 * m + 1, 0] << 4
                                for m in range(8)]


@pytest.mark.parametrize("layout", INT4_LAYOUTS, ids=lambda layout: layout.name)
@pytest.mark.parametrize("rows", LAYOUT_ROWS)
def test_int4_converting_stored_bytes_equals_packing_in_that_layout(layout, rows):
    """``convert_int4_tiles`` rearranges the stored (AVX-512) bytes into each layout exactly as packing the codes in
    it would, into ``out`` or a new tensor; unpacking the result gives the codes; the stored bytes are unchanged."""
    codes = torch.randint(0, 16, (rows, 96), generator=generator(rows)).to(torch.uint8)
    stored = pack_int4_tiles(codes)
    before = stored.clone()
    want = pack_int4_tiles(codes, layout)
    assert torch.equal(convert_int4_tiles(stored, layout), want)
    out = torch.full_like(stored, 0xAA)
    assert convert_int4_tiles(stored, layout, out=out) is out and torch.equal(out, want)
    assert torch.equal(unpack_int4_tiles(want, layout), codes) and torch.equal(stored, before)


def test_int4_conversion_works_tile_group_by_tile_group(monkeypatch):
    """Tiles converted a few at a time (``CONVERT_CHUNK`` bytes), with a short last group, give the same bytes."""
    from offload_moe import quant

    codes = torch.randint(0, 16, (7 * 64 + 48, 64), generator=generator(3)).to(torch.uint8)
    for layout in (AVX2, DEFAULT):
        want = pack_int4_tiles(codes, layout)
        for at_once in (1, 3, 100):  # 64 columns: a tile is 2 KiB
            monkeypatch.setattr(quant, "CONVERT_CHUNK", at_once * 2048)
            assert torch.equal(convert_int4_tiles(pack_int4_tiles(codes), layout), want), (layout, at_once)


@pytest.mark.parametrize("layout", INT4_LAYOUTS, ids=lambda layout: layout.name)
def test_int4_dequantizes_the_same_weight_from_each_layout(layout):
    w = torch.randn(2, 112, 64, generator=generator(5))
    packed, sz = quantize_int4(w, 32)
    held = torch.stack([convert_int4_tiles(p, layout) for p in packed])
    want = dequantize_int4(packed, sz, torch.float32)
    assert same_bits(dequantize_int4(held, sz, torch.float32, layout=layout), want)


@pytest.mark.parametrize("rows", [16, 48, 112, 240])
def test_int4_this_torch_packs_in_the_layout_offload_moe_found(rows):
    """``kernels.int4_kernel_layout`` (found once from torch) is the layout torch's own packing makes for this
    process's CPU code; the stored bytes converted into it are those bytes. (Each CPU code:
    tests/test_int4_cpu_modes.py, in subprocesses.)"""
    from offload_moe.kernels import int4_kernel_layout

    expected = {"AVX512": AVX512, "AVX2": AVX2, "DEFAULT": DEFAULT}.get(torch.backends.cpu.get_cpu_capability())
    if expected is None:
        pytest.skip(f"torch runs {torch.backends.cpu.get_cpu_capability()} code, not one of x86's three")
    assert int4_kernel_layout() == expected, f"torch {torch.__version__} packs int4 unlike offload_moe's layouts"
    layout = expected
    codes = torch.randint(0, 16, (rows, 96), generator=generator(12)).to(torch.uint8)
    theirs = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1).view(rows, 48)
    assert torch.equal(convert_int4_tiles(pack_int4_tiles(codes), layout), theirs)


def test_int4_an_odd_row_count_is_refused():
    with pytest.raises(ConfigError, match="5 rows; use bits=8"):
        quantize_int4(torch.randn(5, 64), 32)


@pytest.mark.parametrize("shape", [(3, 8, 2), (2, 4, 2), (2, 8, 3), (5, 8, 2), (1, 2, 8, 2)])
def test_int4_scales_that_do_not_fit_name_the_tensor(shape):
    packed, _ = quantize_int4(torch.randn(8, 64), 32)
    with pytest.raises(CheckpointError, match="experts/1.gate: scales_and_zeros"):
        dequantize_int4(packed, torch.ones(shape), name="experts/1.gate")
