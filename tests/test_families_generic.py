"""Switch Transformers, NLLB-MoE and DBRX through offload_experts, against transformers' own models.

These families are not decorated with ``use_experts_implementation``, so ``offload_moe.load`` does not
take them; ``offload_experts`` does. Each tiny seeded model is written with ``save_pretrained`` to a temp
folder and read back with ``from_pretrained``: float32 logits within 1e-5 relative and greedy generation
identical, with 2 expert slots and with every expert resident.
"""

from __future__ import annotations

import types

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    DbrxConfig,
    NllbMoeConfig,
    SwitchTransformersConfig,
)

from offload_moe.generic import OffloadedFusedExperts, OffloadedModuleDict, offload_experts
from offload_moe.routing import switch_dispatch
from tiny_models import make_config

RTOL = 1e-5
NEW_TOKENS = 12
VOCAB = 96


def switch_config():
    # expert_capacity=3 with 10-token sequences and 4 experts: some tokens are dropped and pass through
    return SwitchTransformersConfig(
        vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        num_experts=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2, expert_capacity=3,
        decoder_start_token_id=0)


def nllb_config():
    return NllbMoeConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_ffn_dim=48, decoder_ffn_dim=48,
        encoder_attention_heads=4, decoder_attention_heads=4, num_experts=4, encoder_sparse_step=1,
        decoder_sparse_step=1, max_position_embeddings=64, expert_capacity=4)


def dbrx_config():
    # transformers 5.23's DbrxAttention reads attn_config.rope_theta (no such field) and cannot clamp with
    # clip_qkv=None, so both are given (DBRX's released config uses clip_qkv=8)
    return DbrxConfig(
        vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2, max_seq_len=64,
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=48, moe_num_experts=4, moe_top_k=2))


FAMILIES = {
    "switch_transformers": (switch_config, AutoModelForSeq2SeqLM),
    "nllb_moe": (nllb_config, AutoModelForSeq2SeqLM),
    "dbrx": (dbrx_config, AutoModelForCausalLM),
}


def spread(model, seed: int) -> None:
    """Widen routers and experts (as tests/tiny_models.py does) so routing varies between tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and ("router" in name or "experts" in name):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """``checkpoint(family)`` -> folder of a tiny seeded model written with save_pretrained (once per module)."""
    made = {}

    def get(family: str):
        if family not in made:
            config, cls = FAMILIES[family]
            torch.manual_seed(0)
            model = cls.from_config(config())
            spread(model, 1)
            made[family] = tmp_path_factory.mktemp(family)
            model.save_pretrained(made[family])
        return made[family]

    return get


@pytest.fixture
def prompt():
    return torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))


def load(family: str, folder):
    return FAMILIES[family][1].from_pretrained(folder, dtype=torch.float32).eval()


def outputs(model, prompt, seq2seq: bool):
    with torch.no_grad():
        if seq2seq:
            logits = model(input_ids=prompt, decoder_input_ids=prompt[:, :4]).logits
        else:
            logits = model(prompt).logits
        tokens = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    return logits, tokens


def check_parity(family, folder, prompt, want, total_experts, **options) -> None:
    """Offload a fresh copy at 2 slots and at every expert; logits and greedy tokens must match ``want``."""
    seq2seq = family != "dbrx"
    for budget in (2, total_experts):
        model = load(family, folder)
        handle = offload_experts(model, cache_experts=budget, **options)
        logits, tokens = outputs(model, prompt, seq2seq)
        assert ((want[0] - logits).abs().max() / want[0].abs().max()).item() <= RTOL, (family, budget)
        assert torch.equal(want[1], tokens), (family, budget)
        s = handle.stats()
        assert s["total_experts"] == total_experts
        if budget == 2:
            assert s["misses"] > 0 and s["evictions"] > 0  # the experts really streamed through two slots
        else:  # slots for every expert: filled at offload, every request a hit
            assert s["evictions"] == s["misses"] == 0 and s["hits"] > 0
        handle.close()


@pytest.mark.parametrize("replace_forward", [False, True], ids=["own_forward", "replace_forward"])
def test_switch_transformers_parity_and_generation(replace_forward, checkpoint, prompt):
    folder = checkpoint("switch_transformers")
    ref = load("switch_transformers", folder)
    dispatch = []
    ref.encoder.block[0].layer[1].mlp.router.register_forward_hook(lambda m, i, out: dispatch.append(switch_dispatch(out)[0]))
    want = outputs(ref, prompt, seq2seq=True)
    if dispatch[0].shape[-2] > 1:  # 5.17's mask is [..., 1, E]: its capacity count never exceeds 1, so nothing drops
        assert (dispatch[0].sum(-1) == 0).any()  # expert capacity dropped tokens: that path is covered too
    options = dict(replace_forward=True, prefetch="gate") if replace_forward else {}
    check_parity("switch_transformers", folder, prompt, want, total_experts=16, **options)

    model = load("switch_transformers", folder)
    offload_experts(model, cache_experts=2, **options)
    mlp = model.decoder.block[1].layer[2].mlp
    assert type(mlp).__name__ == "SwitchTransformersSparseMLP" and type(mlp.router).__name__ == "SwitchTransformersTop1Router"
    assert isinstance(mlp.experts, OffloadedModuleDict) and list(mlp.experts.keys()) == [f"expert_{i}" for i in range(4)]
    assert ("forward" in vars(mlp)) == replace_forward
    if replace_forward:
        outputs(model, prompt, seq2seq=True)
        assert model.offload.stats()["prefetch_issued"] > 0
    model.offload.close()


def test_nllb_moe_parity_with_its_own_forward(checkpoint, prompt):
    folder = checkpoint("nllb_moe")
    want = outputs(load("nllb_moe", folder), prompt, seq2seq=True)
    check_parity("nllb_moe", folder, prompt, want, total_experts=16)


def published_nllb_experts_forward(self, hidden_states, router_mask, router_probs):
    """NLLB-MoE's expert combination as published (fairseq): sum over the kept top-2 experts of
    combine weight * expert(x), scaled by (1 - moe_token_dropout) at inference."""
    out = torch.zeros_like(hidden_states)
    for e in range(self.num_experts):
        tokens = torch.nonzero(router_probs[:, e] > 0).flatten()
        if tokens.numel():
            y = self[f"expert_{e}"](hidden_states[tokens]) * router_probs[tokens, e, None]
            out.index_add_(0, tokens, y * (1 - self.moe_token_dropout))
    return out


def test_nllb_moe_replace_forward_runs_the_published_top2_rule(checkpoint, prompt):
    """transformers 5.23's NllbMoeExperts.forward runs expert_0 and expert_1 only (it one-hot encodes the
    0/1 top-1 mask and uses the class as the expert id), which the parity above reproduces faithfully.
    ``replace_forward=True`` runs NLLB-MoE's own top-2 rule instead; its reference is the resident model
    with that rule patched in."""
    folder = checkpoint("nllb_moe")
    ref = load("nllb_moe", folder)
    for module in ref.modules():
        if type(module).__name__ == "NllbMoeExperts":
            module.forward = types.MethodType(published_nllb_experts_forward, module)
    want = outputs(ref, prompt, seq2seq=True)
    check_parity("nllb_moe", folder, prompt, want, total_experts=16, replace_forward=True)


@pytest.mark.parametrize("replace_forward", [False, True], ids=["own_forward", "replace_forward"])
def test_dbrx_parity_and_generation(replace_forward, checkpoint, prompt):
    folder = checkpoint("dbrx")
    want = outputs(load("dbrx", folder), prompt, seq2seq=False)
    check_parity("dbrx", folder, prompt, want, total_experts=8, replace_forward=replace_forward)
    model = load("dbrx", folder)
    offload_experts(model, cache_experts=2, replace_forward=replace_forward)
    experts = model.transformer.blocks[0].ffn.experts
    assert isinstance(experts, OffloadedFusedExperts) and type(experts.mlp).__name__ == "DbrxExpertGLU"
    assert not any(".experts.mlp." in n for n, _ in model.named_parameters())  # the fused [E*I, H] weights are gone
    model.offload.close()


def test_transformers_experts_module_of_a_model_built_in_memory(prompt):
    """A decorated family (Mixtral) built in memory, never saved: the core OffloadedExperts serves it."""
    from transformers import AutoModelForCausalLM as Causal

    torch.manual_seed(0)
    ref = Causal.from_config(make_config("mixtral")).eval()
    spread(ref, 2)
    with torch.no_grad():
        want = ref(prompt).logits
    model = Causal.from_config(make_config("mixtral")).eval()
    model.load_state_dict(ref.state_dict())
    handle = offload_experts(model, cache_experts=2, prefetch="gate")
    assert type(model.model.layers[0].mlp.experts).__name__ == "OffloadedExperts"
    with torch.no_grad():
        got = model(prompt).logits
    assert ((want - got).abs().max() / want.abs().max()).item() <= RTOL
    s = handle.stats()
    assert s["layers"] == 3 and s["evictions"] > 0 and s["tokens"] == prompt.numel()
    handle.close()
