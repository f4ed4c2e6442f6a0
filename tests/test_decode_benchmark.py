"""benchmarks/decode.py's accelerate baseline: the device map it asks for on CUDA, worked out on the CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "decode.py"


def _decode():
    spec = importlib.util.spec_from_file_location("decode_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _meta_model(**overrides):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(hidden_size=64, intermediate_size=224, num_local_experts=8, num_experts_per_tok=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=500, num_hidden_layers=4,
                           tie_word_embeddings=False, **overrides)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def test_largest_layer_bytes_is_what_accelerate_counts(model_dir):
    from transformers import AutoModelForCausalLM
    from transformers.integrations.accelerate import compute_module_sizes

    folder = model_dir("mixtral")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    sizes, _ = compute_module_sizes(model, None)
    assert _decode().largest_layer_bytes(folder) == max(sizes[f"model.layers.{i}"] for i in range(3))


def test_accelerate_budget_below_one_layer_still_runs_on_the_gpu():
    """At 12.5% of the experts the budget is smaller than one decoder layer. accelerate reserves a layer's size on
    GPU 0 for onloading, so with the budget alone the whole model went to disk (and ran on the CPU, or failed)."""
    from transformers.integrations.accelerate import compute_module_sizes, infer_auto_device_map

    decode = _decode()
    model = _meta_model()
    sizes, _ = compute_module_sizes(model, None)
    layer = sizes["model.layers.0"]
    expert = 3 * 64 * 224 * 2
    dense = sizes[""] - 4 * 8 * expert
    for share, resident_layers in ((0.125, 0), (0.25, 1), (0.5, 2)):
        budget = dense + round(share * 32) * expert
        device_map = infer_auto_device_map(model, max_memory=decode.accelerate_max_memory("cuda", budget, layer),
                                           no_split_module_classes=model._no_split_modules)
        assert device_map.get("model.embed_tokens") == 0, (share, device_map)
        on_gpu = [n for n, d in device_map.items() if n.startswith("model.layers.") and d == 0]
        assert len(on_gpu) == resident_layers, (share, device_map)  # the same share of experts as offload_moe's slots
    assert decode.accelerate_max_memory("cpu", 123, layer) == {"cpu": 123}
