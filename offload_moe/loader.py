"""Build an offloaded model: empty skeleton, experts swapped, dense weights loaded, experts indexed.

The steps of ``load``:

1. read ``config.json`` and build the model on the meta device (no memory);
2. replace every routed-experts module with ``OffloadedExperts``;
3. index the checkpoint: routed experts stay on disk, everything else is dense;
4. read the dense weights one tensor at a time onto the compute device;
5. allocate the fixed pool of expert slots and attach the cache.

Nothing is written to the model folder, and on any error everything built so far is released.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from .cache import ExpertCache, HostTier, Residency, SlotLayout, SlotPool
from .config import Budget, check_io, check_read_timeout, check_within, format_bytes, parse_bytes, parse_device, parse_dtype, shown
from .errors import (
    BudgetError,
    CheckpointError,
    ConfigError,
    ModelPathError,
    UnsupportedModelError,
)
from .experts import OffloadedExperts, expert_params, find_experts_modules, layer_number
from .hardware import get_profile
from .model_config import REMOTE_CODE_HINT, check_config, checkpoint_size, read_config
from .policies import make_policy
from .prefetch import PREDICTORS, Prefetcher, make_predictor
from .runtime import OffloadRuntime
from .store import ExpertsSpec, ExpertStore
from .transfer import make_mover

log = logging.getLogger("offload_moe")

BUFFER_LIMIT = 2**30  # rotary tables are kilobytes; more is a config out of range

# Families with a parity test against transformers (tests/test_families.py).
SUPPORTED_FAMILIES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
    "glm4_moe", "phimoe", "granitemoe", "gpt_oss",
)


def resolve_model_path(path: str | Path) -> Path:
    """A local model folder; a hub id is looked up in the local Hugging Face cache only, never downloaded."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise ModelPathError(f"{folder} is not a model folder: it has no config.json")
        return folder
    if folder.exists():
        raise ModelPathError(f"{folder} is a file; pass the model folder that holds config.json and *.safetensors")
    if str(path).count("/") == 1 and not str(path).startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            cached = Path(snapshot_download(str(path), local_files_only=True))
            return resolve_model_path(cached)
        except Exception:
            raise ModelPathError(
                f"{path!r} is not a folder, and no copy of that hub model is in the local Hugging Face cache. "
                f"offload_moe never downloads: fetch it first (`hf download {path}`) and pass the folder"
            ) from None
    raise ModelPathError(f"{folder} does not exist; pass the folder of a model saved with save_pretrained")


def load_config(folder: Path, *, trust_remote_code: bool = False):
    """The transformers config of ``folder``: ``config.json`` read strictly and its values checked against the
    checkpoint first (see ``model_config``); code from the folder runs only with ``trust_remote_code``."""
    from transformers import AutoConfig

    data = read_config(folder, trust_remote_code)
    check_config(data, folder / "config.json", checkpoint_size(folder))
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises ValueError, TypeError, AttributeError... for a config it cannot take
        reason = " ".join(str(e).split())  # transformers' message spans lines; an error here is one line
        hint = f" {REMOTE_CODE_HINT}" if "trust_remote_code" in reason else ""
        raise UnsupportedModelError(f"{folder / 'config.json'} cannot be read by transformers: {reason}{hint}") from None


def build_skeleton(config, *, trust_remote_code: bool = False) -> nn.Module:
    """The model with every parameter and persistent buffer on the meta device: built there from the first
    tensor, so no size in the config allocates memory. Non-persistent buffers (rotary tables), which no
    checkpoint holds, are then computed on the CPU by transformers' own weight init, as its from_pretrained does."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import meta_device_safe_creation_ops

    try:
        with torch.device("meta"), meta_device_safe_creation_ops(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as e:  # no class for the model_type; with trust_remote_code, whatever the folder's code raises
        reason = " ".join(str(e).split())
        raise UnsupportedModelError(
            f"transformers cannot build a causal LM for model_type {config.model_type!r} ({reason}). "
            f"Supported families: {', '.join(SUPPORTED_FAMILIES)}"
        ) from None
    _compute_buffers(model)
    return model


def _compute_buffers(model: nn.Module) -> None:
    """Give each non-persistent buffer real memory and let the model's ``_init_weights`` compute it; one it
    leaves unset (still NaN) is refused rather than used with arbitrary values."""
    owners: dict[nn.Module, list[str]] = {}
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.is_meta:
                owners.setdefault(module, []).append(name)
    total = sum(module._buffers[n].nbytes for module, names in owners.items() for n in names)
    if total > BUFFER_LIMIT:
        raise UnsupportedModelError(f"{type(model).__name__} asks for {total:,} bytes of computed buffers (rotary "
                                    "tables...), more than such tables take; check the sizes in config.json")
    for module, names in owners.items():
        for name in names:
            buffer = module._buffers[name]
            module._buffers[name] = torch.full_like(buffer, math.nan, device="cpu") if buffer.is_floating_point() \
                else torch.zeros_like(buffer, device="cpu")
        model._init_weights(module)
        unset = [n for n in names if module._buffers[n].is_floating_point() and module._buffers[n].isnan().any()]
        if unset:
            raise UnsupportedModelError(f"{type(model).__name__}: transformers does not compute the buffer(s) "
                                        f"{', '.join(unset)} of {type(module).__name__} when building on the meta "
                                        "device, so offload_moe cannot build this model")


def swap_experts(model: nn.Module) -> list[OffloadedExperts]:
    """Replace each routed-experts module by an ``OffloadedExperts``; returns them in layer order."""
    found = find_experts_modules(model)
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} ({model.config.model_type}) has no routed-experts module in the "
            "transformers 5 experts layout, so there is nothing to offload. Supported families: "
            f"{', '.join(SUPPORTED_FAMILIES)}; other families decorated with use_experts_implementation "
            "should work too"
        )
    swapped = []
    for ordinal, (name, module) in enumerate(found):
        spec = ExpertsSpec(
            layer=layer_number(name, ordinal),
            prefix=name,
            num_experts=module.num_experts,
            shapes={n: tuple(p.shape[1:]) for n, p in expert_params(module).items()},
            is_transposed=bool(module.is_transposed),
            is_concatenated=bool(getattr(module, "is_concatenated", True)),
        )
        offloaded = OffloadedExperts(module, spec)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, offloaded)
        swapped.append(offloaded)
    return swapped


def find_routers(model: nn.Module, experts: Sequence[tuple[str, int]]) -> list[nn.Module | None]:
    """The router of each experts module, given as (module name, number of experts): its block's
    ``gate`` or ``router`` with an [E, H] weight (None if not found)."""
    routers = []
    for prefix, num_experts in experts:
        block = model.get_submodule(prefix.rpartition(".")[0])
        router = getattr(block, "gate", None) or getattr(block, "router", None)
        weight = getattr(router, "weight", None)
        ok = isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == num_experts
        routers.append(router if ok else None)
    return routers


def checkpoint_renamer(model: nn.Module) -> Callable[[str], str]:
    """Map checkpoint names to the model's parameter names with transformers' own renaming rules.

    Only renamings are applied (e.g. Mixtral's ``block_sparse_moe`` -> ``mlp``); the rules that
    fuse per-expert tensors are not, since the store reads experts one at a time instead.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # an older transformers: names are used as they are
        return lambda key: key
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    names = dict.fromkeys(_tensor_names(model), True)
    prefix = getattr(model, "base_model_prefix", None)
    return lambda key: rename_source_key(key, renamings, [], prefix, names)[0]


def _tensor_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]


def _keep_fp32(model: nn.Module) -> set[str]:
    return set(getattr(model, "_keep_in_fp32_modules", None) or []) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or []
    )


def load_dense(model: nn.Module, store: ExpertStore, device: torch.device, dtype: torch.dtype, progress: bool) -> None:
    """Read every non-expert tensor onto ``device``, one at a time, then tie weights and check nothing is missing."""
    from accelerate.utils import set_module_tensor_to_device

    expected = dict(model.named_parameters())
    expected.update(model.named_buffers())
    keep_fp32 = _keep_fp32(model) if dtype in (torch.float16, torch.bfloat16) else set()
    unexpected = []
    items = sorted(store.dense.items(), key=lambda kv: (str(kv[1].file), kv[1].offset))
    with _progress(progress, "dense weights", sum(info.nbytes for _, info in items)) as advance:
        for key, info in items:
            target = expected.get(key)
            if target is None:
                unexpected.append(info.name)
                continue
            if target.is_floating_point() != info.dtype.is_floating_point:
                raise CheckpointError(
                    f"{info.file}: tensor {info.name!r} has dtype {str(info.dtype).removeprefix('torch.')} but the "
                    f"model expects {str(target.dtype).removeprefix('torch.')}; the checkpoint is corrupted"
                )
            if tuple(target.shape) != info.shape:
                raise CheckpointError(
                    f"{info.file}: tensor {info.name!r} has shape {list(info.shape)} but the model built from "
                    f"config.json expects {list(target.shape)}; the checkpoint does not match its config"
                )
            value = store.read_dense(info)
            cast = torch.float32 if keep_fp32 and keep_fp32 & set(key.split(".")) else dtype
            set_module_tensor_to_device(model, key, device, value=value, dtype=cast if value.is_floating_point() else None)
            advance(info.nbytes)
    if unexpected:
        log.warning("ignored %d checkpoint tensors the model does not use, e.g. %s", len(unexpected), unexpected[:3])
    model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if missing:
        raise CheckpointError(
            f"{store.folder}: the checkpoint lacks {len(missing)} weight(s) the model needs, e.g. "
            f"{', '.join(missing[:5])}; a shard may be missing or the checkpoint may not match config.json"
        )
    for name, buf in list(model.named_buffers()):
        if buf.device != device:
            module_name, _, buf_name = name.rpartition(".")
            model.get_submodule(module_name)._buffers[buf_name] = buf.to(device)


def _progress(enabled: bool, what: str, total: int):
    from contextlib import contextmanager

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    @contextmanager
    def bar():
        console = Console(stderr=True)
        if enabled and not console.is_terminal:  # piped: a line when it starts and one when it is done
            yield from start_and_done_lines(console, f"loading {what}", format_bytes(total))
            return
        with Progress(
            TextColumn(f"[bold]loading {what}"), BarColumn(), DownloadColumn(binary_units=True), TimeRemainingColumn(),
            console=console, transient=True, disable=not (enabled and console.is_terminal),
        ) as p:
            task = p.add_task(what, total=total)
            yield lambda n: p.advance(task, n)

    return bar()


def start_and_done_lines(console, label: str, size: str):
    """What a progress bar shows, as two lines for a log (output that is not a terminal): the start, with
    ``size``, and the end, with the time taken. A generator for a contextmanager; yields a no-op advance."""
    console.print(f"{label} ({size})...", highlight=False, markup=False)
    start = time.perf_counter()
    yield lambda *n: None
    console.print(f"{label}: done in {time.perf_counter() - start:.1f} s", highlight=False, markup=False)


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
    *,
    device: str | torch.device | None = None,
    cache_experts: int | None = None,
    cache_memory: str | int | None = None,
    policy: str | None = None,
    dtype: str | torch.dtype | None = None,
    host_memory: str | int | None = None,
    host_policy: str = "lru",
    prefetch: str | None = None,
    prefetch_margin: int | None = None,
    prefetch_depth: int | None = None,
    readers: int = 2,
    io: str | None = None,
    read_timeout: float | None = 120.0,
    profile: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a Hugging Face MoE checkpoint with its routed experts offloaded to a device expert cache.

    Everything but the routed experts goes to ``device``; the experts stay in the
    checkpoint files and move into a fixed pool of slots on demand. The budget is
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
    ``profile`` (a name from ``profiles/`` or a TOML path) fills in the device, dtype, policy,
    host memory, prefetch settings, ``io`` and, through ``plan``, the number of slots, where they are
    not given.
    ``trust_remote_code=True`` lets transformers run Python code from the model folder (an ``auto_map``
    in config.json) to build an architecture it lacks; without it no code from the folder runs.
    Returns the transformers model; ``model.offload`` holds the runtime and its stats.
    """
    hw = get_profile(profile) if profile is not None else None
    dev = parse_device(device or (hw.device if hw else "cpu"))
    want_dtype = parse_dtype(dtype or (hw.dtype if hw else None))
    policy = policy or (hw.policy if hw and hw.policy else "lru")
    host_memory = host_memory if host_memory is not None else (hw.host_memory if hw else None)
    from_profile = prefetch is None and hw is not None and hw.prefetch is not None
    prefetch = (prefetch or (hw.prefetch if hw else None) or "none").lower()
    prefetch_margin = _first(prefetch_margin, hw.prefetch_margin if hw else None, 1)
    prefetch_depth = _first(prefetch_depth, hw.prefetch_depth if hw else None, 1)
    io = _first(io, hw.io if hw else None, "direct")
    make_policy(policy, seed=seed)  # fail on a bad name before reading anything
    make_policy(host_policy, seed=seed)
    if prefetch not in PREDICTORS:
        raise ConfigError(f"prefetch={prefetch!r} is not a predictor; use one of {', '.join(PREDICTORS)}")
    if readers < 1:
        raise ConfigError(f"readers={readers} must be at least 1")
    origin = f" (io='mmap' comes from hardware profile {hw.name!r})" if hw is not None and hw.io == "mmap" else ""
    check_io(io, host_memory=host_memory is not None, device=dev, origin=origin)
    check_read_timeout(read_timeout)
    for setting, value in (("cache_memory", cache_memory), ("host_memory", host_memory)):
        if value is not None:
            parse_bytes(value, setting)  # a malformed size fails before anything is read
    folder = resolve_model_path(path)
    if hw is not None and cache_experts is None and cache_memory is None:
        from .planning import plan

        cache_experts = plan(folder, device_memory=hw.device_memory, dtype=want_dtype,
                             trust_remote_code=trust_remote_code).expert_slots
    budget = Budget(cache_experts, cache_memory)
    config = load_config(folder, trust_remote_code=trust_remote_code)
    if want_dtype is None:
        want_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        want_dtype = parse_dtype(want_dtype)
    store = mover = model = None
    try:
        model = build_skeleton(config, trust_remote_code=trust_remote_code)
        modules = swap_experts(model)
        store = ExpertStore(folder, [m.spec for m in modules], rename=checkpoint_renamer(model), io=io)
        layout = SlotLayout(_shared_shapes(modules), want_dtype)
        total_experts = sum(m.num_experts for m in modules)
        dense_bytes = sum(info.nbytes for info in store.dense.values())
        capacity = budget.slots(layout.nbytes, total_experts, default_cache_bytes(dev, dense_bytes), dev)
        if capacity >= total_experts:  # every expert has a device slot: a host tier would only copy them twice
            host_memory = None
        host = _host_tier(host_memory, host_policy, seed, layout, total_experts, dev)
        load_dense(model, store, dev, want_dtype, progress)
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
        if store is not None:
            store.close()
        del model
        raise
    model.eval()
    model.offload = OffloadRuntime(model, cache, modules, dev, want_dtype, folder, prefetcher)
    return model


def _first(*values):
    """The first value that is not None."""
    return next(v for v in values if v is not None)


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
