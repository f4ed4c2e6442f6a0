"""config.json as untrusted data: read strictly, every value checked before anything is built, and the
skeleton built on the meta device so that no size in the config allocates memory."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import offload_moe
from offload_moe import checkpoint
from offload_moe.errors import ConfigError, UnsupportedModelError
from offload_moe.checkpoint import build_skeleton, load_config
from tiny_models import make_config


@pytest.fixture
def mixtral(model_dir, tmp_path):
    folder = tmp_path / "mixtral"
    shutil.copytree(model_dir("mixtral"), folder)
    return folder


def edit_config(folder, **values):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def refused(folder, *words):
    """load and plan both refuse ``folder`` with a ConfigError naming config.json and ``words``."""
    for call in (lambda: offload_moe.load(folder, progress=False), lambda: offload_moe.plan(folder, device_memory="1GiB")):
        with pytest.raises(ConfigError, match="config.json") as info:
            call()
        for word in words:
            assert word in str(info.value)
        assert "\n" not in str(info.value) and len(str(info.value)) < 600
    return str(info.value)


@pytest.mark.parametrize("body, what", [
    (b"[1, 2]", "JSON list"),
    (b'"a string"', "JSON str"),
    (b'{"model_type": "mixtral", "vocab_size": 1, "vocab_size": 2}', "twice"),
    (b'{"model_type": "mixtral", "hidden_size": NaN}', "NaN"),
    (b'{"model_type": "mixtral\xff"}', "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, "nests"),
    (b'{"model_type": "mixtral", "pad": "' + b"x" * (17 * 2**20) + b'"}', "larger than"),
], ids=["list", "string", "duplicate-key", "nan", "not-utf8", "deep", "huge"])
def test_a_config_that_is_not_a_small_json_object_is_named(mixtral, body, what):
    (mixtral / "config.json").write_bytes(body)
    refused(mixtral, what)


def test_a_config_that_is_a_fifo_or_a_folder_is_refused_at_once(mixtral):
    (mixtral / "config.json").unlink()
    os.mkfifo(mixtral / "config.json")
    refused(mixtral, "not a regular file")
    (mixtral / "config.json").unlink()
    (mixtral / "config.json").mkdir()
    with pytest.raises(ConfigError, match="config.json is a folder"):
        load_config(mixtral)


@pytest.mark.parametrize("key", ["num_experts_per_tok", "num_local_experts", "vocab_size", "hidden_size",
                                 "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"])
@pytest.mark.parametrize("value", [0, -4, 2.5, "8", True, [8]])
def test_sizes_must_be_positive_whole_numbers(mixtral, key, value):
    edit_config(mixtral, **{key: value})
    with pytest.raises(ConfigError, match=f"config.json: {key} = .* must be a whole number, 1 or more"):
        load_config(mixtral)


def test_moe_intermediate_size_and_expert_counts_of_other_families(model_dir, tmp_path):
    for family, key in (("qwen2_moe", "moe_intermediate_size"), ("qwen2_moe", "num_experts"),
                        ("deepseek_v2", "n_routed_experts")):
        folder = tmp_path / f"{family}-{key}"
        shutil.copytree(model_dir(family), folder)
        edit_config(folder, **{key: -1})
        with pytest.raises(ConfigError, match=f"{key} = -1"):
            load_config(folder)


@pytest.mark.parametrize("top_k", [5, 1000])
def test_top_k_above_the_number_of_experts(mixtral, top_k):
    edit_config(mixtral, num_experts_per_tok=top_k)
    refused(mixtral, f"num_experts_per_tok = {top_k}", "1..4")


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("value", ["banana", "int8", "__class__", 16, ["bfloat16"]])
def test_dtype_must_be_a_torch_floating_dtype(mixtral, key, value):
    edit_config(mixtral, **{key: value})
    refused(mixtral, key, "not a torch floating dtype")


def test_a_float_dtype_torch_knows_is_accepted(mixtral):
    edit_config(mixtral, dtype="bfloat16")
    assert load_config(mixtral).dtype == torch.bfloat16


@pytest.mark.parametrize("key, value", [
    ("vocab_size", 10**12), ("vocab_size", 10**4000), ("num_local_experts", 10**9), ("num_hidden_layers", 10**9),
    ("hidden_size", 10**9),
])
def test_sizes_the_checkpoint_cannot_hold_are_refused(mixtral, key, value):
    edit_config(mixtral, **{key: value})
    refused(mixtral, f"{key} = ", "does not describe this checkpoint")


def test_sizes_within_the_checkpoint_pass_the_check(mixtral):
    """The bound is loose (one bit a weight): a config that could describe the files goes on to transformers,
    and the checkpoint reader judges the shapes."""
    size = sum(f.stat().st_size for f in mixtral.glob("*.safetensors"))
    edit_config(mixtral, vocab_size=size * 8 // 32)
    assert load_config(mixtral).vocab_size == size * 8 // 32


@pytest.mark.parametrize("overrides", [dict(vocab_size=10**12), dict(num_local_experts=10**9),
                                       dict(intermediate_size=10**9, num_local_experts=10**4)])
def test_the_skeleton_is_built_on_the_meta_device_from_the_first_tensor(overrides):
    """Sizes that slip past the checks allocate nothing: before, torch.empty ran on the CPU first (128 TB here)."""
    model = build_skeleton(make_config("mixtral", **overrides))
    assert all(p.is_meta for p in model.parameters())
    buffers = dict(model.named_buffers())
    assert buffers and all(b.device.type == "cpu" for b in buffers.values())


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss", "qwen3_moe"])
def test_rotary_tables_are_computed_as_transformers_computes_them(family):
    from transformers import AutoModelForCausalLM

    config = make_config(family)
    reference = dict(AutoModelForCausalLM.from_config(config).named_buffers())
    built = {name: b for name, b in build_skeleton(config).named_buffers() if not b.is_meta}  # persistent: from the checkpoint
    assert any("rotary" in name for name in built)
    for name, buffer in built.items():
        torch.testing.assert_close(buffer, reference[name], rtol=0, atol=0, msg=name)


def test_a_buffer_transformers_does_not_compute_is_refused_not_left_arbitrary(monkeypatch):
    from transformers import MixtralForCausalLM

    monkeypatch.setattr(MixtralForCausalLM, "_init_weights", lambda self, module: None)
    with pytest.raises(UnsupportedModelError, match="does not compute the buffer.*inv_freq"):
        build_skeleton(make_config("mixtral"))


def test_computed_buffers_are_bounded(monkeypatch):
    monkeypatch.setattr(checkpoint, "BUFFER_LIMIT", 16)
    with pytest.raises(UnsupportedModelError, match="bytes of computed buffers"):
        build_skeleton(make_config("mixtral"))


def test_a_quant_method_is_read_once_it_joins_the_one_set(monkeypatch, tmp_path):
    """The refusal is one set away from reading a format: a method in QUANT_METHODS passes the config check, and
    the refusal of the others then names it among the formats read."""
    from offload_moe import model_config
    from offload_moe.model_config import check_config

    path = tmp_path / "config.json"
    fp8 = {"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    check_config(fp8, path, 10**6)
    monkeypatch.setattr(model_config, "QUANT_METHODS", frozenset({"mxfp4"}))
    with pytest.raises(UnsupportedModelError, match="quant_method = 'fp8'"):
        check_config(fp8, path, 10**6)
    with pytest.raises(UnsupportedModelError, match=r"reads only bf16, fp16 and fp32 checkpoints, MXFP4") as info:
        check_config({"quantization_config": {"quant_method": "gptq"}}, path, 10**6)
    assert "block-scaled FP8" not in str(info.value)
