"""Page-locked host memory of the size asked for, for asynchronous copies to a GPU.

torch's pinned allocator (``pin_memory=True``) rounds every allocation up to the next power of
two and keeps freed blocks pinned in its cache: ``host_memory="24GiB"`` would lock 32 GiB of RAM,
and keep it locked after the model is gone. ``PinnedMemory`` instead maps anonymous pages of the
size asked for (rounded to a page) and registers them with CUDA (``cudaHostRegister``).
``release()`` unregisters them: the pool's owner calls it on ``close()``, and a finalizer does if
the owner is collected first. The pages themselves go when the last tensor over them does.

Where registration is refused, it falls back to ``pin_memory=True`` (with its rounding) and warns.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import warnings
import weakref

import torch

from .errors import BudgetError

PAGE = mmap.PAGESIZE
PORTABLE = 1  # cudaHostRegisterPortable
_PRIVATE = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_ANONYMOUS") else {}


class PinnedMemory:
    """``nbytes`` of page-locked host memory as a uint8 tensor (``tensor``), unlocked by ``release()``."""

    def __init__(self, nbytes: int, what: str = "pinned host memory", device: torch.device | None = None):
        size = max(-(-nbytes // PAGE) * PAGE, PAGE)
        try:  # anonymous and private: page-aligned, zero-filled, ordinary process memory shared with nothing
            pages = mmap.mmap(-1, size, **_PRIVATE)
        except (OSError, ValueError, OverflowError) as e:
            raise BudgetError(f"could not map {size / 2**30:.2f} GiB for {what}: {e}. Lower the budget "
                              "(host_memory / cache_memory).") from None
        whole = torch.frombuffer(pages, dtype=torch.uint8)  # holds the mapping until the last view is gone
        with torch.cuda.device(device) if device is not None else contextlib.nullcontext():
            error = _register(whole.data_ptr(), size)  # on the GPU it serves: no context made on another one
        if error == 0:
            self.registered = True
            self.tensor = whole[:nbytes]
            self._finalizer = weakref.finalize(self, _unregister, whole.data_ptr())
            # not at interpreter exit: finalizers then run newest first, so a reader's staging buffer would be
            # unlocked before the model's own finalizer drains the copies reading it; the owner's close() (or
            # the process ending) unlocks it instead
            self._finalizer.atexit = False
            return
        del whole, pages
        warnings.warn(f"cudaHostRegister refused {size} bytes of {what} (error {error}); using torch's pinned allocator, "
                      "which rounds the allocation up to a power of two", stacklevel=3)
        self.registered = False
        self.tensor = _torch_pinned(nbytes, what)
        self._finalizer = None

    def release(self) -> None:
        """Unlock the pages now (no copy may still be reading them); the memory itself stays valid."""
        if self._finalizer is not None:
            self._finalizer()


def _register(ptr: int, nbytes: int) -> int | str:
    """0 once registered; else cudaHostRegister's error code, or why it could not be called."""
    try:
        error = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, PORTABLE)  # pinned for every GPU's context
    except (AttributeError, RuntimeError, TypeError) as e:  # a torch build without the binding, or no CUDA
        return f"{type(e).__name__}: {e}"
    code = int(getattr(error, "value", error))
    if code:  # reset CUDA's last error, so that it does not surface in a later, unrelated kernel check
        clear = getattr(torch.cuda.cudart(), "cudaGetLastError", None)
        if clear is None:  # torch's cudart binding may lack it: call the runtime torch loaded
            clear = getattr(_loaded_cudart(), "cudaGetLastError", None)
        if clear is not None:
            clear()
    return code


def _loaded_cudart():
    """The CUDA runtime library this process has loaded (torch's, shared), or None (linked statically, no /proc)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split(None, 5)[5].strip() for line in maps
                            if "/libcudart" in line})
    except OSError:
        return None
    for path in paths:
        try:
            return ctypes.CDLL(path)  # already loaded: the same library, so the same per-thread last error
        except OSError:
            continue
    return None


def _unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except (AttributeError, RuntimeError, TypeError):  # CUDA already torn down at interpreter exit
        pass


def _torch_pinned(nbytes: int, what: str) -> torch.Tensor:
    try:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    except (torch.OutOfMemoryError, RuntimeError) as e:
        raise BudgetError(f"could not allocate {nbytes / 2**30:.2f} GiB of {what}: {str(e).splitlines()[0]}. "
                          "Lower the budget (host_memory / cache_memory).") from None
