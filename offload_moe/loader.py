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

from .attach import MoELayer, attach, check_assembly, default_cache_bytes, fill_device_cache, fill_host_tier  # noqa: F401
from .cache import SlotLayout
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
from .config import OffloadConfig, configure, parse_dtype
from .experts import OffloadedExperts
from .progress import start_and_done_lines  # noqa: F401  (stays importable from offload_moe.loader)
from .routing import find_routers

log = logging.getLogger("offload_moe")


def load(
    path: str | Path,
    config: OffloadConfig | None = None,
    *,
    progress: bool = True,
    trust_remote_code: bool = False,
    model_config=None,
    **overrides,
) -> nn.Module:
    """Load a Hugging Face MoE checkpoint with its routed experts offloaded to a device expert cache.

    Everything but the routed experts goes to ``device``; the experts stay in the
    checkpoint files and move into a fixed pool of slots on demand. The settings are an
    ``OffloadConfig`` (``config``), keyword arguments (``device="cuda", cache_memory="6GiB"``),
    or both: keyword arguments override the config's fields. An unknown keyword is a ConfigError.
    The budget is
    ``cache_experts`` (a number of experts, across all layers) or ``cache_memory``
    (bytes or a string such as ``"6GiB"``); without either, half the free memory less the dense weights (counted in
    the compute ``dtype``).
    ``policy`` is the eviction policy (``lru``, ``lfu``, ``fifo``, ``random``, ``forecast``, ``token-forecast``).
    ``host_memory`` adds a warm tier of (pinned, on CUDA) host RAM between the device
    slots and the disk, with its own ``host_policy``; when it holds every expert it is
    filled at load. ``prefetch`` picks the predictor that starts loads for the next
    ``prefetch_depth`` layers (default 1; ``gate``, ``transition``, ``hybrid`` or ``none``, the default, or a
    ``prefetch.Predictor`` of your own, as with ``offload_experts``), naming
    top-k plus ``prefetch_margin`` (default 1) experts. Prefetch raises the hit rate but moves more bytes (wrong guesses
    are loaded too); measure it on your model with ``benchmarks/prefetch_recall.py``. ``readers`` threads read the disk; ``io`` is ``auto``
    (default: ``direct`` or ``mmap``), ``direct`` (O_DIRECT, else dropping read pages), ``dontneed``, ``buffered`` or,
    on CPU only, ``mmap``: an expert missing from the slots is computed in place from the mapped
    checkpoint, with no copy, and the kernel's page cache (memory it can reclaim, beyond the budget)
    keeps what it read; prefetch then asks the kernel to read ahead rather than filling slots.
    A layer waits at most ``read_timeout`` seconds for one expert, then raises ExpertLoadError.
    ``profile=`` (a name from ``profiles/`` or a TOML path; instead of ``config``) fills in the device, dtype,
    policy, host memory, prefetch settings, ``io`` and, through ``plan``, the number of slots, where they are
    not given (``OffloadConfig.from_profile``).
    ``trust_remote_code=True`` lets transformers run Python code from the model folder (an ``auto_map``
    in config.json) to build an architecture it lacks; without it no code from the folder runs.
    ``model_config``: the transformers config of ``path`` as ``checkpoint.load_config`` read it, when the caller
    has it already (``generate`` reads it before the tokenizer), so config.json is not read again.
    Returns the transformers model; ``model.offload`` holds the runtime and its stats.
    """
    settings = configure(config, overrides, "load", ("progress", "trust_remote_code", "model_config"))
    # io="auto" is resolved once the slots are sized (check_assembly); the store reads nothing before that
    ckpt = open_checkpoint(path, trust_remote_code=trust_remote_code, io="direct" if settings.io == "auto" else settings.io,
                           model_config=model_config)
    try:
        config, model, modules = ckpt.config, ckpt.model, ckpt.modules
        want_dtype = settings.dtype or parse_dtype(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
                                                   or torch.float32)
        routers = find_routers(model, [(m.spec.prefix, m.num_experts) for m in modules])
        blocks = [m.spec.prefix.rpartition(".")[0] for m in modules]
        layers = [MoELayer(m.layer, block, m.spec.prefix, m.num_experts, m.spec.shapes, router,
                           model.get_submodule(block)) for m, block, router in zip(modules, blocks, routers)]

        def install() -> list[OffloadedExperts]:  # the experts were swapped when the checkpoint opened
            ckpt.load_dense(settings.device, want_dtype, progress)
            return modules

        assembly = check_assembly(layers, settings, dtype=want_dtype, dense_bytes=ckpt.dense_bytes(want_dtype),
                                  top_k=int(getattr(config, "num_experts_per_tok", 2) or 2),
                                  layout=SlotLayout.of_store(ckpt.store, want_dtype), model_config=config)
        ckpt.store.set_io(assembly.io.io)
        log.info("io=%s (%s)", assembly.io.io, assembly.io.reason)
        attach(model, assembly, ckpt.store, install=install, folder=ckpt.folder, name=ckpt.folder.name,
               progress=progress)
    except BaseException:
        ckpt.close()
        ckpt = model = None  # the traceback keeps this frame: it must not keep the weights read so far
        raise
    model.eval()
    return model
