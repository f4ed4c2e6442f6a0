"""offload_experts(quantize="int8" | "int4"): packed experts for a model built in memory (issue 16).

The reference is the same model with each expert weight replaced by its quantized-then-dequantized value
(``quant.dequantize_int8`` / ``dequantize_int4`` of what ``quantize.quantize_matrix`` makes): the offloaded
model computes from the packed bytes, so it must agree with that model to float32 rounding.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe import quant
from offload_moe.errors import CheckpointError, ConfigError, UnsupportedModelError
from offload_moe.generic import OffloadedModuleList, SavedExperts, offload_experts, save_experts
from offload_moe.kernels import int4_kernel_layout
from offload_moe.planning import device_slots, workspace_bytes
from offload_moe.quantize import quantize_matrix
from tiny_models import make_config, make_model as make_checkpoint, relative_error

HIDDEN, INNER, EXPERTS, LAYERS = 32, 64, 4, 2  # rows and columns fit torch's int4 kernel with groups of 32
RTOL = 1e-5
SETTINGS = {"int8": {"quantize": "int8"},
            "int4": {"quantize": "int4", "group_size": 32},  # torch's CPU int4 kernel, where it runs
            "int4-g16": {"quantize": "int4", "group_size": 16}}  # no kernel takes groups of 16: dequantized


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.top_k = 2
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(HIDDEN, INNER), nn.GELU(), nn.Linear(INNER, HIDDEN))
                                     for _ in range(EXPERTS))

    def forward(self, x):
        weights, index = self.gate(x).softmax(-1).topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)  # as the default router (replace_forward=True) computes
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            chosen = (index == e).any(-1)
            if chosen.any():
                out[chosen] += expert(x[chosen]) * (weights * (index == e))[chosen].sum(-1, keepdim=True)
        return out


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(*[MoE() for _ in range(LAYERS)]).eval()


def inputs() -> torch.Tensor:
    return torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(1))


def dequantized(w: torch.Tensor, quantize: str, group_size: int | None = None) -> torch.Tensor:
    """``w`` [out, in] as the packed store holds it, dequantized to float32."""
    c = quantize_matrix(w, 8 if quantize == "int8" else 4, group_size)
    if quantize == "int8":
        return quant.dequantize_int8(c["qweight"], c["scales"], torch.float32)
    return quant.dequantize_int4(c["qweight"], c["scales_and_zeros"], torch.float32)


def dequantized_model(model: nn.Module, quantize: str, group_size: int | None = None) -> nn.Module:
    """A copy of ``model`` whose experts' nn.Linear weights are replaced by their dequantized values."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if isinstance(module, nn.Linear) and ".experts." in f".{name}.":
                module.weight.copy_(dequantized(module.weight, quantize, group_size))
    return ref


def packed_bytes(quantize: str, group_size: int | None = None) -> int:
    """One expert's bytes: its two weights packed, its two biases in float32."""
    weights = [torch.zeros(INNER, HIDDEN), torch.zeros(HIDDEN, INNER)]
    packed = sum(t.nbytes for w in weights for t in quantize_matrix(w, 8 if quantize == "int8" else 4, group_size).values())
    return packed + (INNER + HIDDEN) * 4


@pytest.mark.parametrize("io", ["buffered", "mmap"])
@pytest.mark.parametrize("replace_forward", [False, True], ids=["own_forward", "replace_forward"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_packed_experts_compute_as_the_dequantized_model(setting, replace_forward, io):
    options = SETTINGS[setting]
    model, x = make_model(), inputs()
    with torch.no_grad():
        want = dequantized_model(model, **options)(x)
        full = model(x)
    handle = offload_experts(model, cache_experts=3, replace_forward=replace_forward, io=io, **options)
    with torch.no_grad():
        got = model(x)
    assert relative_error(want, got) <= RTOL
    assert relative_error(full, got) > 100 * RTOL  # it really is quantized
    s = handle.stats()
    name = "int8" if setting == "int8" else f"int4 (groups of {options['group_size']})"
    assert s["expert_format"] == name and s["expert_bytes"] == packed_bytes(**options)
    # int4 on a CPU whose kernel reads another byte layout is converted into slots, never computed from the mapping
    converted = setting == "int4" and int4_kernel_layout() not in (None, quant.AVX512)
    moved = s["bytes_moved"]["mapped" if io == "mmap" and not converted else "disk"]
    assert s["misses"] > 0 and moved == s["misses"] * s["expert_bytes"]  # a miss moves the packed bytes
    linear = model[0].experts[0]  # an item of the stand-in: its template computes through a _PackedLinear
    assert isinstance(model[0].experts, OffloadedModuleList) and not list(linear.parameters())
    handle.close()


def test_the_packed_path_is_the_one_torchs_cpu_kernels_take():
    """int8 always, int4 in groups of 32 on any CPU whose torch kernel layout offload_moe knows (AVX-512, AVX2, plain):
    no dequantized copy is made."""
    for setting, kernel in (("int8", True), ("int4", int4_kernel_layout() is not None), ("int4-g16", False)):
        model = make_model()
        handle = offload_experts(model, cache_experts=2, **SETTINGS[setting])
        with torch.no_grad():
            model(inputs())
        template = model[0].experts.runtime.kernel  # the model's one dequantization buffer, shared by its kernels
        assert (template.scratch.buffer is None) == kernel, setting
        handle.close()


@pytest.mark.cuda
@pytest.mark.parametrize("setting", ["int8", "int4"])
def test_packed_experts_on_cuda_are_dequantized_into_the_scratch(setting):
    """On CUDA the slots hold the packed bytes on the device; each weight is dequantized into the model's one
    buffer, then multiplied."""
    options = SETTINGS[setting]
    model, x = make_model(), inputs()
    with torch.no_grad():
        want = dequantized_model(model, **options)(x)
    model.to("cuda")
    handle = offload_experts(model, device="cuda", cache_experts=3, **options)
    with torch.no_grad():
        got = model(x.to("cuda")).cpu()
    assert relative_error(want, got) <= 1e-4  # fp32 matmuls on the GPU differ slightly by kernel
    assert handle.cache.pool.buffer.is_cuda and model[0].experts.runtime.kernel.scratch.buffer.is_cuda
    handle.close()


def test_budgets_count_the_packed_bytes():
    """cache_memory and device_memory size the slots by the packed expert (planning.device_slots)."""
    per_expert = packed_bytes("int4", 32)
    handle = offload_experts(make_model(), cache_memory=5 * per_expert, quantize="int4", group_size=32)
    assert handle.stats()["capacity_experts"] == 5
    handle.close()
    budget = 300 * 2**20
    model = make_model()
    dense = sum(p.nbytes for n, p in model.named_parameters() if ".experts." not in n)
    handle = offload_experts(model, device_memory=budget, quantize="int4", group_size=32)
    assert handle.stats()["capacity_experts"] == device_slots(budget, dense, 0, per_expert, LAYERS * EXPERTS)
    assert workspace_bytes(budget) < budget
    handle.close()


# -- transformers models: the same bytes and kernels as load() on a quantize_experts folder ----------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_a_transformers_model_computes_as_load_of_its_quantized_checkpoint(tmp_path, bits):
    """Mixtral's experts module (``ExpertMLP``): offload_experts(quantize=) and load() of ``offload-moe quantize``'s
    folder hold the same bytes and compute with the same kernels: equal logits."""
    sizes = dict(hidden_size=64, intermediate_size=96)
    source = make_checkpoint("mixtral", tmp_path / "bf", **sizes)
    group = 32 if bits == 4 else None
    folder = offload_moe.quantize_experts(source, tmp_path / "q", bits=bits, group_size=group, progress=False).folder
    prompt = torch.randint(3, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    loaded = offload_moe.load(folder, cache_experts=2, dtype="float32", progress=False)
    with torch.no_grad():
        want = loaded(prompt).logits
    want_bytes = loaded.offload.stats()["expert_bytes"]
    loaded.offload.close()
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    handle = offload_experts(model, cache_experts=2, quantize=f"int{bits}", group_size=group)
    with torch.no_grad():
        got = model(prompt).logits
    assert torch.equal(want, got)
    assert handle.stats()["expert_bytes"] == want_bytes
    handle.close()


def test_int8_greedy_tokens_equal_those_of_the_float_model():
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(make_config("mixtral")).eval()
    prompt = torch.randint(3, 96, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    model = copy.deepcopy(ref)
    handle = offload_experts(model, cache_experts=2, quantize="int8")
    with torch.no_grad():
        got = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert torch.equal(want, got)
    assert handle.stats()["misses"] > 0
    handle.close()


@pytest.mark.parametrize("setting", ["int8", "int4-g16"])
def test_dbrx_packs_w2_as_its_transpose(setting):
    """DBRX's fused experts: w1 and v1 are [out, in], w2 is used as [in, out] and packed transposed."""
    from test_families_generic import dbrx_config, spread

    options = SETTINGS[setting]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(dbrx_config()).eval()
    spread(model, 1)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for block in ref.transformer.blocks:
            mlp, inner = block.ffn.experts.mlp, block.ffn.experts.ffn_hidden_size
            for name in ("w1", "v1", "w2"):
                w = getattr(mlp, name).view(-1, inner, mlp.hidden_size)  # [E, I, H]
                for e in range(w.shape[0]):
                    w[e] = dequantized(w[e].t(), **options).t() if name == "w2" else dequantized(w[e], **options)
    prompt = torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(prompt).logits
    handle = offload_experts(model, cache_experts=2, **options)
    with torch.no_grad():
        got = model(prompt).logits
    assert relative_error(want, got) <= RTOL
    handle.close()


@pytest.mark.parametrize("family", ["switch_transformers", "nllb_moe"])
def test_t5_style_experts_that_check_their_weight_dtype_compute_packed(family):
    """Switch Transformers' and NLLB-MoE's experts read ``wo.weight.dtype`` / ``fc2.weight.dtype`` before calling the
    module: the packed module's weight answers that (its dtype is the activations'), and the module computes packed."""
    from transformers import AutoModelForSeq2SeqLM

    from test_families_generic import nllb_config, spread, switch_config

    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config((switch_config if family == "switch_transformers" else nllb_config)()).eval()
    spread(model, 1)
    ref = dequantized_model(model, "int4", 16)
    prompt = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=prompt, decoder_input_ids=prompt[:, :4]).logits
    handle = offload_experts(model, cache_experts=2, quantize="int4", group_size=16)
    with torch.no_grad():
        got = model(input_ids=prompt, decoder_input_ids=prompt[:, :4]).logits
    assert relative_error(want, got) <= RTOL and handle.stats()["misses"] > 0
    handle.close()


# -- stores --------------------------------------------------------------------------------------------------
def test_a_store_saved_packed_brings_its_format(tmp_path):
    model, x = make_model(), inputs()
    with torch.no_grad():
        want = dequantized_model(model, "int4", 32)(x)
    folder = save_experts(model, tmp_path / "packed", quantize="int4", group_size=32)
    manifest = json.loads((folder / "experts.json").read_text())
    assert manifest["version"] == 2 and manifest["quantization"] == {"bits": 4, "group_size": 32}
    assert manifest["layers"][0]["params"]["0.weight"] == {"shape": [INNER, HIDDEN], "packed": True, "transposed": False}
    assert manifest["layers"][0]["params"]["0.bias"] == {"shape": [INNER], "dtype": "float32"}
    for block in model:  # the experts were never loaded: the store alone has them
        block.experts.to("meta")
    handle = offload_experts(model, store=folder, cache_experts=2)
    with torch.no_grad():
        assert relative_error(want, model(x)) <= RTOL
    assert handle.stats()["expert_format"] == "int4 (groups of 32)"
    handle.close()
    with pytest.raises(ConfigError, match=r"^store=.* holds experts packed as int4 \(groups of 32\), and "
                                          r"quantize='int8' asks for int8; leave quantize out"):
        offload_experts(make_model(), store=folder, cache_experts=2, quantize="int8")


def test_a_store_saved_in_float_is_packed_into_a_folder_of_its_own(tmp_path):
    model, x = make_model(), inputs()
    with torch.no_grad():
        want = dequantized_model(model, "int8")(x)
    folder = save_experts(model, tmp_path / "float")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    for block in model:
        block.experts.to("meta")
    with pytest.raises(ConfigError, match=r"^offload_folder=.* is the store= folder"):
        offload_experts(copy.deepcopy(model), store=folder, offload_folder=folder, cache_experts=2, quantize="int8")
    handle = offload_experts(model, store=folder, offload_folder=tmp_path / "int8", cache_experts=2, quantize="int8")
    with torch.no_grad():
        assert relative_error(want, model(x)) <= RTOL
    assert handle.stats()["expert_bytes"] == packed_bytes("int8")
    handle.close()
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()} == before  # only read
    assert SavedExperts(tmp_path / "int8").format.name == "int8"


def edit_manifest(folder: Path, edit: Callable[[dict], object]) -> Path:
    """``folder`` (a save_experts folder) with its manifest changed in place by ``edit``."""
    path = folder / "experts.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    return folder


def test_a_packed_file_alone_is_refused_naming_its_folder(tmp_path):
    folder = save_experts(make_model(), tmp_path / "s", quantize="int8")
    with pytest.raises(CheckpointError, match=r"experts-00000\.safetensors holds packed experts .*open the folder"):
        SavedExperts(folder / "experts-00000.safetensors")


@pytest.mark.parametrize("quantization", [{"bits": 3}, {"bits": 4}, {"bits": 4, "group_size": 7}, {"bits": 8, "x": 1}, "int8"])
def test_a_bad_quantization_in_the_manifest_is_named(tmp_path, quantization):
    folder = edit_manifest(save_experts(make_model(), tmp_path / "s", quantize="int8"),
                           lambda manifest: manifest.update(quantization=quantization))
    with pytest.raises(CheckpointError, match=r"experts\.json: quantization is .* where \{\"bits\": 8\}"):
        SavedExperts(folder)


@pytest.mark.parametrize(("quantization", "shape"), [
    ({"bits": 4, "group_size": 32}, [2, 2**31 - 1]),  # no group divides it: the quantizer's advice scans 2**31 numbers
    ({"bits": 4, "group_size": 32}, [3, 32]),  # rows int4 cannot pair
    ({"bits": 4, "group_size": 32}, [2**31 - 32, 2**31 - 32]),  # more bytes than torch can size, even on meta
    ({"bits": 8}, [2**31 - 1, 2**31 - 1]),
])
def test_a_packed_shape_the_format_cannot_hold_is_named_before_anything_is_sized(tmp_path, monkeypatch, quantization,
                                                                                  shape):
    """A manifest is untrusted: a packed weight's shape that int4 cannot group, or too large to size, is one
    CheckpointError naming the manifest; the quantizer is not asked about a shape already known to be wrong."""
    import offload_moe.saved_experts as saved_experts

    folder = save_experts(make_model(), tmp_path / "s", quantize="int4" if quantization["bits"] == 4 else "int8",
                          group_size=quantization.get("group_size"))
    edit_manifest(folder, lambda manifest: manifest["layers"][0]["params"]["0.weight"].update(shape=shape))
    quantizer = saved_experts.quantize_matrix

    def quantize(w, bits, group_size=None):
        if bits == 4 and (w.shape[0] % 2 or w.shape[1] % group_size):
            raise AssertionError(f"the quantizer was asked to size a shape int4 cannot hold: {list(w.shape)}")
        return quantizer(w, bits, group_size)

    monkeypatch.setattr(saved_experts, "quantize_matrix", quantize)
    with pytest.raises(CheckpointError, match=r"^save_experts manifest .*experts\.json: layer 0 \(0\): .*the manifest "
                                              r"is corrupted, save the experts again$"):
        SavedExperts(folder)


def test_a_packed_tensor_of_another_dtype_is_named(tmp_path):
    from offload_moe.safetensors_io import read_header, write_safetensors

    folder = save_experts(make_model(), tmp_path / "s", quantize="int8")
    file = folder / "experts-00000.safetensors"
    header = read_header(file)
    tensors = [(n, torch.zeros(info.shape, dtype=torch.float32 if n.endswith(".scales") else info.dtype))
               for n, info in header.items()]
    tensors = [(n, t.to(torch.float16) if n == "layers.0.experts.1.2.weight.scales" else t) for n, t in tensors]
    write_safetensors(file, tensors)
    with pytest.raises(CheckpointError, match=r"'layers\.0\.experts\.1\.2\.weight\.scales' is float16, but int8 "
                                              r"stores it as float32"):
        SavedExperts(folder)


# -- settings refused in one line, before the model changes ---------------------------------------------------
class BareMatrixExpert(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(HIDDEN, HIDDEN))

    def forward(self, x):
        return x @ self.w


class BareMoE(MoE):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(BareMatrixExpert() for _ in range(EXPERTS))


class FusedExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_experts = EXPERTS
        self.w = nn.Parameter(torch.randn(EXPERTS, HIDDEN, HIDDEN))


class FusedMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS)
        self.experts = FusedExperts()


@pytest.mark.parametrize(("model", "options", "message"), [
    (make_model, {"quantize": "int3"}, r"^quantize='int3': offload_moe packs experts as 'int8' .* or 'int4'"),
    (make_model, {"quantize": 8}, r"^quantize=8: offload_moe packs experts as 'int8'"),
    (make_model, {"quantize": "int4", "group_size": 3}, r"^group_size = 3 must be an even number"),
    (make_model, {"quantize": "int4", "group_size": 24},
     r"^0\.experts: expert tensor '0\.weight' has 32 input columns, which groups of 24 do not divide; .* e\.g\. 32"),
    (make_model, {"quantize": "int8", "group_size": 32}, r"^group_size=32 applies to quantize='int4' only"),
    (make_model, {"group_size": 32}, r"^group_size=32 applies to quantize='int4'; give quantize='int4'"),
    (lambda: nn.Sequential(BareMoE()), {"quantize": "int8"},
     r"^quantize='int8': 0\.experts: expert tensor 'w' of shape \[32, 32\] is not the weight of an nn\.Linear"),
    (lambda: nn.Sequential(FusedMoE()), {"quantize": "int4", "group_size": 32, "expert_fn": lambda c, x, w: x @ w["w"]},
     r"^quantize='int4': 0\.experts is computed by your expert_fn, which takes float weights"),
])
def test_a_setting_that_cannot_apply_is_refused_in_one_line_and_the_model_is_untouched(model, options, message):
    model = model()
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ConfigError, match=message) as error:
        offload_experts(model, cache_experts=2, **options)
    assert "\n" not in str(error.value)
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()
    assert not hasattr(model, "offload")


def test_save_experts_refuses_what_offload_experts_refuses(tmp_path):
    with pytest.raises(ConfigError, match=r"^quantize='int5'"):
        save_experts(make_model(), tmp_path / "s", quantize="int5")
    assert not (tmp_path / "s").exists()


def test_an_expert_reading_a_linear_weight_directly_is_named():
    class Peeking(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(HIDDEN, HIDDEN)

        def forward(self, x):
            return F.linear(x, self.fc.weight)

    class PeekingMoE(MoE):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(Peeking() for _ in range(EXPERTS))

    model = nn.Sequential(PeekingMoE())
    handle = offload_experts(model, cache_experts=2, quantize="int8")
    with pytest.raises(UnsupportedModelError, match=r"^an expert computed with the weight of one of its nn\.Linear "
                                                   r"modules directly \(linear\); with quantize=\.\.\."):
        model(inputs())
    handle.close()


@pytest.mark.parametrize("version", [3, 0, "2", None])
def test_a_manifest_version_this_offload_moe_does_not_read_is_named(tmp_path, version):
    folder = edit_manifest(save_experts(make_model(), tmp_path / "s", quantize="int8"),
                           lambda manifest: manifest.update(version=version))
    with pytest.raises(CheckpointError, match=r"experts\.json: version .* is not one this offload_moe reads \(1, 2\)"):
        SavedExperts(folder)


# -- a failure after the experts were swapped puts the model back ---------------------------------------------
def _mixtral() -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(make_config("mixtral")).eval()


def _dbrx() -> nn.Module:
    from test_families_generic import dbrx_config

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(dbrx_config()).eval()


def _ids() -> torch.Tensor:
    return torch.randint(3, 96, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("build", "call", "options"), [
    (make_model, lambda m: m(inputs()), {"quantize": "int8"}),
    (make_model, lambda m: m(inputs()), {"quantize": "int4", "group_size": 32, "replace_forward": True}),
    (make_model, lambda m: m(inputs()), {}),
    (_mixtral, lambda m: m(_ids()).logits, {"quantize": "int8"}),
    (_dbrx, lambda m: m(_ids()).logits, {"quantize": "int8"}),
], ids=["module_list", "replace_forward", "unquantized", "transformers", "fused"])
def test_an_offload_stopped_after_the_swap_leaves_the_model_as_it_was(monkeypatch, build, call, options):
    """Ctrl-C (or a read that fails) while every expert is loaded into the slots, after the containers were swapped:
    the model gets its containers, expert parameters and forward back, with no hook left, and runs as before."""
    import offload_moe.attach as attach

    model = build()
    with torch.no_grad():
        want = call(model)
    before = list(model.named_parameters())
    modules = dict(model.named_modules())

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(attach, "fill_device_cache", stopped)
    with pytest.raises(KeyboardInterrupt):
        offload_experts(model, cache_experts=10_000, **options)  # every expert fits: all are loaded at once
    assert [(n, id(p)) for n, p in model.named_parameters()] == [(n, id(p)) for n, p in before]
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(m is modules[n] for n, m in model.named_modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks or "forward" in vars(m) for m in model.modules())
    assert getattr(model, "offload", None) is None
    with torch.no_grad():
        assert torch.equal(call(model), want)
    monkeypatch.undo()
    handle = offload_experts(model, cache_experts=2, **options)  # and it can be offloaded again
    with torch.no_grad():
        call(model)
    assert handle.stats()["misses"] > 0
    handle.close()
