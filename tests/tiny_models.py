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


# -- quantized checkpoints -----------------------------------------------------------------------------------
# Written from a tiny model the way the published releases store them (docs: /work/shared/REFERENCE.md,
# "Quantized expert formats"). The encoders here are test helpers: offload_moe only decodes (quant.py).

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP8_MAX = 448.0  # the largest float8_e4m3fn
MXFP4_CONFIG = {"quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"]}


def fp8_config(block: tuple[int, int] = (128, 128)) -> dict:
    """The ``quantization_config`` of the DeepSeek-V3 and Qwen3 FP8 releases, with ``block`` as its block size."""
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(block)}


def encode_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [..., rows, cols] (cols a multiple of 32) -> (blocks uint8 [..., rows, cols/32, 16],
    scales uint8 [..., rows, cols/32]): each group of 32 shares 2**(scale-127), chosen so its largest value fits 6."""
    groups = w.float().unflatten(-1, (-1, 32))  # [..., rows, G, 32]
    amax = groups.abs().amax(-1)
    exponent = torch.where(amax > 0, torch.ceil(torch.log2(amax / 6)), torch.full_like(amax, -127)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    lut = torch.tensor(FP4_VALUES)
    index = (scaled[..., None] - lut).abs().argmin(-1).to(torch.uint8)  # [..., rows, G, 32]
    blocks = index[..., 0::2] | (index[..., 1::2] << 4)
    return blocks, (exponent + 127).to(torch.uint8)


def encode_fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` [out, in] -> (float8_e4m3fn [out, in], float32 scale_inv [ceil(out/bm), ceil(in/bn)]): each block,
    the last ones partial, scaled so its largest value is 448."""
    bm, bn = block
    rows, cols = w.shape
    scale = torch.ones(-(-rows // bm), -(-cols // bn))
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            amax = w[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].abs().max().item()
            if amax > 0:
                scale[i, j] = amax / FP8_MAX
    full = scale.repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    q = (w.float() / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def make_fp8_model(family: str, folder: Path, block: tuple[int, int] = (16, 16), seed: int = 0, **overrides) -> Path:
    """A tiny ``family`` checkpoint (qwen3_moe, deepseek_v3...) as the block-FP8 releases store it: every
    projection's ``weight`` in float8_e4m3fn with ``weight_scale_inv`` per ``block`` (the routers, norms,
    embeddings and lm_head as they were). The default 16x16 blocks leave partial blocks in the 24-wide expert
    matrices."""
    from safetensors.torch import load_file, save_file

    folder = make_model(family, folder, seed=seed, **overrides)
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n, t in tensors.items() if t.dim() == 2 and n.endswith(("proj.weight", "proj_with_mqa.weight"))]:
        tensors[name], tensors[name + "_scale_inv"] = encode_fp8_blocks(tensors[name], block)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _set_quantization_config(folder, fp8_config(block))
    return folder


def make_mxfp4_model(folder: Path, seed: int = 0, **overrides) -> Path:
    """A tiny gpt-oss checkpoint as gpt-oss ships it: each layer's experts as ``gate_up_proj_blocks`` /
    ``_scales`` ([E, 2I, H/32, 16] / [E, 2I, H/32]) and ``down_proj_blocks`` / ``_scales`` ([E, H, I/32, 16] /
    [E, H, I/32]), rows the output features (the parameters transposed); biases, attention and routers bf16.
    ``intermediate_size`` is 64, since MXFP4 groups of 32 must divide it."""
    from safetensors.torch import load_file, save_file

    folder = make_model("gpt_oss", folder, seed=seed, **{"intermediate_size": 64, **overrides})
    tensors = load_file(folder / "model.safetensors")
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        blocks, scales = encode_mxfp4(tensors.pop(name).transpose(1, 2))
        tensors[name + "_blocks"], tensors[name + "_scales"] = blocks.contiguous(), scales.contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    _set_quantization_config(folder, MXFP4_CONFIG)
    return folder


def dequantized_copy(folder: Path, out: Path) -> Path:
    """``folder`` with every packed tensor dequantized to float32 and no quantization_config: what transformers
    builds from the quantized checkpoint on the CPU, by the format's own rule."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from offload_moe import quant

    shutil.copytree(folder, out)
    tensors = load_file(out / "model.safetensors")
    config = json.loads((out / "config.json").read_text())
    q = config.pop("quantization_config")
    if q["quant_method"] == "fp8":
        for name in [n for n in tensors if n.endswith("_scale_inv")]:
            weight = name.removesuffix("_scale_inv")
            tensors[weight] = quant.dequantize_fp8_blocks(tensors[weight], tensors.pop(name),
                                                          tuple(q["weight_block_size"]), torch.float32)
    else:  # offload_moe's own: T.qweight, T.scales (int8) or T.scales_and_zeros (int4)
        for name in [n for n in tensors if n.endswith(".qweight")]:
            base = name.removesuffix(".qweight")
            if q["bits"] == 8:
                w = quant.dequantize_int8(tensors.pop(name), tensors.pop(base + ".scales"), torch.float32)
            else:
                w = quant.dequantize_int4(tensors.pop(name), tensors.pop(base + ".scales_and_zeros"), torch.float32)
            tensors[base] = w.transpose(-1, -2).contiguous() if base.endswith("gate_up_proj") or base.endswith("experts.down_proj") else w
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


def make_int_model(family: str, folder: Path, bits: int, group_size: int = 8, **overrides) -> Path:
    """A tiny ``family`` checkpoint in offload_moe's own int8/int4 format (QUANT_FORMAT.md), as
    ``quantize_experts`` writes it (int4 in groups of ``group_size``) from ``make_model``'s beside it; its one
    shard is renamed model.safetensors, the file the tests here read and rewrite."""
    import offload_moe

    source = make_model(family, folder.with_name(f"{folder.name}-source"), **overrides)
    offload_moe.quantize_experts(source, folder, bits=bits, group_size=group_size if bits == 4 else None,
                                 progress=False)
    (shard,) = folder.glob("*.safetensors")
    shard.rename(folder / "model.safetensors")
    return folder


def _set_quantization_config(folder: Path, quantization_config: dict) -> None:
    import json

    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "quantization_config": quantization_config}, indent=2))


def load_dequantized(folder: Path, dtype: torch.dtype):
    """The oracle: transformers' own model of a quantized tiny checkpoint, every weight dequantized to ``dtype``
    on the CPU (``Mxfp4Config`` / ``FineGrainedFP8Config`` with ``dequantize=True``; offline, no kernels)."""
    import json

    from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Mxfp4Config

    method = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]["quant_method"]
    config = {"mxfp4": Mxfp4Config, "fp8": FineGrainedFP8Config}[method](dequantize=True)
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=dtype).eval()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference between ``a`` and ``b`` relative to ``a``'s largest magnitude (in float32)."""
    return ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()
