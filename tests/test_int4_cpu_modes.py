"""int4 experts run torch's packed CPU kernel whatever CPU code torch runs (AVX-512, AVX2, plain).

Files store the AVX-512 layout; on the other CPU codes the slots hold the one torch's kernel reads there
(``kernels.held_format``), rearranged as the mover fills them. ``ATEN_CPU_CAPABILITY`` is read when torch is
imported, so each CPU code runs in a subprocess: it loads a tiny int4 Mixtral (rows in multiples of 16, groups of
32: shapes the kernel takes) with slots, a host tier, every expert resident, and ``io="mmap"``, and reports its
logits, greedy tokens and how many weights were dequantized. The reference is transformers' own model with the
int4 weights dequantized to float32.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe import kernels, quant
from offload_moe.formats import ExpertFormat
from tiny_models import dequantized_copy, make_int_model, relative_error

RTOL = 1e-3  # float32 activations: the kernel's sums in another order than F.linear's
NEW_TOKENS = 8
ROOT = Path(offload_moe.__file__).resolve().parents[1]
RUNS = {"slots": {"cache_experts": 2}, "prefetch": {"cache_experts": 3, "prefetch": "gate"},
        "host tier": {"cache_experts": 2, "host_memory": "40KiB"}, "all resident": {"cache_memory": "1GiB"},
        "mmap": {"cache_experts": 2, "io": "mmap"}}

CHILD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
import offload_moe
from offload_moe import kernels, quant

folder, source = sys.argv[1], sys.argv[2]
prompt, runs, new_tokens = torch.tensor(json.loads(sys.argv[3])), json.loads(sys.argv[4]), int(sys.argv[5])
dequantize, calls = quant.dequantize_int4, []
def counted(*args, **kwargs):  # every int4 weight dequantized to compute passes here (formats calls quant's)
    calls.append(1)
    return dequantize(*args, **kwargs)
quant.dequantize_int4 = counted

layout = kernels.int4_kernel_layout()
out = {"capability": torch.backends.cpu.get_cpu_capability(), "layout": layout and layout.name, "runs": {}}
g = torch.Generator().manual_seed(0)
w, x = torch.randn(240, 128, generator=g), torch.randn(3, 128, generator=g)  # 240 rows: a last tile of 48 (16) rows
packed, sz = quant.quantize_int4(w, 32)
want = x @ dequantize(packed, sz, torch.float32).T
got = torch._weight_int4pack_mm_for_cpu(x, quant.convert_int4_tiles(packed, layout), 32, sz)
out["kernel_error"] = ((got - want).abs().max() / want.abs().max()).item()
runs["offload_experts"] = {"cache_experts": 2}  # a model built in memory, packed by quantize="int4"
for name, options in runs.items():
    calls.clear()
    if name == "offload_experts":
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
        offload_moe.offload_experts(model, quantize="int4", group_size=32, **options)
    else:
        model = offload_moe.load(folder, dtype="float32", progress=False, **options)
    with torch.no_grad():
        logits = model(prompt).logits
    tokens = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    s = model.offload.stats()
    out["runs"][name] = {"logits": logits.tolist(), "tokens": tokens.tolist(), "dequantized": len(calls),
                         "misses": s["misses"], "moved": s["bytes_moved"], "mapped": s["mapped_experts"],
                         "prefetched": s["prefetch_issued"],
                         "expert_bytes": s["expert_bytes"], "io_reason": s["io_reason"]}
    model.offload.close()
print(json.dumps(out))
"""


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def int4_model(tmp_path_factory):
    """A tiny int4 Mixtral the kernel takes (gate and up: 96 rows each, a tile of 64 and a last one of 32; down:
    64 rows; groups of 32), and transformers' logits and greedy tokens on its dequantized weights."""
    folder = make_int_model("mixtral", tmp_path_factory.mktemp("int4") / "model", 4, group_size=32, hidden_size=64,
                            intermediate_size=96)
    ref = AutoModelForCausalLM.from_pretrained(dequantized_copy(folder, folder.with_name("ref")),
                                               dtype=torch.float32).eval()
    prompt = torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = ref(prompt).logits
    tokens = ref.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return folder, prompt, logits, tokens


def run_under(mode: str, folder: Path, prompt: torch.Tensor) -> dict:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": mode, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    source = folder.with_name(f"{folder.name}-source")  # the float checkpoint make_int_model quantized
    result = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(source), json.dumps(prompt.tolist()),
                             json.dumps(RUNS), str(NEW_TOKENS)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize(("mode", "capability", "layout"),
                         [("avx2", "AVX2", "avx2"), ("default", "DEFAULT", "default")])
def test_int4_runs_torchs_kernel_under_each_cpu_code(int4_model, mode, capability, layout):
    """No int4 weight is dequantized to compute: each runs torch's kernel from a slot's converted bytes, in every
    way experts reach a slot (a miss, a prefetch, the host tier, the fill at load, ``io="mmap"``), under ``load`` and
    ``offload_experts(quantize="int4")``; logits within RTOL and the same greedy tokens as transformers' dequantized
    model; a miss moves the stored bytes, no more; the model's files are untouched."""
    folder, prompt, want_logits, want_tokens = int4_model
    before = digest(folder)
    out = run_under(mode, folder, prompt)
    if out["capability"] != capability:
        pytest.skip(f"this CPU runs torch's {out['capability']} code under ATEN_CPU_CAPABILITY={mode}")
    assert out["layout"] == layout
    assert out["kernel_error"] < 2e-5  # the kernel on the converted bytes: the dequantized product, float32
    for name, run in out["runs"].items():
        assert run["dequantized"] == 0, name  # the kernel path, not the dequantize fallback
        assert relative_error(want_logits, torch.tensor(run["logits"])) <= RTOL, name
        assert run["tokens"] == want_tokens.tolist(), name
        disk, expert = run["moved"]["disk"], run["expert_bytes"]
        assert disk % expert == 0, name  # whole experts as stored
        if name in ("slots", "mmap"):  # each miss read one expert's stored bytes, no more
            assert run["misses"] > 0 and disk == run["misses"] * expert, name
    mmap = out["runs"]["mmap"]
    assert mmap["mapped"] == 0 and mmap["moved"]["mapped"] == 0  # read into slots, never computed from the mapping
    assert "converted into this CPU's kernel layout" in mmap["io_reason"]
    assert out["runs"]["host tier"]["moved"]["host_to_device"] > 0  # host slots hold converted bytes, copied as they are
    assert out["runs"]["prefetch"]["prefetched"] > 0
    assert digest(folder) == before


# -- which format the slots hold (this process) -------------------------------------------------------------------
INT4 = ExpertFormat("int4", (32,))
SHAPES = {"gate_up_proj.qweight": (192, 32), "gate_up_proj.scales_and_zeros": (2, 2, 96, 2),
          "down_proj.qweight": (64, 48), "down_proj.scales_and_zeros": (1, 3, 64, 2)}


@pytest.mark.parametrize("kernel_layout", [quant.AVX2, quant.DEFAULT])
def test_cpu_slots_hold_int4_in_the_kernels_layout_where_it_takes_every_weight(monkeypatch, kernel_layout):
    monkeypatch.setattr(kernels, "int4_kernel_layout", lambda: kernel_layout)
    cpu = torch.device("cpu")
    assert kernels.held_format(INT4, SHAPES, cpu) == ExpertFormat("int4", (32,), kernel_layout)
    assert kernels.held_format(ExpertFormat("int4", (16,)), SHAPES, cpu).int4_layout == quant.AVX512  # no kernel for 16
    rows_40 = {**SHAPES, "down_proj.scales_and_zeros": (1, 3, 40, 2)}
    assert kernels.held_format(INT4, rows_40, cpu) == INT4  # a row part the kernel does not take: dequantized anyway
    assert kernels.held_format(INT4, SHAPES, torch.device("meta")) == INT4  # not the CPU: dequantized
    assert kernels.held_format(ExpertFormat("int8"), {}, cpu) == ExpertFormat("int8")


@pytest.mark.parametrize("kernel_layout", [quant.AVX512, None])
def test_cpu_slots_hold_int4_as_stored_where_the_kernel_reads_it_or_none_is_known(monkeypatch, kernel_layout):
    monkeypatch.setattr(kernels, "int4_kernel_layout", lambda: kernel_layout)
    assert kernels.held_format(INT4, SHAPES, torch.device("cpu")) == INT4


def test_the_benchmark_runs_quick_and_writes_its_json(tmp_path):
    """benchmarks/int4_layouts.py --quick (this process's CPU code): every row measured, the kernel path taken."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("int4_layouts_benchmark", ROOT / "benchmarks" / "int4_layouts.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    report = script.main(["--quick", "--json", str(tmp_path / "int4.json")])
    result = json.loads((tmp_path / "int4.json").read_text())["result"]
    assert result == json.loads(json.dumps(report["result"]))
    assert set(result["seconds"]) == {"fallback", "kernel", "convert", "copy", "unpack+torch pack"}
    assert all(min(row["rounds"]) > 0 for row in result["seconds"].values())
    assert result["kernel_path"] and result["relative_error"] < 2e-2  # bf16 activations
