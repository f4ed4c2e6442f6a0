"""``model.offload``: the handle a user holds on a loaded model's expert cache."""

from __future__ import annotations

import functools
import inspect
import shutil
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from .cache import ExpertCache
from .prefetch import Prefetcher


class OffloadHandle:
    """``model.offload``: what both verbs (``load`` and ``offload_experts``) hand back, built by ``attach``.

    ``cache`` (the expert cache), ``prefetcher`` (None without prefetch), ``device`` and ``dtype`` (of the
    expert slots), ``layers`` (the MoE layers' dotted names), ``moe_layers`` (what ``attach`` was told of
    each: ``attach.MoELayer``), ``modules`` (the modules standing in for their experts), ``folder`` (where the experts' bytes are),
    ``name`` (the model's, for traces and messages), ``owned_folder`` (a folder ``offload_experts`` made for
    the experts, deleted on close; else None) and ``lock`` (held by ``forward``, ``generate`` and each layer).
    A context manager: leaving the ``with`` block closes it.
    """

    def __init__(self, model: nn.Module, cache: ExpertCache, prefetcher: Prefetcher | None, layers: Sequence,
                 modules: list[nn.Module], folder: Path, name: str, owned_folder: Path | None,
                 cleanups: list[Callable[[], None]]):
        self.cache = cache
        self.prefetcher = prefetcher
        self.device = cache.pool.device
        self.dtype = cache.pool.layout.dtype
        self.moe_layers = tuple(layers)
        self.layers = [layer.name for layer in layers]
        self.modules = modules
        self.total_experts = sum(layer.num_experts for layer in layers)
        self.folder = folder
        self.name = name
        self.owned_folder = owned_folder
        self.lock = cache.lock
        self.io_reason = ""  # why the store reads with its io (``attach`` sets it: memory.choose_io)
        self._finalizer = weakref.finalize(model, _close, cache, cleanups, owned_folder)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def store(self):
        return self.cache.store

    def stats(self) -> dict:
        """Counters since load (or the last ``reset_stats``): see docs/statistics.md. Among them hits,
        misses, evictions, bytes_loaded, capacity_experts, resident_bytes, and the same per layer under ``per_layer``."""
        out = self.cache.stats()
        requests = out["hits"] + out["misses"]
        pf = self.prefetcher
        out.update(
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            layers=self.num_layers,
            total_experts=self.total_experts,
            hit_rate=out["hits"] / requests if requests else 0.0,
            prefetch=pf.predictor.name if pf else "none",
            io_reason=self.io_reason,
            prediction_recall=pf.score.recall if pf else 0.0,
            prediction_precision=pf.score.precision if pf else 0.0,
        )
        return out

    def reset_stats(self) -> None:
        self.cache.reset_stats()
        if self.prefetcher is not None:
            self.prefetcher.reset()

    def close(self) -> None:
        """Release reader threads, file handles, mappings, pinned buffers and hooks now rather than when the model
        is collected, and delete the experts folder if ``offload_experts`` made it. Afterwards the model raises
        ``ModelClosedError`` wherever it would use its experts; a second ``close`` does nothing."""
        self._finalizer()

    def __enter__(self) -> OffloadHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


OffloadRuntime = OffloadHandle  # the names of the two handles before there was one
ExpertOffload = OffloadHandle


def serialise(model: nn.Module, cache: ExpertCache) -> None:
    """Make ``forward`` and ``generate`` take the cache's lock: calls from several threads run one after the
    other, so a generation's layers (and the prefetcher's predictions across them) never interleave with
    another's. The experts modules take the same lock for each layer, so calls into the inner model are safe
    too. After ``close`` both raise ``ModelClosedError`` before running anything."""
    lock = cache.lock
    for name in ("forward", "generate"):
        method = getattr(model, name, None)
        if method is None:
            continue
        # a weak reference to a bound method: the model holding a strong one to itself would be a cycle, freed
        # only by the cycle collector, on whichever thread it runs (a reader's, in the middle of a read)
        target = weakref.WeakMethod(method) if inspect.ismethod(method) else (lambda m=method: m)

        @functools.wraps(getattr(method, "__func__", method))  # __wrapped__ too must not be the bound method
        def locked(*args, __target=target, **kwargs):
            with lock:
                cache.check_open()
                return __target()(*args, **kwargs)

        locked.__signature__ = inspect.signature(method)  # the bound signature, without self, as before
        setattr(model, name, locked)


def _close(cache: ExpertCache, cleanups: Sequence[Callable[[], None]] = (), owned_folder: Path | None = None) -> None:
    """The one close of a model: its hooks removed, its cache closed, the folder made for its experts deleted."""
    if threading.current_thread() in cache.mover.pool.threads():
        # collected on one of its own reader threads, mid-read: draining there would wait for that very read
        threading.Thread(target=_close, args=(cache, cleanups, owned_folder), name="offload-moe-close",
                         daemon=True).start()
        return
    for cleanup in cleanups:
        cleanup()
    try:
        cache.close()
    finally:
        if owned_folder is not None:
            shutil.rmtree(owned_folder, ignore_errors=True)
