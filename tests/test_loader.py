"""Loading: bad input gets a clear error and leaves nothing behind; model files are never written."""

from __future__ import annotations

import gc
import hashlib
import json
import shutil
import struct

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

import offload_moe
from offload_moe.errors import (
    BudgetError,
    CheckpointError,
    ConfigError,
    DeviceError,
    ModelPathError,
    OffloadMoEError,
    UnsupportedModelError,
)
from offload_moe.synthetic import write_synthetic_checkpoint

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64)


def load(path, **kw):
    kw.setdefault("cache_experts", 2)
    return offload_moe.load(path, progress=False, **kw)


@pytest.fixture
def mixtral_copy(model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(model_dir("mixtral"), dst)
    return dst


@pytest.fixture
def sharded(tmp_path):
    return write_synthetic_checkpoint(tmp_path / "sharded", "mixtral", shard_bytes=20_000, **SMALL)


def open_fds() -> int:
    gc.collect()  # models of earlier tests close their files when collected
    return psutil.Process().num_fds()


def expect(error, match, fn, *args, **kw):
    before = open_fds()
    with pytest.raises(error, match=match) as info:
        fn(*args, **kw)
    assert isinstance(info.value, OffloadMoEError)
    assert open_fds() == before, "a failed load left files open"
    return info.value


@pytest.mark.slow
def test_path_that_is_not_a_model(tmp_path):
    expect(ModelPathError, "does not exist", load, tmp_path / "nope")
    expect(ModelPathError, "no config.json", load, tmp_path)
    (tmp_path / "file.txt").write_text("x")
    expect(ModelPathError, "is a file", load, tmp_path / "file.txt")
    expect(ModelPathError, "never downloads", load, "some-org/not-cached-model")


def test_folder_without_safetensors(tmp_path, mixtral_copy):
    for f in mixtral_copy.glob("*.safetensors"):
        f.unlink()
    expect(ModelPathError, "no .safetensors", load, mixtral_copy)


@pytest.mark.slow
def test_sharded_checkpoint_loads_and_missing_shard_is_named(sharded, prompt):
    model = load(sharded)
    assert model.offload.stats()["capacity_experts"] == 2
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    model.offload.close()
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    expect(CheckpointError, shards[1].name, load, sharded)


@pytest.mark.slow
def test_truncated_file(mixtral_copy):
    f = mixtral_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    expect(CheckpointError, "truncated", load, mixtral_copy)


@pytest.mark.slow
def test_corrupted_header(mixtral_copy):
    f = mixtral_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 2**40)
    f.write_bytes(bytes(data))
    expect(CheckpointError, "corrupted safetensors header", load, mixtral_copy)
    data[:8] = struct.pack("<Q", 16)
    data[8:24] = b"{not json at all"
    f.write_bytes(bytes(data))
    expect(CheckpointError, "corrupted safetensors header", load, mixtral_copy)


@pytest.mark.slow
def test_expert_tensor_with_wrong_shape(mixtral_copy):
    f = mixtral_copy / "model.safetensors"
    tensors = load_file(f)
    name = next(k for k in tensors if k.endswith("experts.1.w1.weight"))
    tensors[name] = tensors[name][:-1]
    save_file(tensors, f)
    err = expect(CheckpointError, "has shape", load, mixtral_copy)
    assert name in str(err)


@pytest.mark.slow
def test_expert_missing_from_checkpoint(mixtral_copy):
    f = mixtral_copy / "model.safetensors"
    tensors = load_file(f)
    name = next(k for k in tensors if k.endswith("experts.2.w3.weight"))
    del tensors[name]
    save_file(tensors, f)
    expect(CheckpointError, "expert 2", load, mixtral_copy)


@pytest.mark.slow
def test_dense_tensor_missing(mixtral_copy):
    f = mixtral_copy / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.norm.weight"]
    save_file(tensors, f)
    expect(CheckpointError, "model.norm.weight", load, mixtral_copy)


@pytest.mark.slow
def test_budget_below_two_experts(model_dir):
    expect(BudgetError, "at least 2", load, model_dir("mixtral"), cache_experts=1)
    expect(BudgetError, "at least 2", load, model_dir("mixtral"), cache_experts=None, cache_memory="1KiB")
    expect(BudgetError, "not a size", load, model_dir("mixtral"), cache_experts=None, cache_memory="lots")
    expect(BudgetError, "not both", load, model_dir("mixtral"), cache_experts=4, cache_memory="1GiB")


@pytest.mark.slow
def test_unknown_policy(model_dir):
    expect(ConfigError, "lru", load, model_dir("mixtral"), policy="clairvoyant")


@pytest.mark.slow
def test_device_that_does_not_exist(model_dir):
    expect(DeviceError, "not a device name", load, model_dir("mixtral"), device="gpu0")
    expect(DeviceError, "cpu", load, model_dir("mixtral"), device="mps")
    if not torch.cuda.is_available():
        expect(DeviceError, "no CUDA", load, model_dir("mixtral"), device="cuda:7")
    else:
        expect(DeviceError, "does not exist", load, model_dir("mixtral"), device=f"cuda:{torch.cuda.device_count()}")


@pytest.mark.slow
def test_unsupported_model(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    err = expect(UnsupportedModelError, "no routed-experts module", load, tmp_path)
    assert "mixtral" in str(err)
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "model_type": "not_a_model"}))
    err = expect(UnsupportedModelError, "config.json", load, tmp_path)
    assert "\n" not in str(err)  # transformers' multi-line message, joined: the CLI prints errors as one line


def test_model_files_are_never_written(mixtral_copy, prompt):
    def digest():
        return {f.name: (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest()) for f in mixtral_copy.iterdir()}

    before = digest()
    model = load(mixtral_copy)
    model.generate(prompt, max_new_tokens=8, do_sample=False)
    model.offload.close()
    assert digest() == before
    assert sorted(p.name for p in mixtral_copy.iterdir()) == sorted(before)


@pytest.mark.slow
def test_close_releases_files(model_dir, prompt):
    before = open_fds()
    model = load(model_dir("mixtral"))
    model(prompt)
    assert open_fds() > before  # the store keeps its shards open for reads
    model.offload.close()
    assert open_fds() == before


def test_stats_fields(model_dir, prompt):
    model = load(model_dir("mixtral"), cache_experts=3)
    model(prompt)
    model.offload.cache.drain()
    s = model.offload.stats()
    for key in ("hits", "misses", "evictions", "bytes_loaded", "capacity_experts", "resident_bytes", "per_layer"):
        assert key in s
    assert s["capacity_experts"] == 3
    assert s["hits"] + s["misses"] == sum(v["hits"] + v["misses"] for v in s["per_layer"].values())
    assert s["bytes_loaded"] == (s["misses"] + s["prefetch_issued"]) * s["expert_bytes"]
    assert sorted(s["per_layer"]) == [0, 1, 2]
    model.offload.reset_stats()
    assert model.offload.stats()["misses"] == 0


def test_tied_embeddings_are_tied_again(tmp_path):
    from tiny_models import make_model
    from transformers import AutoModelForCausalLM

    folder = make_model("qwen3_moe", tmp_path / "tied", tie_word_embeddings=True)
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = load(folder, dtype="float32")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.arange(10)[None]
    with torch.no_grad():
        assert torch.allclose(ref(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_dtype_that_disagrees_with_the_config(mixtral_copy):
    f = mixtral_copy / "model.safetensors"
    tensors = load_file(f)
    name = next(k for k in tensors if k.endswith("experts.0.w2.weight"))
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, f)
    expect(CheckpointError, "dtype int32", load, mixtral_copy)
    tensors[name] = tensors[name].float()
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int64)
    save_file(tensors, f)
    expect(CheckpointError, "model.norm.weight.*int64", load, mixtral_copy)


def test_the_default_budget_counts_the_dense_weights_in_the_compute_dtype(tmp_path, monkeypatch):
    """A bf16 checkpoint computed in float32 takes twice its file's bytes on the device: half the free memory
    less those, not less the bytes on disk."""
    from types import SimpleNamespace

    from offload_moe.checkpoint import open_checkpoint

    folder = write_synthetic_checkpoint(tmp_path / "bf16", "mixtral", dtype=torch.bfloat16, **SMALL)
    with open_checkpoint(folder) as ckpt:
        dense32, dense16 = ckpt.dense_bytes(torch.float32), ckpt.dense_bytes()
        expert32 = offload_moe.cache.SlotLayout(ckpt.modules[0].spec.shapes, torch.float32).nbytes
    assert dense32 == 2 * dense16
    free = 2 * (dense32 + 3 * expert32 + expert32 // 2)  # half of it: the dense weights and 3.5 experts in float32
    memory = SimpleNamespace(available=free, total=psutil.virtual_memory().total)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory)
    model = offload_moe.load(folder, dtype="float32", progress=False)
    try:
        assert model.offload.stats()["capacity_experts"] == 3  # counted from the bytes on disk: 4
    finally:
        model.offload.close()


def test_load_reads_config_json_once_when_given_the_config_read_before(monkeypatch):
    """``load_with_tokenizer`` reads config.json before the tokenizer and hands it to ``load``."""
    from offload_moe import checkpoint, generation

    reads = []
    real = checkpoint.read_config
    monkeypatch.setattr(checkpoint, "read_config", lambda *a, **k: reads.append(a) or real(*a, **k))
    model, _ = generation.load_with_tokenizer(None, cache_experts=4, progress=False)
    model.offload.close()
    assert len(reads) == 1
