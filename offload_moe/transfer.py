"""Moving one expert's bytes from the store into a cache slot.

``Mover.fill`` is the only place bytes cross from the cold tier to the slot. On
CPU it reads straight into the slot when the checkpoint layout and dtype allow
it, otherwise through one reused staging buffer. On CUDA it reads into reused
pinned staging buffers and copies on a side stream; the compute stream waits on
an event for that one expert, never on the whole queue, and the host never
waits for the device.
"""

from __future__ import annotations

import torch

from .store import ExpertStore, Piece


ALIGN = 64  # bytes; keeps each piece's view in a shared staging buffer aligned for any dtype


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def staging_bytes(store: ExpertStore) -> int:
    """Room for the largest expert's pieces laid end to end, each aligned."""
    return max((sum(_aligned(p.nbytes) for p in ps) for ps in store.pieces.values()), default=0)


def _source(staging: torch.Tensor, piece: Piece) -> torch.Tensor:
    src = staging.view(piece.dtype).view(piece.shape)
    return src.T if piece.transpose else src


class Mover:
    """Fills slots on the CPU: direct reads when possible, else one reused staging buffer."""

    def __init__(self, staging_bytes: int):
        self.staging = torch.empty(max(staging_bytes, 1), dtype=torch.uint8)

    def fill(self, store: ExpertStore, layer: int, expert: int, views: dict[str, torch.Tensor]) -> int:
        total = 0
        for piece in store.expert_pieces(layer, expert):
            dest = views[piece.param][piece.index]
            if piece.whole and piece.dtype == dest.dtype and dest.is_contiguous():
                store.read_piece(piece, dest)
            else:
                buf = self.staging[: piece.nbytes]
                store.read_piece(piece, buf)
                dest.copy_(_source(buf, piece))
            total += piece.nbytes
        return total

    def close(self) -> None:
        self.staging = torch.empty(0, dtype=torch.uint8)


class CudaMover(Mover):
    """Fills device slots from pinned staging buffers on a side stream, double-buffered."""

    def __init__(self, staging_bytes: int, device: torch.device, buffers: int = 2):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.buffers = [torch.empty(max(staging_bytes, 1), dtype=torch.uint8, pin_memory=True) for _ in range(buffers)]
        self.events: list[torch.cuda.Event | None] = [None] * buffers
        self.turn = 0

    def fill(self, store: ExpertStore, layer: int, expert: int, views: dict[str, torch.Tensor]) -> int:
        i, self.turn = self.turn, (self.turn + 1) % len(self.buffers)
        staging, previous = self.buffers[i], self.events[i]
        if previous is not None:
            previous.synchronize()  # the copy that last read this buffer has finished
        pieces = store.expert_pieces(layer, expert)
        offset = 0
        for piece in pieces:
            store.read_piece(piece, staging[offset : offset + piece.nbytes])
            offset += _aligned(piece.nbytes)
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)  # kernels still reading the evicted expert's slot come first
        with torch.cuda.stream(self.stream):
            offset = 0
            for piece in pieces:
                src = _source(staging[offset : offset + piece.nbytes], piece)
                views[piece.param][piece.index].copy_(src, non_blocking=True)
                offset += _aligned(piece.nbytes)
            done = torch.cuda.Event()
            done.record(self.stream)
        compute.wait_event(done)
        self.events[i] = done
        return sum(p.nbytes for p in pieces)

    def close(self) -> None:
        for ev in self.events:
            if ev is not None:
                ev.synchronize()
        self.buffers = []
        self.events = []


def make_mover(device: torch.device, store: ExpertStore) -> Mover:
    """The mover for ``device``, with staging buffers sized for ``store``'s largest expert."""
    if device.type == "cuda":
        return CudaMover(staging_bytes(store), device)
    return Mover(staging_bytes(store))
