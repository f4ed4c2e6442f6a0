"""The bundled demo model: files, parity with transformers, tokenizer, stable greedy output, reference traces."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import offload_moe
from offload_moe.traces import load_trace, record_trace

RTOL = 1e-5
NEW_TOKENS = 32
MAX_BYTES = 30 * 10**6
TRACE = Path(__file__).resolve().parent.parent / "profiles" / "traces" / "demo-heldout.safetensors"
SOURCE = (
    "def gr\u00fc\u00dfe(name: str) -> str:\n"
    '\t"""Say hello \u2014 in any script: \u4f60\u597d, \u043f\u0440\u0438\u0432\u0435\u0442, \U0001f40d."""\n'
    "        return f'hello {name!r}'  \r\n"
    "\n\n    x = [1,\t2]  # trailing spaces   \n"
)


@pytest.fixture(scope="module")
def folder() -> Path:
    return offload_moe.demo_model_path()


@pytest.fixture(scope="module")
def tokenizer(folder):
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def card(folder) -> dict:
    return json.loads((folder / "card.json").read_text())


def test_bundled_files_config_and_size(folder, card):
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md", "card.json", "training.json"} <= names
    assert sum(p.stat().st_size for p in folder.iterdir()) <= MAX_BYTES
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_experts_per_tok"] == 2
    assert config["num_hidden_layers"] >= 6 and config["num_local_experts"] >= 16
    assert config["router_aux_loss_coef"] > 0
    # the card describes these very weights and a model that learned something
    assert card["checkpoint_bytes"] == (folder / "model.safetensors").stat().st_size
    held = card["evaluation"]["held_out"]
    assert held["loss_nats_per_token"] < held["unigram_loss_nats_per_token"]


def test_demo_model_path_names_a_missing_model(monkeypatch, tmp_path):
    monkeypatch.setattr(offload_moe.checkpoint, "__file__", str(tmp_path / "checkpoint.py"))
    with pytest.raises(offload_moe.ModelPathError, match="bundled model is incomplete"):
        offload_moe.demo_model_path()


def test_parity_with_transformers_at_minimum_and_full_budget(folder, tokenizer):
    prompt = tokenizer("import os\n\n\ndef main(argv):\n", return_tensors="pt").input_ids  # [1, S]
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        want_logits = ref(prompt).logits
    want = ref.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    for budget in (2, None):
        model = offload_moe.load(folder, cache_experts=budget, cache_memory=None if budget else "1GiB",
                                 dtype="float32", progress=False)
        stats = model.offload.stats()
        assert stats["capacity_experts"] == (budget or stats["total_experts"])
        with torch.no_grad():
            got_logits = model(prompt).logits
        err = ((want_logits - got_logits).abs().max() / want_logits.abs().max()).item()
        assert err <= RTOL, (budget, err)
        got = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(want, got), budget
        if budget == 2:
            assert model.offload.stats()["evictions"] > 0  # the experts really streamed through two slots
        model.offload.close()


def test_tokenizer_round_trips_python_source(tokenizer):
    ids = tokenizer(SOURCE, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == SOURCE
    with_bos = tokenizer(SOURCE).input_ids
    assert with_bos[0] == tokenizer.bos_token_id and with_bos[1:] == ids
    assert tokenizer.decode(with_bos, skip_special_tokens=True) == SOURCE
    assert len(ids) < len(SOURCE.encode())  # BPE merges something, even on this unusual text


def test_chat_template_uses_single_special_tokens(tokenizer):
    chat = [{"role": "user", "content": "Write a function."}, {"role": "assistant", "content": "def f(): pass"}]
    text = tokenizer.apply_chat_template(chat, tokenize=False)
    assert text == "<|bos|><|user|>\nWrite a function.\n<|assistant|>\ndef f(): pass<|eos|>\n"
    ids = tokenizer.apply_chat_template(chat[:1], add_generation_prompt=True, tokenize=True, return_dict=False)
    specials = tokenizer.convert_tokens_to_ids(["<|bos|>", "<|user|>", "<|assistant|>"])
    assert [i for i in ids if i in specials] == specials


def greedy(folder, tokenizer, prompt: str, new_tokens: int, cache_experts: int) -> list[int]:
    model = offload_moe.load(folder, cache_experts=cache_experts, dtype="float32", progress=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    model.offload.close()
    return out[0, ids.shape[1]:].tolist()


def test_greedy_completion_is_stable_and_matches_the_card(folder, tokenizer, card):
    sample = card["evaluation"]["sample"]
    runs = [greedy(folder, tokenizer, sample["prompt"], sample["max_new_tokens"], sample["cache_experts"])
            for _ in range(2)]
    assert runs[0] == runs[1]
    assert runs[0] == sample["token_ids"]
    assert tokenizer.decode(runs[0], skip_special_tokens=True) == sample["completion"]


def test_reference_trace_is_the_bundled_models_routing(folder):
    trace = load_trace(TRACE)
    config = json.loads((folder / "config.json").read_text())
    assert trace.layers == list(range(config["num_hidden_layers"]))
    assert trace.num_experts == config["num_local_experts"] and trace.top_k == 2
    assert "held-out" in trace.metadata["source"] and TRACE.stat().st_size < 512 * 1024
    start, end = trace.sequences()[0]
    model = offload_moe.load(folder, cache_experts=24, dtype="float32", progress=False)
    again = record_trace(model, [trace.token_ids[start:end].long()], source="re-recorded")
    model.offload.close()
    assert torch.equal(again.experts, trace.experts[start:end])
