"""The model's dense nn.Linear layers (attention, lm_head...) compute through kernels.dense_linear on the CPU in bf16,
and so through gemv.bf16_linear at decode (conftest sets $OFFLOAD_MOE_GEMV=on), until the handle closes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe import attach, gemv
from tiny_models import relative_error

pytestmark = pytest.mark.skipif(not gemv.available(), reason="needs numba")

NEW_TOKENS = 8


@pytest.fixture
def spy(monkeypatch):
    """The data pointers of the weights gemv.bf16_linear was called with, in order."""
    seen: list[int] = []
    real = gemv.bf16_linear

    def counting(x, weight, bias=None, *, transposed=False):
        seen.append(weight.data_ptr())
        return real(x, weight, bias, transposed=transposed)

    monkeypatch.setattr(gemv, "bf16_linear", counting)
    return seen


def build(verb: str, folder, dtype: torch.dtype = torch.bfloat16, **settings):
    if verb == "load":
        return offload_moe.load(folder, dtype=str(dtype).removeprefix("torch."), progress=False, **settings)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    offload_moe.offload_experts(model, **settings)
    return model


def dense_linears(model: nn.Module) -> list[nn.Linear]:
    experts = {id(m) for s in model.offload.modules for m in s.modules()}
    return [m for m in model.modules() if type(m) is nn.Linear and id(m) not in experts]


def patched(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "forward" in vars(m) and type(m) is nn.Linear]


def decode(model, prompt):
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits).float()  # [steps, 1, vocab]


@pytest.mark.parametrize("verb", ["load", "offload_experts"])
def test_dense_layers_take_the_gemv_at_decode_until_close(verb, model_dir, prompt, spy):
    folder = model_dir("mixtral")
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    want_tokens, want_logits = decode(ref, prompt)
    assert spy == []  # transformers' own model is not touched
    model = build(verb, folder, cache_experts=2)
    linears = dense_linears(model)
    assert {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m in linears} >= {"q_proj", "o_proj", "lm_head"}
    assert patched(model) == linears
    state = {k: v.clone() for k, v in model.state_dict().items()}

    got_tokens, got_logits = decode(model, prompt)
    assert torch.equal(want_tokens, got_tokens)
    assert relative_error(want_logits, got_logits) < 2e-2  # bf16: rounded in other places than torch's kernels
    assert {m.weight.data_ptr() for m in linears} <= set(spy)  # every dense layer, at least once
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    q_proj = model.model.layers[0].self_attn.q_proj
    x = torch.randn(1, 1, q_proj.in_features, dtype=torch.bfloat16)
    with torch.enable_grad():  # training: torch's kernel, which has a backward
        spy.clear()
        q_proj(x.requires_grad_()).sum().backward()
        assert spy == [] and x.grad is not None
    x = x.detach()
    hooked = model.model.layers[0].self_attn.k_proj
    ours = hooked.forward
    hooked.forward = lambda h: ours(h)  # what an accelerate hook added after load does: it calls the forward it found

    model.offload.close()
    assert patched(model) == [hooked]
    spy.clear()
    with torch.no_grad():
        assert torch.equal(q_proj(x), F.linear(x, q_proj.weight, q_proj.bias))
        assert torch.equal(hooked(x), F.linear(x, hooked.weight, hooked.bias))
        model.lm_head(torch.randn(1, model.lm_head.in_features, dtype=torch.bfloat16))
    assert spy == []  # neither the ones put back nor the one wrapped since


@pytest.mark.parametrize("verb", ["load", "offload_experts"])
def test_nothing_is_patched_with_the_gemv_off(verb, model_dir, prompt, spy, monkeypatch):
    monkeypatch.setenv(gemv.ENV, "off")
    model = build(verb, model_dir("mixtral"), cache_experts=2)
    assert dense_linears(model) and patched(model) == []
    decode(model, prompt)
    assert spy == []
    model.offload.close()


@pytest.mark.parametrize("verb", ["load", "offload_experts"])
def test_nothing_is_patched_in_float32(verb, model_dir, spy):
    model = build(verb, model_dir("mixtral"), torch.float32, cache_experts=2)
    assert dense_linears(model) and patched(model) == []
    model.offload.close()


def test_an_error_while_attaching_leaves_no_layer_patched(model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(model_dir("mixtral"), dtype=torch.bfloat16).eval()
    own = model.model.layers[1].self_attn.v_proj
    own.forward = forward = lambda h: F.linear(h, own.weight)  # a forward of its own: left alone
    before = [m for m in model.modules() if type(m) is nn.Linear]

    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(attach, "fill_device_cache", fail)  # after the layers were patched
    with pytest.raises(KeyboardInterrupt):
        offload_moe.offload_experts(model, cache_memory="1GiB")
    assert [m for m in model.modules() if type(m) is nn.Linear] == before
    assert patched(model) == [own] and vars(own)["forward"] is forward


def test_verdicts_are_settled_at_load_and_numba_compiled_only_if_used(model_dir, monkeypatch, tmp_path):
    monkeypatch.setenv(gemv.ENV, "auto")
    monkeypatch.setenv("OFFLOAD_MOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(gemv, "_verdicts", {})
    timed, compiled = [], []
    monkeypatch.setattr(gemv, "calibrate", lambda shape, *, transposed, tokens: timed.append((shape, tokens)) or
                        {"gemv": False, "speedup": 0.9, "rounds": 5})
    monkeypatch.setattr(gemv, "compile_kernels", lambda: compiled.append(1))
    model = build("load", model_dir("mixtral"), cache_experts=2)
    dense = {tuple(m.weight.shape) for m in dense_linears(model)}  # q, k and v, o, lm_head
    assert {(s, t) for s in dense for t in (1, gemv.MAX_TOKENS)} <= set(timed)
    assert compiled == []  # every verdict said torch's kernel
    count = len(timed)
    with torch.no_grad():
        model(torch.tensor([[1]]))  # decoding asks the verdicts settled at load: no calibration
    assert len(timed) == count
    model.offload.close()
