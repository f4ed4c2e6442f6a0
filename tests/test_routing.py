"""Routing schemes as routers: each rule on its own, then offloaded (replace_forward=True) against the same layer resident."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from offload_moe.errors import ConfigError
from offload_moe.generic import offload_experts
from offload_moe.routing import (
    BalancedRouter,
    CapacityTop1Router,
    ExpertChoiceRouter,
    HashPredictor,
    HashRouter,
    NoisyTopKRouter,
    TokenIds,
    TopKRouter,
)

HIDDEN, INNER, EXPERTS, VOCAB = 12, 24, 4, 40


class RoutedMoE(nn.Module):
    """A resident reference: ``router(self, x)`` picks experts, every pair is computed directly (-1 skipped)."""

    def __init__(self, router, top_k: int = 2, dropped: str = "zero"):
        super().__init__()
        self.router, self.top_k, self.dropped = router, top_k, dropped
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.noise = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(HIDDEN, INNER), nn.SiLU(), nn.Linear(INNER, HIDDEN))
                                     for _ in range(EXPERTS))

    def forward(self, x):
        flat = x.reshape(-1, HIDDEN)
        index, weights = self.router(self, x)
        out = torch.zeros_like(flat)
        for t, j in itertools.product(range(index.shape[0]), range(index.shape[1])):
            if index[t, j] >= 0:
                out[t] += self.experts[int(index[t, j])](flat[t]) * weights[t, j]
        if self.dropped == "identity":
            out = torch.where((index < 0).all(-1, keepdim=True), flat, out)
        return out.view(x.shape)


class Stack(nn.Module):
    def __init__(self, make_layer, layers: int = 2, embed: bool = False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN) if embed else None
        self.layers = nn.ModuleList(make_layer(i) for i in range(layers))

    def forward(self, x):
        x = self.embed(x) if self.embed is not None else x
        for layer in self.layers:
            x = x + layer(x)
        return x


def make_stack(router, layers: int = 2, seed: int = 0, **kw) -> Stack:
    torch.manual_seed(seed)
    model = Stack(lambda i: RoutedMoE(router, **kw), layers).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.gate.weight.mul_(3)
    return model


def hidden(tokens: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


def check_offloaded_parity(ref: nn.Module, x: torch.Tensor, router, budgets=(2, 8), **kw) -> list[dict]:
    """Offload a copy of ``ref`` with ``router`` at each budget; its output must equal the resident one."""
    with torch.no_grad():
        want = ref(x)
    stats = []
    for budget in budgets:
        model = copy.deepcopy(ref)
        handle = offload_experts(model, router=router, replace_forward=True, cache_experts=budget, **kw)
        with torch.no_grad():
            got = model(x)
        assert ((want - got).abs().max() / want.abs().max()).item() <= 1e-6, budget
        stats.append(handle.stats())
        handle.close()
    return stats


class GateOnly(nn.Module):
    def __init__(self, weight: torch.Tensor, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.noise = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.gate.weight.copy_(weight)


# -- top-k and noisy top-k --------------------------------------------------------------------------------------
def test_top_k_rule_and_parity():
    layer, x = GateOnly(torch.randn(EXPERTS, HIDDEN)), hidden()
    index, weights = TopKRouter()(layer, x)
    probs = (x @ layer.gate.weight.T).softmax(-1)
    top = probs.topk(2, dim=-1)
    assert torch.equal(index, top.indices)
    assert torch.allclose(weights, top.values / top.values.sum(-1, keepdim=True))
    assert torch.allclose(TopKRouter(k=3, normalize=False)(layer, x)[1], probs.topk(3, dim=-1).values)
    router = TopKRouter()
    check_offloaded_parity(make_stack(router), hidden(), router)


def test_noisy_top_k_is_deterministic_in_eval_and_noisy_in_training():
    layer, x = GateOnly(torch.randn(EXPERTS, HIDDEN)), hidden()
    router = NoisyTopKRouter(generator=torch.Generator().manual_seed(7))
    layer.eval()
    first, again = router(layer, x), router(layer, x)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    clean = TopKRouter()(layer, x)  # softmax over the kept k logits = the renormalised top-k of the softmax
    assert torch.equal(first[0], clean[0]) and torch.allclose(first[1], clean[1])

    layer.train()
    router.generator.manual_seed(7)
    expected = x @ layer.gate.weight.T + torch.randn(8, EXPERTS, generator=torch.Generator().manual_seed(7)) \
        * F.softplus(x @ layer.noise.weight.T)  # H = x W_g + N(0, 1) * softplus(x W_noise)
    assert torch.allclose(router.logits(layer, x), expected, atol=1e-6)
    router.generator.manual_seed(7)
    index, weights = router(layer, x)
    top = expected.topk(2, dim=-1)
    assert torch.equal(index, top.indices) and torch.allclose(weights, top.values.softmax(-1), atol=1e-6)
    assert not torch.equal(router.logits(layer, x), router.logits(layer, x))  # fresh noise on every call


def test_noisy_top_k_offloaded_parity():
    router = NoisyTopKRouter()
    check_offloaded_parity(make_stack(router), hidden(), router)


# -- top-1 with a capacity factor -----------------------------------------------------------------------------------
def test_capacity_top1_drops_tokens_past_capacity():
    weight = torch.zeros(EXPERTS, HIDDEN)
    weight[0, 0] = 5.0  # tokens with a positive first feature prefer expert 0
    layer = GateOnly(weight)
    x = torch.zeros(8, HIDDEN)
    x[:, 0] = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, -1.0, 1.5, -2.0])  # six want expert 0
    router = CapacityTop1Router(capacity_factor=1.0)
    assert router.capacity(8, EXPERTS) == 2
    index, weights = router(layer, x)
    probs = (x @ weight.T).softmax(-1)
    assert index.shape == (8, 1) and torch.allclose(weights[:, 0], probs.max(-1).values)
    assert index[:, 0].tolist()[:5] == [0, 0, -1, -1, -1]  # first come, first served: tokens 2, 3, 4 dropped
    assert (index[:, 0] == 0).sum() == 2
    by_score = CapacityTop1Router(capacity_factor=1.0, priority="score")(layer, x)[0][:, 0]
    assert sorted(torch.nonzero(by_score == 0).flatten().tolist()) == [2, 3]  # the two most confident
    assert (CapacityTop1Router(capacity_factor=4.0)(layer, x)[0] >= 0).all()  # room for everyone


@pytest.mark.parametrize("dropped", ["zero", "identity"])
def test_capacity_top1_offloaded_parity_with_dropped_tokens(dropped):
    router = CapacityTop1Router(capacity_factor=0.5)
    ref, x = make_stack(router, dropped=dropped), hidden(12)
    index, _ = router(ref.layers[0], x)
    assert (index < 0).any()  # the parity below covers dropped tokens
    check_offloaded_parity(ref, x, router, dropped_tokens=dropped)


# -- expert choice -----------------------------------------------------------------------------------------------
def test_expert_choice_each_expert_takes_its_top_c_tokens():
    layer, x = GateOnly(torch.randn(EXPERTS, HIDDEN) * 3), hidden(10)
    router = ExpertChoiceRouter(capacity_factor=2.0)
    c = router.capacity(10, EXPERTS)
    assert c == math.ceil(2.0 * 10 / EXPERTS) == 5
    index, weights = router(layer, x)
    probs = (x @ layer.gate.weight.T).softmax(-1)
    assert index.shape == (10, EXPERTS)
    for e in range(EXPERTS):
        taken = (index == e).any(-1)
        assert taken.sum() == c
        assert set(torch.nonzero(taken).flatten().tolist()) == set(probs[:, e].topk(c).indices.tolist())
        assert torch.allclose(weights[:, e][taken], probs[taken, e])
    assert (weights[index < 0] == 0).all()
    assert torch.equal(ExpertChoiceRouter()(layer, x[:1])[0], torch.arange(EXPERTS)[None])  # one token: all take it


def test_expert_choice_offloaded_parity():
    router = ExpertChoiceRouter(capacity_factor=1.0)
    ref, x = make_stack(router), hidden(12)
    assert (router(ref.layers[0], x)[0] < 0).all(-1).any()  # some token is taken by no expert
    check_offloaded_parity(ref, x, router)


# -- BASE layers -------------------------------------------------------------------------------------------------
def test_balanced_assignment_is_balanced_and_optimal_in_training_and_greedy_in_eval():
    pytest.importorskip("scipy")
    weight = torch.randn(2, HIDDEN)
    layer, x = GateOnly(weight), hidden(4)
    affinity = x @ weight.T
    layer.train()
    expert = BalancedRouter()(layer, x)[0][:, 0]
    assert torch.bincount(expert, minlength=2).tolist() == [2, 2]
    best = max(itertools.permutations([0, 0, 1, 1]), key=lambda a: sum(affinity[t, e] for t, e in enumerate(a)))
    assert math.isclose(sum(affinity[t, e] for t, e in enumerate(expert.tolist())),
                        sum(affinity[t, e] for t, e in enumerate(best)), rel_tol=1e-6)
    layer.eval()
    index, weights = BalancedRouter()(layer, x)
    assert torch.equal(index[:, 0], affinity.argmax(-1))
    assert torch.allclose(weights[:, 0], affinity.max(-1).values.sigmoid())


def test_balanced_router_offloaded_parity():
    router = BalancedRouter()
    check_offloaded_parity(make_stack(router), hidden(), router)


# -- hash routing ----------------------------------------------------------------------------------------------
def make_hash_stack(layers: int = 3, k: int = 1):
    tokens = TokenIds()
    routers = [HashRouter.balanced(tokens, VOCAB, EXPERTS, k=k, seed=i) for i in range(layers)]
    torch.manual_seed(0)
    model = Stack(lambda i: RoutedMoE(routers[i]), layers, embed=True).eval()
    tokens.attach(model)
    return model, tokens, routers


def test_hash_routing_rule():
    tokens = TokenIds()
    router = HashRouter.balanced(tokens, VOCAB, EXPERTS, k=2, seed=3)
    assert torch.bincount(router.table[:, 0], minlength=EXPERTS).tolist() == [VOCAB // EXPERTS] * EXPERTS
    assert (router.table[:, 0] != router.table[:, 1]).all()  # k distinct experts per token
    ids = torch.tensor([[5, 9, 5]])
    tokens.capture(ids)
    index, weights = router(None, torch.zeros(1, 3, HIDDEN))
    assert torch.equal(index, router.table[ids.flatten()]) and (weights == 0.5).all()
    assert torch.equal(index[0], index[2])  # the same token always goes to the same experts
    with pytest.raises(ConfigError, match="hold 3 tokens but the layer got 2"):
        router(None, torch.zeros(2, HIDDEN))


def test_hash_routing_offloaded_parity_and_prefetch_recall_is_one():
    ref, _, routers = make_hash_stack()
    batches = [torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    with torch.no_grad():
        want = [ref(ids) for ids in batches]
    model, tokens, routers = make_hash_stack()
    handle = offload_experts(model, router=routers, replace_forward=True, cache_experts=EXPERTS,
                             prefetch=HashPredictor(routers))
    with torch.no_grad():
        for ids, expected in zip(batches, want):
            assert torch.allclose(model(ids), expected, rtol=1e-6, atol=1e-6)
    handle.cache.drain()
    s = handle.stats()
    assert s["prefetch"] == "hash" and s["prefetch_issued"] > 0 and s["misses"] == 0
    assert s["prefetch_recall"] == 1.0 and s["prediction_recall"] == 1.0 and s["prediction_precision"] == 1.0
    assert s["evictions"] > 0  # the slots really were reused across layers
    handle.close()

    model, _, routers = make_hash_stack()
    handle = offload_experts(model, router=routers, replace_forward=True, cache_experts=EXPERTS)
    with torch.no_grad():
        for ids in batches:
            model(ids)
    assert handle.stats()["prefetch_recall"] < 1.0  # without the hash predictor, layers wait for their experts
    handle.close()
