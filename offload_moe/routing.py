"""Routing schemes as routers, for layers offloaded with ``offload_experts(..., replace_forward=True)``.

A router is a callable ``router(layer, hidden, *args, **kwargs) -> (top_k_index, top_k_weights)``:

- ``layer`` is the MoE layer module (routers read their weights from it: ``layer.gate``...);
- ``hidden`` is the layer's input as it received it, ``[..., H]``; ``args``/``kwargs`` are the rest of
  the layer's forward arguments (NLLB-MoE's padding mask, for instance);
- ``top_k_index [T, k]`` (T = the number of tokens, in ``hidden.reshape(-1, H)`` order) names the
  experts of each token; ``-1`` means "no expert" (a token dropped for capacity, or an expert-choice
  slot nobody filled), and its weight is ignored;
- ``top_k_weights [T, k]`` scales each expert's output; the layer's output is their weighted sum.

A router may define ``check(layer, num_experts)``, which ``offload_experts`` calls before it changes the
model, to fail early on a layer it cannot route.

The schemes: ``TopKRouter`` (softmax top-k: Mixtral, GShard and GLaM-style top-2), ``NoisyTopKRouter``
(Shazeer et al. 2017), ``CapacityTop1Router`` (Switch Transformer top-1 with a capacity factor),
``ExpertChoiceRouter`` (Zhou et al. 2022), ``BalancedRouter`` (BASE layers, Lewis et al. 2021) and
``HashRouter`` (Hash layers, Roller et al. 2021) with its ``HashPredictor``, which knows every layer's
experts as soon as the token ids arrive. ``family_router`` gives the router of Switch Transformers,
NLLB-MoE and DBRX layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .prefetch import Predictor

Router = Callable[..., tuple[torch.Tensor, torch.Tensor]]

GATE_NAMES = ("gate", "router")
TOP_K_NAMES = ("top_k", "k", "num_experts_per_tok", "moe_top_k", "num_selected_experts")


# -- reading a layer ----------------------------------------------------------------------------------
def gate_of(layer: nn.Module, num_experts: int | None = None, names: Sequence[str] = GATE_NAMES) -> nn.Module | None:
    """The layer's gate: the first of ``layer.gate``, ``layer.router`` (or their ``classifier``/``layer``
    child) with a 2-D ``weight`` of ``num_experts`` rows. None if there is none."""
    for name in names:
        module = getattr(layer, name, None)
        if not isinstance(module, nn.Module):
            continue
        for candidate in (module, getattr(module, "classifier", None), getattr(module, "layer", None)):
            weight = getattr(candidate, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2 and (
                    num_experts is None or weight.shape[0] == num_experts):
                return candidate
    return None


def find_routers(model: nn.Module, experts: Sequence[tuple[str, int]]) -> list[nn.Module | None]:
    """The router of each experts module, given as (module name, number of experts): its block's
    ``gate`` or ``router`` with an [E, H] weight (None if not found)."""
    routers = []
    for prefix, num_experts in experts:
        block = model.get_submodule(prefix.rpartition(".")[0])
        router = getattr(block, "gate", None) or getattr(block, "router", None)
        weight = getattr(router, "weight", None)
        ok = isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.shape[0] == num_experts
        routers.append(router if ok else None)
    return routers


def top_k_of(layer: nn.Module) -> int | None:
    """The layer's number of experts per token, from ``top_k``, ``k``, ``num_experts_per_tok``... (None if absent)."""
    for name in TOP_K_NAMES:
        value = getattr(layer, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _logits(gate: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    flat = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
    return F.linear(flat.to(gate.weight.dtype), gate.weight, getattr(gate, "bias", None))  # [T, E]


class _GateRouter:
    """Base of the routers that read one gate (an ``nn.Linear``-like module) from the layer."""

    k: int | None = None  # experts per token, where the rule has one; None: the layer's top_k attribute

    def __init__(self, gate: str | None = None):
        self.gate = gate

    def _k(self, layer: nn.Module) -> int:
        k = self.k or top_k_of(layer)
        if k is None:
            raise ConfigError(
                f"{type(self).__name__}: {type(layer).__name__} has no {'/'.join(TOP_K_NAMES)} attribute; pass k=..."
            )
        return k

    def _gate(self, layer: nn.Module, num_experts: int | None = None) -> nn.Module:
        gate = gate_of(layer, num_experts, (self.gate,) if self.gate else GATE_NAMES)
        if gate is None:
            wanted = f"layer.{self.gate}" if self.gate else "layer.gate or layer.router"
            raise ConfigError(
                f"{type(self).__name__} needs {wanted}: a module with a 2-D weight of {num_experts or 'E'} rows "
                f"(an nn.Linear), and {type(layer).__name__} has none; pass gate='<attribute name>' or another router"
            )
        return gate

    def check(self, layer: nn.Module, num_experts: int) -> None:
        self._gate(layer, num_experts)


# -- token choice ---------------------------------------------------------------------------------------
class TopKRouter(_GateRouter):
    """Softmax over the gate's logits (in float32), the top ``k``, renormalised to sum to 1 if ``normalize``.

    This is the rule of Mixtral and of the sparsely-gated MoE layer most research code writes; with
    ``k=2`` it is GShard's and GLaM's top-2 gating at inference. ``k`` defaults to the layer's ``top_k``
    (or ``k``, ``num_experts_per_tok``) attribute.
    """

    def __init__(self, k: int | None = None, *, normalize: bool = True, gate: str | None = None):
        super().__init__(gate)
        if k is not None and k < 1:
            raise ConfigError(f"TopKRouter(k={k}): k must be at least 1")
        self.k = k
        self.normalize = normalize

    def check(self, layer: nn.Module, num_experts: int) -> None:
        super().check(layer, num_experts)
        if self._k(layer) > num_experts:
            raise ConfigError(f"{type(self).__name__}: k={self._k(layer)} is more than the layer's {num_experts} experts")

    def __call__(self, layer: nn.Module, hidden: torch.Tensor, *_, **__) -> tuple[torch.Tensor, torch.Tensor]:
        probs = _logits(self._gate(layer), hidden).float().softmax(dim=-1)  # [T, E]
        weights, index = probs.topk(self._k(layer), dim=-1)  # [T, k]
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return index, weights.to(hidden.dtype)


class NoisyTopKRouter(_GateRouter):
    """Noisy top-k gating (Shazeer et al. 2017): ``H = x W_g + N(0, 1) * softplus(x W_noise)``, keep the top
    ``k`` of H, softmax over them.

    The noise is drawn only while the layer is in training mode; in eval mode the router is the plain
    top-k of the clean logits, so inference is deterministic. ``W_noise`` is ``layer.<noise>`` (an
    ``nn.Linear`` with E outputs). ``generator`` makes the training noise reproducible.
    """

    def __init__(self, k: int | None = None, *, gate: str | None = None, noise: str = "noise",
                 generator: torch.Generator | None = None):
        super().__init__(gate)
        self.k = k
        self.noise = noise
        self.generator = generator

    def check(self, layer: nn.Module, num_experts: int) -> None:
        super().check(layer, num_experts)
        self._k(layer)
        if gate_of(layer, num_experts, (self.noise,)) is None:
            raise ConfigError(
                f"NoisyTopKRouter needs layer.{self.noise}, an nn.Linear with {num_experts} outputs for the noise "
                f"scale, and {type(layer).__name__} has none; pass noise='<attribute name>'"
            )

    def logits(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The (noisy, in training mode) gate logits ``H`` [T, E]."""
        clean = _logits(self._gate(layer), hidden).float()
        if not layer.training:
            return clean
        scale = F.softplus(_logits(gate_of(layer, None, (self.noise,)), hidden).float())
        if self.generator is None:
            noise = torch.randn_like(clean)
        else:
            noise = torch.randn(clean.shape, generator=self.generator, device=self.generator.device).to(clean.device)
        return clean + noise * scale

    def __call__(self, layer: nn.Module, hidden: torch.Tensor, *_, **__) -> tuple[torch.Tensor, torch.Tensor]:
        top, index = self.logits(layer, hidden).topk(self._k(layer), dim=-1)  # [T, k]
        return index, top.softmax(dim=-1).to(hidden.dtype)  # softmax over the kept k: the rest are -inf


class CapacityTop1Router(_GateRouter):
    """Top-1 routing with a capacity factor (Switch Transformer): each expert takes at most
    ``ceil(capacity_factor * T / E)`` tokens of a call; tokens past their expert's capacity are dropped.

    Tokens are admitted in position order (``priority="position"``, Switch) or, with
    ``priority="score"``, highest router probability first (V-MoE's batch-prioritised routing). A kept
    token's weight is its router probability. A dropped token gets index -1: its MoE output is zero, so
    the residual connection around the layer carries it through unchanged, as in Switch Transformer;
    ``offload_experts(..., dropped_tokens="identity")`` returns the token's input instead, for layers
    that have no residual around them.
    """

    def __init__(self, capacity_factor: float = 1.0, *, priority: str = "position", gate: str | None = None):
        super().__init__(gate)
        if capacity_factor <= 0:
            raise ConfigError(f"CapacityTop1Router(capacity_factor={capacity_factor}) must be positive")
        if priority not in ("position", "score"):
            raise ConfigError(f"CapacityTop1Router(priority={priority!r}): use 'position' or 'score'")
        self.capacity_factor = capacity_factor
        self.priority = priority

    def capacity(self, num_tokens: int, num_experts: int) -> int:
        return max(1, math.ceil(self.capacity_factor * num_tokens / num_experts))

    def __call__(self, layer: nn.Module, hidden: torch.Tensor, *_, **__) -> tuple[torch.Tensor, torch.Tensor]:
        probs = _logits(self._gate(layer), hidden).float().softmax(dim=-1)  # [T, E]
        num_tokens, num_experts = probs.shape
        weight, expert = probs.max(dim=-1)  # [T]
        order = weight.argsort(descending=True, stable=True) if self.priority == "score" \
            else torch.arange(num_tokens, device=probs.device)
        onehot = F.one_hot(expert[order], num_experts)  # [T, E] in admission order
        rank = (onehot.cumsum(dim=0) * onehot).sum(dim=-1)  # 1-based place in its expert's queue
        kept = torch.empty_like(rank, dtype=torch.bool)
        kept[order] = rank <= self.capacity(num_tokens, num_experts)
        index = torch.where(kept, expert, torch.full_like(expert, -1))
        return index[:, None], weight[:, None].to(hidden.dtype)


class BalancedRouter(_GateRouter):
    """BASE layers (Lewis et al. 2021): in training, a balanced assignment that maximises the total
    token-expert affinity ``x . w_e`` with every expert taking ``ceil(T / E)`` tokens at most; at
    inference, each token's top expert (greedy, as the paper does at test time).

    The weight is ``sigmoid(affinity)``, as BASE scales an expert's output. The training assignment
    is solved exactly with scipy's ``linear_sum_assignment``.
    """

    def assign(self, affinity: torch.Tensor) -> torch.Tensor:
        """The balanced assignment [T] of an affinity matrix [T, E]."""
        try:
            from scipy.optimize import linear_sum_assignment
        except ImportError:
            raise ConfigError("BalancedRouter needs scipy for its training-time assignment: pip install scipy") from None
        num_tokens, num_experts = affinity.shape
        per_expert = math.ceil(num_tokens / num_experts)
        cost = -affinity.detach().float().repeat_interleave(per_expert, dim=1).cpu().numpy()  # [T, E * c]
        rows, cols = linear_sum_assignment(cost)
        expert = torch.empty(num_tokens, dtype=torch.long)
        expert[torch.as_tensor(rows)] = torch.as_tensor(cols) // per_expert
        return expert.to(affinity.device)

    def __call__(self, layer: nn.Module, hidden: torch.Tensor, *_, **__) -> tuple[torch.Tensor, torch.Tensor]:
        affinity = _logits(self._gate(layer), hidden).float()  # [T, E]
        expert = self.assign(affinity) if layer.training else affinity.argmax(dim=-1)
        weight = affinity.gather(1, expert[:, None]).sigmoid()
        return expert[:, None], weight.to(hidden.dtype)


# -- expert choice --------------------------------------------------------------------------------------
class ExpertChoiceRouter(_GateRouter):
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top ``c`` tokens of the call by
    router probability (softmax over experts), ``c = ceil(capacity_factor * T / E)``.

    A token can be taken by any number of experts, none included; its output is the sum of the
    chosen experts' outputs, each weighted by its probability. The index is ``[T, E]``, ``-1`` where
    an expert did not take the token. A batch's tokens compete, so a token's output depends on the
    others of its call: with one token per call (decoding), every expert takes it.
    """

    def __init__(self, capacity_factor: float = 1.0, *, gate: str | None = None):
        super().__init__(gate)
        if capacity_factor <= 0:
            raise ConfigError(f"ExpertChoiceRouter(capacity_factor={capacity_factor}) must be positive")
        self.capacity_factor = capacity_factor

    def capacity(self, num_tokens: int, num_experts: int) -> int:
        return min(num_tokens, max(1, math.ceil(self.capacity_factor * num_tokens / num_experts)))

    def __call__(self, layer: nn.Module, hidden: torch.Tensor, *_, **__) -> tuple[torch.Tensor, torch.Tensor]:
        probs = _logits(self._gate(layer), hidden).float().softmax(dim=-1)  # [T, E]
        num_tokens, num_experts = probs.shape
        tokens = probs.topk(self.capacity(num_tokens, num_experts), dim=0).indices  # [c, E]
        chosen = torch.zeros_like(probs, dtype=torch.bool).scatter_(0, tokens, True)  # [T, E]
        experts = torch.arange(num_experts, device=probs.device).expand(num_tokens, -1)
        index = torch.where(chosen, experts, torch.full_like(experts, -1))
        return index, torch.where(chosen, probs, torch.zeros_like(probs)).to(hidden.dtype)


# -- hash routing -----------------------------------------------------------------------------------------
class TokenIds:
    """The token ids of the model call in progress, for routers and predictors that route by token.

    ``attach(model)`` installs a forward pre-hook on the model that captures its ``input_ids``
    argument (keyword, else the first positional argument if it is an integer tensor).
    """

    def __init__(self, key: str = "input_ids"):
        self.key = key
        self.ids: torch.Tensor | None = None  # [T]
        self._listeners: list[Callable[[torch.Tensor], None]] = []

    def attach(self, model: nn.Module):
        """Capture the ids of every call of ``model``; returns the hook's handle (``.remove()`` to stop)."""
        return model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get(self.key)
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        if isinstance(ids, torch.Tensor) and not ids.is_floating_point():
            self.capture(ids)

    def capture(self, ids: torch.Tensor) -> None:
        """Set the current token ids (any shape; flattened in the order of the hidden states)."""
        self.ids = ids.reshape(-1)
        for listener in list(self._listeners):
            listener(self.ids)

    def listen(self, listener: Callable[[torch.Tensor], None]) -> Callable[[], None]:
        """Call ``listener(ids)`` on every capture; returns a function that stops it."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    @property
    def current(self) -> torch.Tensor:
        if self.ids is None:
            raise ConfigError(
                "no token ids were captured: attach the TokenIds to the model (tokens.attach(model)) or call "
                "tokens.capture(input_ids) before the forward"
            )
        return self.ids


class HashRouter:
    """Hash layers (Roller et al. 2021): token id ``t`` goes to the experts ``table[t]``, fixed in advance.

    ``table`` is ``[vocab, k]``; each of the k experts gets weight 1/k. ``HashRouter.balanced`` builds
    a random table in which every expert gets the same number of ids.
    """

    def __init__(self, table: torch.Tensor, tokens: TokenIds):
        if table.dim() != 2 or table.is_floating_point():
            raise ConfigError(f"HashRouter: table must be an integer [vocab, k] tensor, got {table.dtype} {list(table.shape)}")
        self.table = table.long()
        self.tokens = tokens

    @classmethod
    def balanced(cls, tokens: TokenIds, vocab_size: int, num_experts: int, k: int = 1, seed: int = 0) -> "HashRouter":
        """A random balanced hash: a seeded permutation of the vocabulary dealt round-robin to the experts."""
        if not 1 <= k <= num_experts:
            raise ConfigError(f"HashRouter.balanced: k={k} must be between 1 and num_experts={num_experts}")
        g = torch.Generator().manual_seed(seed)
        base = torch.empty(vocab_size, dtype=torch.long)
        base[torch.randperm(vocab_size, generator=g)] = torch.arange(vocab_size) % num_experts
        return cls((base[:, None] + torch.arange(k)) % num_experts, tokens)

    def check(self, layer: nn.Module, num_experts: int) -> None:
        if int(self.table.max()) >= num_experts or int(self.table.min()) < 0:
            raise ConfigError(f"HashRouter: the table names experts outside 0..{num_experts - 1}")

    def experts(self, ids: torch.Tensor) -> torch.Tensor:
        """The experts [T, k] of token ids [T]."""
        if int(ids.max()) >= self.table.shape[0] or int(ids.min()) < 0:
            raise ConfigError(f"HashRouter: a token id is outside the table's vocabulary of {self.table.shape[0]}")
        return self.table[ids.cpu()]

    def __call__(self, layer: nn.Module, hidden: torch.Tensor, *_, **__) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokens.current
        num_tokens = hidden.numel() // hidden.shape[-1]
        if ids.numel() != num_tokens:
            raise ConfigError(
                f"HashRouter: the captured token ids hold {ids.numel()} tokens but the layer got {num_tokens}; "
                "attach the TokenIds to the model whose input_ids reach this layer"
            )
        index = self.experts(ids).to(hidden.device)
        return index, torch.full(index.shape, 1.0 / index.shape[1], dtype=hidden.dtype, device=hidden.device)


class HashPredictor(Predictor):
    """Prefetch for hash routing: every layer's experts follow from the token ids, so the prediction is exact.

    At each layer it names the experts of the next ``depth`` layers. ``offload_experts`` calls
    ``bind(prefetcher)``, which starts loading the first layer's experts as soon as the token ids are
    captured, before the embedding and attention run; every needed expert is then already resident
    or in flight when its layer asks (prefetch recall 1.0), given slots for one layer's experts.
    """

    name = "hash"

    def __init__(self, routers: Sequence[HashRouter], depth: int = 1):
        if not routers:
            raise ConfigError("HashPredictor needs the HashRouter of every offloaded layer, in layer order")
        if depth < 1:
            raise ConfigError(f"HashPredictor(depth={depth}) must be at least 1 layer")
        self.routers = list(routers)
        self.tokens = self.routers[0].tokens
        if any(r.tokens is not self.tokens for r in self.routers):
            raise ConfigError("HashPredictor: every HashRouter must read the same TokenIds")
        self.depth = depth

    def predict_host(self, pos: int, routing: torch.Tensor) -> dict[int, torch.Tensor]:
        ids = self.tokens.current
        last = min(pos + 1 + self.depth, len(self.routers))
        return {ahead: self.routers[ahead].experts(ids) for ahead in range(pos + 1, last)}

    def bind(self, prefetcher) -> Callable[[], None]:
        """Prefetch the first layer's experts whenever new token ids arrive; returns the function that stops it."""
        def first_layer(ids: torch.Tensor) -> None:
            prefetcher.cache.prefetch(prefetcher.layers[0], _by_votes(self.routers[0].experts(ids)))

        return self.tokens.listen(first_layer)


def _by_votes(ids: torch.Tensor) -> list[int]:
    """The distinct experts of ``ids`` [T, k], most used first."""
    votes = torch.bincount(ids.reshape(-1))
    order = votes.argsort(descending=True, stable=True)
    return order[: int((votes > 0).sum())].tolist()


# -- the routers of transformers families that are not decorated with use_experts_implementation ---------
def switch_router(layer: nn.Module, hidden: torch.Tensor, *_, **__) -> tuple[torch.Tensor, torch.Tensor]:
    """Switch Transformers (``SwitchTransformersSparseMLP``): the layer's own top-1 router with its
    per-sequence expert capacity; a token past capacity gets -1 and a zero output, as in transformers."""
    dispatch, probs = switch_dispatch(layer.router(hidden))
    dispatch = dispatch.reshape(-1, dispatch.shape[-1])
    index = torch.where(dispatch.any(dim=-1), dispatch.argmax(dim=-1), -1)
    return index[:, None], probs.reshape(-1, 1)


def switch_dispatch(outputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """The dispatch mask [B, S, E] (one-hot, dropped tokens zeroed) and the chosen expert's probability [B, S, 1]
    from a Switch router's outputs, whose order changed in transformers 5.24 (from probs, mask, max prob)."""
    dispatch = next(t for t in outputs if not t.is_floating_point())
    probs = next(t for t in outputs if t.is_floating_point() and t.shape[-1] == 1)
    return dispatch, probs


def nllb_router(layer: nn.Module, hidden: torch.Tensor, padding_mask: torch.Tensor | None = None, *_, **__
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """NLLB-MoE (``NllbMoeSparseMLP``) at inference: the layer's own top-2 router with its capacity and
    padding rules; each kept expert's output is weighted by its combine weight times (1 - moe_token_dropout),
    as fairseq's NLLB-MoE does in eval mode."""
    if layer.training:
        raise ConfigError(
            "nllb_router implements NLLB-MoE's inference rule (token dropout is a scale in eval mode); to train, "
            "keep the layer's own forward: offload_experts(..., replace_forward=False)"
        )
    _, combine, _ = layer.router(hidden.reshape(-1, hidden.shape[-1]), padding_mask)  # combine [T, E]
    weights, index = combine.topk(2, dim=-1)
    index = torch.where(weights > 0, index, -1)
    return index, weights * (1 - float(getattr(layer.experts, "moe_token_dropout", 0.0)))


def dbrx_router(layer: nn.Module, hidden: torch.Tensor, *_, **__) -> tuple[torch.Tensor, torch.Tensor]:
    """DBRX (``DbrxFFN``): the layer's own router and ``route_tokens_to_experts`` (softmax, top-k, p-norm)."""
    weights, index = layer.route_tokens_to_experts(layer.router(hidden))
    return index, weights


FAMILY_ROUTERS: dict[str, Router] = {
    "SwitchTransformersSparseMLP": switch_router,
    "NllbMoeSparseMLP": nllb_router,
    "DbrxFFN": dbrx_router,
}


def family_router(layer: nn.Module) -> Router | None:
    """The router of a known model family's MoE layer (by class name), or None."""
    return FAMILY_ROUTERS.get(type(layer).__name__)


def default_router(layer: nn.Module, num_experts: int) -> Router:
    """The family's router, else ``TopKRouter()`` if the layer has a gate; raises ConfigError if neither."""
    router = family_router(layer)
    if router is not None:
        return router
    if not isinstance(gate_of(layer, num_experts), nn.Linear):
        raise ConfigError(
            f"replace_forward=True needs a router for {type(layer).__name__}: it has no gate/router nn.Linear with "
            f"{num_experts} outputs for the default TopKRouter and is not a known family "
            f"({', '.join(FAMILY_ROUTERS)}); pass router=... (see offload_moe.routing)"
        )
    return TopKRouter()
