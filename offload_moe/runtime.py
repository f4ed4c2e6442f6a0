"""``model.offload``: the handle a user holds on a loaded model's expert cache."""

from __future__ import annotations

import functools
import inspect
import threading
import weakref
from pathlib import Path

import torch
from torch import nn

from .cache import ExpertCache
from .experts import OffloadedExperts
from .prefetch import Prefetcher


class OffloadHandle:
    """What both entry points (``load`` and ``offload_experts``) hand back as ``model.offload``.

    Subclasses set ``cache``, ``prefetcher``, ``device``, ``dtype``, ``num_layers``,
    ``total_experts`` and ``_finalizer``.
    """

    cache: ExpertCache
    prefetcher: Prefetcher | None
    device: torch.device
    dtype: torch.dtype
    num_layers: int
    total_experts: int
    _finalizer: weakref.finalize

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
            prediction_recall=pf.score.recall if pf else 0.0,
            prediction_precision=pf.score.precision if pf else 0.0,
        )
        return out

    def reset_stats(self) -> None:
        self.cache.reset_stats()
        if self.prefetcher is not None:
            self.prefetcher.reset()

    def close(self) -> None:
        """Release reader threads, file handles, mappings and pinned buffers now rather than when the model is
        collected. Afterwards the model raises ``ModelClosedError`` wherever it would use its experts; a second
        ``close`` does nothing."""
        self._finalizer()


class OffloadRuntime(OffloadHandle):
    """``model.offload`` of a model from ``offload_moe.load``: its expert cache, store and statistics."""

    def __init__(
        self,
        model: nn.Module,
        cache: ExpertCache,
        modules: list[OffloadedExperts],
        device: torch.device,
        dtype: torch.dtype,
        folder: Path,
        prefetcher: Prefetcher | None = None,
    ):
        self.cache = cache
        self.modules = modules
        self.device = device
        self.dtype = dtype
        self.folder = folder
        self.prefetcher = prefetcher
        self.num_layers = len(modules)
        self.total_experts = sum(m.num_experts for m in modules)
        self._finalizer = weakref.finalize(model, _close, cache)
        self.lock = cache.lock
        _serialise(model, cache)


def _serialise(model: nn.Module, cache: ExpertCache) -> None:
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


def _close(cache: ExpertCache) -> None:
    if threading.current_thread() in cache.mover.pool.threads():
        # collected on one of its own reader threads, mid-read: draining there would wait for that very read
        threading.Thread(target=cache.close, name="offload-moe-close", daemon=True).start()
        return
    cache.close()
