"""One runtime assembly under both verbs: slots, tiers, mover, cache, prefetcher, fill, lock and handle.

``load`` (a checkpoint) and ``offload_experts`` (a model already built) differ only in how they find the MoE
layers and where the experts' bytes are. Each then calls ``attach`` with what it found (``MoELayer``), the
store of the bytes and the ``OffloadConfig``, and gets back the one ``OffloadHandle`` that is
``model.offload``. Every setting is checked and every buffer allocated before the model changes
(``install``); on any error everything built so far is released, the store and a folder it owns included.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from . import memory
from .cache import ExpertCache, HostTier, Residency, SlotLayout, SlotPool
from .config import MIN_CACHE_EXPERTS, Budget, OffloadConfig, check_within, format_bytes, parse_bytes, shown
from .errors import BudgetError, ConfigError, UnsupportedModelError
from .kernels import Scratch, held_format, prepare_cpu_kernels, route_dense_linears
from .memory import IoChoice, MemoryRoom, choose_io
from .policies import make_policy, reads_tokens
from .planning import device_slots, host_slots, kv_reserve, workspace_bytes
from .prefetch import Predictor, Prefetcher, make_predictor
from .progress import progress_bar
from .runtime import OffloadHandle, serialise
from .transfer import make_mover


@dataclass(frozen=True)
class MoELayer:
    """One MoE layer as a verb found it: its cache layer id, the dotted names of the layer and of its experts
    container (``where``, for messages), its experts, their tensor shapes (leading expert dimension removed),
    its router (for the ``gate`` predictor; None if it has none) and the layer module."""

    layer: int
    name: str
    where: str
    num_experts: int
    shapes: dict[str, tuple[int, ...]]
    router: nn.Module | None
    block: nn.Module | None = None


def shared_shapes(layers: Sequence[MoELayer]) -> dict[str, tuple[int, ...]]:
    """The expert tensor shapes every layer shares; a layer of another size is refused, naming both."""
    first = layers[0]
    for layer in layers[1:]:
        if layer.shapes != first.shapes:
            raise UnsupportedModelError(
                f"{layer.where} has expert tensors {layer.shapes}, unlike {first.where} ({first.shapes}); the expert "
                "cache holds one expert size per model (with offload_experts, offload layers of one size per call: "
                "layers=[...])"
            )
    return first.shapes


def default_cache_bytes(device: torch.device, dense_bytes: int, room: MemoryRoom | None = None) -> int:
    """Without a budget: half of what is free on the device after the dense weights (on the CPU: of what this
    process may use, a memory cgroup's limit included: ``room``, by default ``memory.memory_room()``)."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = (memory.memory_room() if room is None else room).available
    return max(0, free // 2 - dense_bytes)


@dataclass(frozen=True)
class Assembly:
    """What ``attach`` will build, every setting checked and nothing allocated yet (``check_assembly``)."""

    layers: tuple[MoELayer, ...]
    config: OffloadConfig
    layout: SlotLayout
    capacity: int  # device slots
    host_slots: int  # 0: no host tier
    predictor: Predictor | None
    io: IoChoice  # the read mode (``config.io``, or what ``auto`` chose) and why

    @property
    def total_experts(self) -> int:
        return sum(layer.num_experts for layer in self.layers)


def check_assembly(layers: Sequence[MoELayer], config: OffloadConfig, *, dtype: torch.dtype, dense_bytes: int,
                   top_k: int, layout: SlotLayout | None = None, model_config=None) -> Assembly:
    """Check what an expert cache for ``layers`` under ``config`` needs, before any file is written or buffer
    allocated: one expert size (slots of ``dtype``), the device slots (``cache_experts`` or ``cache_memory``; else what
    ``device_memory`` leaves beside ``dense_bytes`` and the KV cache of the model ``model_config`` describes, as
    ``plan`` counts: ``_device_capacity``; else half the free memory after ``dense_bytes``), the predictor (``top_k`` experts
    a token), the host tier's slots (``config.host_memory``; none when the device slots hold every expert), the
    read mode (``io="auto"`` chooses one from the memory the process may use: ``memory.choose_io``). ``layout`` is
    the slots' layout when a store knows it (packed experts); by default the layers' shapes in ``dtype``."""
    shapes = shared_shapes(layers)
    layout = layout or SlotLayout(shapes, dtype)
    total = sum(layer.num_experts for layer in layers)
    dev = config.device
    budget = Budget(config.cache_experts, config.cache_memory)
    planned = config.device_memory is not None and budget == Budget()
    # the memory this process may use, read once for both that may need it: the default budget and io="auto"
    needs_room = (budget == Budget() and not planned) or config.io == "auto"
    room = memory.memory_room() if dev.type == "cpu" and needs_room else None
    if planned:
        capacity = _device_capacity(config.device_memory, layout, total, dense_bytes,
                                    kv_reserve(model_config, dtype).nbytes, dev)
    else:
        default = default_cache_bytes(dev, dense_bytes, room) if budget == Budget() else 0  # unread with a budget
        capacity = budget.slots(layout.nbytes, total, default, dev)
    predictor = _predictor(config, layers, top_k)
    host_slots = _host_slots(config.host_memory, layout, total, capacity)
    io = choose_io(config.io, device=dev, experts_bytes=total * layout.nbytes, slots_bytes=capacity * layout.nbytes,
                   dense_bytes=dense_bytes, host_tier=host_slots > 0, room=room)
    return Assembly(tuple(layers), config, layout, capacity, host_slots, predictor, io)


def _device_capacity(device_memory, layout: SlotLayout, total: int, dense_bytes: int, kv_bytes: int,
                     device: torch.device) -> int:
    """The device slots ``device_memory`` (a budget for the whole model, a profile's) leaves after the dense
    weights, a KV cache of ``kv_bytes`` and a workspace: ``planning.device_slots``, the rule ``plan`` counts by. Too
    few slots, or more slot bytes than the machine has, are refused naming ``device_memory``."""
    nbytes = parse_bytes(device_memory, "device_memory")
    capacity = device_slots(nbytes, dense_bytes, kv_bytes, layout.nbytes, total)
    setting = f"device_memory={shown(device_memory)}"
    if capacity < MIN_CACHE_EXPERTS:
        raise BudgetError(
            f"{setting} leaves room for {capacity} expert slot(s) of {format_bytes(layout.nbytes)} each after the "
            f"dense weights ({format_bytes(dense_bytes)}), a KV cache ({format_bytes(kv_bytes)}) and a workspace "
            f"({format_bytes(workspace_bytes(nbytes))}); offload_moe needs at least {MIN_CACHE_EXPERTS} (one computing "
            "while the next loads). Raise it, or give cache_experts or cache_memory."
        )
    check_within(capacity * layout.nbytes, f"{setting} (its {capacity} expert slots)", device)
    return capacity


def attach(model: nn.Module, assembly: Assembly, store, *, install: Callable[[], list], folder: Path, name: str,
           owned_folder: Path | None = None, progress: bool = False) -> OffloadHandle:
    """Give ``model`` the expert cache ``assembly`` describes, over ``store``; return its handle (also
    ``model.offload``, unless the model has such an attribute already).

    Builds the host tier, the mover, the cache (device slots, ``read_timeout``) and the prefetcher; then
    ``install()`` changes the model (dense weights onto the device, experts containers swapped) and returns
    the layers' stand-ins in the order of ``assembly.layers``; each gets the cache and the prefetcher. A
    tier that holds every expert is filled here. ``forward`` and ``generate`` take the cache's lock.
    ``store`` (and ``owned_folder``, a folder made for it) belong to the handle from here on: closed with
    the model, or here on an error. int4 experts on a CPU whose torch kernel reads another byte layout are held in
    that one (``kernels.held_format``): the mover converts each as it fills a slot, and none computes from a mapping.
    On the CPU the model's dense bf16 ``nn.Linear`` layers compute through ``kernels.dense_linear`` too, until the
    handle closes (``kernels.route_dense_linears``).
    """
    config, layers, layout, total = assembly.config, assembly.layers, assembly.layout, assembly.total_experts
    dev, predictor = config.device, assembly.predictor
    held = held_format(layout.format, layout.shapes, dev)
    if held != layout.format:
        layout = replace(layout, format=held)
    mover = cache = host = None
    cleanups: list[Callable[[], object]] = []  # hooks on the model: removed by the handle, or here on an error
    try:
        if assembly.host_slots:
            host = HostTier(Residency(assembly.host_slots, make_policy(config.host_policy, seed=config.seed)),
                            SlotPool(assembly.host_slots, layout, torch.device("cpu"),
                                     pin=dev if dev.type == "cuda" else False))
        mover = make_mover(dev, store, config.readers, held)
        cache = ExpertCache(Residency(assembly.capacity, make_policy(config.policy, seed=config.seed)),
                            SlotPool(assembly.capacity, layout, dev), store, mover, host,
                            {layer.layer: layer.where for layer in layers}, read_timeout=config.read_timeout)
        prefetcher = Prefetcher(predictor, [layer.layer for layer in layers], cache) if predictor else None
        stand_ins = install()
        scratch = Scratch()  # the model's one dequantization buffer: its layers run one at a time, on one stream
        for pos, stand_in in enumerate(stand_ins):
            stand_in.cache, stand_in.prefetcher, stand_in.pos = cache, prefetcher, pos
            if isinstance(getattr(getattr(stand_in, "kernel", None), "scratch", None), Scratch):  # kernels of packed weights
                stand_in.kernel.scratch = scratch
        dense = {n: shape for n, shape in layout.shapes.items() if n not in layout.packed}
        prepare_cpu_kernels([getattr(s, "kernel", None) for s in stand_ins], dense, layout.dtype, dev)
        modules = [s if isinstance(s, nn.Module) else s.module for s in stand_ins]
        cleanups.append(route_dense_linears(model, skip=modules, device=dev))  # attention, shared experts, lm_head
        cleanups.append(_count_tokens(layers, cache))
        cleanups.append(_tell_tokens(model, cache))
        bind = getattr(predictor, "bind", None)
        if bind is not None:
            cleanups.append(bind(prefetcher))
        keys = [(layer.layer, e) for layer in layers for e in range(layer.num_experts)]
        if host is not None and assembly.host_slots >= total:
            fill_host_tier(cache, keys, progress)
        if assembly.capacity >= total:
            fill_device_cache(cache, keys, progress)
    except BaseException:
        for cleanup in cleanups:
            cleanup()
        _release(cache, mover, host, store, owned_folder)
        raise
    handle = OffloadHandle(model, cache, prefetcher, layers, modules, folder, name, owned_folder, cleanups)
    handle.io_reason = assembly.io.reason
    if held != assembly.layout.format and assembly.io.io == "mmap":
        handle.io_reason += (f"; int4 experts are converted into this CPU's kernel layout ({held.int4_layout.name}) as "
                             "they fill slots, so they are read into slots, not computed from the mapping")
    serialise(model, cache)
    if getattr(model, "offload", None) is None:
        model.offload = handle
    return handle


def fill_host_tier(cache: ExpertCache, keys: list[tuple[int, int]], progress: bool) -> None:
    """Read every expert from disk into the warm tier once (it holds them all), with a progress bar."""
    with progress_bar(progress, "loading experts into host memory", len(keys) * cache.pool.layout.nbytes) as advance:
        cache.fill_host(keys, advance)


def fill_device_cache(cache: ExpertCache, keys: list[tuple[int, int]], progress: bool) -> None:
    """Load every expert into the device slots once (they hold them all), with a progress bar."""
    with progress_bar(progress, "loading experts into the expert cache", len(keys) * cache.pool.layout.nbytes) as advance:
        cache.fill(keys, advance)


def _predictor(config: OffloadConfig, layers: Sequence[MoELayer], top_k: int) -> Predictor | None:
    if isinstance(config.prefetch, Predictor):
        return config.prefetch
    if config.prefetch == "none":
        return None
    try:
        return make_predictor(config.prefetch, routers=[layer.router for layer in layers],
                              num_experts=layers[0].num_experts, top_k=top_k,
                              margin=config.prefetch_margin, depth=config.prefetch_depth)
    except ConfigError as e:
        if not config.prefetch_from_profile():
            raise
        raise ConfigError(f"{e} (prefetch={config.prefetch!r} comes from hardware profile {config.profile.name!r}; "
                          "pass prefetch='none' to override it)") from None


def _host_slots(host_memory, layout: SlotLayout, total: int, capacity: int) -> int:
    """The host tier's slots (``planning.host_slots``, as ``plan`` counts them); a budget this machine's RAM cannot
    hold, or one that holds no expert where a host tier is built, is refused."""
    if host_memory is None:
        return 0
    nbytes = parse_bytes(host_memory, "host_memory")
    slots = host_slots(nbytes, layout.nbytes, total, capacity)
    if capacity < total:
        check_within(nbytes, f"host_memory={shown(host_memory)}", torch.device("cpu"))
        if slots < 1:
            raise BudgetError(f"host_memory={shown(host_memory)} holds no expert of {layout.nbytes} bytes; raise it or leave it out")
    return slots


def _tell_tokens(model: nn.Module, cache: ExpertCache) -> Callable[[], None]:
    """Name each forward step's token ids to a policy that reads them (``token-forecast``): a forward pre-hook on
    the model, reading ``input_ids`` (one row; None for several rows, or a step given embeddings)."""
    policy = cache.residency.policy
    if not reads_tokens(policy):
        return lambda: None

    def tell(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        tokens = None
        if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[0] == 1 and not ids.is_floating_point():
            tokens = ids[0].tolist()
        with cache.lock:
            policy.on_tokens(tokens)

    return model.register_forward_pre_hook(tell, with_kwargs=True).remove


def _count_tokens(layers: Sequence[MoELayer], cache: ExpertCache) -> Callable[[], None]:
    """Count the tokens entering the first MoE layer of each stack (encoder, decoder...) for ``stats()['tokens']``:
    the one place tokens are counted, under both verbs (a forward pre-hook on the layer's block)."""
    def count(module, args, kwargs):
        hidden = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if isinstance(hidden, torch.Tensor) and hidden.dim() >= 1:
            with cache.lock:
                cache.flow.tokens += hidden.numel() // hidden.shape[-1]

    handles, stacks = [], set()
    for layer in layers:
        stack = _stack(layer.name)
        if stack in stacks:
            continue
        stacks.add(stack)
        if layer.block is not None:
            handles.append(layer.block.register_forward_pre_hook(count, with_kwargs=True))
    return lambda: [h.remove() for h in handles]


def _stack(name: str) -> str:
    """``encoder.block`` of ``encoder.block.3.layer.1.mlp``: the part before the first layer number."""
    return re.split(r"(?:^|\.)\d+(?:\.|$)", name, maxsplit=1)[0]


def _release(cache: ExpertCache | None, mover, host: HostTier | None, store, owned_folder: Path | None) -> None:
    """Undo a half-built assembly: reader threads, pinned host slots, the store's files, a folder made for it."""
    try:
        if cache is not None:
            cache.close()  # the mover, the store and the host pool with it
        else:
            if mover is not None:
                mover.close()
            if host is not None:
                host.pool.release()
            store.close()
    finally:
        if owned_folder is not None:
            shutil.rmtree(owned_folder, ignore_errors=True)
