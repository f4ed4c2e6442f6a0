"""The module that stands in for a model's routed experts.

transformers 5 keeps each family's routed experts in one module called as
``experts(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.
``OffloadedExperts`` takes its place with the same call. The router, the routing
rule, shared experts and attention stay the model's own. The weights come from
expert-cache slots; this module never knows whether they came from RAM or disk.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from .cache import ExpertCache
from .errors import ExpertLoadError
from .kernels import ExpertMLP
from .prefetch import Prefetcher
from .store import ExpertsSpec

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def is_experts_module(module: nn.Module) -> bool:
    """True for a module decorated with transformers' ``use_experts_implementation``."""
    return (
        hasattr(module, "is_transposed")
        and hasattr(module, "has_gate")
        and hasattr(module, "num_experts")
        and hasattr(type(module), "_apply_gate")
    )


def find_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_experts_module(m)]


def layer_number(name: str, ordinal: int) -> int:
    m = _LAYER.search(name + ".")
    return int(m.group(1)) if m else ordinal


def expert_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's per-expert parameters: direct parameters with a leading expert dimension."""
    e = module.num_experts
    return {n: p for n, p in module._parameters.items() if p is not None and p.dim() >= 2 and p.shape[0] == e}


class OffloadedExperts(nn.Module):
    """Computes a layer's routed experts with weights held in an ``ExpertCache``.

    Resident experts run first; missing ones are then loaded and run, one at a
    time, so a layer needs at most one free slot beyond what it already holds.
    Tokens are grouped by expert, so a prefill batch loads each expert once.
    """

    sees_routing = True  # a forward pre-hook reads the layer's routing from its arguments (trace recording)

    def __init__(self, original: nn.Module, spec: ExpertsSpec):
        super().__init__()
        self.spec = spec
        self.layer = spec.layer
        self.num_experts = spec.num_experts
        self.has_gate = bool(original.has_gate)
        self.has_bias = bool(getattr(original, "has_bias", False))
        self.is_transposed = bool(original.is_transposed)
        self.has_post_expert_norm = bool(getattr(original, "has_post_expert_norm", False))
        for name in expert_params(original):
            del original._parameters[name]
        # What is left of the module (act_fn, norms, dense parameters) stays under its own names,
        # so dense checkpoint keys such as "...experts.post_expert_norm.weight" still load.
        for name, child in original.named_children():
            self.add_module(name, child)
        for name, p in original.named_parameters(recurse=False):
            self.register_parameter(name, p)
        # The gate is bound to the original: GPT-OSS's clamped SwiGLU reads its alpha and limit from there.
        self.kernel = ExpertMLP(gated=self.has_gate, transposed=self.is_transposed,
                                activation=original._apply_gate if self.has_gate else self.act_fn,
                                post_norm=self.post_expert_norm if self.has_post_expert_norm else None)
        self.cache: ExpertCache | None = None  # set by the runtime; not a submodule
        self.prefetcher: Prefetcher | None = None
        self.pos = 0  # position among the model's MoE layers

    def extra_repr(self) -> str:
        return f"layer={self.layer}, num_experts={self.num_experts}, offloaded=True"

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            raise ExpertLoadError(f"the expert cache of {self.spec.prefix} is not attached yet; load the model with "
                                  "offload_moe.load or offload it with offload_experts first")
        return compute_grouped(self.cache, self.prefetcher, self.layer, self.pos, hidden_states, top_k_index,
                               top_k_weights, self.kernel, self.num_experts)


def routing_to_host(flat: torch.Tensor, predicted: dict[int, torch.Tensor]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Bring the routing [T*k] and any device-side predictions to the host in one copy."""
    if flat.device.type == "cpu":
        return flat, predicted
    parts = [flat] + [p.reshape(-1) for p in predicted.values()]
    host = torch.cat(parts).cpu()
    routing, rest = host[: flat.numel()], host[flat.numel():]
    out, offset = {}, 0
    for pos, p in predicted.items():
        out[pos] = rest[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    return routing, out


def compute_grouped(cache: ExpertCache, prefetcher: Prefetcher | None, layer: int, pos: int,
                    hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                    kernel: Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor], num_experts: int,
                    check: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """One MoE layer's routed experts with weights from ``cache``: ``hidden`` [T, H], ``index`` and ``weights`` [T, k].

    Token-expert pairs are grouped by expert; resident experts run first while the missing ones
    are already loading, and each needed expert is loaded once. An index of -1 is a dropped pair
    (it contributes nothing). ``kernel(x, slot_tensors)`` computes one expert. ``check`` sees the
    routing once it is on the host. The k contributions of a token are summed in k order, as
    transformers' grouped implementation does. The cache's lock is taken once, by ``use_layer``.
    """
    num_tokens, top_k = index.shape
    flat = index.reshape(-1)  # [T*k]
    order = torch.argsort(flat, stable=True)  # pair ids grouped by expert, dropped (-1) pairs first
    predicted = prefetcher.predict_device(pos, hidden) if prefetcher else {}
    routing, predicted = routing_to_host(flat, predicted)  # the layer's one host-device sync
    if check is not None:
        check(routing)
    spans = _spans(routing, num_experts)
    pair_weights = weights.reshape(-1)  # [T*k]
    out = hidden.new_zeros(num_tokens * top_k, hidden.shape[-1], dtype=torch.promote_types(hidden.dtype, weights.dtype))

    def compute(expert: int, tensors: dict[str, torch.Tensor]) -> None:
        lo, hi = spans[expert]
        pairs = order[lo:hi]
        out[pairs] = kernel(hidden[pairs // top_k], tensors) * pair_weights[pairs, None]

    use_layer(cache, prefetcher, layer, pos, list(spans), _kept(routing, num_tokens, top_k), predicted, compute,
              tokens=num_tokens)
    return out.view(num_tokens, top_k, -1).sum(dim=1).to(hidden.dtype)


def use_layer(cache: ExpertCache, prefetcher: Prefetcher | None, layer: int, pos: int, experts: list[int],
              routing: torch.Tensor, predicted: dict[int, torch.Tensor],
              compute: Callable[[int, dict[str, torch.Tensor]], None], *, tokens: int = 1) -> None:
    """One layer's turn at the cache and the prefetcher, as the runtime takes it and a trace replay repeats it.

    ``experts`` are the layer's distinct experts, ascending; ``routing`` [T, k] (on the host) and the
    device-side ``predicted`` go to the prefetcher, whose loads the lease starts while the layer computes
    and again once the layer has let go of its slots. ``compute(expert, tensors)`` runs each expert,
    resident first, then each missing one once it is ready. All of it under the cache's lock, taken once.
    ``tokens``: the tokens the layer computes (a batched step or a prompt: several; ``ExpertCache.use``).
    """
    with cache.use(layer, experts, tokens=tokens) as lease:
        if prefetcher is not None:
            lease.prefetch(prefetcher.after_routing(pos, routing, predicted))
        for expert, tensors in lease:
            compute(expert, tensors)


def _spans(routing: torch.Tensor, num_experts: int) -> dict[int, tuple[int, int]]:
    """Expert -> (first, end) of its pairs in the sorted routing, for the experts that have any."""
    counts = torch.bincount(routing + 1, minlength=num_experts + 1)[: num_experts + 1].tolist()  # [0]: dropped
    spans, start = {}, counts[0]
    for expert, n in enumerate(counts[1:]):
        if n:
            spans[expert] = (start, start + n)
        start += n
    return spans


def _kept(routing: torch.Tensor, num_tokens: int, top_k: int) -> torch.Tensor:
    """The routing [T, k] for the prefetcher; with dropped pairs, the kept ones as [n, 1]."""
    if routing.numel() == 0 or int(routing.min()) >= 0:
        return routing.view(num_tokens, top_k)
    return routing[routing >= 0].view(-1, 1)
