"""quantize_experts and `offload-moe quantize`: the folder they write (format version 1, docs/quantization.md),
its fidelity to the source, its size, atomicity, and the inputs refused."""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import offload_moe
import offload_moe.quantize as quantize_module
from offload_moe import CheckpointError, ConfigError, quantize_experts
from offload_moe.cli import app
from offload_moe.quant import dequantize_int4, dequantize_int8, quantize_int4, unpack_int4_tiles
from tiny_models import make_model

# Expert weights of the families below, named independently of the store's index: per-expert (Mixtral, Qwen3,
# OLMoE), fused and transposed (GPT-OSS: [E, in, out]), fused and renamed (GraniteMoE: input_linear [E, out, in]).
EXPERT_WEIGHT = re.compile(r"\.experts\.([0-9]+\.\w+\.weight|gate_up_proj|down_proj)$|\.(input|output)_linear\.weight$")
TRANSPOSED = {"gpt_oss"}
FAMILIES = ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "granitemoe"]
TINY_GROUP = 8  # divides every tiny model's expert widths (24, 32, 48); the bundled model's 192 takes 64


@pytest.fixture(scope="module")
def quantized(model_dir, tmp_path_factory):
    """``quantized(family, bits, group_size=None)`` -> (source folder, the folder quantize_experts wrote)."""
    made = {}

    def get(family: str, bits: int, group_size: int | None = None) -> tuple[Path, Path]:
        group_size = TINY_GROUP if bits == 4 and group_size is None else group_size
        key = (family, bits, group_size)
        if key not in made:
            out = tmp_path_factory.mktemp("quantized") / f"{family}-int{bits}"
            quantize_experts(model_dir(family), out, bits=bits, group_size=group_size, progress=False)
            made[key] = (model_dir(family), out)
        return made[key]

    return get


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            found.update({name: f.get_tensor(name) for name in f.keys()})
    return found


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in folder.iterdir()}


# -- the folder written ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("bits", "group_size", "settings"), [
    (8, None, {"quant_method": "offload_moe", "format_version": 1, "bits": 8}),
    (4, None, {"quant_method": "offload_moe", "format_version": 1, "bits": 4, "group_size": TINY_GROUP}),
    (4, 16, {"quant_method": "offload_moe", "format_version": 1, "bits": 4, "group_size": 16}),
])
def test_config_gains_the_quantization_config_and_the_other_files_are_copied(quantized, bits, group_size, settings):
    source, out = quantized("mixtral", bits, group_size)
    config = json.loads((out / "config.json").read_text())
    assert config.pop("quantization_config") == settings
    assert config == json.loads((source / "config.json").read_text())
    assert (out / "generation_config.json").read_bytes() == (source / "generation_config.json").read_bytes()
    assert [p.name for p in out.glob("*.safetensors")] == ["model-00001-of-00001.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_tensor_but_the_expert_weights_is_copied_byte_for_byte(quantized, family):
    source, out = quantized(family, 4)
    before, after = tensors(source), tensors(out)
    experts = {n for n in before if EXPERT_WEIGHT.search(n)}
    assert experts, "the family's expert weights were not recognised by the test"
    expected = {n for n in before if n not in experts}
    expected |= {f"{n}.{c}" for n in experts for c in ("qweight", "scales_and_zeros")}
    assert set(after) == expected
    for name in set(before) - experts:
        assert after[name].dtype == before[name].dtype and after[name].shape == before[name].shape, name
        assert torch.equal(after[name].view(torch.uint8), before[name].view(torch.uint8)), name


def logical(family: str, weight: torch.Tensor) -> torch.Tensor:
    """The source weight as W [..., out, in] (F.linear's layout)."""
    return weight.float().transpose(-1, -2) if family in TRANSPOSED else weight.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_components_follow_the_format_and_round_to_within_half_a_step(quantized, family):
    source, out = quantized(family, 8)
    before, after = tensors(source), tensors(out)
    for name in (n for n in before if EXPERT_WEIGHT.search(n)):
        w = logical(family, before[name])
        q, scales = after[f"{name}.qweight"], after[f"{name}.scales"]
        assert q.dtype == torch.int8 and q.shape == w.shape, name
        assert scales.dtype == torch.float32 and scales.shape == w.shape[:-1], name
        assert q.abs().max() <= 127
        error = (dequantize_int8(q, scales, torch.float32) - w).abs()
        assert (error <= scales[..., None] / 2 * (1 + 1e-5) + 1e-12).all(), name


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "granitemoe"])
def test_each_expert_is_quantized_as_quant_py_quantizes_its_weight_alone(quantized, family):
    """The writer's placement: expert e of a fused tensor, transposed or not, holds exactly the quantization of
    that expert's W [out, in]."""
    source, out = quantized(family, 4)
    before, after = tensors(source), tensors(out)
    for name in (n for n in before if EXPERT_WEIGHT.search(n)):
        w = logical(family, before[name])
        experts = w.unbind(0) if w.dim() == 3 else [w]
        for e, alone in enumerate(experts):
            packed, scales_and_zeros = quantize_int4(alone.contiguous(), TINY_GROUP)
            want = [packed, scales_and_zeros.to(torch.bfloat16)]
            got = [after[f"{name}.{c}"] for c in ("qweight", "scales_and_zeros")]
            got = [g[e] for g in got] if w.dim() == 3 else got
            assert all(torch.equal(a, b) for a, b in zip(want, got)), (name, e)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("group_size", [2, TINY_GROUP])
def test_int4_components_follow_the_format_and_round_to_within_half_a_step(quantized, family, group_size):
    source, out = quantized(family, 4, group_size)
    before, after = tensors(source), tensors(out)
    for name in (n for n in before if EXPERT_WEIGHT.search(n)):
        w = logical(family, before[name])
        packed, scales_and_zeros = (after[f"{name}.{c}"] for c in ("qweight", "scales_and_zeros"))
        assert packed.dtype == torch.uint8 and packed.shape == (*w.shape[:-1], w.shape[-1] // 2), name
        assert scales_and_zeros.dtype == torch.bfloat16, name
        assert scales_and_zeros.shape == (*w.shape[:-2], w.shape[-1] // group_size, w.shape[-2], 2), name
        codes = unpack_int4_tiles(packed).float()
        step, zero = (t.float().transpose(-1, -2).repeat_interleave(group_size, dim=-1)
                      for t in scales_and_zeros.unbind(-1))  # [..., out, in]
        assert torch.equal(dequantize_int4(packed, scales_and_zeros, torch.float32), (codes - 8) * step + zero), name
        # codes were rounded against float32 scales and zeros; bfloat16 keeps each to 2**-8 of itself
        error = ((codes - 8) * step + zero - w).abs()
        assert (error <= step * (0.5 + 9 * 2**-8) + zero.abs() * 2**-8 + 1e-7).all(), name


def test_the_bundled_model_shrinks_to_half_with_int8_and_below_three_tenths_with_int4(tmp_path):
    source = offload_moe.demo_model_path()
    with safe_open(source / "model.safetensors", "pt") as f:
        expert_bytes = sum(f.get_slice(n).get_shape()[0] * f.get_slice(n).get_shape()[1] * 2
                           for n in f.keys() if EXPERT_WEIGHT.search(n))
        assert {f.get_slice(n).get_dtype() for n in f.keys() if EXPERT_WEIGHT.search(n)} == {"BF16"}
    for bits, low, high in ((8, 0.5, 0.52), (4, 0.25, 0.3)):
        result = quantize_experts(source, tmp_path / f"int{bits}", bits=bits, progress=False)
        written = 0
        with safe_open(result.folder / "model-00001-of-00001.safetensors", "pt") as f:
            for name in f.keys():
                if name.endswith((".qweight", ".scales", ".scales_and_zeros")):
                    t = f.get_slice(name)
                    written += math.prod(t.get_shape()) * {"I8": 1, "U8": 1, "F32": 4, "BF16": 2}[t.get_dtype()]
        assert written == result.expert_bytes and result.source_expert_bytes == expert_bytes
        assert low <= written / expert_bytes <= high, (bits, written / expert_bytes)


def test_small_shards_get_an_index_naming_every_tensor(model_dir, tmp_path):
    result = quantize_experts(model_dir("mixtral"), tmp_path / "q", bits=4, group_size=8, shard_size=8192,
                              progress=False)
    shards = sorted(p.name for p in result.folder.glob("*.safetensors"))
    n = len(shards)
    assert n > 2 and shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.loads((result.folder / "model.safetensors.index.json").read_text())
    written = {name: path.name for path in result.folder.glob("*.safetensors")
               for name in safe_open(path, "pt").keys()}
    assert index["weight_map"] == written
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors(result.folder).values())
    single = tensors(quantize_experts(model_dir("mixtral"), tmp_path / "one", bits=4, group_size=8,
                                      progress=False).folder)
    sharded = tensors(result.folder)
    assert single.keys() == sharded.keys() and all(torch.equal(single[k], sharded[k]) for k in single)


# -- never the source, all or nothing ----------------------------------------------------------------------
def test_the_source_is_only_read(model_dir, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(model_dir("gpt_oss"), source)
    before = snapshot(source)
    quantize_experts(source, tmp_path / "q4", bits=4, group_size=8, progress=False)
    quantize_experts(source, tmp_path / "q8", bits=8, progress=False)
    assert snapshot(source) == before


@pytest.mark.parametrize("failure", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_a_failure_midway_leaves_no_output_and_no_temporary_folder(model_dir, tmp_path, monkeypatch, failure):
    calls, original = [], quantize_module.quantize_int4

    def failing(w, group_size):
        calls.append(1)
        if len(calls) == 20:  # after several shards are on disk
            raise failure
        return original(w, group_size)

    monkeypatch.setattr(quantize_module, "quantize_int4", failing)
    parent = tmp_path / "new" / "folders"
    with pytest.raises(type(failure)):
        quantize_experts(model_dir("mixtral"), parent / "q", bits=4, group_size=8, shard_size=4096, progress=False)
    assert len(calls) == 20
    assert not (tmp_path / "new").exists()  # the folders made for it are gone too
    assert list(tmp_path.iterdir()) == []


def test_the_work_folder_a_killed_run_left_is_removed_by_the_next_run(model_dir, tmp_path):
    dead = 2**22 + 12345  # above Linux's largest PID, so no process has it
    stale = tmp_path / f".q.offload-moe-{dead}-00ff00ff.tmp"  # as _work_folder names it
    (stale / "sub").mkdir(parents=True)
    (stale / ".shard-1.safetensors").write_bytes(b"half")
    other = tmp_path / f".r.offload-moe-{dead}-00ff00ff.tmp"  # another output's: left alone
    other.mkdir()
    quantize_experts(model_dir("mixtral"), tmp_path / "q", bits=8, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "q"]


def test_an_empty_output_folder_is_filled(model_dir, tmp_path):
    (tmp_path / "q").mkdir()
    quantize_experts(model_dir("mixtral"), tmp_path / "q", bits=8, progress=False)
    assert (tmp_path / "q" / "config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


# -- refusals ----------------------------------------------------------------------------------------------
def test_a_source_quantized_already_is_refused(model_dir, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(model_dir("mixtral"), source)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'gptq'.*quantized already"):
        quantize_experts(source, tmp_path / "q", bits=4, progress=False)
    assert not (tmp_path / "q").exists()


def test_an_output_that_is_not_a_new_folder_is_refused(model_dir, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(model_dir("mixtral"), source)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        quantize_experts(source, tmp_path / "full", bits=4, progress=False)
    with pytest.raises(ConfigError, match="not a folder"):
        quantize_experts(source, tmp_path / "file", bits=4, progress=False)
    for inside in (source, source / "int4", source / ".." / "source" / "x"):
        with pytest.raises(ConfigError, match="inside the model folder"):
            quantize_experts(source, inside, bits=4, progress=False)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine" and (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in source.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


@pytest.mark.parametrize(("settings", "message"), [
    ({"bits": 3}, "int8 .bits=8. or int4"),
    ({"bits": 8, "group_size": 64}, "applies to bits=4 only"),
    ({"bits": 4, "group_size": 0}, "an even number"),
    ({"bits": 4, "group_size": 7}, "an even number"),
    ({"bits": 4, "shard_size": 0}, "shard size"),
])
def test_bad_settings_are_refused_before_anything_is_read(tmp_path, settings, message):
    with pytest.raises(ConfigError, match=message):
        quantize_experts(tmp_path / "missing", tmp_path / "q", progress=False, **settings)


def test_int4_needs_even_rows_and_input_columns_in_whole_groups(model_dir, tmp_path):
    source = make_model("mixtral", tmp_path / "odd", intermediate_size=47)
    with pytest.raises(ConfigError, match=r"w1\.weight' has 47 output rows.*bits=8"):  # w2: 47 input columns
        quantize_experts(source, tmp_path / "q", bits=4, group_size=2, progress=False)
    with pytest.raises(ConfigError, match=r"w1\.weight' has 32 input columns, which groups of 64 do not divide.*e\.g\. 32"):
        quantize_experts(model_dir("mixtral"), tmp_path / "q", bits=4, progress=False)
    assert not (tmp_path / "q").exists()
    quantize_experts(source, tmp_path / "q", bits=8, progress=False)


# -- the command -------------------------------------------------------------------------------------------
def test_the_command_writes_the_folder_and_reports_its_size(model_dir, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["quantize", str(model_dir("mixtral")), "--bits", "4", "--group-size", "8",
                                 "--out", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert "36 expert tensors as int4 (groups of 8)" in result.stdout
    assert "quantizing " in result.stderr and "done in" in result.stderr  # piped: start and done lines
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["group_size"] == 8
    bad = runner.invoke(app, ["quantize", str(model_dir("mixtral")), "--bits", "3", "--out", str(tmp_path / "r")])
    assert bad.exit_code == 2 and "3 is not 8 or 4" in bad.output
    refused = runner.invoke(app, ["quantize", str(model_dir("mixtral")), "--bits", "8", "--out", str(tmp_path / "q")])
    assert isinstance(refused.exception, ConfigError)  # main() prints it as one line, exit code 1
