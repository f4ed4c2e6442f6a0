"""Build an offloaded model: the checkpoint opened, dense weights loaded, expert slots attached.

The steps of ``load``:

1. open the checkpoint (``checkpoint.open_checkpoint``): read ``config.json``, build the model on the meta
   device (no memory), replace every routed-experts module with ``OffloadedExperts`` and index the files:
   routed experts stay on disk, everything else is dense;
2. read the dense weights one tensor at a time onto the compute device;
3. allocate the fixed pool of expert slots and attach the cache.

Nothing is written to the model folder, and on any error everything built so far is released.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from .cache import ExpertCache, HostTier, Residency, SlotLayout, SlotPool
from .checkpoint import (  # noqa: F401  (build_skeleton... stay importable from offload_moe.loader)
    SUPPORTED_FAMILIES,
    build_skeleton,
    checkpoint_renamer,
    load_config,
    load_dense,
    open_checkpoint,
    resolve_model_path,
    swap_experts,
)
from .config import Budget, OffloadConfig, check_within, configure, parse_bytes, parse_dtype, shown
from .errors import BudgetError, ConfigError, UnsupportedModelError
from .experts import OffloadedExperts
from .planning import plan_checkpoint
from .policies import make_policy
from .prefetch import Predictor, Prefetcher, make_predictor
from .progress import progress_bar as _progress
from .progress import start_and_done_lines  # noqa: F401  (the CLI's piped progress lines import it from here)
from .routing import find_routers
from .runtime import OffloadRuntime
from .transfer import make_mover

log = logging.getLogger("offload_moe")


def default_cache_bytes(device: torch.device, dense_bytes: int) -> int:
    """Without a budget: half of what is free on the device after the dense weights."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        import psutil

        free = psutil.virtual_memory().available
    return max(0, free // 2 - dense_bytes)


def load(
    path: str | Path,
    config: OffloadConfig | None = None,
    *,
    progress: bool = True,
    trust_remote_code: bool = False,
    **overrides,
) -> nn.Module:
    """Load a Hugging Face MoE checkpoint with its routed experts offloaded to a device expert cache.

    Everything but the routed experts goes to ``device``; the experts stay in the
    checkpoint files and move into a fixed pool of slots on demand. The settings are an
    ``OffloadConfig`` (``config``), keyword arguments (``device="cuda", cache_memory="6GiB"``),
    or both: keyword arguments override the config's fields. An unknown keyword is a ConfigError.
    The budget is
    ``cache_experts`` (a number of experts, across all layers) or ``cache_memory``
    (bytes or a string such as ``"6GiB"``); without either, half the free memory.
    ``policy`` is the eviction policy (``lru``, ``lfu``, ``fifo``, ``random``).
    ``host_memory`` adds a warm tier of (pinned, on CUDA) host RAM between the device
    slots and the disk, with its own ``host_policy``; when it holds every expert it is
    filled at load. ``prefetch`` picks the predictor that starts loads for the next
    ``prefetch_depth`` layers (default 1; ``gate``, ``transition``, ``hybrid`` or ``none``, the default), naming
    top-k plus ``prefetch_margin`` (default 1) experts. Prefetch raises the hit rate but moves more bytes (wrong guesses
    are loaded too); measure it on your model with ``benchmarks/prefetch_recall.py``. ``readers`` threads read the disk; ``io`` is ``direct``
    (O_DIRECT, else dropping read pages; the default), ``dontneed``, ``buffered`` (page cache) or,
    on CPU only, ``mmap``: an expert missing from the slots is computed in place from the mapped
    checkpoint, with no copy, and the kernel's page cache (memory it can reclaim, beyond the budget)
    keeps what it read; prefetch then asks the kernel to read ahead rather than filling slots.
    A layer waits at most ``read_timeout`` seconds for one expert, then raises ExpertLoadError.
    ``profile=`` (a name from ``profiles/`` or a TOML path; instead of ``config``) fills in the device, dtype,
    policy, host memory, prefetch settings, ``io`` and, through ``plan``, the number of slots, where they are
    not given (``OffloadConfig.from_profile``).
    ``trust_remote_code=True`` lets transformers run Python code from the model folder (an ``auto_map``
    in config.json) to build an architecture it lacks; without it no code from the folder runs.
    Returns the transformers model; ``model.offload`` holds the runtime and its stats.
    """
    settings = configure(config, overrides, "load", ("progress", "trust_remote_code"))
    if isinstance(settings.prefetch, Predictor):
        raise ConfigError("load takes prefetch as a predictor name (none, gate, transition, hybrid); a Predictor "
                          "object works with offload_experts")
    hw, dev, want_dtype = settings.profile, settings.device, settings.dtype
    policy, host_policy, seed = settings.policy, settings.host_policy, settings.seed
    cache_experts, cache_memory, host_memory = settings.cache_experts, settings.cache_memory, settings.host_memory
    prefetch, prefetch_margin, prefetch_depth = settings.prefetch, settings.prefetch_margin, settings.prefetch_depth
    from_profile = settings.prefetch_from_profile()
    io, readers, read_timeout = settings.io, settings.readers, settings.read_timeout
    ckpt = mover = None
    try:
        ckpt = open_checkpoint(path, trust_remote_code=trust_remote_code, io=io)
        folder, config, model, modules, store = ckpt.folder, ckpt.config, ckpt.model, ckpt.modules, ckpt.store
        if settings.device_memory is not None and cache_experts is None and cache_memory is None:
            cache_experts = plan_checkpoint(ckpt, device_memory=settings.device_memory, dtype=want_dtype).expert_slots
        budget = Budget(cache_experts, cache_memory)
        if want_dtype is None:
            want_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
            want_dtype = parse_dtype(want_dtype)
        layout = SlotLayout(_shared_shapes(modules), want_dtype)
        total_experts = sum(m.num_experts for m in modules)
        dense_bytes = ckpt.dense_bytes()
        capacity = budget.slots(layout.nbytes, total_experts, default_cache_bytes(dev, dense_bytes), dev)
        if capacity >= total_experts:  # every expert has a device slot: a host tier would only copy them twice
            host_memory = None
        host = _host_tier(host_memory, host_policy, seed, layout, total_experts, dev)
        ckpt.load_dense(dev, want_dtype, progress)
        mover = make_mover(dev, store, readers)
        cache = ExpertCache(
            Residency(capacity, make_policy(policy, seed=seed)),
            SlotPool(capacity, layout, dev),
            store,
            mover,
            host,
            {m.layer: m.spec.prefix for m in modules},
        )
        cache.read_timeout = read_timeout
        try:
            predictor = make_predictor(prefetch, routers=find_routers(model, [(m.spec.prefix, m.num_experts) for m in modules]),
                                       num_experts=modules[0].num_experts,
                                       top_k=int(getattr(config, "num_experts_per_tok", 2) or 2),
                                       margin=prefetch_margin, depth=prefetch_depth)
        except ConfigError as e:
            if not from_profile:
                raise
            raise ConfigError(f"{e} (prefetch={prefetch!r} comes from hardware profile {hw.name!r}; "
                              "pass prefetch='none' to override it)") from None
        prefetcher = Prefetcher(predictor, [m.layer for m in modules], cache) if prefetch != "none" else None
        for pos, m in enumerate(modules):
            m.cache, m.prefetcher, m.pos = cache, prefetcher, pos
        if host is not None and host.residency.capacity >= total_experts:
            fill_host_tier(cache, modules, progress)
        if capacity >= total_experts:
            fill_device_cache(cache, modules, progress)
    except BaseException:
        if mover is not None:
            mover.close()
        if ckpt is not None:
            ckpt.close()
        ckpt = model = None  # the traceback keeps this frame: it must not keep the weights read so far
        raise
    model.eval()
    model.offload = OffloadRuntime(model, cache, modules, dev, want_dtype, folder, prefetcher)
    return model


def _host_tier(host_memory, host_policy: str, seed: int, layout: SlotLayout, total_experts: int,
               device: torch.device) -> HostTier | None:
    if host_memory is None:
        return None
    nbytes = parse_bytes(host_memory, "host_memory")
    check_within(nbytes, f"host_memory={shown(host_memory)}", torch.device("cpu"))
    slots = min(total_experts, nbytes // layout.nbytes)
    if slots < 1:
        raise BudgetError(f"host_memory={shown(host_memory)} holds no expert of {layout.nbytes} bytes; raise it or leave it out")
    pin = device if device.type == "cuda" else False
    return HostTier(Residency(slots, make_policy(host_policy, seed=seed)), SlotPool(slots, layout, torch.device("cpu"), pin=pin))


def fill_host_tier(cache: ExpertCache, modules: list[OffloadedExperts], progress: bool) -> None:
    """Read every expert from disk into the warm tier once (it holds them all), with a progress bar."""
    keys = _every_expert(modules)
    with _progress(progress, "experts into host memory", len(keys) * cache.pool.layout.nbytes) as advance:
        cache.fill_host(keys, advance)


def fill_device_cache(cache: ExpertCache, modules: list[OffloadedExperts], progress: bool) -> None:
    """Load every expert into the device slots once (they hold them all), with a progress bar."""
    keys = _every_expert(modules)
    with _progress(progress, "experts into the expert cache", len(keys) * cache.pool.layout.nbytes) as advance:
        cache.fill(keys, advance)


def _every_expert(modules: list[OffloadedExperts]) -> list[tuple[int, int]]:
    return [(m.layer, e) for m in modules for e in range(m.num_experts)]


def _shared_shapes(modules: list[OffloadedExperts]) -> dict[str, tuple[int, ...]]:
    shapes = modules[0].spec.shapes
    for m in modules[1:]:
        if m.spec.shapes != shapes:
            raise UnsupportedModelError(
                f"{m.spec.prefix} has expert shapes {m.spec.shapes}, unlike {modules[0].spec.prefix} "
                f"({shapes}); offload_moe needs one expert size for the whole model"
            )
    return shapes
