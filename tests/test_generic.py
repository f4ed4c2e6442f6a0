"""offload_experts on any nn.Module: the issue's custom MoE layer, ModuleDict and fused containers, save_experts, errors."""

from __future__ import annotations

import copy
import gc
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from offload_moe.errors import BudgetError, CheckpointError, ConfigError, ExpertLoadError, UnsupportedModelError
from offload_moe.generic import (
    OffloadedFusedExperts,
    OffloadedModuleDict,
    OffloadedModuleList,
    SavedExperts,
    find_moe_layers,
    offload_experts,
    save_experts,
)
from tiny_models import relative_error

HIDDEN, INNER, EXPERTS, TOP_K, LAYERS = 16, 32, 6, 2, 3


class MoELayer(nn.Module):
    """The issue's layer: experts a ModuleList of Sequential(Linear, GELU, Linear), gate an nn.Linear;
    softmax over the gate logits, top-k, renormalise, weighted sum of the chosen experts' outputs."""

    def __init__(self, num_experts: int = EXPERTS, top_k: int = TOP_K, inner: int = INNER):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(HIDDEN, num_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(HIDDEN, inner), nn.GELU(), nn.Linear(inner, HIDDEN)) for _ in range(num_experts)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = self.gate(x).softmax(dim=-1).topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            chosen = index == e  # [..., k]
            tokens = chosen.any(dim=-1)
            if tokens.any():
                out[tokens] += expert(x[tokens]) * (weights * chosen).sum(dim=-1)[tokens, None]
        return out


class DenseLoopMoE(MoELayer):
    """A layer whose forward runs every expert on every token and masks by weight (a common research shape)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = self.gate(x).softmax(dim=-1).topk(self.top_k, dim=-1)
        dense = torch.zeros(*x.shape[:-1], len(self.experts)).scatter(-1, index, weights / weights.sum(-1, keepdim=True))
        return sum(expert(x) * dense[..., e, None] for e, expert in enumerate(self.experts))


class Model(nn.Module):
    def __init__(self, layer=MoELayer, layers: int = LAYERS):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(HIDDEN), "moe": layer()}) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block["moe"](block["norm"](x))
        return x


def make_model(layer=MoELayer, seed: int = 0) -> Model:
    torch.manual_seed(seed)
    model = Model(layer).eval()
    with torch.no_grad():
        for block in model.blocks:
            block["moe"].gate.weight.mul_(4)  # spread the routing over the experts
    return model


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(seed))


def needed_experts(model: Model, x: torch.Tensor) -> int:
    """How many (layer, expert) pairs the resident model routes to for ``x``."""
    total, h = 0, x
    for block in model.blocks:
        moe, normed = block["moe"], block["norm"](h)
        total += moe.gate(normed).topk(moe.top_k, dim=-1).indices.unique().numel()
        h = h + moe(normed)
    return total


@pytest.mark.parametrize("replace_forward", [False, True], ids=["own_forward", "replace_forward"])
@pytest.mark.parametrize("budget", [2, 5, LAYERS * EXPERTS])
def test_offloaded_output_equals_resident(budget, replace_forward):
    ref, x = make_model(), inputs()
    with torch.no_grad():
        want = ref(x)
    model = copy.deepcopy(ref)
    handle = offload_experts(model, cache_experts=budget, replace_forward=replace_forward)
    with torch.no_grad():
        got = model(x)
    assert relative_error(want, got) <= 1e-6
    s = handle.stats()
    assert s["capacity_experts"] == budget and s["layers"] == LAYERS and s["total_experts"] == LAYERS * EXPERTS
    assert s["tokens"] == 10
    if budget == 2:
        assert s["misses"] >= needed_experts(ref, x) and s["evictions"] > 0  # they streamed through two slots
    if budget == LAYERS * EXPERTS:  # slots for every expert: filled at offload, as load fills them
        assert s["misses"] == 0 and s["hits"] == needed_experts(ref, x) and s["evictions"] == 0
        assert s["resident_experts"] == LAYERS * EXPERTS
    handle.close()


def test_layer_above_and_its_forward_are_untouched():
    ref, x = make_model(), inputs()
    model = copy.deepcopy(ref)
    handle = offload_experts(model, cache_experts=4)
    moe = model.blocks[1]["moe"]
    assert model.offload is handle
    assert "forward" not in vars(moe)  # the layer's own class forward runs
    assert isinstance(moe.experts, nn.ModuleList) and isinstance(moe.experts, OffloadedModuleList)
    assert len(moe.experts) == EXPERTS and isinstance(moe.gate, nn.Linear)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for n, p in ref.named_parameters() if ".experts." not in n)  # no expert weight left in the model
    with torch.no_grad():  # an item is still callable on its own
        assert torch.allclose(moe.experts[3](x), ref.blocks[1]["moe"].experts[3](x), rtol=1e-6, atol=1e-7)
    handle.close()


def test_replace_forward_loads_only_the_needed_experts_of_a_dense_loop_layer():
    ref, x = make_model(DenseLoopMoE), inputs()
    with torch.no_grad():
        want = ref(x[:, :1])  # one token per sequence: few experts needed
    results = {}
    for replace in (False, True):
        model = copy.deepcopy(ref)
        handle = offload_experts(model, cache_experts=LAYERS * EXPERTS, replace_forward=replace)
        with torch.no_grad():
            assert relative_error(want, model(x[:, :1])) <= 1e-5
        s = handle.stats()
        results[replace] = s["hits"] + s["misses"]  # every expert is resident (filled): count what was asked for
        handle.close()
    assert results[False] == LAYERS * EXPERTS  # its own forward calls every expert: every expert is needed
    assert results[True] <= LAYERS * 2 * TOP_K < results[False]  # router + grouped: only the chosen ones


class DropoutMoE(MoELayer):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(HIDDEN, INNER), nn.GELU(), nn.Dropout(0.5),
                                                   nn.Linear(INNER, HIDDEN)) for _ in range(EXPERTS))


@pytest.mark.parametrize("replace_forward", [False, True], ids=["own_forward", "replace_forward"])
def test_experts_follow_train_and_eval_mode(replace_forward):
    ref, x = make_model(DropoutMoE), inputs()
    for start in ("eval", "train"):
        model = copy.deepcopy(ref).train(start == "train")
        handle = offload_experts(model, cache_experts=4, replace_forward=replace_forward)
        with torch.no_grad():
            if start == "eval":  # offloaded in eval mode: no dropout from the start
                assert relative_error(ref(x), model(x)) <= 1e-6
            assert not torch.allclose(model.train()(x), ref(x))  # training: the experts' dropout is active
            assert relative_error(ref(x), model.eval()(x)) <= 1e-6  # eval again: deterministic, equal to resident
        handle.close()


class DictMoE(nn.Module):
    """Experts in an nn.ModuleDict by name, with a non-expert child in the same dict (kept resident)."""

    def __init__(self):
        super().__init__()
        self.top_k = 1
        self.router = nn.Linear(HIDDEN, 4)
        self.experts = nn.ModuleDict({f"e{i}": nn.Sequential(nn.Linear(HIDDEN, INNER), nn.ReLU(),
                                                             nn.Linear(INNER, HIDDEN)) for i in range(4)})
        self.experts["scale"] = nn.Identity()

    def forward(self, x):
        best = self.router(x).argmax(dim=-1)
        out = torch.zeros_like(x)
        for i in best.unique().tolist():
            out[best == i] = self.experts["scale"](self.experts[f"e{i}"](x[best == i]))
        return out


def test_module_dict_experts_keep_their_keys_and_other_children():
    torch.manual_seed(0)
    ref, x = DictMoE().eval(), inputs()
    want = ref(x)
    model = copy.deepcopy(ref)
    handle = offload_experts(model, cache_experts=2)
    assert isinstance(model.experts, OffloadedModuleDict)
    assert list(model.experts.keys()) == ["e0", "e1", "e2", "e3", "scale"]
    assert isinstance(model.experts["scale"], nn.Identity)
    assert relative_error(want, model(x)) <= 1e-6
    assert handle.layers == [""]  # the model itself is the MoE layer
    handle.close()


class FusedExperts(nn.Module):
    """Fused [E, ...] expert parameters, called as experts(hidden, top_k_index, top_k_weights)."""

    def __init__(self, num_experts=4):
        super().__init__()
        self.num_experts = num_experts
        self.w_in = nn.Parameter(torch.randn(num_experts, HIDDEN, INNER) * 0.2)
        self.w_out = nn.Parameter(torch.randn(num_experts, INNER, HIDDEN) * 0.2)

    def forward(self, hidden, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden)
        for e in range(self.num_experts):
            weight = (top_k_weights * (top_k_index == e)).sum(dim=-1, keepdim=True)
            out += fused_expert(self, hidden, {"w_in": self.w_in[e], "w_out": self.w_out[e]}) * weight
        return out


def fused_expert(container, x, w):
    return F.gelu(x @ w["w_in"]) @ w["w_out"]


class FusedMoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, 4, bias=False)
        self.experts = FusedExperts()

    def forward(self, x):
        flat = x.reshape(-1, HIDDEN)
        weights, index = self.gate(flat).softmax(-1).topk(2, dim=-1)
        return self.experts(flat, index, weights).view(x.shape)


@pytest.mark.parametrize("prefetch", ["none", "gate"])
def test_fused_experts_with_an_expert_fn(prefetch):
    torch.manual_seed(0)
    ref, x = nn.Sequential(FusedMoE(), FusedMoE()).eval(), inputs()
    want = ref(x)
    for budget in (2, 8):
        model = copy.deepcopy(ref)
        handle = offload_experts(model, cache_experts=budget, expert_fn=fused_expert, prefetch=prefetch)
        assert isinstance(model[0].experts, OffloadedFusedExperts)
        assert not any("w_in" in n for n, _ in model.named_parameters())
        with torch.no_grad():
            assert relative_error(want, model(x)) <= 1e-6
        assert handle.stats()["prefetch"] == prefetch
        handle.close()
    with pytest.raises(UnsupportedModelError, match="expert_fn"):
        offload_experts(copy.deepcopy(ref), cache_experts=2)


# -- save_experts and the store ---------------------------------------------------------------------------------
def test_save_experts_round_trip(tmp_path):
    ref, x = make_model(), inputs()
    folder = save_experts(ref, tmp_path / "experts")
    manifest = json.loads((folder / "experts.json").read_text())
    layer = manifest["layers"][1]
    assert layer["module"] == "blocks.1.moe" and layer["num_experts"] == EXPERTS and layer["container"] == "ModuleList"
    assert layer["expert_class"] == "torch.nn.modules.container.Sequential"
    assert layer["params"]["0.weight"] == {"shape": [INNER, HIDDEN], "dtype": "float32"}
    assert sorted(p.name for p in folder.iterdir()) == ["experts-00000.safetensors", "experts-00001.safetensors",
                                                        "experts-00002.safetensors", "experts.json"]  # no temp files
    with safe_open(folder / layer["file"], "pt") as f:  # a standard safetensors file
        assert torch.equal(f.get_tensor("layers.1.experts.4.2.bias"), ref.blocks[1]["moe"].experts[4][2].bias)
        assert len(f.keys()) == EXPERTS * 4
    store = SavedExperts(folder)
    assert len(store.pieces) == LAYERS * EXPERTS
    piece = next(p for p in store.expert_pieces(2, 5) if p.param == "0.weight")
    out = torch.empty(INNER, HIDDEN)
    store.read_piece(piece, out)
    assert torch.equal(out, ref.blocks[2]["moe"].experts[5][0].weight)
    store.close()

    # a model whose experts were never loaded (meta) runs from the saved files
    model = copy.deepcopy(ref)
    for block in model.blocks:
        block["moe"].experts.to("meta")
    handle = offload_experts(model, store=folder, cache_experts=3)
    with torch.no_grad():
        assert relative_error(ref(x), model(x)) <= 1e-6
    handle.close()
    assert (folder / "experts.json").exists()  # a store the user gave is never deleted


def test_save_experts_in_another_dtype_and_one_file_as_store(tmp_path):
    ref, x = make_model(), inputs()
    folder = save_experts(ref, tmp_path, dtype="bfloat16")
    with safe_open(folder / "experts-00000.safetensors", "pt") as f:
        assert f.get_tensor("layers.0.experts.0.0.weight").dtype == torch.bfloat16
    single = copy.deepcopy(ref)
    handle = offload_experts(single, layers=["blocks.0.moe"], store=folder / "experts-00000.safetensors",
                             cache_experts=2, dtype="float32")
    assert handle.stats()["dtype"] == "float32"
    with torch.no_grad():
        assert relative_error(ref(x), single(x)) <= 2e-2  # the experts went through bfloat16
    handle.close()


def test_temporary_folder_is_removed_on_close_and_a_given_one_kept(tmp_path):
    model = make_model()
    handle = offload_experts(model, cache_experts=2)
    temp = handle.folder
    assert (temp / "experts.json").exists()
    handle.close()
    assert not temp.exists()
    model = make_model()
    offload_experts(model, cache_experts=2, offload_folder=tmp_path / "mine")
    temp = offload_experts(make_model(), cache_experts=2).folder
    del model  # the model's end closes its cache, like model.offload.close()
    gc.collect()
    assert (tmp_path / "mine" / "experts.json").exists() and not temp.exists()


def test_save_experts_never_writes_into_a_model_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="config.json"):
        save_experts(make_model(), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_interrupted_or_foreign_stores_are_refused(tmp_path):
    folder = save_experts(make_model(), tmp_path / "a")
    (folder / "experts.json").unlink()  # what an interrupted save leaves
    with pytest.raises(CheckpointError, match="interrupted"):
        SavedExperts(folder)
    other = save_experts(make_model(lambda: MoELayer(inner=8)), tmp_path / "b")
    with pytest.raises(CheckpointError, match="save this model's experts again"):
        offload_experts(make_model(), store=other, cache_experts=2)


# -- io="mmap": missing experts computed from the mapped store files -------------------------------------------
@pytest.mark.parametrize("replace_forward", [False, True], ids=["own_forward", "replace_forward"])
def test_mmap_computes_missing_experts_in_place(tmp_path, replace_forward):
    ref, x = make_model(), inputs()
    with torch.no_grad():
        want = ref(x)
    model = copy.deepcopy(ref)
    handle = offload_experts(model, cache_experts=2, replace_forward=replace_forward, io="mmap",
                             offload_folder=tmp_path)
    with torch.no_grad():
        assert relative_error(want, model(x)) <= 1e-6
    s = handle.stats()
    assert s["io"] == "mmap" and s["misses"] >= needed_experts(ref, x)
    assert s["mapped_experts"] == s["misses"] and s["bytes_moved"]["mapped"] == s["misses"] * s["expert_bytes"]
    assert s["bytes_loaded"] == 0 and s["bytes_moved"]["disk"] == 0  # nothing was copied into a slot
    assert s["resident_experts"] == 0 and not handle.cache.residency.pins
    handle.close()


def test_mmap_on_fused_experts_with_prefetch_advice():
    torch.manual_seed(0)
    ref, x = nn.Sequential(FusedMoE(), FusedMoE()).eval(), inputs()
    want = ref(x)
    model = copy.deepcopy(ref)
    handle = offload_experts(model, cache_experts=2, expert_fn=fused_expert, prefetch="gate", io="mmap")
    with torch.no_grad():
        assert relative_error(want, model(x)) <= 1e-6
    s = handle.stats()
    assert s["mapped_experts"] == s["misses"] > 0 and s["bytes_loaded"] == 0
    assert s["prefetch_issued"] > 0  # layer 1's predicted experts: read-ahead advice, no slot taken
    handle.close()


def test_mmap_reads_into_slots_what_needs_a_dtype_conversion(tmp_path):
    ref, x = make_model(), inputs()
    folder = save_experts(ref, tmp_path, dtype="bfloat16")
    model = copy.deepcopy(ref)
    handle = offload_experts(model, store=folder, cache_experts=3, dtype="float32", io="mmap")
    with torch.no_grad():
        assert relative_error(ref(x), model(x)) <= 2e-2  # the experts went through bfloat16
    s = handle.stats()
    assert s["mapped_experts"] == 0 and s["bytes_loaded"] == s["misses"] * s["expert_bytes"] > 0
    handle.close()


# -- errors -----------------------------------------------------------------------------------------------------
def test_no_moe_layer_says_what_it_looked_for():
    with pytest.raises(UnsupportedModelError, match=r"`experts` attribute.*layers=\["):
        offload_experts(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), cache_experts=2)
    with pytest.raises(ConfigError, match="no submodule named 'blocks.9.moe'"):
        offload_experts(make_model(), layers=["blocks.9.moe"], cache_experts=2)


def test_experts_must_be_identical():
    model = make_model()
    model.blocks[2]["moe"].experts[4] = nn.Sequential(nn.Linear(HIDDEN, 8), nn.GELU(), nn.Linear(8, HIDDEN))
    with pytest.raises(UnsupportedModelError, match=r"blocks.2.moe.experts: expert '4' differs from expert '0'"):
        offload_experts(model, cache_experts=2)
    assert isinstance(model.blocks[0]["moe"].experts, nn.ModuleList) and not isinstance(
        model.blocks[0]["moe"].experts, OffloadedModuleList)  # nothing was changed


@pytest.mark.parametrize("router, message", [
    (lambda layer, h: (torch.zeros(h.numel() // HIDDEN, dtype=torch.long), torch.ones(h.numel() // HIDDEN)),
     r"returned top_k_index torch.int64 \[10\].*\[T, k\]"),
    (lambda layer, h: (torch.full((h.numel() // HIDDEN, 1), EXPERTS), torch.ones(h.numel() // HIDDEN, 1)),
     "outside 0..5"),
])
def test_router_output_is_checked(router, message):
    model = make_model()
    offload_experts(model, router=router, replace_forward=True, cache_experts=2)
    with pytest.raises(ConfigError, match=message):
        model(inputs())


def test_bad_settings_fail_before_the_model_changes(tmp_path):
    model = make_model()
    with pytest.raises(ConfigError, match="replace_forward=True"):
        offload_experts(model, prefetch="gate", cache_experts=4)  # its own forward calls experts one by one
    with pytest.raises(BudgetError, match="at least 2"):
        offload_experts(model, cache_experts=1)
    with pytest.raises(ConfigError, match="unknown eviction policy"):
        offload_experts(model, cache_experts=2, policy="mru")
    with pytest.raises(ConfigError, match="dropped_tokens"):
        offload_experts(model, cache_experts=2, dropped_tokens="drop")
    with pytest.raises(ConfigError, match="needs a router"):
        offload_experts(nn.Sequential(NoGate()), layers=["0"], replace_forward=True, cache_experts=2)
    assert not any(isinstance(m, OffloadedModuleList) for m in model.modules())
    handle = offload_experts(model, cache_experts=2)
    with pytest.raises(ConfigError, match="already offloaded"):
        offload_experts(model, cache_experts=2)
    handle.close()
    with pytest.raises(ExpertLoadError, match="closed"):
        model(inputs())


class NoGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))


def test_find_moe_layers_needs_a_gate_unless_told():
    model = nn.Sequential(NoGate(), make_model())
    assert [n for n, _ in find_moe_layers(model)] == ["1.blocks.0.moe", "1.blocks.1.moe", "1.blocks.2.moe"]
    assert [n for n, _ in find_moe_layers(model, need_gate=False)][0] == "0"


def test_recording_a_trace_of_an_offload_experts_model_is_a_clear_error():
    from offload_moe.errors import TraceError
    from offload_moe.traces import record_trace

    model = make_model()
    handle = offload_experts(model, cache_experts=4)
    with pytest.raises(TraceError, match=r"blocks\.0\.moe\.experts: its experts are called one at a time"):
        record_trace(model, [torch.zeros(3, dtype=torch.long)], source="test")
    handle.close()


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), 0, -1])
def test_offload_experts_checks_read_timeout_as_load_does(timeout):
    with pytest.raises(ConfigError, match="^read_timeout="):
        offload_experts(make_model(), cache_experts=4, read_timeout=timeout)


def test_offload_experts_refuses_slots_larger_than_the_machine():
    import psutil

    with pytest.raises(BudgetError, match="cache_memory="):
        offload_experts(make_model(), cache_memory=psutil.virtual_memory().total * 4)


def test_a_stand_in_used_before_its_cache_is_attached_is_the_same_error_on_both_verbs():
    """The core stand-in (what load swaps in) and offload_experts' layer runtime raise one error class."""
    from offload_moe.checkpoint import build_skeleton, swap_experts
    from offload_moe.generic import LayerRuntime
    from tiny_models import make_config

    core = swap_experts(build_skeleton(make_config("mixtral")))[0]
    with pytest.raises(ExpertLoadError, match=r"expert cache of model\.layers\.0\.mlp\.experts is not attached"):
        core(torch.zeros(2, 32), torch.zeros(2, 2, dtype=torch.long), torch.ones(2, 2))
    runtime = LayerRuntime(0, "blocks.0.moe.experts", EXPERTS, kernel=lambda w, x: x)
    with pytest.raises(ExpertLoadError, match=r"expert cache of blocks\.0\.moe\.experts is not attached"):
        runtime.run_one(0, (torch.zeros(1, HIDDEN),), {}, training=False)
