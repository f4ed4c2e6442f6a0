"""quant.py against transformers' own dequantized model of a tiny quantized checkpoint (the oracle,
``tiny_models.load_dequantized``): gpt-oss MXFP4 bit for bit; Qwen3-MoE and DeepSeek-V3 block FP8 bit for bit
where transformers follows the FP8 rule, and the rule (not transformers) where 5.24's CPU loader breaks it.

The checkpoints are written the way the releases store them (``tiny_models.make_mxfp4_model`` /
``make_fp8_model``); the expert matrices of the FP8 ones end in partial blocks.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from offload_moe.quant import dequantize_fp8_blocks, dequantize_mxfp4
from tiny_models import load_dequantized, make_fp8_model, make_mxfp4_model

PROJS = ("gate_proj", "up_proj", "down_proj")


def experts_of(model):
    """(layer, experts module) of each MoE layer of transformers' model."""
    return [(i, layer.mlp.experts) for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def fp8_expert(tensors: dict, layer: int, expert: int, block, dtype=torch.float32, dequantize=None):
    """gate, up and down of one expert from the FP8 checkpoint's own tensors, with ``dequantize`` (ours by default)."""
    dequantize = dequantize or (lambda q, s: dequantize_fp8_blocks(q, s, block, dtype, name=key))
    out = []
    for proj in PROJS:
        key = f"model.layers.{layer}.mlp.experts.{expert}.{proj}.weight"
        out.append(dequantize(tensors[key], tensors[key + "_scale_inv"]))
    return out


def test_mxfp4_equals_transformers_dequantized_gpt_oss_bit_for_bit(tmp_path):
    folder = make_mxfp4_model(tmp_path / "gpt_oss")
    tensors = load_file(folder / "model.safetensors")
    oracle = load_dequantized(folder, torch.bfloat16)
    layers = experts_of(oracle)
    assert len(layers) == 3
    for layer, experts in layers:
        prefix = f"model.layers.{layer}.mlp.experts."
        for param in ("gate_up_proj", "down_proj"):
            ours = dequantize_mxfp4(tensors[prefix + param + "_blocks"], tensors[prefix + param + "_scales"],
                                    torch.bfloat16, name=prefix + param)
            theirs = getattr(experts, param).detach()
            assert ours.transpose(1, 2).shape == theirs.shape  # stored rows are the parameter's columns
            assert torch.equal(ours.transpose(1, 2).view(torch.int16), theirs.view(torch.int16)), (layer, param)
        assert torch.equal(experts.gate_up_proj_bias.detach(), tensors[prefix + "gate_up_proj_bias"])


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_fp8_with_whole_blocks_equals_transformers_dequantized_model_bit_for_bit(tmp_path, family):
    """With the releases' 128x128 blocks every tiny matrix is one partial block, which transformers gets right."""
    folder = make_fp8_model(family, tmp_path / family, block=(128, 128))
    tensors = load_file(folder / "model.safetensors")
    oracle = load_dequantized(folder, torch.float32)
    for layer, experts in experts_of(oracle):
        for e in range(experts.num_experts):
            gate, up, down = fp8_expert(tensors, layer, e, (128, 128))
            assert torch.equal(experts.gate_up_proj[e].detach(), torch.cat([gate, up])), (layer, e)
            assert torch.equal(experts.down_proj[e].detach(), down), (layer, e)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_fp8_partial_blocks_follow_the_rule_where_transformers_5_24_does_not(tmp_path, family):
    """16x16 blocks over the 24-wide expert matrices: gate/up [24, 32] end in an 8-row block, down [32, 24] in an
    8-column one. transformers 5.24's loader (``Fp8Dequantize._dequantize_one``) takes the block as 24 // 2 = 12,
    so rows (columns) 12..15 get the second block's scale. Our values equal the rule (transformers' own
    ``_dequantize_fp8_weight``); the oracle's equal the 12-wide reading, and so differ there and only there."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight

    block = (16, 16)
    folder = make_fp8_model(family, tmp_path / family, block=block)
    tensors = load_file(folder / "model.safetensors")
    oracle = load_dequantized(folder, torch.float32)
    rule = lambda q, s: _dequantize_fp8_weight(q, s, list(block), torch.float32)  # noqa: E731
    loader = lambda q, s: Fp8Dequantize(None)._dequantize_one(q, s, torch.float32)  # noqa: E731
    for layer, experts in experts_of(oracle):
        for e in range(experts.num_experts):
            gate, up, down = fp8_expert(tensors, layer, e, block)
            for ours, right in zip((gate, up, down), fp8_expert(tensors, layer, e, block, dequantize=rule)):
                assert torch.equal(ours, right)
            wrong_gate, wrong_up, wrong_down = fp8_expert(tensors, layer, e, block, dequantize=loader)
            assert torch.equal(experts.gate_up_proj[e].detach(), torch.cat([wrong_gate, wrong_up]))
            assert torch.equal(experts.down_proj[e].detach(), wrong_down)
            assert torch.equal(gate[:12], wrong_gate[:12]) and torch.equal(gate[16:], wrong_gate[16:])
            assert not torch.equal(gate[12:16], wrong_gate[12:16])
            assert torch.equal(down[:, :12], wrong_down[:, :12]) and not torch.equal(down[:, 12:16], wrong_down[:, 12:16])


def test_fp8_attention_weights_of_whole_blocks_equal_the_oracle(tmp_path):
    """The releases quantize attention too; a [32, 32] or [16, 32] projection is whole 16x16 blocks."""
    folder = make_fp8_model("qwen3_moe", tmp_path / "qwen3_moe", block=(16, 16))
    tensors = load_file(folder / "model.safetensors")
    oracle = load_dequantized(folder, torch.float32)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        key = f"model.layers.1.self_attn.{proj}.weight"
        ours = dequantize_fp8_blocks(tensors[key], tensors[key + "_scale_inv"], (16, 16), torch.float32, name=key)
        assert torch.equal(ours, oracle.get_parameter(key).detach()), proj


def test_the_dequantized_oracle_runs(tmp_path):
    oracle = load_dequantized(make_fp8_model("qwen3_moe", tmp_path / "q"), torch.float32)
    logits = oracle(torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape == (1, 4, 96) and torch.isfinite(logits).all()
