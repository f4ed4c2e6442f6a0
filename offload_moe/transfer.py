"""Moving experts between the tiers: disk -> (pinned host slot ->) device slot.

``Mover.from_disk`` and ``from_host`` begin filling one device slot and returns a ``Ticket`` at once:

- from the warm tier (a host slot already holding the expert): one whole-slot copy,
  issued on the calling thread;
- from the disk: a reader thread reads the expert's pieces (file reads release the
  GIL) into a host slot of the warm tier if there is one, else straight into the
  device slot on CPU, or into a reused pinned staging buffer on CUDA, then copies.

The buffers a piece's bytes pass through, disk to slot, by I/O mode:

- ``buffered`` / ``dontneed``: page cache -> slot (CPU slot or host slot); on CUDA without a
  host tier, page cache -> pinned staging -> GPU slot.
- ``direct`` (``O_DIRECT``): disk -> pinned staging -> GPU slot on CUDA without a host tier;
  into a CPU or host slot, disk -> slot for the whole 4096-byte blocks when the slot's address
  and the file offset agree modulo 4096, and the partial blocks at its ends (or all of it, when
  they disagree, 8 MiB at a time: ``SCRATCH_BYTES``) disk -> scratch -> slot.
- with a host tier on CUDA, the host slot is filled as above, then one whole-slot copy -> GPU.

A piece the slot does not hold as the file does (transposed, another dtype; an int4 weight the slots hold
in the byte layout of this CPU's kernel, ``kernels.held_format``) lands in a staging buffer first and is
converted by the copy out of it: with ``direct`` the staging gives each piece room for its whole blocks
(``span``, ``staging_layout``), so the read fills it in place, with no scratch. Into a CPU or host slot one
piece at a time, ``SCRATCH_BYTES`` of its rows at a time (``row_parts``; an int4 weight's tiles whole), so a
reader thread's staging stays that size; on CUDA every piece of the expert at once, in pinned memory, as the
copies are queued together. A block of a slot tensor's rows (a gate or an up projection stored apart) is
read straight into the slot. ``io="mmap"`` on CPU reads nothing for an expert it can map: compute views the
page cache (``sources.MappedSource``); one it cannot map is read as ``buffered``.

On CUDA every copy goes on one side stream and records an event; ``Ticket.wait``
makes the compute stream wait on that event alone, so compute waits only for the
expert it is about to use and the host never waits for the device. The mover does
no bookkeeping: ``ExpertCache`` and ``HostTier`` decide which slot, on the calling
thread, and tell the mover where to put bytes.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import torch

from .errors import ExpertLoadError
from .formats import ExpertFormat
from .pinned import PinnedMemory
from .quant import convert_int4_tiles
from .safetensors_io import DIRECT_ALIGN, SCRATCH_BYTES, aligned_empty, span
from .store import ExpertStore, Piece

ALIGN = 64  # bytes; keeps each piece's region in a shared staging buffer aligned for any dtype


def staging_layout(pieces: list[Piece], align: int) -> tuple[list[tuple[int, int]], int]:
    """Where an expert's pieces go in a shared staging buffer: ``(start, room)`` of each one's region, and the
    bytes all of them need. A region holds the piece's whole ``align`` blocks (``safetensors_io.span``), so an
    ``O_DIRECT`` read fills it in place; each starts on a multiple of ``align`` and of ``ALIGN``."""
    step, regions, at = max(align, ALIGN), [], 0
    for piece in pieces:
        room = span(piece.offset, piece.nbytes, align)[1]
        regions.append((at, room))
        at += -(-room // step) * step
    return regions, at


def staging_bytes(store: ExpertStore) -> int:
    """Room for the largest expert's pieces laid out by ``staging_layout`` (CUDA: all of them are copied at once)."""
    align = store.reader.align
    return max((staging_layout(ps, align)[1] for ps in store.pieces.values()), default=0)


def land(store: ExpertStore, piece: Piece, region: torch.Tensor) -> torch.Tensor:
    """Read ``piece`` into ``region`` (its room in a staging buffer); the uint8 bytes, viewable as its dtype.

    With ``io="direct"`` the bytes land where their block puts them: in a checkpoint whose tensor starts
    are not multiples of their dtype's size, that address cannot be viewed as the dtype, so such a piece
    is read to the region's start instead (through the reader's scratch: one more copy, for odd files only)."""
    if piece.offset % store.reader.align % piece.dtype.itemsize:
        out = region[: piece.nbytes]
        store.read_piece(piece, out)
        return out
    return store.reader.read_span(piece.file, piece.offset, piece.nbytes, region)


def _source(data: torch.Tensor, piece: Piece) -> torch.Tensor:
    src = data.view(piece.dtype).view(piece.shape)
    return src.T if piece.transpose else src


def row_parts(piece: Piece, nbytes: int) -> list[tuple[Piece, slice]]:
    """``piece`` as consecutive blocks of its rows (its first dimension) of at most ``nbytes`` each (one row at
    least): each block as a piece of its own, and the rows it covers. A piece that fits is itself."""
    rows = piece.shape[0] if piece.shape else 1
    row_bytes = piece.nbytes // max(rows, 1)
    per = max(1, nbytes // max(row_bytes, 1))
    if rows <= per:
        return [(piece, slice(None))]
    return [(replace(piece, offset=piece.offset + r * row_bytes, nbytes=(min(r + per, rows) - r) * row_bytes,
                     shape=(min(r + per, rows) - r, *piece.shape[1:])), slice(r, min(r + per, rows)))
            for r in range(0, rows, per)]


@dataclass
class Transfer:
    """What one load moved, reported back to the compute thread for the statistics."""

    disk_bytes: int = 0
    disk_seconds: float = 0.0
    copy_bytes: int = 0  # host slot -> device slot
    copy_seconds: float = 0.0  # CPU copies; CUDA copies are timed with events
    events: tuple = ()  # CUDA (start, end) of the copy, for its duration
    done: "torch.cuda.Event | None" = None  # CUDA: recorded after the copy on the copy stream


@dataclass
class Ticket:
    """One expert on its way into a device slot."""

    future: Future
    started: float = field(default_factory=time.perf_counter)

    def finished(self) -> bool:
        """The host-side work is over (the copy may still be queued on the device)."""
        return self.future.done()

    def transfer(self, timeout: float | None = None) -> Transfer:
        """Block until the host-side work is over; raises what the reader raised, or TimeoutError."""
        return self.future.result(timeout)


class _Job:
    __slots__ = ("future", "fn", "args", "taken")

    def __init__(self, fn: Callable, args: tuple):
        self.future: Future = Future()
        self.fn, self.args, self.taken = fn, args, False


class ReaderPool:
    """Reader threads that take the most urgent read first: a load a layer waits for goes before prefetches.

    ``submit(..., urgent=False)`` queues a prefetch behind every urgent read; ``hurry(future)`` moves a
    queued prefetch to the front when a layer turns out to need it. Threads start on demand, up to
    ``workers``. ``shutdown`` cancels what has not started and, with ``wait``, joins the threads.
    """

    def __init__(self, workers: int, name: str = "offload-moe-reader"):
        self.workers, self.name = max(1, workers), name
        self._queue: list[tuple[int, int, _Job]] = []  # (0 urgent | 1 later, order, job)
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def submit(self, fn: Callable, *args, urgent: bool = True) -> Future:
        job = _Job(fn, args)
        job.future._offload_job = job  # for hurry()
        with self._cond:
            if self._closed:
                raise ExpertLoadError("the model's expert reader threads are closed (model.offload.close() was "
                                      "called); load the model again to use it")
            if self._idle == 0 and len(self._threads) < self.workers:
                thread = threading.Thread(target=self._work, name=f"{self.name}_{len(self._threads)}", daemon=True)
                thread.start()  # before the job is queued: if no thread can start, nothing is left behind
                self._threads.append(thread)
            heapq.heappush(self._queue, (0 if urgent else 1, next(self._order), job))
            self._cond.notify()
        return job.future

    def threads(self) -> list[threading.Thread]:
        """The reader threads started so far."""
        with self._cond:
            return list(self._threads)

    def hurry(self, future: Future) -> None:
        """Make a queued read urgent (its older queue entry is then skipped). Nothing if it already started."""
        job = getattr(future, "_offload_job", None)
        with self._cond:
            if job is None or job.taken or self._closed:
                return
            heapq.heappush(self._queue, (0, next(self._order), job))
            self._cond.notify()

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._idle += 1
                    self._cond.wait()
                    self._idle -= 1
                if not self._queue:
                    return
                job = heapq.heappop(self._queue)[2]
                if job.taken:  # the older entry of a hurried read, or a cancelled one
                    del job  # an idle thread must not keep a finished read's tensors alive
                    continue
                job.taken = True
            future, fn, args = job.future, job.fn, job.args
            job.fn = job.args = future._offload_job = None  # nothing here may keep a slot's tensors alive
            del job
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as e:  # handed to whoever waits on the load
                    future.set_exception(e)
                else:
                    future.set_result(result)
            del future, fn, args

    def shutdown(self, wait: bool = True, cancel_futures: bool = True) -> None:
        with self._cond:
            self._closed = True
            if cancel_futures:
                for _, _, job in self._queue:
                    if not job.taken:
                        job.taken = True
                        job.future.cancel()
                        job.fn = job.args = job.future._offload_job = None
                self._queue.clear()
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                if thread is not threading.current_thread():
                    thread.join()


def _done(value: Transfer) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class Mover:
    """Reads and copies on the CPU: ``readers`` threads for disk reads, copies inline. ``held``: the format the
    slots hold experts in, if not the store's (``kernels.held_format``: int4 in this CPU's kernel layout)."""

    def __init__(self, store: ExpertStore, readers: int = 2, held: ExpertFormat | None = None):
        self.store = store
        self.pool = ReaderPool(readers)
        self._local = threading.local()
        # int4 weights are rearranged into the slots' byte layout as they are read: None where it is the stored one
        converts = held is not None and held.kind == "int4" and held.int4_layout != store.format.int4_layout
        self._int4_layout = held.int4_layout if converts else None

    # -- the API the caches use ------------------------------------------------
    def from_disk(self, layer: int, expert: int, views: dict[str, torch.Tensor],
                  device_flat: torch.Tensor | None = None, host_flat: torch.Tensor | None = None,
                  urgent: bool = True) -> Ticket:
        """Read an expert into ``views`` (a host slot when ``device_flat`` is given, then copied there).

        A read that is not ``urgent`` (a prefetch) waits behind every urgent one."""
        return Ticket(self.pool.submit(self._read_then_copy, layer, expert, views, host_flat, device_flat,
                                       self._compute(), urgent=urgent))

    def hurry(self, ticket: Ticket) -> None:
        """A layer needs this load now: if its read has not started, it goes next."""
        self.pool.hurry(ticket.future)

    def from_host(self, host_flat: torch.Tensor, device_flat: torch.Tensor) -> Ticket:
        """Copy a whole host slot into a device slot."""
        return Ticket(_done(self._copy(host_flat, device_flat, self._compute())))

    def _compute(self):
        """The stream compute runs on, read on the calling thread (streams are per thread)."""
        return None

    def wait(self, ticket: Ticket, timeout: float | None = None) -> Transfer:
        """Make the expert usable by compute: wait for the host work (and, on CUDA, order the compute stream)."""
        return ticket.transfer(timeout)

    def landed(self, transfer: Transfer) -> bool:
        """The bytes are in the device slot (CPU: once the host work is over)."""
        return True

    def settle(self, transfer: Transfer) -> None:
        """Block until the bytes are in the device slot (CPU: they already are)."""

    def gpu_stall_seconds(self) -> float:
        return 0.0

    def gpu_copy_seconds(self) -> float:
        return 0.0

    def account(self, transfer: Transfer) -> None:
        """Note a landed transfer for the timing statistics (CUDA times copies with events)."""

    def close(self, wait: bool = True) -> None:
        """Stop the reader threads. ``wait=False`` when a read is stuck in the kernel: it cannot be
        interrupted, and its thread holds the buffers it writes into until it ends."""
        self.pool.shutdown(wait=wait, cancel_futures=True)

    # -- the work --------------------------------------------------------------
    def _read_then_copy(self, layer, expert, views, host_flat, device_flat, compute) -> Transfer:
        start = time.perf_counter()
        nbytes = self._read(layer, expert, views)
        t = Transfer(disk_bytes=nbytes, disk_seconds=time.perf_counter() - start)
        if device_flat is not None:
            copy = self._copy(host_flat, device_flat, compute)
            t.copy_bytes, t.copy_seconds, t.events, t.done = copy.copy_bytes, copy.copy_seconds, copy.events, copy.done
        return self._settled_if_closed(t)

    def _settled_if_closed(self, t: Transfer) -> Transfer:
        """A read that ends after ``close(wait=False)`` (it was stuck) waits for its own copy: nothing else
        will, and the pinned pages the copy reads are unlocked and unmapped once this thread lets go of them."""
        if t.done is not None and self.pool._closed:
            t.done.synchronize()
        return t

    def _read(self, layer: int, expert: int, views: dict[str, torch.Tensor]) -> int:
        """Read every piece of an expert into ``views`` (CPU tensors), converting dtype or layout if needed.

        A piece the slot holds as the file does (the whole tensor, or a block of its rows: a gate or an up
        projection stored apart) is read straight into it; any other lands in this thread's staging buffer (in
        place, with ``O_DIRECT``), ``SCRATCH_BYTES`` of its rows at a time, and is converted from there by one copy
        each (an int4 weight, whole, into the slots' byte layout: by one rearrangement of its bytes)."""
        total = 0
        for piece in self.store.expert_pieces(layer, expert):
            dest = views[piece.param][piece.index]
            if self._int4_layout is not None and piece.param.endswith(".qweight"):  # an int4 weight's tiles
                room = self._staging(span(piece.offset, piece.nbytes, self.store.reader.align)[1])
                convert_int4_tiles(_source(land(self.store, piece, room), piece), self._int4_layout, out=dest)
            elif not piece.transpose and piece.dtype == dest.dtype and dest.is_contiguous():
                self.store.read_piece(piece, dest)
            else:
                parts = row_parts(piece, SCRATCH_BYTES)
                for part, rows in parts:
                    room = self._staging(span(part.offset, part.nbytes, self.store.reader.align)[1])
                    # the source's rows are the slot tensor's columns when it is stored transposed
                    target = dest if len(parts) == 1 else dest[:, rows] if piece.transpose else dest[rows]
                    target.copy_(_source(land(self.store, part, room), part))
            total += piece.nbytes
        return total

    def _staging(self, nbytes: int) -> torch.Tensor:
        """This thread's staging buffer, of at least ``nbytes`` (``SCRATCH_BYTES`` of rows and their blocks)."""
        buf = getattr(self._local, "staging", None)
        if buf is None or buf.numel() < nbytes:
            buf = self._local.staging = aligned_empty(nbytes, DIRECT_ALIGN)
        return buf

    def _copy(self, host_flat: torch.Tensor, device_flat: torch.Tensor, compute=None) -> Transfer:
        start = time.perf_counter()
        device_flat.copy_(host_flat)
        return Transfer(copy_bytes=host_flat.numel() * host_flat.element_size(), copy_seconds=time.perf_counter() - start)


class CudaMover(Mover):
    """Device slots on a GPU: pinned staging per reader thread, copies on a side stream with one event each."""

    def __init__(self, store: ExpertStore, device: torch.device, readers: int = 2):
        super().__init__(store, readers)
        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self._stagings: list[torch.Tensor] = []  # every pinned buffer, freed on close
        self._pinned: list[PinnedMemory] = []  # their page locks, released on close
        self._lock = threading.Lock()
        self.stall_events: list[tuple] = []  # (before, after) wait events on the compute stream
        self._stall_folded = 0.0
        self.copy_events: list[tuple] = []  # (begin, end) of copies on the copy stream
        self._copy_folded = 0.0

    def from_disk(self, layer, expert, views, device_flat=None, host_flat=None, urgent=True) -> Ticket:
        if device_flat is None and next(iter(views.values())).is_cuda:  # no warm tier: disk -> pinned staging -> slot
            return Ticket(self.pool.submit(self._read_staged, layer, expert, views, self._compute(), urgent=urgent))
        return super().from_disk(layer, expert, views, device_flat, host_flat, urgent)

    def _compute(self):
        return torch.cuda.current_stream(self.device)

    def wait(self, ticket: Ticket, timeout: float | None = None) -> Transfer:
        t = ticket.transfer(timeout)
        if t.done is not None:
            compute = torch.cuda.current_stream(self.device)
            before, after = self._events()
            before.record(compute)
            compute.wait_event(t.done)  # GPU-side wait: no host sync
            after.record(compute)
            self.stall_events.append((before, after))
            if len(self.stall_events) > 1024:
                self._fold(block=False)
        return t

    def account(self, transfer: Transfer) -> None:
        if transfer.events:
            self.copy_events.append(transfer.events)
            if len(self.copy_events) > 1024:
                self._fold(block=False)

    def _fold(self, block: bool) -> None:
        """Add up the stall and copy times whose events have completed (all of them when ``block``)."""
        if block:
            torch.cuda.synchronize(self.device)
        self.stall_events, stalled = _elapsed(self.stall_events, block)
        self.copy_events, copied = _elapsed(self.copy_events, block)
        self._stall_folded += stalled
        self._copy_folded += copied

    def gpu_stall_seconds(self) -> float:
        """Time the compute stream spent waiting on copies (synchronises: for stats, not the hot path)."""
        self._fold(block=True)
        return self._stall_folded

    def gpu_copy_seconds(self) -> float:
        """Time the copy stream spent on host-to-device copies (synchronises: for stats, not the hot path)."""
        self._fold(block=True)
        return self._copy_folded

    def landed(self, transfer: Transfer) -> bool:
        return transfer.done is None or transfer.done.query()

    def settle(self, transfer: Transfer) -> None:
        if transfer.done is not None:
            transfer.done.synchronize()

    def _read_staged(self, layer: int, expert: int, views: dict[str, torch.Tensor], compute) -> Transfer:
        staging, previous = self._pinned_staging()
        if previous is not None:
            previous.synchronize()  # the copy that last read this thread's buffer has finished
        pieces = self.store.expert_pieces(layer, expert)
        start = time.perf_counter()
        regions, _ = staging_layout(pieces, self.store.reader.align)
        landed = [land(self.store, piece, staging[at : at + room]) for piece, (at, room) in zip(pieces, regions)]
        t = Transfer(disk_bytes=sum(p.nbytes for p in pieces), disk_seconds=time.perf_counter() - start)
        begin, end = self._events()
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(compute)  # kernels still reading the evicted expert's slot go first
            begin.record(self.stream)
            for piece, data in zip(pieces, landed):
                views[piece.param][piece.index].copy_(_source(data, piece), non_blocking=True)
            end.record(self.stream)
        self._local.event = end
        t.copy_bytes, t.events, t.done = t.disk_bytes, (begin, end), end
        return self._settled_if_closed(t)

    def _copy(self, host_flat: torch.Tensor, device_flat: torch.Tensor, compute=None) -> Transfer:
        begin, end = self._events()
        with torch.cuda.stream(self.stream):
            self.stream.wait_stream(compute)
            begin.record(self.stream)
            device_flat.copy_(host_flat, non_blocking=True)
            end.record(self.stream)
        return Transfer(copy_bytes=host_flat.numel() * host_flat.element_size(), events=(begin, end), done=end)

    def _events(self):
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def _pinned_staging(self):
        buf = getattr(self._local, "pinned", None)
        if buf is None:
            # room for every piece of the largest expert: all of them land before their copies are queued
            memory = PinnedMemory(max(staging_bytes(self.store), 1), "a reader thread's staging buffer",
                                  device=self.device)
            buf = self._local.pinned = memory.tensor
            with self._lock:
                self._stagings.append(buf)
                self._pinned.append(memory)
        return buf, getattr(self._local, "event", None)

    def close(self, wait: bool = True) -> None:
        super().close(wait)
        self.stream.synchronize()
        with self._lock:
            self._stagings.clear()
            if wait:  # else a reader stuck in the kernel may yet copy from its buffer: the locks go with the mover
                for memory in self._pinned:
                    memory.release()
                self._pinned.clear()


def _elapsed(pairs: list[tuple], block: bool) -> tuple[list[tuple], float]:
    """Sum the durations of the completed (start, end) event pairs; return the pending ones and the sum."""
    pending, total = [], 0.0
    for start, end in pairs:
        if block or end.query():
            total += start.elapsed_time(end) / 1000
        else:
            pending.append((start, end))
    return pending, total


class NullMover(Mover):
    """A mover that moves no bytes, for replaying a trace through the real ``ExpertCache``.

    With ``readers=0`` every ticket is done when it is issued: a prefetch has always landed by the
    time the next layer starts. With ``readers >= 1`` each load is an empty job on a ``ReaderPool``,
    queued, prioritised, hurried and cancelled as a real read is, so the cache meets the same races
    it meets live (a prefetch may still be in flight when its layer runs). Either way the counts are
    the same: the cache's books never depend on when a load lands.
    """

    def __init__(self, readers: int = 0):
        self.pool = ReaderPool(readers) if readers else None

    def from_disk(self, layer, expert, views, device_flat=None, host_flat=None, urgent=True) -> Ticket:
        if self.pool is None:
            return Ticket(_done(Transfer()))
        return Ticket(self.pool.submit(Transfer, urgent=urgent))

    def from_host(self, host_flat, device_flat) -> Ticket:
        return Ticket(_done(Transfer()))

    def hurry(self, ticket: Ticket) -> None:
        if self.pool is not None:
            self.pool.hurry(ticket.future)

    def close(self, wait: bool = True) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=wait, cancel_futures=True)


def make_mover(device: torch.device, store: ExpertStore, readers: int = 2, held: ExpertFormat | None = None) -> Mover:
    """The mover for ``device``, with ``readers`` disk-reader threads; ``held``: the slots' format, if not the store's
    (``kernels.held_format``, the CPU only)."""
    if device.type == "cuda":
        return CudaMover(store, device, readers)
    return Mover(store, readers, held)
