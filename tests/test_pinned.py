"""PinnedMemory: host memory locked to the page (not to the next power of two), unlocked on close or collection.

CUDA's registration calls are replaced by a recorder, so this runs without a GPU; tests/test_cuda.py checks
the real thing.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

import offload_moe
from offload_moe import pinned
from offload_moe.cache import SlotLayout, SlotPool
from offload_moe.pinned import PAGE, PinnedMemory
from offload_moe.safetensors_io import FileReader


class FakeCudart:
    def __init__(self, error: int = 0):
        self.error = error
        self.registered: dict[int, int] = {}
        self.unregistered: list[int] = []
        self.flags: list[int] = []

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int):
        self.flags.append(flags)
        if not self.error:
            assert ptr not in self.registered, "registered twice"
            self.registered[ptr] = nbytes
        return self.error

    def cudaHostUnregister(self, ptr: int):
        assert ptr in self.registered, "unregistered memory that was never registered"
        self.unregistered.append(ptr)
        return 0


@pytest.fixture
def cudart(monkeypatch):
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    return fake


def test_the_size_asked_for_is_locked_to_the_page_and_unlocked_once(cudart):
    nbytes = 24 * 2**20 + 10  # torch's pinned allocator would lock 32 MiB
    memory = PinnedMemory(nbytes)
    assert memory.registered and memory.tensor.numel() == nbytes and memory.tensor.dtype == torch.uint8
    (ptr, size), = cudart.registered.items()
    assert ptr == memory.tensor.data_ptr() and ptr % PAGE == 0 and size == 24 * 2**20 + PAGE
    memory.tensor[-1] = 7  # ordinary writable memory
    assert memory.tensor[-1] == 7
    memory.release()
    memory.release()
    assert cudart.unregistered == [ptr]
    assert cudart.flags == [1]  # cudaHostRegisterPortable: pinned for every GPU, not only the current one


def test_registered_on_the_gpu_it_serves(cudart, monkeypatch):
    """A reader thread's current device is GPU 0: registering there would make a context on GPU 0 for a model
    on another GPU. The device the memory serves is made current for the call."""
    import contextlib

    current = []

    @contextlib.contextmanager
    def device(d):
        current.append(d)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    memory = PinnedMemory(PAGE, device=torch.device("cuda", 1))
    pool = SlotPool(2, SlotLayout({"w": (4, 4)}, torch.float32), torch.device("cpu"), pin=torch.device("cuda", 1))
    assert memory.registered and pool.nbytes == 2 * 64 * 4  # slots are 64-element aligned
    assert current == [torch.device("cuda", 1)] * 2 and len(cudart.registered) == 2


def test_a_collected_buffer_is_unlocked(cudart):
    memory = PinnedMemory(3 * PAGE)
    ptr = memory.tensor.data_ptr()
    del memory
    gc.collect()
    assert cudart.unregistered == [ptr]


def test_a_refused_registration_falls_back_to_torchs_allocator_with_a_warning(monkeypatch, cudart):
    cudart.error = 2  # cudaErrorMemoryAllocation
    monkeypatch.setattr(pinned, "_torch_pinned", lambda nbytes, what: torch.empty(nbytes, dtype=torch.uint8))
    with pytest.warns(UserWarning, match="cudaHostRegister refused .* power of two"):
        memory = PinnedMemory(5 * PAGE, "test slots")
    assert not memory.registered and memory.tensor.numel() == 5 * PAGE
    memory.release()
    assert cudart.unregistered == []


def test_pinned_slot_pool_holds_exactly_its_slots(cudart):
    layout = SlotLayout({"gate_up_proj": (6, 4), "down_proj": (4, 3)}, torch.float32)
    pool = SlotPool(5, layout, torch.device("cpu"), pin=True)
    (ptr, size), = cudart.registered.items()
    assert pool.buffer.data_ptr() == ptr and pool.nbytes == 5 * layout.numel * 4 and size == PAGE
    pool.views(4)["down_proj"].fill_(1.5)
    assert pool.flat(4).view(torch.float32).sum() == 12 * 1.5  # a slot is bytes
    pool.release()
    assert cudart.unregistered == [ptr]
    SlotPool(5, layout, torch.device("cpu"))  # unpinned pools register nothing
    assert len(cudart.registered) == 1


def test_close_unlocks_the_host_tier(model_dir):
    model = offload_moe.load(model_dir("mixtral"), device="cpu", cache_experts=2, host_memory=3 * 18432,
                             progress=False)
    released = []
    model.offload.cache.host.pool.release = lambda: released.append(True)
    model.offload.close()
    assert released == [True]


class FakeRuntime:
    """The libcudart torch loaded: its per-thread last error, which cudaGetLastError returns and resets."""

    def __init__(self):
        self.last_error = 0

    def cudaGetLastError(self):
        error, self.last_error = self.last_error, 0
        return error


def test_a_refused_registration_leaves_no_cuda_error_behind(monkeypatch, cudart):
    """A failed cudaHostRegister stays the thread's last CUDA error, and torch's next kernel-launch check
    (cudaGetLastError) would raise it as its own. torch's cudart binding has cudaHostRegister but (like
    FakeCudart) no cudaGetLastError, so the error must be reset through the loaded runtime."""
    runtime = FakeRuntime()
    refuse = cudart.cudaHostRegister

    def register(ptr, nbytes, flags):
        runtime.last_error = refuse(ptr, nbytes, flags)
        return runtime.last_error

    cudart.error = 2  # cudaErrorMemoryAllocation
    monkeypatch.setattr(cudart, "cudaHostRegister", register)
    monkeypatch.setattr(pinned, "_loaded_cudart", lambda: runtime, raising=False)
    monkeypatch.setattr(pinned, "_torch_pinned", lambda nbytes, what: torch.empty(nbytes, dtype=torch.uint8))
    with pytest.warns(UserWarning, match="cudaHostRegister refused"):
        memory = PinnedMemory(PAGE)
    assert not memory.registered and runtime.last_error == 0


EXIT_ORDER = """
import weakref

import torch

from offload_moe import pinned


class Cudart:
    def cudaHostRegister(self, ptr, nbytes, flags):
        return 0

    def cudaHostUnregister(self, ptr):
        print("unregister", flush=True)
        return 0


cudart = Cudart()
torch.cuda.cudart = lambda: cudart


class Model:
    pass


def close():  # runtime._close: drain the copies in flight, then unlock
    print("drain", flush=True)
    staging.release()


model = Model()
weakref.finalize(model, close)  # made at load
staging = pinned.PinnedMemory(pinned.PAGE)  # made later, by a reader thread's first read
"""


@pytest.mark.slow
def test_at_exit_the_pages_are_unlocked_only_after_the_models_finalizer_drained_the_copies():
    """weakref.finalize runs the finalizers left at exit newest first: a staging buffer (made by a reader after
    the model's finalizer) was unlocked before that finalizer had waited for the copies reading it."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", EXIT_ORDER], capture_output=True, text=True, timeout=120,
                         cwd=Path(pinned.__file__).parent.parent)  # this checkout's offload_moe
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["drain", "unregister"]


class FakeEvent:
    def __init__(self):
        self.synchronized = False

    def record(self, stream=None):
        pass

    def synchronize(self):
        self.synchronized = True


class NoPieces:
    pieces: dict = {}
    reader = FileReader("buffered")

    def expert_pieces(self, layer, expert):
        return []


def cpu_cuda_mover(store, monkeypatch):
    """A CudaMover whose stream, events and page locking (a ``FakeCudart``) are faked: its staged path runs on the
    CPU. tests/test_bytes_path.py uses it too."""
    import contextlib
    import threading
    import types

    from offload_moe.transfer import CudaMover, Mover

    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    mover = Mover.__new__(CudaMover)
    Mover.__init__(mover, store, readers=1)
    mover.stream = types.SimpleNamespace(wait_stream=lambda compute: None, synchronize=lambda: None)
    mover._stagings, mover._pinned, mover._lock, mover.device = [], [], threading.Lock(), None
    event = types.SimpleNamespace(record=lambda stream=None: None, synchronize=lambda: None)
    mover._events = lambda: (event, event)
    return mover


def test_a_stuck_read_that_ends_after_close_waits_for_its_own_copy(monkeypatch):
    """close(wait=False) leaves a stuck read running. When it ends, its thread lets go of the mover (whose staging
    buffers are then unlocked and unmapped) and of the host slot's views: the copy it has just issued from them
    must have finished by then, since nothing else waits for it any more."""
    from offload_moe.transfer import Transfer

    mover = cpu_cuda_mover(NoPieces(), monkeypatch)
    staged, copied = [], []
    mover._events = lambda: (FakeEvent(), staged.append(FakeEvent()) or staged[-1])
    mover._copy = lambda host, device, compute=None: copied.append(FakeEvent()) or Transfer(done=copied[-1])
    slot = torch.empty(4)

    mover._read_staged(0, 0, {}, None)  # disk -> pinned staging -> device slot
    mover._read_then_copy(0, 1, {}, slot, slot, None)  # disk -> pinned host slot -> device slot
    assert not staged[0].synchronized and not copied[0].synchronized  # open: the layer waits on the event
    mover.close(wait=False)
    mover._read_staged(0, 2, {}, None)
    mover._read_then_copy(0, 3, {}, slot, slot, None)
    assert staged[1].synchronized and copied[1].synchronized
