"""``plan``: what goes where for a model and a memory budget, from the config and file headers alone."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .cache import SlotLayout
from .checkpoint import Checkpoint, open_checkpoint
from .config import MIN_CACHE_EXPERTS, check_io, format_bytes, parse_bytes, parse_dtype
from .errors import BudgetError
from .hardware import get_profile
from .memory import choose_io

WORKSPACE_MIN = 256 * 2**20  # activations, allocator slack, CUDA context share
WORKSPACE_FRACTION = 0.05
DEFAULT_CONTEXT = 4096  # tokens of KV cache a device budget keeps room for


@dataclass(frozen=True)
class Plan:
    """Where each part of a model would live under a device-memory budget. Sizes are bytes."""

    model: str
    model_type: str
    dtype: str
    moe_layers: int
    experts_per_layer: int
    top_k: int
    total_experts: int
    expert_bytes: int
    dense_bytes: int
    experts_bytes: int
    kv_bytes_per_token: int
    context_length: int
    kv_reserve_bytes: int
    workspace_bytes: int
    device_memory: int
    expert_slots: int
    slots_bytes: int
    host_memory: int = 0  # bytes for the warm tier in (pinned) host RAM; 0: none
    host_slots: int = 0  # experts the warm tier holds
    io: str = "direct"  # the read mode (what io="auto" chose); with "mmap" (CPU) a partial slot pool stays empty
    model_context: int | None = None  # max_position_embeddings: the KV reserve never exceeds it
    expert_format: str = ""  # what an expert is stored as: the dtype, or a packed format (fp8, mxfp4, int8, int4)
    io_reason: str = ""  # why ``io``: "as asked", or what io="auto" weighed (memory.choose_io)

    @property
    def fits(self) -> bool:
        return self.expert_slots >= MIN_CACHE_EXPERTS

    @property
    def resident_fraction(self) -> float:
        return self.expert_slots / self.total_experts if self.total_experts else 0.0

    @property
    def disk_experts(self) -> int:
        """Experts that are in neither the device slots nor the host tier: a miss on them reads the disk."""
        return self.total_experts - max(self.expert_slots, self.host_slots)

    @property
    def disk_bytes(self) -> int:
        return self.disk_experts * self.expert_bytes

    @property
    def warnings(self) -> list[str]:
        """What in this plan buys nothing (said in its text, and by ``offload-moe plan`` on stderr)."""
        if self.host_slots and self.host_slots <= self.expert_slots < self.total_experts:
            more = format_bytes((self.expert_slots + 1) * self.expert_bytes)
            return [f"the host tier holds {self.host_slots} experts, no more than the {self.expert_slots} device slots, "
                    f"so it adds nothing: give host memory of {more} or more, or none"]
        return []

    def as_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits, "resident_fraction": self.resident_fraction,
                "disk_experts": self.disk_experts, "disk_bytes": self.disk_bytes, "warnings": self.warnings}

    def rows(self) -> list[tuple[str, str, str]]:
        """(part, where, size) rows for a table."""
        return [
            ("dense weights (attention, norms, embeddings, routers, shared experts)", "device", format_bytes(self.dense_bytes)),
            (f"KV-cache reserve ({self.context_length} tokens"
             + (", the model's context)" if self.context_length == self.model_context else ")"),
             "device", format_bytes(self.kv_reserve_bytes)),
            ("workspace reserve", "device", format_bytes(self.workspace_bytes)),
            (f"expert slots: {self.expert_slots} of {self.total_experts} ({self.resident_fraction:.0%})", "device", format_bytes(self.slots_bytes)),
        ] + ([self._host_row()] if self.host_memory else []) + [
            self._miss_row(),
        ]

    def _host_row(self) -> tuple[str, str, str]:
        if not self.host_slots and self.expert_slots >= self.total_experts:
            return ("host tier: none (every expert fits in the device slots)", "host RAM", format_bytes(0))
        return (f"host tier: {self.host_slots} of {self.total_experts} experts ({self.host_slots / self.total_experts:.0%})",
                "host RAM (pinned on CUDA)", format_bytes(self.host_slots * self.expert_bytes))

    def _miss_row(self) -> tuple[str, str, str]:
        if self.io == "mmap" and self.disk_experts:  # the slots stay empty: every expert is computed from the mapping
            return (f"experts computed in place from the mapped checkpoint (io=mmap; the slots stay empty): "
                    f"{self.total_experts}", "page cache, else disk", format_bytes(self.experts_bytes))
        return (f"experts read from disk on a miss: {self.disk_experts}", "disk (checkpoint files)", format_bytes(self.disk_bytes))

    @property
    def io_line(self) -> str:
        """How experts are read, and why (``io="auto"`` says what it weighed)."""
        return f"io: {self.io}" + (f" ({self.io_reason})" if self.io_reason else "")

    @property
    def _format_note(self) -> str:
        return f" ({self.expert_format})" if self.expert_format and self.expert_format != self.dtype else ""

    def __str__(self) -> str:
        width = max(len(r[0]) for r in self.rows())
        lines = [f"{self.model} ({self.model_type}, {self.dtype}): {self.moe_layers} MoE layers x {self.experts_per_layer} experts, "
                 f"top-{self.top_k}, {format_bytes(self.expert_bytes)} per expert{self._format_note}; device budget {format_bytes(self.device_memory)}"]
        lines += [f"  {part:<{width}}  {where:<24} {size:>12}" for part, where, size in self.rows()]
        lines.append(f"  {self.io_line}")
        if not self.fits:
            lines.append(f"  does not fit: fewer than {MIN_CACHE_EXPERTS} expert slots remain after the dense weights")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)


def kv_bytes_per_token(config, itemsize: int) -> int:
    """Key and value bytes one token adds to the cache across all layers (MLA caches decompressed heads)."""
    layers = config.num_hidden_layers
    heads = config.num_attention_heads
    if getattr(config, "qk_nope_head_dim", None) is not None:  # DeepSeek-style multi-head latent attention
        per_layer = heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    else:
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        per_layer = 2 * kv_heads * head_dim
    return layers * per_layer * itemsize


def plan(
    path: str | Path,
    *,
    device_memory: str | int | None = None,
    dtype: str | torch.dtype | None = None,
    context_length: int = DEFAULT_CONTEXT,
    profile: str | Path | None = None,
    host_memory: str | int | None = None,
    io: str | None = None,
    trust_remote_code: bool = False,
) -> Plan:
    """What fits where for the model at ``path`` with ``device_memory`` for the compute device.

    ``host_memory`` sizes the warm tier of host RAM between the device slots and the disk.
    ``io`` is the I/O mode ``load`` will use (``mmap`` leaves a partial slot pool empty); ``auto`` (the default)
    is resolved as ``load`` resolves it, from the memory this process may use now (``memory.choose_io``).
    ``profile`` supplies ``device_memory``, ``host_memory``, ``dtype``, ``io`` and the device (else the CPU)
    where they are not given.
    The KV cache is reserved for ``context_length`` tokens, at most the model's own context; no host tier
    is reserved when every expert fits in the device slots (``load`` builds none then).
    Reads only config.json and the safetensors headers: no weights are loaded. ``trust_remote_code`` as in
    ``offload_moe.load``: without it no code from the model folder runs.
    """
    device = "cpu"
    if profile is not None:
        hw = get_profile(profile)
        device_memory = device_memory or hw.device_memory
        host_memory = host_memory if host_memory is not None else hw.host_memory
        dtype = dtype or hw.dtype
        io = io or hw.io
        device = hw.device
    budget, host = _check_options(device_memory, host_memory, io, context_length)  # fails before anything is read
    with open_checkpoint(path, trust_remote_code=trust_remote_code) as checkpoint:
        return _plan(checkpoint, budget, host, dtype, context_length, io, device)


def workspace_bytes(device_memory: int) -> int:
    """What a device budget keeps for activations, allocator slack and the CUDA context's share."""
    return max(WORKSPACE_MIN, int(WORKSPACE_FRACTION * device_memory))


def device_slots(device_memory: int, dense: int, kv: int, expert_bytes: int, total: int) -> int:
    """Expert slots that fit in ``device_memory`` bytes beside ``dense`` weights, a ``kv`` cache reserve
    (``kv_reserve``) and the workspace; at most ``total``. The one rule both verbs size slots by from a device budget."""
    return max(0, min(total, (device_memory - dense - kv - workspace_bytes(device_memory)) // expert_bytes))


def host_slots(host_bytes: int, expert_bytes: int, total: int, slots: int) -> int:
    """Experts a host tier of ``host_bytes`` holds beside ``slots`` device slots: none when the device slots hold
    all ``total`` experts (no host tier is built then), else as many as fit, at most ``total``."""
    return 0 if slots >= total else min(total, host_bytes // expert_bytes)


@dataclass(frozen=True)
class KVReserve:
    """The KV cache a device budget keeps room for: ``per_token`` bytes for ``tokens`` tokens."""

    per_token: int
    tokens: int
    model_context: int | None  # max_position_embeddings: ``tokens`` never exceeds it

    @property
    def nbytes(self) -> int:
        return self.per_token * self.tokens


def kv_reserve(config, dtype: torch.dtype, context_length: int = DEFAULT_CONTEXT) -> KVReserve:
    """The KV cache of ``context_length`` tokens in ``dtype`` (at most the model's own context) for the model
    ``config`` describes; none for a model whose config does not give its attention sizes (a model built in
    memory without a transformers config)."""
    if not all(isinstance(getattr(config, k, None), int) for k in ("num_hidden_layers", "num_attention_heads")):
        return KVReserve(0, 0, None)
    model_context = getattr(config, "max_position_embeddings", None)
    tokens = min(context_length, model_context) if model_context else context_length
    per_token = kv_bytes_per_token(config, torch.empty((), dtype=dtype).element_size())
    return KVReserve(per_token, tokens, model_context)


def _plan(checkpoint: Checkpoint, budget: int, host: int, dtype: str | torch.dtype | None, context_length: int,
          io: str | None, device: str) -> Plan:
    config, modules = checkpoint.config, checkpoint.modules
    want = parse_dtype(dtype) or parse_dtype(getattr(config, "dtype", None) or torch.float32)
    dense = checkpoint.dense_bytes(want)
    layout = SlotLayout.of_store(checkpoint.store, want)
    expert_bytes = layout.nbytes
    total = checkpoint.total_experts
    kv = kv_reserve(config, want, context_length)
    slots = device_slots(budget, dense, kv.nbytes, expert_bytes, total)
    warm = host_slots(host, expert_bytes, total, slots)
    chosen = choose_io(io or "auto", device=torch.device(device), experts_bytes=total * expert_bytes,
                       slots_bytes=int(slots) * expert_bytes, dense_bytes=dense, host_tier=warm > 0)
    return Plan(
        model=str(checkpoint.folder),
        model_type=config.model_type,
        dtype=str(want).removeprefix("torch."),
        moe_layers=len(modules),
        experts_per_layer=modules[0].num_experts,
        top_k=int(getattr(config, "num_experts_per_tok", 0) or 0),
        total_experts=total,
        expert_bytes=expert_bytes,
        dense_bytes=dense,
        experts_bytes=total * expert_bytes,
        kv_bytes_per_token=kv.per_token,
        context_length=kv.tokens,
        kv_reserve_bytes=kv.nbytes,
        workspace_bytes=workspace_bytes(budget),
        device_memory=budget,
        expert_slots=int(slots),
        slots_bytes=int(slots) * expert_bytes,
        host_memory=host,
        host_slots=warm,
        io=chosen.io,
        io_reason=chosen.reason,
        model_context=kv.model_context,
        expert_format=layout.format_name,
    )


def _check_options(device_memory, host_memory, io, context_length) -> tuple[int, int]:
    """The device budget and the host tier's bytes (0: none), every option checked."""
    if device_memory is None:
        raise BudgetError("plan needs device_memory (e.g. '12GiB') or a hardware profile")
    budget = parse_bytes(device_memory, "device_memory")
    host = parse_bytes(host_memory, "host_memory") if host_memory is not None else 0
    if io is not None:
        check_io(io, host_memory=bool(host))
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 0:
        raise BudgetError(f"context_length={context_length!r} must be a whole number of tokens, 0 or more")
    return budget, host
