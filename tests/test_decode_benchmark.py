"""benchmarks/decode.py's accelerate baseline: the device map it asks for on CUDA, worked out on the CPU; and its
``--child`` runner."""

from __future__ import annotations

import importlib.util
import json
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


def test_a_child_reads_the_trace_it_is_given(tmp_path, monkeypatch, capsys):
    """``--child`` with a trace (``--memory-limit`` with ``--trace``) loads it from the path in the spec."""
    from safetensors.torch import save_file

    decode = _decode()
    experts = torch.zeros(3, 2, 2, dtype=torch.int16)
    save_file({"experts": experts}, tmp_path / "trace.safetensors")
    seen = {}
    monkeypatch.setattr(decode, "run_offload", lambda folder, trace, **kw: seen.update(trace=trace, **kw) or {"ok": 1})
    threads = torch.get_num_threads()
    try:
        decode.run_child({"kind": "offload", "folder": str(tmp_path), "trace": str(tmp_path / "trace.safetensors"),
                          "host_memory": None, "device": "cpu", "tokens": 1, "warmup": 0, "capacity": 2,
                          "variant": "lru", "threads": 1})
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(seen["trace"], experts) and seen["capacity"] == 2
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"ok": 1, "threads": 1}
