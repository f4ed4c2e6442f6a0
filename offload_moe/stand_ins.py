"""The modules that stand in for a built model's expert containers, and the per-layer runtime they share.

``offload_experts`` (``offload_moe.generic``) replaces each MoE layer's ``experts`` container by one of these;
the layer above it keeps working unchanged:

- ``OffloadedModuleList`` / ``OffloadedModuleDict``: item ``i`` (an ``OffloadedExpert``) computes expert ``i``
  with its weights from a cache slot (``torch.func.functional_call`` on one weightless template of the
  expert, ``_TemplateKernel``); the layer's and the container's own forward run as written.
- ``OffloadedFusedExperts``: fused expert parameters called as ``experts(hidden, top_k_index, top_k_weights)``;
  ``grouped`` computes the resident experts first and loads each missing one once.
- ``RoutedForward``: with ``replace_forward=True``, the layer's forward itself: its router, then ``grouped``.

``LayerRuntime`` is what the stand-ins of one layer share: its cache layer id, its kernel, the cache.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from .cache import ExpertCache
from .errors import ConfigError, DeviceError, ExpertLoadError, UnsupportedModelError
from .experts import compute_grouped
from .formats import QuantizedWeight
from .kernels import Scratch, linear
from .layers import Kernel, LayerPlan, Offloaded
from .prefetch import Prefetcher
from .routing import Router

_MODULE_INTERNALS = frozenset(vars(nn.Module()))


# == the modules that stand in for expert containers ==========================================================
class _TemplateKernel:
    """Runs one expert module's forward with a slot's tensors as its parameters and buffers.

    ``packed``: the weights of the template's ``nn.Linear`` modules that the slots hold packed
    (``offload_experts(quantize=...)``, ``"0.weight"`` for module ``"0"``); each of those modules becomes a
    ``_PackedLinear``, handed its ``QuantizedWeight`` for the call. Calls run under the cache's lock, one at a time.
    """

    def __init__(self, expert: nn.Module, packed: Sequence[str] = ()):
        self.template = copy.deepcopy(expert).to("meta")  # structure only, no memory
        self.scratch = Scratch()  # where packed weights are dequantized: the model's one (``attach`` sets it)
        self.packed: dict[str, _PackedLinear] = {}
        for name in packed:
            module = name.removesuffix("weight").removesuffix(".")
            self.packed[name] = replacement = _PackedLinear(self.template.get_submodule(module))
            if module:
                self.template.set_submodule(module, replacement)
            else:
                self.template = replacement

    def __call__(self, weights: dict, *args, **kwargs) -> torch.Tensor:
        if not self.packed:
            return functional_call(self.template, weights, args, kwargs)
        dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        for name, module in self.packed.items():
            module.packed, module.scratch, module.dtype = weights[name], self.scratch, dtype
        try:
            return functional_call(self.template, {n: t for n, t in weights.items() if n not in self.packed}, args, kwargs)
        finally:
            for module in self.packed.values():
                module.packed = None  # the slot may be reused once the call is over


class _PackedLinear(nn.Module):
    """An expert's ``nn.Linear`` whose weight is packed: ``kernels.linear`` with the ``QuantizedWeight`` of the call.

    ``weight`` is a ``_WeightShape``: its dtype (the call's activations'), shape and device answer the checks T5-style
    experts make before they call the module (Switch Transformers, NLLB-MoE); computing with it is refused.
    """

    def __init__(self, original: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = original.in_features, original.out_features
        self.bias = original.bias  # on meta: a slot's bias takes its place in each call
        self.packed: QuantizedWeight | None = None
        self.scratch: Scratch | None = None
        self.dtype: torch.dtype | None = None  # the call's activations'

    @property
    def weight(self) -> torch.Tensor:
        dtype = self.dtype or torch.get_default_dtype()
        return torch.empty((self.out_features, self.in_features), dtype=dtype, device="meta").as_subclass(_WeightShape)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed=True"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.packed, self.bias, self.scratch)


class _WeightShape(torch.Tensor):
    """What a packed ``nn.Linear``'s ``weight`` reads as: its dtype, shape and device can be asked; any computation
    with it is refused, naming the setting (the weight is packed, and only the module's own forward computes with it)."""

    ALLOWED = frozenset({"dtype", "shape", "device", "ndim", "is_cuda", "is_meta", "size", "dim"})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", None)
        if name == "__get__":  # an attribute read: the attribute's name
            name = getattr(getattr(func, "__self__", None), "__name__", None)
        if name not in cls.ALLOWED:
            raise UnsupportedModelError(
                f"an expert computed with the weight of one of its nn.Linear modules directly ({name}); "
                "with quantize=... its weights are packed and only the module's own forward computes with them, so "
                "leave quantize out for this model"
            )
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


@dataclass
class LayerRuntime:
    """What the stand-in modules of one layer share: its cache layer id, how an expert computes, the cache."""

    layer: int
    name: str
    num_experts: int
    kernel: Kernel
    cache: ExpertCache | None = None
    prefetcher: Prefetcher | None = None
    pos: int = 0  # position among the offloaded layers, for the prefetcher
    module: nn.Module | None = None  # the stand-in container

    def attached(self) -> ExpertCache:
        if self.cache is None:
            raise ExpertLoadError(f"the expert cache of {self.name or 'the model'} is not attached yet; "
                                  "offload the model with offload_experts first")
        return self.cache

    def check_device(self, x: torch.Tensor) -> None:
        device = self.attached().pool.device
        if x.device.type != device.type or (device.index is not None and x.device.index != device.index):
            raise DeviceError(
                f"{self.name or 'the model'}: hidden states are on {x.device} but the expert slots are on {device}; "
                "move the rest of the model there (model.to(device)) or pass offload_experts(device=...)"
            )

    def follow(self, training: bool) -> None:
        """Put the expert template (dropout...) in the calling module's train/eval mode."""
        template = getattr(self.kernel, "template", None)
        if template is not None and template.training != training:
            template.train(training)

    def run_one(self, expert: int, args: tuple, kwargs: dict, training: bool) -> torch.Tensor:
        """Compute one expert on ``args``: load it if it is not resident, keep it pinned while it runs. The lease
        holds the cache's lock (taken once), so threads calling the model never interleave inside one expert's use
        or flip the template's mode under another."""
        cache = self.attached()
        if args and isinstance(args[0], torch.Tensor):
            self.check_device(args[0])
        with cache.use(self.layer, [expert]) as ready:
            self.follow(training)
            for _, tensors in ready:
                return self.kernel(tensors, *args, **kwargs)


class OffloadedExpert(nn.Module):
    """Item ``expert`` of an offloaded container: the expert's forward, with its weights from the cache."""

    def __init__(self, runtime: LayerRuntime, expert: int, key: str):
        super().__init__()
        self.runtime = runtime
        self.expert = expert
        self.key = key

    def extra_repr(self) -> str:
        return f"layer={self.runtime.layer}, expert={self.expert}, offloaded=True"

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.runtime.run_one(self.expert, args, kwargs, self.training)


class _OffloadedItems(Offloaded):
    """What offloaded ModuleList and ModuleDict share: the original's attributes and its own forward."""

    sees_routing = False  # its layer calls its items one expert at a time

    def _adopt(self, original: nn.Module, plan: LayerPlan, runtime: LayerRuntime) -> list[tuple[str, nn.Module]]:
        for key, value in vars(original).items():
            if key not in _MODULE_INTERNALS:
                self.__dict__[key] = value  # num_experts, moe_token_dropout...: what its forward reads
        self.training = original.training
        self.runtime = runtime
        forward = type(original).forward
        self._container_forward = None if forward in (nn.Module.forward, nn.ModuleList.forward,
                                                      nn.ModuleDict.forward) else forward
        experts = {k: i for i, k in enumerate(plan.keys)}
        items = original.items() if isinstance(original, nn.ModuleDict) else \
            ((str(i), m) for i, m in enumerate(original))
        return [(k, OffloadedExpert(runtime, experts[k], k).train(m.training) if k in experts else m) for k, m in items]

    def forward(self, *args, **kwargs):
        if self._container_forward is None:
            raise UnsupportedModelError(f"{type(self).__name__} of {self.runtime.name}: the original container has no "
                                        "forward of its own; call its items")
        return self._container_forward(self, *args, **kwargs)


class OffloadedModuleList(_OffloadedItems, nn.ModuleList):
    """Stands in for an ``nn.ModuleList`` of experts: same length and order, items compute from the cache."""

    def __init__(self, original: nn.ModuleList, plan: LayerPlan, runtime: LayerRuntime):
        nn.ModuleList.__init__(self)
        for _, module in self._adopt(original, plan, runtime):
            self.append(module)


class OffloadedModuleDict(_OffloadedItems, nn.ModuleDict):
    """Stands in for an ``nn.ModuleDict`` of experts: same keys, items compute from the cache."""

    def __init__(self, original: nn.ModuleDict, plan: LayerPlan, runtime: LayerRuntime):
        nn.ModuleDict.__init__(self)
        for key, module in self._adopt(original, plan, runtime):
            self[key] = module


class OffloadedFusedExperts(Offloaded, nn.Module):
    """Stands in for fused experts called as ``experts(hidden [..., H], top_k_index [T, k], top_k_weights [T, k])``.

    Returns ``[..., H]``, the weighted sum of each token's experts. Keeps the original's other children
    and attributes (DBRX's ``mlp`` with its activation), without the expert parameters.
    """

    sees_routing = True  # a forward pre-hook reads the layer's routing from its arguments (trace recording)

    def __init__(self, original: nn.Module, plan: LayerPlan, runtime: LayerRuntime):
        super().__init__()
        for key, value in vars(original).items():
            if key not in _MODULE_INTERNALS:
                self.__dict__[key] = value
        for name, child in original.named_children():
            self.add_module(name, child)
        self.training = original.training
        self.runtime = runtime

    @property
    def num_experts(self) -> int:
        return self.runtime.num_experts

    def extra_repr(self) -> str:
        return f"layer={self.runtime.layer}, num_experts={self.runtime.num_experts}, offloaded=True"

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        out = grouped(self.runtime, flat, top_k_index.reshape(flat.shape[0], -1),
                      top_k_weights.reshape(flat.shape[0], -1), training=self.training)
        return out.view(hidden_states.shape)



# == grouped computation: resident experts first, each missing one loaded once ================================
def grouped(rt: LayerRuntime, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, *,
            training: bool = False) -> torch.Tensor:
    """The layer's expert output [T, H] for ``hidden`` [T, H] routed by ``index``/``weights`` [T, k] (-1: none).

    The computation is ``offload_moe.experts.compute_grouped``, the one ``OffloadedExperts`` runs; this
    checks the router's output first. ``training`` is the caller's mode, which the expert template follows.
    """
    cache = rt.attached()
    rt.check_device(hidden)
    _check_routing(rt, hidden, index, weights)

    def kernel(x: torch.Tensor, views: dict[str, torch.Tensor]) -> torch.Tensor:
        rt.follow(training)  # under the lease's lock: the template's mode is shared by the threads calling the model
        return rt.kernel(views, x)

    return compute_grouped(cache, rt.prefetcher, rt.layer, rt.pos, hidden, index, weights, kernel, rt.num_experts,
                           check=lambda r: _check_range(rt, r))


def _check_routing(rt: LayerRuntime, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
    want = hidden.shape[0]
    ok = (isinstance(index, torch.Tensor) and isinstance(weights, torch.Tensor) and index.dim() == 2
          and index.shape == weights.shape and index.shape[0] == want and not index.is_floating_point()
          and weights.is_floating_point())
    if not ok:
        raise ConfigError(
            f"the router of {rt.name or 'the model'} returned top_k_index {_describe(index)} and top_k_weights "
            f"{_describe(weights)}; it must return an integer [T, k] index and a floating [T, k] weight with "
            f"T={want} tokens (-1 in the index for no expert)"
        )


def _describe(t: object) -> str:
    return f"{t.dtype} {list(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_range(rt: LayerRuntime, routing: torch.Tensor) -> None:
    if routing.numel() and (int(routing.min()) < -1 or int(routing.max()) >= rt.num_experts):
        raise ConfigError(
            f"the router of {rt.name or 'the model'} named expert {int(routing.min())}..{int(routing.max())}, outside "
            f"0..{rt.num_experts - 1} (and -1 for no expert)"
        )


class RoutedForward:
    """A layer's replacement forward: its router, then the grouped offloaded experts (``replace_forward=True``).

    Called with the layer's own arguments; returns a tensor shaped like the hidden states. Tokens the
    router drops (index -1 in every column) get zeros, or their input with ``dropped="identity"``.
    """

    def __init__(self, layer: nn.Module, runtime: LayerRuntime, router: Router, dropped: str = "zero"):
        self.layer = weakref.ref(layer)
        self.runtime = runtime
        self.router = router
        self.dropped = dropped

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        layer = self.layer()
        index, weights = self.router(layer, hidden_states, *args, **kwargs)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])  # [T, H]
        out = grouped(self.runtime, flat, index, weights, training=layer.training)
        if self.dropped == "identity":
            gone = (index < 0).all(dim=-1)  # [T]
            out = torch.where(gone[:, None], flat, out)
        return out.view(hidden_states.shape)
