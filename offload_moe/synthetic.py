"""Write random MoE checkpoints of any size without holding the model in memory.

Used by the demo, the benchmarks and the memory tests: a shard at a time is
generated and written, experts in the common per-expert layout
(``...experts.E.gate_proj.weight``), so a checkpoint larger than RAM can be made.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .experts import expert_params, find_experts_modules


def write_synthetic_checkpoint(
    folder: str | Path,
    model_type: str = "mixtral",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    shard_bytes: int = 512 * 2**20,
    layout: str = "per_expert",
    **config_kwargs,
) -> Path:
    """Write config.json and random safetensors shards for a ``model_type`` model; returns the folder.

    ``layout`` is ``per_expert`` (``experts.E.gate_proj.weight``..., what most hub checkpoints hold)
    or ``fused`` (``experts.gate_up_proj`` [E, 2I, H], the in-memory layout of transformers 5).
    """
    if layout not in ("per_expert", "fused"):
        raise ValueError(f"layout={layout!r}: use 'per_expert' or 'fused'")
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model(model_type, **config_kwargs)
    config.dtype = dtype
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    experts = {name: m for name, m in find_experts_modules(model)}
    g = torch.Generator().manual_seed(seed)
    tensors = list(_dense_tensors(model, experts)) + list(_expert_tensors(experts, layout))
    shards: list[dict[str, tuple]] = [{}]
    size = 0
    for name, shape, kind in tensors:
        nbytes = _numel(shape) * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = (shape, kind)
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: _random(shape, kind, dtype, g) for n, (shape, kind) in shard.items()}, folder / file,
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(folder)
    return folder


def _dense_tensors(model, experts):
    skip = {f"{prefix}.{p}" for prefix, m in experts.items() for p in expert_params(m)}
    tied = model.config.tie_word_embeddings
    for name, p in model.named_parameters():
        if name in skip or (tied and name == "lm_head.weight"):
            continue
        kind = "ones" if name.endswith("norm.weight") or "layernorm" in name else "router" if ".gate." in name or "router" in name else "normal"
        if p.dim() == 1 and kind == "normal":
            kind = "zeros"
        yield name, tuple(p.shape), kind


def _expert_tensors(experts, layout: str):
    for prefix, m in experts.items():
        if layout == "fused":
            for name, p in expert_params(m).items():
                yield f"{prefix}.{name}", tuple(p.shape), "normal"
            continue
        shapes = {n: tuple(p.shape[1:]) for n, p in expert_params(m).items()}
        two_i, hidden = shapes["gate_up_proj"]
        for e in range(m.num_experts):
            yield f"{prefix}.{e}.gate_proj.weight", (two_i // 2, hidden), "normal"
            yield f"{prefix}.{e}.up_proj.weight", (two_i // 2, hidden), "normal"
            yield f"{prefix}.{e}.down_proj.weight", shapes["down_proj"], "normal"


def _random(shape, kind: str, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    scale = 1.0 if kind == "router" else 0.02
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
