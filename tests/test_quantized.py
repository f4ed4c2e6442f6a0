"""Quantized experts (issue 16): packed bytes flow store -> slot -> compute, with parity against transformers.

The reference is transformers' own model on the CPU with every weight dequantized: loaded from the quantized
checkpoint itself where transformers reads it right (MXFP4; block FP8 whose blocks tile every matrix), else
from a copy whose packed tensors are dequantized with ``offload_moe.quant`` (transformers 5.24's CPU FP8
loader takes a partial last block as a smaller block; see /work/shared/REFERENCE.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe import quant
from offload_moe.formats import ExpertFormat
from offload_moe.kernels import Scratch, int4_kernel_layout, quantized_linear
from offload_moe.errors import CheckpointError, ConfigError
from tiny_models import (dequantized_copy, load_dequantized, make_fp8_model, make_int_model, make_model,
                         make_mxfp4_model, relative_error)

RTOL = 1e-3
KERNEL_SIZES = dict(hidden_size=64, intermediate_size=96)
NEW_TOKENS = 16
STORED_IS_KERNELS = int4_kernel_layout() == quant.AVX512  # torch's int4 kernel reads the stored bytes as they lie


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made: dict[str, Path] = {}
    writers = {
        "qwen3_moe-fp8": lambda f: make_fp8_model("qwen3_moe", f),  # 16x16 blocks: partial blocks in 24-wide experts
        "deepseek_v3-fp8": lambda f: make_fp8_model("deepseek_v3", f),
        "qwen3_moe-fp8-tiled": lambda f: make_fp8_model("qwen3_moe", f, block=(8, 8)),  # transformers reads these right
        "gpt_oss-mxfp4": make_mxfp4_model,
        "mixtral-int8": lambda f: make_int_model("mixtral", f, 8),
        "mixtral-int4": lambda f: make_int_model("mixtral", f, 4),
        "gpt_oss-int4": lambda f: make_int_model("gpt_oss", f, 4),
        # groups of 32 and rows in multiples of 16: torch's CPU int4 kernel computes it (gate and up: 64 + 32 rows each)
        "mixtral-int4-kernel": lambda f: make_int_model("mixtral", f, 4, group_size=32, **KERNEL_SIZES),
        "mixtral-int8-kernel": lambda f: make_int_model("mixtral", f, 8, **KERNEL_SIZES),
    }

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = writers[kind](tmp_path_factory.mktemp(kind))
        return made[kind]
    return get


def reference(kind: str, folder: Path, tmp_path: Path):
    if kind in ("gpt_oss-mxfp4", "qwen3_moe-fp8-tiled"):  # transformers' own loader, dequantizing on the CPU
        return load_dequantized(folder, torch.float32)
    return AutoModelForCausalLM.from_pretrained(dequantized_copy(folder, tmp_path / "ref"), dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["qwen3_moe-fp8", "deepseek_v3-fp8", "qwen3_moe-fp8-tiled", "gpt_oss-mxfp4",
                                  "mixtral-int8", "mixtral-int4", "gpt_oss-int4", "mixtral-int4-kernel",
                                  "mixtral-int8-kernel"])
def test_parity_with_transformers_dequantized(checkpoints, kind, prompt, tmp_path):
    folder = checkpoints(kind)
    ref = reference(kind, folder, tmp_path)
    with torch.no_grad():
        want_logits = ref(prompt).logits
    want_tokens = ref.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    packed = _packed_bytes_per_expert(folder)
    for options in ({"cache_experts": 2}, {"cache_memory": "1GiB"}, {"cache_experts": 2, "io": "mmap"}):
        model = offload_moe.load(folder, dtype="float32", progress=False, **options)
        with torch.no_grad():
            got_logits = model(prompt).logits
        assert relative_error(want_logits, got_logits) <= RTOL, (kind, options)
        got_tokens = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        assert torch.equal(want_tokens, got_tokens), (kind, options)
        stats = model.offload.stats()
        assert stats["expert_format"] != "float32" and stats["expert_bytes"] == packed
        if options.get("cache_experts") == 2:
            assert stats["misses"] > 0 and stats["evictions"] + stats["mapped_experts"] > 0
            if "io" not in options:  # every miss moved the packed bytes as stored, no more
                assert stats["bytes_moved"]["disk"] == stats["misses"] * _packed_bytes_per_expert(folder, None)
        if options.get("io") == "mmap" and kind.endswith("fp8"):  # every expert tensor is mappable as stored
            assert stats["mapped_experts"] == stats["misses"] > 0
        model.offload.close()


def test_mxfp4_computes_from_the_mapped_packed_bytes(checkpoints, prompt):
    """gpt-oss in its own bf16: every miss is computed from the mapping, as from a slot."""
    folder = checkpoints("gpt_oss-mxfp4")
    slots = offload_moe.load(folder, cache_experts=2, progress=False)
    mapped = offload_moe.load(folder, cache_experts=2, io="mmap", progress=False)
    with torch.no_grad():
        assert torch.equal(slots(prompt).logits, mapped(prompt).logits)
    stats = mapped.offload.stats()
    assert stats["mapped_experts"] == stats["misses"] > 0 and stats["expert_format"] == "mxfp4"
    slots.offload.close()
    mapped.offload.close()


def test_plan_counts_packed_bytes(checkpoints):
    for kind in ("qwen3_moe-fp8", "gpt_oss-mxfp4", "mixtral-int4"):
        folder = checkpoints(kind)
        p = offload_moe.plan(folder, device_memory="1GiB", dtype="float32")
        assert p.expert_bytes == _packed_bytes_per_expert(folder)
        assert p.expert_format in str(p) and p.expert_format not in ("", "float32")


@pytest.mark.parametrize("kind", ["mixtral-int4", "mixtral-int4-kernel", "gpt_oss-int4"])
def test_plan_counts_the_bytes_each_miss_moves(checkpoints, prompt, kind):
    """int4's scales and zeros are stored in bfloat16: plan counts them so (as the slots hold them), and a miss reads
    exactly plan's bytes per expert (in the checkpoint's own dtype, which GPT-OSS's unpacked biases keep)."""
    folder = checkpoints(kind)
    dtype = "bfloat16" if kind.startswith("gpt_oss") else "float32"
    planned = offload_moe.plan(folder, device_memory="1GiB", dtype=dtype).expert_bytes
    model = offload_moe.load(folder, cache_experts=2, dtype=dtype, prefetch="none", io="buffered", progress=False)
    with torch.no_grad():
        model(prompt)
    s = model.offload.stats()
    model.offload.close()
    assert s["misses"] > 0 and s["bytes_moved"]["disk"] == s["misses"] * planned == s["misses"] * s["expert_bytes"]
    assert planned == _packed_bytes_per_expert(folder, None)


def test_int4_holds_about_3_75x_the_bf16_experts_at_the_same_memory(tmp_path):
    """int4 in groups of 128 with bfloat16 scales and zeros: 0.53 bytes a weight against bf16's 2."""
    sizes = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_local_experts=48)
    dense = make_model("mixtral", tmp_path / "bf16", **sizes)
    packed = make_int_model("mixtral", tmp_path / "int4", 4, group_size=128, **sizes)
    budget = 8 * 2**20
    ratios = []
    for slots in (lambda f: offload_moe.plan(f, device_memory=budget + 258 * 2**20, dtype="bfloat16").expert_slots,
                  lambda f: _capacity(f, budget)):
        ratios.append(slots(packed) / slots(dense))
    assert all(3.6 < r < 3.9 for r in ratios), ratios


def test_a_scale_that_does_not_match_its_weight_is_named(checkpoints, tmp_path):
    folder = Path(shutil.copytree(checkpoints("qwen3_moe-fp8"), tmp_path / "bad"))
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.1.mlp.experts.2.down_proj.weight_scale_inv"
    tensors[name] = torch.ones(3, 3)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model.safetensors.*experts\.2\.down_proj\.weight_scale_inv.*\[2, 2\]"):
        offload_moe.load(folder, cache_experts=2, progress=False)


def test_mxfp4_columns_that_groups_of_32_do_not_divide_are_named(tmp_path):
    folder = make_mxfp4_model(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.experts.down_proj_blocks"
    tensors[name] = tensors[name][:, :, :1].contiguous()  # as if the expert width were 32: the config says 64
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    assert config["intermediate_size"] == 64
    with pytest.raises(CheckpointError, match=r"down_proj_blocks.*must be uint8 \[4, 32, 2, 16\]"):
        offload_moe.load(folder, cache_experts=2, progress=False)


def test_an_int4_group_size_that_does_not_divide_the_columns_is_named(tmp_path):
    """Groups of 18 over 32 and 48 columns round up to the 2 and 3 groups that groups of 16 make: the shapes
    agree, so only the group size itself can refuse it (it once loaded and computed with groups of 16)."""
    folder = make_int_model("mixtral", tmp_path / "m", 4, group_size=16)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["group_size"] = 18
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model.safetensors: expert tensor '.*experts\.0\.w1\.weight.scales_and_zeros'"
                                              r": int4 groups of 18 columns .* do not divide its 32 columns"):
        offload_moe.load(folder, cache_experts=2, progress=False)


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_an_unknown_format_version_is_refused_naming_config_json(tmp_path, version):
    folder = make_int_model("mixtral", tmp_path / "m", 8)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["format_version"] = version
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json: quantization_config\.format_version = .* is not a version "
                                          r"of offload_moe's format this offload_moe reads \(1\)"):
        offload_moe.load(folder, cache_experts=2, progress=False)


def _capacity(folder: Path, budget: int) -> int:
    model = offload_moe.load(folder, cache_memory=budget, dtype="bfloat16", progress=False)
    try:
        return model.offload.stats()["capacity_experts"]
    finally:
        model.offload.close()


def _packed_bytes_per_expert(folder: Path, bias_itemsize: int | None = 4) -> int:
    """Bytes of one expert: its routed-expert tensors in the checkpoint over the experts, biases (which are not
    packed) at ``bias_itemsize`` bytes (the compute dtype's; None: as stored)."""
    tensors = load_file(folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    experts = next(config[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in config)
    names = [n for n in tensors if ".experts." in n]
    layers = {n.split(".")[2] for n in names}
    total = sum(tensors[n].numel() * (bias_itemsize if bias_itemsize and n.endswith("_bias") else tensors[n].element_size())
                for n in names)
    return total // (experts * len(layers))


@pytest.mark.parametrize(("fmt", "rows", "kernel"), [(ExpertFormat("int8"), (64, 32), True),
                                                     (ExpertFormat("int4", (32,)), (64, 48), STORED_IS_KERNELS),
                                                     (ExpertFormat("int4", (8,)), (64, 48), False),  # groups of 8: no kernel
                                                     (ExpertFormat("int4", (32,)), (40, 40), False)])  # rows not x16
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cpu_computes_int8_and_int4_with_torchs_packed_kernels(fmt, rows, kernel, dtype):
    """Row parts (a gate and an up projection, as a slot holds them) go to torch's packed kernels as they lie,
    never through the scratch; what the kernel cannot take is dequantized into it. Both agree with F.linear."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(r, 96, generator=g) for r in rows]
    if fmt.kind == "int8":
        quantized = [quant.quantize_int8(w) for w in parts]
        tensors = {"w.qweight": torch.cat([q for q, _ in quantized]), "w.scales": torch.cat([s for _, s in quantized])}
    else:
        quantized = [quant.quantize_int4(w, fmt.block[0]) for w in parts]
        tensors = {"w.qweight": torch.cat([q for q, _ in quantized])}
        if len(set(rows)) == 1:  # a slot: one entry per row part
            tensors["w.scales_and_zeros"] = torch.stack([sz.bfloat16() for _, sz in quantized])
        else:  # a mapping: one tensor per part
            tensors = {"w.qweight": tuple(q for q, _ in quantized),
                       "w.scales_and_zeros": tuple(sz.bfloat16() for _, sz in quantized)}
    weight = fmt.weights(tensors)["w"]
    x, bias = torch.randn(3, 96, generator=g).to(dtype), torch.randn(sum(rows), generator=g).to(dtype)
    scratch = Scratch()
    got = quantized_linear(x, weight, bias, scratch)
    dense = weight.dequantize(torch.empty(weight.shape))
    want = torch.nn.functional.linear(x.float(), dense, bias.float())
    assert got.dtype == dtype and got.shape == (3, sum(rows))
    assert relative_error(want, got) < (1e-5 if dtype == torch.float32 else 1e-2)
    assert (scratch.buffer is None) == kernel


@pytest.mark.parametrize("offset", [0, 8, 40])
def test_an_int8_weight_off_its_alignment_is_staged_not_crashed_on(offset):
    """torch's int8 kernel assumes an aligned weight and crashes the process (SIGSEGV) on one 8 bytes past a 16-byte
    boundary from 4 tokens on; a mapped file can give such a view. It is copied into the scratch first, and computes
    the same numbers as the aligned weight; an aligned one runs in place."""
    g = torch.Generator().manual_seed(0)
    q, scales = quant.quantize_int8(torch.randn(64, 96, generator=g))
    room = torch.zeros(q.numel() + 128, dtype=torch.int8)
    start = -room.data_ptr() % 64 + offset
    view = room[start : start + q.numel()].view(q.shape)
    view.copy_(q)
    weight = ExpertFormat("int8").weights({"w.qweight": view, "w.scales": scales})["w"]
    x = torch.randn(8, 96, generator=g).bfloat16()
    scratch = Scratch()
    got = quantized_linear(x, weight, None, scratch)
    want = quantized_linear(x, ExpertFormat("int8").weights({"w.qweight": q, "w.scales": scales})["w"], None, Scratch())
    assert torch.equal(got, want)
    assert (scratch.buffer is None) == (offset == 0)


def test_files_offload_moe_writes_start_their_data_on_a_cache_line(tmp_path):
    from offload_moe.safetensors_io import DATA_ALIGN, write_safetensors

    for names in (["a"], ["a", "bb", "a_much_longer_name_for_the_header"]):
        path = write_safetensors(tmp_path / f"{len(names)}.safetensors", [(n, torch.zeros(3, dtype=torch.int8)) for n in names])
        header_bytes = int.from_bytes(path.read_bytes()[:8], "little")
        assert (8 + header_bytes) % DATA_ALIGN == 0
        assert load_file(path)["a"].tolist() == [0, 0, 0]


# -- traces, replays and checksums on packed experts -------------------------------------------------------------
@pytest.mark.parametrize("predictor", ["none", "gate"])
def test_a_trace_recorded_on_int4_experts_replays_as_it_ran(checkpoints, predictor):
    """The routing recorded from an int4 checkpoint (torch's packed kernel computing) replays through the same
    policy and predictor with the live counts, and each expert the replay loads costs plan's packed bytes."""
    from test_profiling import _inline

    from offload_moe.profiling import replay
    from offload_moe.traces import record_trace

    folder = checkpoints("mixtral-int4-kernel")
    model = offload_moe.load(folder, cache_experts=3, policy="lru", prefetch=predictor, io="buffered", progress=False)
    model.offload.cache.mover.pool.submit = _inline  # each prefetch lands before the next layer, as the replay models
    trace = record_trace(model, [torch.tensor([5])], source="test", max_new_tokens=16, predict_margin=1)
    live = model.offload.stats()
    model.offload.close()
    replayed = replay(trace, "lru", 3, predictor=predictor, margin=1)
    assert live["evictions"] > 0 and trace.experts.shape == (16, 3, 2)  # the prompt token, 15 fed back
    assert (replayed.hits, replayed.misses, replayed.evictions) == (live["hits"], live["misses"], live["evictions"])
    assert replayed.prefetch_issued == live["prefetch_issued"]
    expert_bytes = offload_moe.plan(folder, device_memory="1GiB", dtype="float32").expert_bytes
    assert live["bytes_moved"]["disk"] == replayed.loads * expert_bytes


@pytest.mark.parametrize(("kind", "tensor"), [
    ("mixtral-int4", "model.layers.1.block_sparse_moe.experts.2.w2.weight.qweight"),
    ("mixtral-int8", "model.layers.1.block_sparse_moe.experts.2.w1.weight.scales"),
    ("gpt_oss-int4", "model.layers.1.mlp.experts.down_proj.scales_and_zeros"),  # fused [E, ...]: expert 2's share
])
def test_verify_checks_the_packed_bytes_and_names_a_flipped_one(checkpoints, tmp_path, kind, tensor):
    from typer.testing import CliRunner

    from offload_moe.cli import app
    from offload_moe.safetensors_io import read_header

    folder = Path(shutil.copytree(checkpoints(kind), tmp_path / "model"))
    runner = CliRunner()
    first = runner.invoke(app, ["verify", str(folder)])
    assert first.exit_code == 0 and "wrote checksums of 12 experts" in first.output, first.output
    again = runner.invoke(app, ["verify", str(folder)])
    assert again.exit_code == 0 and "all 12 experts match" in again.output
    info = read_header(folder / "model.safetensors")[tensor]
    at = info.offset + (2 * info.nbytes // 4 if ".experts.down_proj" in tensor else 0) + 1  # a byte of expert 2
    with open(folder / "model.safetensors", "r+b") as f:
        f.seek(at)
        byte = f.read(1)[0]
        f.seek(at)
        f.write(bytes([byte ^ 0x01]))
    result = offload_moe.verify(folder)
    assert [(layer, expert) for layer, expert, _ in result.bad] == [(1, 2)]
    bad = runner.invoke(app, ["verify", str(folder)])
    assert bad.exit_code == 1 and "expert 2 of layer 1 differs" in bad.output
