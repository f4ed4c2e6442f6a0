"""Tiny seeded MoE checkpoints of every supported family, written with save_pretrained.

Generated, never downloaded. Sizes are small enough that a family's parity test
runs in about a second, yet every family keeps its own routing quirks
(shared experts, grouped sigmoid routing, dense first layers, GPT-OSS biases).
"""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)

FAMILIES: dict[str, dict] = {
    "mixtral": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                      num_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                      head_dim=8, norm_topk_prob=True),
    "olmoe": dict(intermediate_size=48, num_experts=4, num_experts_per_tok=2),
    "deepseek_v2": dict(intermediate_size=48, moe_intermediate_size=24, n_routed_experts=4, num_experts_per_tok=2,
                        n_shared_experts=1, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=8,
                        qk_nope_head_dim=8, first_k_dense_replace=0, num_key_value_heads=4),
    "deepseek_v3": dict(intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                        n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8,
                        qk_nope_head_dim=8, first_k_dense_replace=1, n_group=2, topk_group=1,
                        num_key_value_heads=4),
    "glm4_moe": dict(intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
                     n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1, head_dim=8),
    "phimoe": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "granitemoe": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                    layer_types=["sliding_attention", "full_attention", "sliding_attention"], sliding_window=16),
}

# GPT-OSS ships in bf16; the others are written in float32 so parity is exact to 1e-5.
CHECKPOINT_DTYPE = {"gpt_oss": torch.bfloat16}


def make_config(family: str, **overrides):
    from transformers import AutoConfig

    kwargs = {**COMMON, **FAMILIES[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


def make_model(family: str, folder: Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny seeded random ``family`` model to ``folder``; returns the folder."""
    from transformers import AutoModelForCausalLM

    config = make_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _spread_router_and_experts(model, seed)
    dtype = CHECKPOINT_DTYPE.get(family, torch.float32)
    model.to(dtype).save_pretrained(folder)
    return Path(folder)


def _spread_router_and_experts(model, seed: int) -> None:
    """Random init leaves routers near zero and every layer picks the same experts; widen them so routing varies."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("gate" in name or "router" in name or "experts" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            elif name.endswith("e_score_correction_bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
