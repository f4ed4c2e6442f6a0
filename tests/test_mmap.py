"""io="mmap" on CPU: missing experts computed in place from the mapped checkpoint."""

from __future__ import annotations

import gc
import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import offload_moe
from offload_moe.errors import CheckpointError, ExpertLoadError
from offload_moe.safetensors_io import MappedFiles
from offload_moe.kernels import RowBlocks, linear
from offload_moe.synthetic import write_synthetic_checkpoint
from test_prefetch import NEW, check_parity, reference_tokens


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "olmoe"])
@pytest.mark.parametrize("settings", [
    dict(prefetch="none"),
    dict(prefetch="gate", prefetch_margin=2),
    dict(prefetch="hybrid", prefetch_depth=2),
])
def test_output_unchanged_when_misses_are_computed_from_the_mapping(family, settings, model_dir, prompt):
    folder = model_dir(family)
    logits, tokens = reference_tokens(folder, prompt)
    for capacity in (2, 5):
        model = offload_moe.load(folder, cache_experts=capacity, dtype="float32", io="mmap", progress=False, **settings)
        check_parity(model, prompt, logits, tokens)
        assert model.offload.stats()["mapped_experts"] > 0  # the per-expert checkpoint maps as row blocks
        model.offload.close()


def fused_checkpoint(folder, model_type="qwen3_moe", dtype=torch.float32, **extra):
    return write_synthetic_checkpoint(folder, model_type, dtype=dtype, layout="fused", vocab_size=96, hidden_size=32,
                                      intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                      num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, **extra)


def generate(folder, prompt, **settings):
    model = offload_moe.load(folder, cache_experts=2, progress=False, **settings)
    with torch.no_grad():
        logits = model(prompt).logits
    tokens = model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    stats = model.offload.stats()
    model.offload.close()
    return logits, tokens, stats


def test_fused_checkpoint_maps_whole_experts_and_matches_slot_loads(tmp_path, prompt):
    folder = fused_checkpoint(tmp_path / "fused")
    want_logits, want_tokens, _ = generate(folder, prompt, io="direct")
    logits, tokens, stats = generate(folder, prompt, io="mmap")
    assert torch.equal(want_logits, logits) and torch.equal(want_tokens, tokens)
    assert stats["mapped_experts"] == stats["misses"] > 0
    assert stats["bytes_moved"]["mapped"] == stats["mapped_experts"] * stats["expert_bytes"]


def test_gpt_oss_in_its_own_dtype_maps_its_transposed_experts(model_dir, prompt):
    folder = model_dir("gpt_oss")  # bf16, fused, transposed, with biases
    want_logits, want_tokens, _ = generate(folder, prompt, io="direct", dtype="bfloat16")
    logits, tokens, stats = generate(folder, prompt, io="mmap", dtype="bfloat16")
    assert torch.equal(want_logits, logits) and torch.equal(want_tokens, tokens)
    assert stats["mapped_experts"] > 0


def test_a_checkpoint_in_another_dtype_is_loaded_into_slots_instead(model_dir, prompt):
    folder = model_dir("gpt_oss")  # bf16 on disk, float32 wanted: a conversion, so no mapping
    logits, tokens = reference_tokens(folder, prompt)
    model = offload_moe.load(folder, cache_experts=2, dtype="float32", io="mmap", progress=False)
    check_parity(model, prompt, logits, tokens)
    stats = model.offload.stats()
    assert stats["mapped_experts"] == 0 and stats["bytes_moved"]["disk"] > 0
    model.offload.close()


def test_stats_add_up_and_misses_take_no_slot(model_dir, prompt):
    model = offload_moe.load(model_dir("mixtral"), cache_experts=3, dtype="float32", io="mmap", prefetch="gate",
                             progress=False)
    model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    model.offload.cache.drain()
    s = model.offload.stats()
    requests = sum(c["hits"] + c["misses"] for c in s["per_layer"].values())
    assert s["hits"] + s["misses"] == requests > 0
    # Every miss is computed in place: nothing is read into a slot, so nothing is evicted either.
    assert s["mapped_experts"] == s["misses"] == requests
    assert s["evictions"] == s["resident_experts"] == s["bytes_moved"]["disk"] == 0
    assert s["bytes_moved"]["mapped"] == s["misses"] * s["expert_bytes"]
    # Prefetch is read-ahead advice: each piece of advice is used or wasted once its layer runs.
    assert s["prefetch_issued"] > 0
    assert 0 < s["prefetch_used"] and s["prefetch_used"] + s["prefetch_wasted"] <= s["prefetch_issued"]
    assert s["prefetch_recall"] == pytest.approx(s["prefetch_used"] / requests)
    model.offload.close()


def test_a_budget_for_every_expert_is_filled_at_load_and_never_misses(model_dir, prompt):
    model = offload_moe.load(model_dir("mixtral"), cache_memory="1GiB", dtype="float32", io="mmap", progress=False)
    model.generate(prompt, max_new_tokens=4, do_sample=False)
    s = model.offload.stats()
    assert s["misses"] == s["mapped_experts"] == 0 and s["hits"] > 0
    model.offload.close()


def test_mmap_needs_the_cpu(model_dir):
    from offload_moe.errors import ConfigError
    from offload_moe.hardware import read_profile

    bad = model_dir("mixtral").parent / "gpu-mmap.toml"
    bad.write_text('description = "x"\ndevice = "cuda"\ndevice_memory = "8GiB"\nio = "mmap"\n')
    with pytest.raises(ConfigError, match=r"gpu-mmap.toml: io='mmap' .* needs device='cpu' \(got cuda\)"):
        read_profile(bad)  # the message OffloadConfig gives, from the same check
    bad.write_text('description = "x"\ndevice = "cpu"\ndevice_memory = "8GiB"\nio = "aio"\n')
    with pytest.raises(ConfigError, match="not an I/O mode"):
        read_profile(bad)


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_the_model_files_are_never_written(tmp_path, prompt):
    folder = fused_checkpoint(tmp_path / "fused")
    before = digest(folder)
    model = offload_moe.load(folder, cache_experts=2, io="mmap", progress=False)
    model.generate(prompt, max_new_tokens=4, do_sample=False)
    expert = model.offload.cache.store.mapped(model.offload.modules[0].layer, 0, torch.float32)
    for t in expert.values():
        t.fill_(7.0)  # a stray in-place write stays in this process: the mapping is copy-on-write
    model.offload.close()
    del model, expert, t
    gc.collect()
    assert digest(folder) == before
    maps = Path("/proc/self/maps")
    if maps.exists():  # every mapping of the checkpoint went with the model
        assert str(folder) not in maps.read_text()


def test_mapped_files_view_bytes_without_copying_and_reject_misaligned_tensors(tmp_path):
    path = tmp_path / "data.bin"
    data = torch.arange(64, dtype=torch.float32)
    path.write_bytes(data.numpy().tobytes())
    maps = MappedFiles()
    view = maps.tensor(path, 16, torch.float32, (4, 2))
    assert torch.equal(view, data[4:12].view(4, 2))
    assert maps.tensor(path, 16, torch.float32, (4,)).data_ptr() == view.data_ptr()  # one mapping, shared
    maps.willneed(path, 0, 256)
    with pytest.raises(CheckpointError, match="not aligned"):
        maps.tensor(path, 2, torch.float32, (1,))
    maps.close()
    assert torch.equal(view, data[4:12].view(4, 2))  # a live view keeps its mapping until it goes


def test_row_blocks_compute_the_joined_weight():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 5, generator=g), torch.randn(8, 5, generator=g), torch.randn(8, generator=g)
    split = RowBlocks((w[:3], w[3:]))
    want = torch.nn.functional.linear(x, w, b)
    assert torch.allclose(linear(x, split, RowBlocks((b[:3], b[3:]))), want, atol=1e-6)
    assert torch.allclose(linear(x, split, b), want, atol=1e-6)
    assert torch.allclose(linear(x, w, None), torch.nn.functional.linear(x, w), atol=1e-6)


def misaligned(folder):
    """Pad the header of ``folder``'s single shard so that every float32 tensor starts at 2 (mod 4)."""
    import struct

    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = raw[8 : 8 + n].rstrip(b" ")
    header += b" " * ((2 - len(header)) % 4)
    path.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n :])
    return folder


def test_a_misaligned_checkpoint_is_read_into_slots_instead(tmp_path, prompt):
    folder = misaligned(fused_checkpoint(tmp_path / "fused"))
    want_logits, want_tokens, _ = generate(folder, prompt, io="direct")
    logits, tokens, stats = generate(folder, prompt, io="mmap", prefetch="gate")
    assert torch.equal(want_logits, logits) and torch.equal(want_tokens, tokens)
    assert stats["mapped_experts"] == 0 and stats["bytes_moved"]["disk"] > 0


def test_a_file_that_cannot_be_mapped_falls_back_with_a_warning(tmp_path, prompt, monkeypatch):
    import offload_moe.safetensors_io as sio

    def refuse(fd):
        raise OSError(12, "Cannot allocate memory")

    folder = fused_checkpoint(tmp_path / "fused")
    want_logits, want_tokens, _ = generate(folder, prompt, io="direct")
    monkeypatch.setattr(sio, "_private_map", refuse)
    with pytest.warns(UserWarning, match="cannot map .*Cannot allocate memory.*read into slots"):
        logits, tokens, stats = generate(folder, prompt, io="mmap", prefetch="gate")
    assert torch.equal(want_logits, logits) and torch.equal(want_tokens, tokens)
    assert stats["mapped_experts"] == 0


def test_a_failure_while_mapping_releases_the_layers_pins(tmp_path, prompt, monkeypatch):
    folder = fused_checkpoint(tmp_path / "fused")
    model = offload_moe.load(folder, cache_experts=7, io="mmap", progress=False)  # of 8 experts
    cache = model.offload.cache
    cache.store.maps = None  # misses now go through the slots, so experts become resident
    model.generate(prompt, max_new_tokens=2, do_sample=False)
    assert len(cache.residency) == 7

    def broken(layer, expert):  # the layer has pinned its resident experts by now
        assert cache.residency.pins
        raise RuntimeError("mapping failed")

    monkeypatch.setattr(cache.source, "view", broken)
    with pytest.raises(RuntimeError, match="mapping failed"):
        model.generate(prompt, max_new_tokens=2, do_sample=False)
    assert not any(cache.residency.pins.values())  # the hits acquired before the failure were released
    cache.residency.check()
    model.offload.close()


def test_host_memory_with_mmap_is_refused(model_dir):
    from offload_moe.errors import ConfigError

    with pytest.raises(ConfigError, match="host_memory adds nothing with io='mmap'"):
        offload_moe.load(model_dir("mixtral"), cache_experts=2, io="mmap", host_memory="1GiB", progress=False)


# -- a checkpoint file that changes on disk after load ------------------------------------------------------------
def test_a_mapping_follows_its_file_and_refuses_bytes_past_its_end(tmp_path):
    """Truncated after mapping: refused (never touched, which would be SIGBUS). Restored in place or replaced:
    mapped afresh. Removed: refused, naming the file."""
    path = tmp_path / "data.bin"
    data = torch.arange(4096, dtype=torch.float32)  # 16 KiB: four pages
    path.write_bytes(data.numpy().tobytes())
    maps = MappedFiles()
    assert torch.equal(maps.tensor(path, 12288, torch.float32, (16,)), data[3072:3088])
    with open(path, "r+b") as f:
        f.truncate(4096)
    with pytest.raises(CheckpointError, match=rf"{path} is 4096 bytes long.*truncated or replaced.*restore it"):
        maps.tensor(path, 12288, torch.float32, (16,))
    assert torch.equal(maps.tensor(path, 0, torch.float32, (4,)), data[:4])  # what is still there maps
    path.write_bytes(data.numpy().tobytes())  # restored in place (same inode)
    assert torch.equal(maps.tensor(path, 12288, torch.float32, (16,)), data[3072:3088])
    replaced = tmp_path / "new.bin"
    replaced.write_bytes((data * 2).numpy().tobytes())
    os.replace(replaced, path)  # another file under the same name
    assert torch.equal(maps.tensor(path, 12288, torch.float32, (16,)), 2 * data[3072:3088])
    path.unlink()
    with pytest.raises(CheckpointError, match=rf"{path} cannot be opened any more"):
        maps.tensor(path, 0, torch.float32, (4,))
    maps.close()


def test_a_mapping_made_while_the_file_was_short_is_not_kept(tmp_path):
    path = tmp_path / "data.bin"
    data = torch.arange(4096, dtype=torch.float32)
    path.write_bytes(data[:1024].numpy().tobytes())  # mapped while truncated...
    maps = MappedFiles()
    assert torch.equal(maps.tensor(path, 0, torch.float32, (4,)), data[:4])
    with pytest.raises(CheckpointError, match="truncated or replaced"):
        maps.tensor(path, 12288, torch.float32, (16,))
    path.write_bytes(data.numpy().tobytes())  # ...then restored
    assert torch.equal(maps.tensor(path, 12288, torch.float32, (16,)), data[3072:3088])
    maps.close()
    with pytest.raises(offload_moe.OffloadMoEError, match="closed"):  # closed for good: nothing is mapped again
        maps.tensor(path, 0, torch.float32, (4,))


def truncate(shard, keep):
    with open(shard, "r+b") as f:
        f.truncate(keep)


def restore(shard, original):
    with open(shard, "r+b") as f:  # in place: the same inode, a new size and modification time
        f.write(original)


def header_end(raw):
    import struct

    return 8 + struct.unpack("<Q", raw[:8])[0]


def test_a_shard_truncated_before_its_first_mapping_works_again_once_restored(tmp_path, prompt):
    folder = fused_checkpoint(tmp_path / "fused")
    _, want, _ = generate(folder, prompt, io="direct")
    shard = folder / "model.safetensors"
    original = shard.read_bytes()
    model = offload_moe.load(folder, cache_experts=2, io="mmap", prefetch="gate", progress=False)
    truncate(shard, header_end(original) + 64)  # every expert is past the new end; the dense weights are loaded
    with pytest.raises(ExpertLoadError, match=rf"expert \d+ of layer \d+ .* from {shard} failed: {shard} is "
                                              rf"\d+ bytes long.*truncated or replaced.*restore it"):
        model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    cache = model.offload.cache
    assert not cache.residency.pins and cache.stats()["load_failures"] >= 1
    restore(shard, original)
    assert torch.equal(model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False), want)
    model.offload.close()


# Runs in its own process: without the checks, touching a page past the end of a truncated file is SIGBUS.
TRUNCATE_SCRIPT = r"""
import os, struct, sys
from pathlib import Path
import torch
import offload_moe
from offload_moe.errors import ExpertLoadError

folder = Path(sys.argv[1])
shard = folder / "model.safetensors"
original = shard.read_bytes()
short = original[: 8 + struct.unpack("<Q", original[:8])[0] + 64]  # every expert is past its end
prompt = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
model = offload_moe.load(folder, cache_experts=2, io="mmap", prefetch="gate", progress=False)


def run():
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)


def fails(what):
    try:
        run()
    except ExpertLoadError as e:
        print(what, "->", e, flush=True)
        assert not model.offload.cache.residency.pins
        return
    sys.exit(f"{what}: no error")


def replace(data):
    (folder / "new.tmp").write_bytes(data)
    os.replace(folder / "new.tmp", shard)


want = run()  # the file is mapped at its full size
with open(shard, "r+b") as f:
    f.truncate(len(short))
fails("truncated after mapping")
with open(shard, "r+b") as f:
    f.write(original)
assert torch.equal(run(), want), "restored in place"
replace(short)
fails("replaced by a short file")
replace(original)
assert torch.equal(run(), want), "replaced by the whole file"
model.offload.close()
print("OK")
"""


@pytest.mark.slow  # a fresh interpreter: a few seconds
def test_a_shard_truncated_after_mapping_gives_a_clear_error_and_works_again_once_restored(tmp_path):
    folder = fused_checkpoint(tmp_path / "fused")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(offload_moe.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", TRUNCATE_SCRIPT, str(folder)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode} (-7 is SIGBUS)\n{done.stdout}\n{done.stderr[-3000:]}"
    lines = done.stdout.splitlines()
    assert lines[-1] == "OK"
    errors = [line for line in lines if "->" in line]
    assert len(errors) == 2
    for line in errors:  # names the layer, the expert and the file, and says what to do
        assert re.search(rf"loading expert \d+ of layer \d+ \(.*experts\) from {folder / 'model.safetensors'} failed: "
                         rf".* is \d+ bytes long.*truncated or replaced.*restore it", line), line


def test_an_expert_read_ahead_is_not_advised_again_when_its_layer_maps_it():
    from offload_moe.cache import FlowCounters
    from offload_moe.sources import MappedSource

    class Store:  # maps every expert; counts the kernel's read-ahead advice
        def __init__(self):
            self.advised = []

        def mapped(self, layer, expert, dtype):
            return {"w": torch.zeros(1)}

        def willneed(self, layer, expert):
            self.advised.append((layer, expert))

    store, flow = Store(), FlowCounters()
    source = MappedSource(store, torch.float32)
    assert source.read_ahead((0, 1), flow) and store.advised == [(0, 1)]
    source.settle(0, [1, 2], set(), flow)  # layer 0 runs with 1 (read ahead) and 2 (not)
    source.view(0, 1)
    source.view(0, 2)
    assert store.advised == [(0, 1), (0, 2)] and flow.mapped_ahead == 1
    source.settle(1, [1], set(), flow)  # the next layer: what was read ahead for layer 0 is forgotten
    source.view(0, 1)
    assert store.advised == [(0, 1), (0, 2), (0, 1)]
