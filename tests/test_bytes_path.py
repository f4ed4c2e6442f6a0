"""The bytes path from file to slot: every I/O mode x alignment case byte-exact, and no buffer touched that the
source does not need (an O_DIRECT read into room lands in place; into an exact destination only its partial
blocks go through scratch). The CUDA staging path runs here on the CPU, its stream, events and page locking
faked; tests/test_cuda.py runs it on a GPU."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from test_pinned import cpu_cuda_mover

from offload_moe.errors import CheckpointError
from offload_moe.files import open_fd
from offload_moe.formats import ExpertFormat
from offload_moe.quant import AVX2, DEFAULT, pack_int4_tiles
from offload_moe.safetensors_io import DIRECT_ALIGN, FileReader, TensorInfo, aligned_empty, span
from offload_moe.store import Piece, PieceStore
from offload_moe import safetensors_io, transfer
from offload_moe.transfer import ALIGN, Mover, row_parts, staging_bytes, staging_layout

A = DIRECT_ALIGN
SIZE = 5 * A + 123  # the last block is partial
MODES = ("buffered", "dontneed", "direct", "mmap")


@pytest.fixture
def data_file(tmp_path) -> tuple[Path, bytes]:
    data = torch.randint(0, 256, (SIZE,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "raw.bin"
    path.write_bytes(data.numpy().tobytes())
    return path, path.read_bytes()


def direct_works(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


RANGES = [(0, 1), (0, A), (1, 100), (7, A), (A - 1, 2), (A, A), (A + 1, 3 * A), (12, 4 * A + 5), (2 * A + 3, 1),
          (SIZE - 123, 123), (SIZE - 1, 1), (SIZE - A - 7, A + 7), (5, SIZE - 5), (0, SIZE)]


@pytest.fixture
def reader(io):
    """A FileReader of the test's I/O mode (its ``io`` parameter), closed after the test."""
    reader = FileReader(io)
    yield reader
    reader.close()


@pytest.mark.parametrize("io", MODES)
def test_read_into_is_exact_for_every_offset_length_and_address(io, reader, data_file):
    path, data = data_file
    room = aligned_empty(SIZE + 3 * A)
    for offset, n in RANGES:
        for shift in sorted({0, 1, 17, offset % A}):  # 0 and offset % A: the address agrees with the file offset
            out = room[shift : shift + n]
            out.fill_(0)
            assert reader.read_into(path, offset, out) == n
            assert bytes(out.numpy()) == data[offset : offset + n], (offset, n, shift)
    if io != "direct" or direct_works(path):
        assert reader.io == io  # no read fell back: every O_DIRECT read was aligned


@pytest.mark.parametrize("io", MODES)
def test_read_span_lands_where_span_says(io, reader, data_file):
    path, data = data_file
    room = aligned_empty(SIZE + 2 * A)
    for offset, n in RANGES:
        skip, size = span(offset, n, reader.align)
        got = reader.read_span(path, offset, n, room[:size])
        assert got.data_ptr() == room.data_ptr() + skip and got.numel() == n
        assert bytes(got.numpy()) == data[offset : offset + n], (offset, n)
    if io != "direct" or direct_works(path):
        assert reader.io == io
    with pytest.raises(ValueError, match="room"):
        reader.read_span(path, 1, A, room[: span(1, A, reader.align)[1] - 1])  # direct: 2 blocks; else A bytes


def test_direct_reads_touch_no_scratch_with_room_and_only_partial_blocks_without(data_file, monkeypatch):
    path, data = data_file
    if not direct_works(path):
        pytest.skip("this file system refuses O_DIRECT")
    reader = FileReader("direct")
    room = aligned_empty(SIZE + 2 * A)
    offset, n = 12, 4 * A + 5
    reader.read_span(path, offset, n, room)
    assert getattr(reader._local, "scratch", None) is None  # the disk wrote straight into the room
    out = room[offset % A : offset % A + n]  # address agrees with the offset: the 3 whole blocks land in place
    reader.read_into(path, offset, out)
    assert len(reader._local.scratch) == 2 * A  # the head and the tail block only
    assert bytes(out.numpy()) == data[offset : offset + n]
    out = room[1 : 1 + n]  # disagrees: the whole range goes through scratch
    reader.read_into(path, offset, out)
    assert len(reader._local.scratch) == span(offset, n, A)[1] and bytes(out.numpy()) == data[offset : offset + n]
    reader._local.scratch = None
    monkeypatch.setattr(safetensors_io, "SCRATCH_BYTES", 2 * A)  # ... SCRATCH_BYTES at a time
    out.fill_(0)
    reader.read_into(path, offset, out)
    assert len(reader._local.scratch) == 2 * A and bytes(out.numpy()) == data[offset : offset + n]
    assert reader.io == "direct"
    reader.close()


@pytest.mark.parametrize("io", MODES)
def test_a_tensor_read_once_leaves_no_page_cache_behind(io, data_file, monkeypatch):
    """The dense weights are copied into the model: with buffered reads (buffered, mmap) their pages are dropped,
    else they would stay in the page cache as a second copy, charged to the process's memory cgroup."""
    path, data = data_file
    advice = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, n, how: advice.append((offset, n, how)))
    reader = FileReader(io)
    info = TensorInfo("t", path, 12, 4 * A, torch.int32, (A,))
    kept = reader.read_tensor(info)
    dropped = reader.read_tensor(info, keep_cached=False)
    assert bytes(kept.view(torch.uint8).numpy()) == bytes(dropped.view(torch.uint8).numpy()) == data[12 : 12 + 4 * A]
    mine = [a for a in advice if a[2] == os.POSIX_FADV_DONTNEED]
    if io in ("buffered", "mmap"):
        assert mine == [(12, 4 * A, os.POSIX_FADV_DONTNEED)]  # once: the read that drops
    elif reader.io == "dontneed":  # dontneed, or direct where the file system refuses O_DIRECT: every read drops
        assert len(mine) == 2
    else:
        assert mine == []  # O_DIRECT bypasses the page cache
    reader.close()


@pytest.mark.parametrize("io", MODES)
def test_a_read_past_the_end_is_a_truncation_error(io, data_file):
    path, _ = data_file
    reader = FileReader(io)
    with pytest.raises(CheckpointError, match="raw.bin ended after .* the file is truncated"):
        reader.read_into(path, SIZE - 10, torch.empty(11, dtype=torch.uint8))
    with pytest.raises(CheckpointError, match="truncated"):
        reader.read_span(path, SIZE - 10, 11, aligned_empty(2 * A))
    reader.close()


def test_a_file_system_refusing_o_direct_falls_back_exactly(data_file, monkeypatch):
    path, data = data_file
    real = os.open

    def no_direct(p, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(p, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    reader = FileReader("direct")
    room = aligned_empty(2 * A)
    got = reader.read_span(path, 5, 100, room)
    assert reader.io == "dontneed" and got.data_ptr() == room.data_ptr() + 5  # where span put it, all the same
    assert bytes(got.numpy()) == data[5:105]
    reader.close()


def test_open_fd_keeps_every_check_and_leaves_refused_flags_to_the_caller(tmp_path, monkeypatch):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="pipe is not a regular file"):
        open_fd(fifo, "checkpoint file")
    with pytest.raises(CheckpointError, match="pipe is not a regular file"):  # O_DIRECT refused there: opened again
        FileReader("direct").read_into(fifo, 0, torch.empty(1, dtype=torch.uint8))
    with pytest.raises(CheckpointError, match="is a folder"):
        open_fd(tmp_path, "checkpoint file")
    with pytest.raises(CheckpointError, match="is a folder"):
        FileReader("direct").read_into(tmp_path, 0, torch.empty(1, dtype=torch.uint8))
    for flags in (0, os.O_DIRECT):
        with pytest.raises(CheckpointError, match="missing does not exist"):
            open_fd(tmp_path / "missing", "checkpoint file", flags=flags)
    real = os.open
    monkeypatch.setattr(os, "open", lambda p, flags, *a: (_ for _ in ()).throw(OSError(errno.EINVAL, "Invalid argument"))
                        if flags & os.O_DIRECT else real(p, flags, *a))
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(OSError) as refused:
        open_fd(tmp_path / "f", "checkpoint file", flags=os.O_DIRECT)
    assert not isinstance(refused.value, CheckpointError)
    os.close(open_fd(tmp_path / "f", "checkpoint file"))


# -- the movers: pieces of one expert, as a checkpoint lays them out -------------------------------------------


def test_staging_layout_gives_each_piece_its_blocks_on_an_aligned_start():
    piece = lambda offset, nbytes: Piece("p", (slice(None),), Path("f"), offset, nbytes, torch.float32, (nbytes // 4,),
                                         False, "t")
    pieces = [piece(12, 400), piece(A - 4, 8), piece(3 * A, A), piece(5 * A + 8, 4)]
    regions, total = staging_layout(pieces, A)
    assert regions == [(0, A), (A, 2 * A), (3 * A, A), (4 * A, A)] and total == 5 * A
    regions, total = staging_layout(pieces, 1)  # buffered: the bytes alone, each start 64-aligned
    assert regions == [(0, 400), (448, 8), (512, A), (512 + A, 4)] and total == 512 + A + ALIGN


class RawStore(PieceStore):
    """Pieces of one expert at chosen offsets of one file, with junk around them."""

    def __init__(self, folder: Path, io: str):
        super().__init__(io)
        g = torch.Generator().manual_seed(1)
        self.expected = {"down": torch.randn(6, 5, generator=g), "gate_up": torch.randn(6, 5, generator=g),
                         "conv": torch.randn(4, 7, generator=g).bfloat16().float(), "odd": torch.randn(9, 3, generator=g)}
        raw = bytearray(torch.randint(0, 256, (3 * A + 40,), dtype=torch.uint8, generator=g).numpy().tobytes())
        file = folder / "experts.bin"

        def put(param, index, offset, tensor, transpose=False):
            stored = tensor.T.contiguous() if transpose else tensor.contiguous()
            data = stored.reshape(-1).view(torch.uint8).numpy().tobytes()
            raw[offset : offset + len(data)] = data
            self.pieces[(0, 0)].append(Piece(param, index, file, offset, len(data), stored.dtype, tuple(stored.shape),
                                             transpose, f"{param}{index}"))

        rows = lambda a, b: (slice(a, b),)
        whole = (slice(None),)
        put("down", whole, A + 100, self.expected["down"])  # as the slot holds it, at an offset off the block
        put("gate_up", rows(0, 3), A - 8, self.expected["gate_up"][:3])  # half a slot tensor, across a block edge
        put("gate_up", rows(3, 6), 2 * A + 4, self.expected["gate_up"][3:], transpose=True)  # stored transposed
        put("conv", whole, 2 * A + 200, self.expected["conv"].bfloat16())  # converted to the slot's dtype
        odd = self.expected["odd"].reshape(-1).view(torch.uint8).numpy().tobytes()
        end = len(raw) + 1  # the file ends with it, mid-block, at an offset no float32 view can start at
        raw += b"\0" * (end - len(raw)) + odd
        self.pieces[(0, 0)].append(Piece("odd", whole, file, end, len(odd), torch.float32, (9, 3), False, "odd"))
        assert len(raw) % A and end % 4
        file.write_bytes(bytes(raw))

    def views(self) -> dict[str, torch.Tensor]:
        return {name: torch.full_like(t, float("nan")) for name, t in self.expected.items()}


def assert_exact(views, expected):
    for name, want in expected.items():
        assert torch.equal(views[name], want), name


@pytest.mark.parametrize("io", MODES)
def test_cpu_mover_fills_a_slot_exactly(io, tmp_path):
    store = RawStore(tmp_path, io)
    mover = Mover(store, readers=1)
    views = store.views()
    assert mover._read(0, 0, views) == sum(p.nbytes for p in store.pieces[(0, 0)])
    assert_exact(views, store.expected)
    staging = mover._local.staging  # room for the largest converted piece; a row block goes straight into the slot
    converted = [p for p in store.pieces[(0, 0)] if p.transpose or p.dtype != views[p.param].dtype]
    assert [p.name for p in converted] == ["gate_up(slice(3, 6, None),)", "conv(slice(None, None, None),)"]
    assert staging.data_ptr() % A == 0 and staging.numel() == max(span(p.offset, p.nbytes, store.reader.align)[1]
                                                                  for p in converted)
    mover.close()
    store.close()


@pytest.mark.parametrize("io", MODES)
def test_cpu_mover_converts_and_reads_a_few_rows_at_a_time(io, tmp_path, monkeypatch):
    """Staging and the reader's scratch hold SCRATCH_BYTES of rows, not a whole tensor (a Mixtral expert's gate_up is
    224 MiB): each converted piece is staged a few rows at a time, and a direct read into a destination whose
    address disagrees with the file offset goes through scratch block by block."""
    monkeypatch.setattr(transfer, "SCRATCH_BYTES", 40)  # 2 rows of 5 float32, 2 of 7 bfloat16
    monkeypatch.setattr(safetensors_io, "SCRATCH_BYTES", A)
    store = RawStore(tmp_path, io)
    mover = Mover(store, readers=1)
    views = store.views()
    mover._read(0, 0, views)
    assert_exact(views, store.expected)
    assert mover._local.staging.numel() <= 40 + 2 * store.reader.align
    scratch = getattr(store.reader._local, "scratch", None)
    assert scratch is None or len(scratch) <= 2 * A
    mover.close()
    store.close()


def test_row_parts_split_a_piece_into_blocks_of_whole_rows():
    piece = Piece("p", (slice(None),), Path("f"), 100, 7 * 12, torch.float32, (7, 3), True, "t")
    parts = row_parts(piece, 25)  # 2 rows of 12 bytes a part
    assert [(p.offset, p.nbytes, p.shape, rows) for p, rows in parts] == [
        (100, 24, (2, 3), slice(0, 2)), (124, 24, (2, 3), slice(2, 4)), (148, 24, (2, 3), slice(4, 6)),
        (172, 12, (1, 3), slice(6, 7))]
    assert all(p.transpose and p.dtype == torch.float32 for p, _ in parts)
    assert row_parts(piece, 84) == [(piece, slice(None))] and len(row_parts(piece, 1)) == 7  # one row at least
    scalar = Piece("s", (), Path("f"), 0, 4, torch.float32, (), False, "s")
    assert row_parts(scalar, 1) == [(scalar, slice(None))]


class Int4Store(PieceStore):
    """An int4 expert as offload_moe stores it (AVX-512 tiles): a gate and an up projection of 96 rows each (a tile
    of 64 and a last one of 32) as row blocks of one slot tensor, a down projection of 160 rows, at offsets off the
    block edges, the file ending mid-block; beside them a plain tensor the slot holds in another dtype."""

    format = ExpertFormat("int4", (32,))

    def __init__(self, folder: Path, io: str):
        super().__init__(io)
        g = torch.Generator().manual_seed(4)
        self.codes = {"gate_up.qweight": torch.randint(0, 16, (192, 64), generator=g, dtype=torch.uint8),
                      "down.qweight": torch.randint(0, 16, (160, 64), generator=g, dtype=torch.uint8)}
        self.plain = torch.randn(40, 6, generator=g).bfloat16()
        raw = bytearray(torch.randint(0, 256, (A - 8,), dtype=torch.uint8, generator=g).numpy().tobytes())
        file = folder / "int4.bin"

        def put(param, index, tensor):
            data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            self.pieces[(0, 0)].append(Piece(param, index, file, len(raw), len(data), tensor.dtype,
                                             tuple(tensor.shape), False, param))
            raw.extend(data + b"\x07" * 13)

        put("gate_up.qweight", (slice(0, 96),), pack_int4_tiles(self.codes["gate_up.qweight"][:96]))
        put("gate_up.qweight", (slice(96, 192),), pack_int4_tiles(self.codes["gate_up.qweight"][96:]))
        put("plain", (slice(None),), self.plain)
        put("down.qweight", (slice(None),), pack_int4_tiles(self.codes["down.qweight"]))
        assert len(raw) % A
        file.write_bytes(bytes(raw))

    def views(self) -> dict[str, torch.Tensor]:
        return {"gate_up.qweight": torch.zeros(192, 32, dtype=torch.uint8),
                "down.qweight": torch.zeros(160, 32, dtype=torch.uint8), "plain": torch.zeros(40, 6)}


@pytest.mark.parametrize("layout", [AVX2, DEFAULT], ids=lambda layout: layout.name)
@pytest.mark.parametrize("io", MODES)
def test_cpu_mover_converts_int4_into_the_held_layout_and_stages_the_rest_in_row_parts(io, layout, tmp_path,
                                                                                         monkeypatch):
    """Slots holding int4 in another layout than the stored one (AVX2, plain CPUs: ``kernels.held_format``): each
    weight's stored bytes land whole in staging (in place with O_DIRECT) and are rearranged into its slot rows,
    part by part, while a piece converted by dtype is still staged a few rows at a time; byte-exact in every mode."""
    monkeypatch.setattr(transfer, "SCRATCH_BYTES", 48)  # 2 rows of the plain piece (6 bfloat16 values)
    monkeypatch.setattr(safetensors_io, "SCRATCH_BYTES", A)
    store = Int4Store(tmp_path, io)
    mover = Mover(store, readers=1, held=ExpertFormat("int4", (32,), layout))
    views = store.views()
    assert mover._read(0, 0, views) == sum(p.nbytes for p in store.pieces[(0, 0)])
    gate_up = store.codes["gate_up.qweight"]
    assert torch.equal(views["gate_up.qweight"], torch.cat([pack_int4_tiles(gate_up[:96], layout),
                                                            pack_int4_tiles(gate_up[96:], layout)]))
    assert torch.equal(views["down.qweight"], pack_int4_tiles(store.codes["down.qweight"], layout))
    assert torch.equal(views["plain"], store.plain.float())
    assert store.reader.io == io or not direct_works(tmp_path / "int4.bin")
    mover.close()
    store.close()


@pytest.mark.parametrize("io", MODES)
def test_staged_path_copies_each_piece_from_where_it_landed(io, tmp_path, monkeypatch):
    store = RawStore(tmp_path, io)
    mover = cpu_cuda_mover(store, monkeypatch)
    views, copies, real_copy = store.views(), [], torch.Tensor.copy_

    def copy(dest, src, non_blocking=False):  # the "device" copies: note where each one reads from
        copies.append((src.data_ptr(), non_blocking))
        return real_copy(dest, src, non_blocking=non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", copy)
    t = mover._read_staged(0, 0, views, None)
    monkeypatch.setattr(torch.Tensor, "copy_", real_copy)
    assert_exact(views, store.expected)
    assert t.disk_bytes == t.copy_bytes == sum(p.nbytes for p in store.pieces[(0, 0)])
    (staging,) = mover._stagings
    assert staging.data_ptr() % A == 0 and staging.numel() == staging_bytes(store)
    regions, _ = staging_layout(store.pieces[(0, 0)], store.reader.align)
    for piece, (at, room), (source, non_blocking) in zip(store.pieces[(0, 0)], regions, copies):
        aligned = piece.offset % store.reader.align % piece.dtype.itemsize == 0
        skip = span(piece.offset, piece.nbytes, store.reader.align)[0] if aligned else 0
        assert non_blocking and source == staging.data_ptr() + at + skip, piece.name  # the device copy reads in place
    if io == "direct" and direct_works(store.pieces[(0, 0)][0].file):
        assert store.reader.io == "direct"
        # only the misaligned last piece went through the reader's scratch (its partial blocks)
        assert len(store.reader._local.scratch) <= span(0, store.pieces[(0, 0)][-1].nbytes, A)[1] + A
    mover.close()
    store.close()


def test_staged_path_without_misaligned_pieces_touches_no_scratch(tmp_path, monkeypatch):
    store = RawStore(tmp_path, "direct")
    if not direct_works(store.pieces[(0, 0)][0].file):
        pytest.skip("this file system refuses O_DIRECT")
    store.pieces[(0, 0)].pop()  # the misaligned piece
    del store.expected["odd"]
    mover = cpu_cuda_mover(store, monkeypatch)
    views = store.views()
    mover._read_staged(0, 0, views, None)
    assert_exact(views, store.expected)
    assert getattr(store.reader._local, "scratch", None) is None  # disk -> pinned staging -> device, nothing between
    mover.close()
    store.close()


@pytest.mark.parametrize("io", ["direct", "buffered"])
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "qwen3_moe"])
def test_staged_path_matches_the_cpu_mover_on_real_checkpoints(family, io, model_dir, monkeypatch):
    """tests/test_cuda.py::test_staged_reads_are_byte_exact_on_the_gpu, its device faked: row blocks (Mixtral's w1/w3),
    transposed pieces (GPT-OSS), fused experts (Qwen3) land in pinned staging and are copied out exactly."""
    import offload_moe
    from offload_moe.cache import SlotPool

    model = offload_moe.load(model_dir(family), device="cpu", cache_experts=2, io=io, progress=False)
    store, layout = model.offload.cache.store, model.offload.cache.pool.layout
    mover = cpu_cuda_mover(store, monkeypatch)
    staged, reference = SlotPool(1, layout, torch.device("cpu")), SlotPool(1, layout, torch.device("cpu"))
    for key in sorted(store.pieces)[:6]:
        staged.buffer.fill_(0xAB)  # the slot buffer is bytes: a pattern no expert holds
        mover._read_staged(*key, staged.views(0), None)
        Mover._read(mover, *key, reference.views(0))
        for name, want in reference.views(0).items():
            assert torch.equal(staged.views(0)[name], want), (key, name)
    mover.close()
    model.offload.close()
