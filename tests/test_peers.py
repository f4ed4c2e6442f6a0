"""benchmarks/peers: the llama.cpp side by side without building llama.cpp.

Tested here, with no network and no build: the command lines the module runs (download, configure, build,
convert, quantize, llama-bench), the parsing of llama-bench's JSON (a saved sample from the real binary), the
synthetic checkpoint's hub names and tokenizer (offload_moe reads the renamed checkpoint as it read the
original), where the benchmark's memory cgroup is made, and the round planning and comparisons.

Not tested here (they need the package index and a 10-minute build): ``build`` itself, and conversion and timing
with the real binaries; ``test_convert_and_bench_with_a_built_llama_cpp`` runs them where a build exists in the
default cache folder and is skipped elsewhere.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import cgroups  # noqa: E402
from benchmarks.peers import llama_cpp, side_by_side, synthetic  # noqa: E402

# `llama-bench -m tiny-f16.gguf -p 0 -n 8 -t 2 -r 2 -o json`, llama.cpp 0c1e570, a tiny synthetic Mixtral (2026-12-01)
BENCH_SAMPLE = """[
  {
    "build_commit": "0c1e570",
    "build_number": 1,
    "cpu_info": "Intel(R) Xeon(R) Processor",
    "gpu_info": "",
    "backends": "CPU",
    "model_filename": "/tmp/tiny-f16.gguf",
    "model_type": "llama ?B F16",
    "model_size": 478976,
    "model_n_params": 239040,
    "n_batch": 2048,
    "n_ubatch": 512,
    "n_threads": 2,
    "cpu_mask": "0x0",
    "cpu_strict": false,
    "poll": 50,
    "type_k": "f16",
    "type_v": "f16",
    "n_gpu_layers": -1,
    "n_cpu_moe": 0,
    "split_mode": "layer",
    "main_gpu": 0,
    "no_kv_offload": false,
    "flash_attn": -1,
    "devices": "auto",
    "tensor_split": "0.00",
    "tensor_buft_overrides": "none",
    "load_mode": "auto",
    "lazy_mode": "auto",
    "embeddings": false,
    "no_op_offload": 0,
    "no_host": false,
    "repack": true,
    "fit_target": 0,
    "fit_min_ctx": 0,
    "n_prompt": 0,
    "n_gen": 8,
    "n_depth": 0,
    "test_time": "2026-12-01T15:03:26Z",
    "avg_ns": 416357545,
    "stddev_ns": 588171378,
    "avg_ts": 8746.523428,
    "stddev_ts": 12355.858055,
    "samples_ns": [ 832257515, 457576 ],
    "samples_ts": [ 9.61241, 17483.4 ]
  }
]
"""


def test_command_lines():
    llama = llama_cpp.LlamaCpp(Path("/cache/0.3.36"), "0.3.36")
    assert llama_cpp.download_command("0.3.36", Path("/d"))[1:] == [
        "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "llama-cpp-python==0.3.36", "-d", "/d"]
    src = "/cache/0.3.36/llama_cpp_python-0.3.36/vendor/llama.cpp"
    configure = llama_cpp.configure_command(llama)
    assert configure[:7] == ["cmake", "-S", src, "-B", "/cache/0.3.36/build", "-G", "Ninja"]
    assert {"-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"} <= set(configure)
    assert llama_cpp.build_command(llama, 2) == ["cmake", "--build", "/cache/0.3.36/build", "-j", "2", "--target",
                                                 "llama-bench", "llama-quantize"]
    convert = llama_cpp.convert_command(llama, Path("/m/ck"), Path("/m/ck-f16.gguf"), "f16")
    assert convert[1:] == [f"{src}/convert_hf_to_gguf.py", "/m/ck", "--outfile", "/m/ck-f16.gguf", "--outtype", "f16"]
    assert llama_cpp.quantize_command(llama, Path("/m/a.gguf"), Path("/m/b.gguf"), "q4_0", 2) == [
        "/cache/0.3.36/build/bin/llama-quantize", "/m/a.gguf", "/m/b.gguf", "Q4_0", "2"]
    assert llama_cpp.bench_command(llama, Path("/m/b.gguf"), threads=2, tokens=16, repeats=3) == [
        "/cache/0.3.36/build/bin/llama-bench", "-m", "/m/b.gguf", "-p", "0", "-n", "16", "-t", "2", "-r", "3",
        "-o", "json"]
    assert llama_cpp.bench_command(llama, Path("/m/b.gguf"), threads=1, tokens=4, warmup=False)[-1] == "--no-warmup"
    assert llama_cpp.gguf_path(Path("/m/ck"), "q4_0") == Path("/m/ck-q4_0.gguf")
    assert llama_cpp.default_cache_dir("0.3.36") == Path.home() / ".cache/offload-moe/llama.cpp/0.3.36"
    assert llama_cpp.server_build_commands(llama, 2) == [
        ["cmake", "-S", src, "-B", "/cache/0.3.36/build", "-DLLAMA_BUILD_SERVER=ON"],
        ["cmake", "--build", "/cache/0.3.36/build", "-j", "2", "--target", "llama-server"]]
    assert llama_cpp.server_command(llama, Path("/m/b.gguf"), port=8123, threads=2, parallel=8, context=128) == [
        "/cache/0.3.36/build/bin/llama-server", "-m", "/m/b.gguf", "--host", "127.0.0.1", "--port", "8123",
        "-t", "2", "-np", "8", "-c", "1024", "--no-webui"]


def test_parse_bench_reads_the_decode_test_from_a_saved_sample():
    text = "some log line on stdout\n" + BENCH_SAMPLE
    result = llama_cpp.parse_bench(text)
    raw = json.loads(BENCH_SAMPLE)[0]
    assert result["tokens_per_s"] == raw["avg_ts"] > 0
    assert result["s_per_token"] == pytest.approx(1 / raw["avg_ts"])
    assert result["samples_tokens_per_s"] == raw["samples_ts"] and len(raw["samples_ts"]) == 2
    assert result["threads"] == 2 and result["tokens"] == 8
    assert result["build_commit"].startswith("0c1e570")


def test_parse_bench_says_what_is_missing():
    with pytest.raises(ValueError, match="-o json"):
        llama_cpp.parse_bench("no json here")
    prompt_only = [{"n_prompt": 512, "n_gen": 0, "avg_ts": 100.0}]
    with pytest.raises(ValueError, match="no decode test"):
        llama_cpp.parse_bench(json.dumps(prompt_only))


def test_convert_refuses_before_a_build_and_an_unknown_type(tmp_path):
    llama = llama_cpp.LlamaCpp(tmp_path / "none")
    with pytest.raises(SystemExit, match="not built"):
        llama_cpp.convert(llama, tmp_path / "ck", "f16")


def test_hub_names():
    assert synthetic.hub_name("model.layers.3.mlp.experts.7.gate_proj.weight") == \
        "model.layers.3.block_sparse_moe.experts.7.w1.weight"
    assert synthetic.hub_name("model.layers.0.mlp.experts.0.up_proj.weight") == \
        "model.layers.0.block_sparse_moe.experts.0.w3.weight"
    assert synthetic.hub_name("model.layers.0.mlp.experts.1.down_proj.weight") == \
        "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    assert synthetic.hub_name("model.layers.1.mlp.gate.weight") == "model.layers.1.block_sparse_moe.gate.weight"
    assert synthetic.hub_name("model.layers.1.self_attn.q_proj.weight") == "model.layers.1.self_attn.q_proj.weight"


@pytest.mark.parametrize("size", [400, 1000, 32000, 40000])
def test_the_synthetic_vocabulary_has_the_size_asked_and_merges_that_build_its_tokens(size):
    vocab, merges = synthetic.tokenizer_vocab(size)
    assert sorted(vocab.values()) == list(range(size))
    assert vocab["<unk>"] == 0 and vocab["<s>"] == 1 and vocab["</s>"] == 2 and vocab["<0xFF>"] == 258
    for a, b in merges:
        assert a in vocab and b in vocab and a + b in vocab


def _tiny(folder: Path) -> Path:
    from offload_moe.synthetic import write_synthetic_checkpoint

    return write_synthetic_checkpoint(folder, "mixtral", dtype=torch.bfloat16, num_hidden_layers=2, hidden_size=64,
                                      intermediate_size=128, num_local_experts=4, num_experts_per_tok=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                                      tie_word_embeddings=False, shard_bytes=300_000)


def test_prepare_renames_in_place_and_offload_moe_reads_the_same_model(tmp_path):
    import offload_moe
    from safetensors import safe_open
    from transformers import AutoTokenizer

    original, renamed = _tiny(tmp_path / "a"), _tiny(tmp_path / "b")
    synthetic.prepare(renamed)
    assert synthetic.prepare(renamed) == renamed  # a second call changes nothing
    names = set()
    for shard in sorted(renamed.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            names |= set(f.keys())
    assert len(list(renamed.glob("*.safetensors"))) > 1
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    assert not any(".mlp." in n for n in names)
    index = json.loads((renamed / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index) == names
    assert json.loads((renamed / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    tokenizer = AutoTokenizer.from_pretrained(renamed)
    assert tokenizer.vocab_size == 1000
    assert tokenizer.decode(tokenizer("hello wörld")["input_ids"]) == "hello wörld"  # bytes fall back

    ids = torch.tensor([[1, 5, 9, 300]])
    logits = []
    for folder in (original, renamed):
        model = offload_moe.load(folder, device="cpu", cache_experts=2, progress=False)
        with torch.inference_mode():
            logits.append(model(ids).logits)
        model.offload.close()
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_prepare_refuses_fused_experts_and_other_families(tmp_path):
    from offload_moe.synthetic import write_synthetic_checkpoint

    fused = write_synthetic_checkpoint(tmp_path / "f", "mixtral", num_hidden_layers=1, hidden_size=32,
                                       intermediate_size=64, num_local_experts=2, num_attention_heads=2,
                                       num_key_value_heads=1, vocab_size=500, layout="fused")
    with pytest.raises(SystemExit, match="per_expert"):
        synthetic.prepare(fused)
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "config.json").write_text('{"model_type": "qwen3_moe"}')
    with pytest.raises(SystemExit, match="Mixtral-shaped"):
        synthetic.prepare(tmp_path / "q")


def test_the_cgroup_is_made_below_this_process_own_group_only(tmp_path):
    # a container: the mount's root is its own group /docker/x; memory_cgroups maps paths under it, and a path
    # that merely starts with the same letters (/docker/xy/z) is not taken for one under it (as own_groups did)
    proc, memory = tmp_path / "proc", tmp_path / "sys" / "memory"
    (memory / "job").mkdir(parents=True)
    (tmp_path / "sys" / "xy" / "z").mkdir(parents=True)  # where "/docker/xy/z" less the prefix "/docker/x" lands
    proc.mkdir()
    (proc / "mountinfo").write_text(f"35 31 0:32 /docker/x {memory} rw - cgroup cgroup rw,memory\n")
    (proc / "cgroup").write_text("5:memory:/docker/x/job\n")
    group = cgroups.MemoryCgroup(1000, proc)
    assert group.folder.parent == memory / "job" and (group.folder / "memory.limit_in_bytes").read_text() == "1000\n"
    (proc / "cgroup").write_text("5:memory:/docker/xy/z\n")
    with pytest.raises(SystemExit, match="cannot make a memory cgroup"):
        cgroups.MemoryCgroup(1000, proc)
    assert list((tmp_path / "sys" / "xy" / "z").iterdir()) == []


def test_run_limited_without_a_limit_is_a_plain_run():
    done = cgroups.run_limited([sys.executable, "-c", "print('hi')"], None)
    assert (done.returncode, done.stdout.strip(), done.peak_bytes) == (0, "hi", None)


def test_a_kill_is_out_of_memory_else_the_exit_status_and_stderr():
    for status in (-9, 137):
        assert cgroups.Done(status, "", "").error("llama-bench exit status", tail=3) == cgroups.OUT_OF_MEMORY
    failed = cgroups.Done(1, "", "a\nb\nc\n")
    assert failed.error("llama-bench exit status", tail=2) == "llama-bench exit status 1: b | c"
    assert failed.error() == "exit status 1" and cgroups.Done(2, "", None).error(tail=2) == "exit status 2"


def _files(tmp_path):
    ours = {}
    for precision, size in (("bf16", 1000), ("int4", 300)):
        folder = tmp_path / precision
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * size)
        ours[precision] = folder
    gguf = {"f16": tmp_path / "m-f16.gguf", "q4_0": tmp_path / "m-q4_0.gguf"}
    return ours, gguf


def test_plan_pairs_each_precision_and_bounds_both_sides_alike(tmp_path):
    ours, gguf = _files(tmp_path)
    configs = side_by_side.plan_configs(ours, gguf, budgets=[0.25, 1.0], total_experts=16, limit_share=0.5)
    names = [c.name for c in configs]
    assert names[:4] == ["llama.cpp f16", "ours bf16 25% full mmap", "ours bf16 100% full mmap",
                         "llama.cpp f16, cgroup 0.00 GiB"]
    assert [c.capacity for c in configs if c.side == "ours"] == [4, 16, 4, 4, 16, 4]
    limited = [c for c in configs if c.limit]
    assert [(c.side, c.precision, c.limit) for c in limited] == [
        ("llama.cpp", "f16", 500), ("ours", "bf16", 500), ("llama.cpp", "q4_0", 150), ("ours", "int4", 150)]
    assert [c.variant for c in limited if c.side == "ours"] == ["full", "full"]
    assert all(c.files == (gguf["q4_0"],) for c in configs if c.precision == "q4_0")
    assert side_by_side.plan_configs(ours, gguf, budgets=[0.25], total_experts=16)[-1].limit is None


def test_rounds_interleave_and_comparisons_take_medians(tmp_path):
    ours, gguf = _files(tmp_path)
    configs = side_by_side.plan_configs({"bf16": ours["bf16"]}, {"f16": gguf["f16"]}, budgets=[0.25],
                                        total_experts=16, limit_share=0.5)
    order, speed = [], {"llama.cpp f16": [10, 12, 11], "ours bf16 25% full mmap": [9, 13, 11],
                        "llama.cpp f16, cgroup 0.00 GiB": [2, 2, 2], "ours bf16 25% full, cgroup 0.00 GiB": [5, 0, 6]}

    def run(config):
        order.append(config.name)
        s = speed[config.name][sum(1 for n in order if n == config.name) - 1]
        return {"tokens_per_s": s} if s else {"error": "killed: out of memory in the cgroup"}

    runs = side_by_side.run_rounds(configs, repeats=3, run=run)
    assert order == [c.name for c in configs] * 3
    rows = side_by_side.comparisons(runs)
    assert [(r["ratio"], r["target"], r["met"]) for r in rows] == [(1.0, 1.0, True), (2.75, 2.0, True)]
    assert rows[0]["ours"] == "11.00 (9.00-13.00)" and rows[1]["ours"] == "5.50 (5.00-6.00), 1 failed"
    table = side_by_side.format_table(rows)
    assert "| bf16 / f16 | all in RAM | 25% (full mmap) | 11.00 (9.00-13.00) | 11.00 (10.00-12.00) | 1.00x | 1.0x | yes |" in table


@pytest.mark.skipif(not llama_cpp.LlamaCpp(llama_cpp.default_cache_dir()).built or llama_cpp.missing_conversion_packages(),
                    reason="needs llama.cpp built in ~/.cache/offload-moe/llama.cpp (python -m benchmarks.peers.llama_cpp build) "
                           "in this environment, with what its converter imports (sentencepiece); tests install nothing")
@pytest.mark.slow
def test_convert_and_bench_with_a_built_llama_cpp(tmp_path):
    llama = llama_cpp.LlamaCpp(llama_cpp.default_cache_dir())
    folder = synthetic.prepare(_tiny(tmp_path / "tiny"))
    for gguf_type in ("f16", "q8_0", "q4_0"):
        model = llama_cpp.convert(llama, folder, gguf_type)
        assert model == tmp_path / f"tiny-{gguf_type}.gguf" and model.stat().st_size > 0
        result = llama_cpp.bench(llama, model, threads=1, tokens=4, repeats=1)
        assert result["tokens_per_s"] > 0 and result["tokens"] == 4, result
