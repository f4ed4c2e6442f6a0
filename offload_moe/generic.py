"""Offload the experts of any PyTorch MoE model: custom layers, Switch Transformers, NLLB-MoE, DBRX.

``offload_moe.load`` builds a transformers model from a checkpoint. ``offload_experts`` takes a model
that is already built (its experts in memory, or on the meta device with ``store=``) and moves the
experts of its MoE layers into the same expert cache, store, prefetch and statistics.

An MoE layer is a module with an ``experts`` container and a ``gate`` or ``router``. The container is
replaced, so the layer above it keeps working unchanged:

- an ``nn.ModuleList`` / ``nn.ModuleDict`` of identical experts becomes an ``OffloadedModuleList`` /
  ``OffloadedModuleDict`` whose item ``i`` computes expert ``i`` with its weights from a cache slot
  (``torch.func.functional_call`` on one weightless template of the expert). The layer's own forward,
  and the container's own forward if its class has one (Switch Transformers, NLLB-MoE), run as written;
  each call of an item loads that expert if it is not resident. A layer that loops over every expert
  loads every expert.
- fused expert parameters (``[E, ...]``, or DBRX's ``[E * I, H]``), called as
  ``experts(hidden, top_k_index, top_k_weights)``, become an ``OffloadedFusedExperts`` that groups the
  tokens by expert, computes the resident experts first and loads each missing one once. Containers
  decorated with transformers' ``use_experts_implementation`` get the core ``OffloadedExperts``.
- ``replace_forward=True`` replaces the layer's forward itself by its router (``offload_moe.routing``)
  plus that grouped computation: the fast path for a layer whose forward calls every expert.

Where the bytes come from: ``save_experts`` writes the experts to safetensors, one tensor per expert
parameter named ``layers.{L}.experts.{E}.{param}``, plus a JSON manifest; ``SavedExperts`` indexes
those files for the movers, as ``ExpertStore`` does for a transformers checkpoint.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from .attach import MoELayer, attach, check_assembly, shared_shapes
from .cache import ExpertCache, SlotLayout
from .config import Budget, OffloadConfig, configure, parse_bytes, parse_dtype
from .errors import ConfigError, DeviceError, ExpertLoadError, UnsupportedModelError
from .experts import OffloadedExperts, compute_grouped
from .layers import (  # noqa: F401  (find_moe_layers... stay importable from offload_moe.generic)
    FUSED_KERNELS,
    ExpertFn,
    Kernel,
    LayerPlan,
    Offloaded,
    expert_item,
    find_moe_layers,
    plan_layers,
)
from .planning import device_slots, kv_reserve
from .prefetch import Prefetcher
from .routing import Router, default_router, gate_of, top_k_of
from .runtime import ExpertOffload, OffloadHandle  # noqa: F401  (ExpertOffload stays importable from here)
from .saved_experts import SavedExperts, write_plans
from .store import ExpertsSpec

DROPPED = ("zero", "identity")
OWN_OPTIONS = ("layers", "router", "replace_forward", "store", "offload_folder", "experts_attr", "expert_fn",
               "dropped_tokens")  # offload_experts' options that are no OffloadConfig setting
_MODULE_INTERNALS = frozenset(vars(nn.Module()))


# == the modules that stand in for expert containers ==========================================================
class _TemplateKernel:
    """Runs one expert module's forward with a slot's tensors as its parameters and buffers."""

    def __init__(self, expert: nn.Module):
        self.template = copy.deepcopy(expert).to("meta")  # structure only, no memory

    def __call__(self, weights: dict[str, torch.Tensor], *args, **kwargs) -> torch.Tensor:
        return functional_call(self.template, weights, args, kwargs)


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
        """Compute one expert on ``args``: load it if it is not resident, keep it pinned while it runs
        (holding the cache's lock, so that threads calling the model never interleave inside one expert's use)."""
        cache = self.attached()
        with cache.lock:
            if args and isinstance(args[0], torch.Tensor):
                self.check_device(args[0])
            self.follow(training)
            with cache.use(self.layer, [expert]) as ready:
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
    with cache.lock:  # the template's mode and the cache's books are shared by the threads calling the model
        rt.check_device(hidden)
        rt.follow(training)
        _check_routing(rt, hidden, index, weights)
        return compute_grouped(cache, rt.prefetcher, rt.layer, rt.pos, hidden, index, weights,
                               lambda x, views: rt.kernel(views, x), rt.num_experts,
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


# == save_experts ===============================================================================================

def save_experts(model_or_layers: nn.Module | Sequence[nn.Module], folder: str | Path, *,
                 layers: Sequence[nn.Module | str] | None = None, experts_attr: str = "experts",
                 dtype: str | torch.dtype | None = None, expert_fn: ExpertFn | None = None) -> Path:
    """Write the experts of a model's MoE layers to ``folder`` as safetensors, for ``offload_experts(store=...)``.

    One file per layer, one tensor per expert parameter, named ``layers.{L}.experts.{E}.{param}`` (L: the
    layer's position among the MoE layers found, E: the expert), in the experts' dtype or ``dtype``; then
    ``experts.json`` (layer names, expert counts, parameter shapes and dtypes, expert class). Each file is
    written to a temporary name and renamed into place, the manifest last, so an interrupted save leaves
    no folder that looks complete. The layers are found as ``offload_experts`` finds them, or named with
    ``layers=``; ``model_or_layers`` may also be a list of MoE layer modules. Refuses a folder holding a
    model (``config.json``): this never writes into a model's own files. Returns the folder.
    """
    if isinstance(model_or_layers, nn.Module):
        plans = plan_layers(model_or_layers, layers, experts_attr=experts_attr, need_gate=True, expert_fn=expert_fn)
    else:
        holder = nn.ModuleList(list(model_or_layers))  # names "0", "1"...: matched by order later
        plans = plan_layers(holder, list(holder), experts_attr=experts_attr, expert_fn=expert_fn)
    return write_plans(plans, Path(folder).expanduser(), parse_dtype(dtype))


# == offload_experts ============================================================================================
def offload_experts(
    model: nn.Module,
    config: OffloadConfig | None = None,
    *,
    layers: Sequence[nn.Module | str] | nn.Module | str | None = None,
    router: Router | Sequence[Router] | Mapping[str, Router] | None = None,
    replace_forward: bool = False,
    store: str | Path | SavedExperts | None = None,
    offload_folder: str | Path | None = None,
    experts_attr: str = "experts",
    expert_fn: ExpertFn | None = None,
    dropped_tokens: str = "zero",
    **overrides,
) -> OffloadHandle:
    """Move the experts of ``model``'s MoE layers into an expert cache; the model keeps running as before.

    Layers: found as modules with an ``experts`` container (``experts_attr``) next to a ``gate`` or
    ``router``, or named with ``layers=`` (modules or dotted names). Containers: ModuleList/ModuleDict of
    identical experts, or fused ``[E, ...]`` parameters (DBRX's are known; others need
    ``expert_fn(container, x, weights) -> y``). The container is replaced; the layer's forward is kept,
    or with ``replace_forward=True`` replaced by ``router(layer, hidden, *args) -> (top_k_index [T, k],
    top_k_weights [T, k])`` plus a grouped computation that loads each needed expert once. ``router``:
    one callable, one per layer, or a mapping by layer name; default: the family's router
    (Switch Transformers, NLLB-MoE, DBRX), else ``TopKRouter()`` (softmax over the gate, top-k from the
    layer's ``top_k``/``k``/``num_experts_per_tok``, renormalised). Tokens the router drops (-1) output
    zeros, or their input with ``dropped_tokens="identity"``.

    Bytes: from ``store`` (a folder or file written by ``save_experts``), else the experts are first
    written with ``save_experts`` to ``offload_folder`` or to a temporary folder deleted on ``close()``.
    Settings: an ``OffloadConfig`` (``config``) and/or its fields as keyword arguments, which win, as in
    ``offload_moe.load`` (``profile=`` too). Budget: ``cache_experts`` slots or ``cache_memory`` bytes on ``device``,
    shared by all layers (one expert size for the model); without either, what a profile's ``device_memory``
    leaves after the dense weights, a KV cache and a workspace (as ``load`` and ``plan`` count), else half the free memory. A device budget that holds every expert is
    filled at once. ``host_memory`` adds the warm tier, as in ``load``. ``policy``, ``dtype``, ``readers``, ``io`` and
    ``read_timeout`` as in ``offload_moe.load``: with ``io="mmap"`` (CPU only) an expert missing from the slots is computed in place
    from the mapped store files. ``prefetch``: ``none``, ``gate``, ``transition``, ``hybrid`` or a ``Predictor``; it needs the routing before the
    experts run, so ``replace_forward=True`` or fused containers. A predictor with ``bind(prefetcher)``
    (``routing.HashPredictor``) is bound to the model's inputs.

    Returns the handle ``load`` gives as ``model.offload`` (``stats()``, ``reset_stats()``, ``close()``), also set
    as ``model.offload`` if the model has no such attribute; ``forward`` and ``generate`` take its lock, as after
    ``load``. Put the rest of the model on ``device`` yourself.
    """
    settings = _settings(config, overrides, dropped_tokens)
    plans = plan_layers(model, layers, experts_attr=experts_attr, need_gate=router is None, expert_fn=expert_fn)
    routers = _routers(plans, router) if replace_forward else [None] * len(plans)
    _check_modes(plans, replace_forward, settings.prefetch)
    found = [MoELayer(p.layer, p.name, p.where, p.num_experts, p.shapes, gate_of(p.module, p.num_experts), p.module)
             for p in plans]
    dtype = settings.dtype or next(iter(plans[0].dtypes.values()))
    dense = _dense_bytes(model, plans)
    assembly = check_assembly(found, settings, dtype=dtype, budget=_budget(settings, found, dtype, dense, model),
                              dense_bytes=dense, top_k=top_k_of(plans[0].module) or 2)
    opened, owned = _open_store(plans, store, offload_folder, settings.io)
    return attach(model, assembly, opened,
                  install=lambda: [_swap(plan, routers[i], dropped_tokens) for i, plan in enumerate(plans)],
                  folder=opened.folder, name=_model_name(model), owned_folder=owned)


def _settings(config: OffloadConfig | None, overrides: dict, dropped: str) -> OffloadConfig:
    settings = configure(config, overrides, "offload_experts", OWN_OPTIONS)
    if dropped not in DROPPED:
        raise ConfigError(f"dropped_tokens={dropped!r}: use one of {', '.join(DROPPED)}")
    return settings


def _budget(settings: OffloadConfig, layers: Sequence[MoELayer], dtype: torch.dtype, dense: int, model: nn.Module) -> Budget:
    """``cache_experts`` or ``cache_memory``; without either, what ``device_memory`` (a profile's) leaves after the
    dense weights, the KV cache and a workspace, by the rule ``plan`` and ``load`` use (``planning.device_slots``):
    a KV cache of ``DEFAULT_CONTEXT`` tokens when the model's config gives its attention sizes, else none."""
    budget = Budget(settings.cache_experts, settings.cache_memory)
    if settings.device_memory is None or budget != Budget():
        return budget
    expert_bytes = SlotLayout(shared_shapes(layers), dtype).nbytes
    total = sum(layer.num_experts for layer in layers)
    kv = kv_reserve(getattr(model, "config", None), dtype).nbytes
    return Budget(device_slots(parse_bytes(settings.device_memory, "device_memory"), dense, kv, expert_bytes, total))


def _model_name(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "_name_or_path", "") or getattr(config, "model_type", "") or type(model).__name__)


def _routers(plans: Sequence[LayerPlan], router) -> list[Router]:
    for plan in plans:
        if plan.kind == "transformers":
            raise UnsupportedModelError(
                f"{plan.where} is a transformers experts module: its block keeps its own routing (shared experts, "
                "scaling), so replace_forward=True does not apply; leave it False"
            )
    if router is None:
        out = [default_router(p.module, p.num_experts) for p in plans]
    elif isinstance(router, Mapping):
        missing = [p.name for p in plans if p.name not in router]
        if missing:
            raise ConfigError(f"router={{...}} has no router for the MoE layer(s) {missing}; key it by layer name")
        out = [router[p.name] for p in plans]
    elif callable(router):
        out = [router] * len(plans)
    else:
        out = list(router)
        if len(out) != len(plans):
            raise ConfigError(f"router=[...] holds {len(out)} routers for {len(plans)} MoE layers; give one per layer")
    for plan, r in zip(plans, out):
        if hasattr(r, "check"):
            r.check(plan.module, plan.num_experts)
    return out


def _check_modes(plans: Sequence[LayerPlan], replace_forward: bool, prefetch) -> None:
    if prefetch == "none" or replace_forward:
        return
    blind = [p.where for p in plans if p.kind in ("ModuleList", "ModuleDict")]
    if blind:
        raise ConfigError(
            f"prefetch={getattr(prefetch, 'name', prefetch)!r} needs each layer's routing before its experts run, and "
            f"{blind[0]} is called one expert at a time by its layer's own forward; use replace_forward=True, or "
            "prefetch='none'"
        )


def _open_store(plans, store, offload_folder, io) -> tuple[SavedExperts, Path | None]:
    owned = None
    if store is None:
        folder = Path(offload_folder).expanduser() if offload_folder is not None else None
        if folder is None:
            folder = owned = Path(tempfile.mkdtemp(prefix="offload_moe-experts-"))
        try:
            write_plans(plans, folder)
        except BaseException:
            if owned is not None:
                shutil.rmtree(owned, ignore_errors=True)
            raise
        store = folder
    opened = store if isinstance(store, SavedExperts) else SavedExperts(store, io=io)
    try:
        opened.match(plans)
    except BaseException:
        opened.close()
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)
        raise
    return opened, owned


def _swap(plan: LayerPlan, router: Router | None, dropped: str):
    """Replace the layer's container by its offloaded stand-in (the expert weights are dropped here)."""
    if plan.kind == "transformers":
        spec = _transformers_spec(plan)
        stand_in = OffloadedExperts(plan.container, spec)
        setattr(plan.module, plan.attr, stand_in)
        return stand_in
    kernel = _kernel(plan)
    runtime = LayerRuntime(plan.layer, plan.where, plan.num_experts, kernel)
    if plan.kind == "fused":
        for name in plan.shapes:
            owner, _, leaf = name.rpartition(".")
            del plan.container.get_submodule(owner)._parameters[leaf]
        stand_in = OffloadedFusedExperts(plan.container, plan, runtime)
    else:
        cls = OffloadedModuleDict if plan.kind == "ModuleDict" else OffloadedModuleList
        stand_in = cls(plan.container, plan, runtime)
    setattr(plan.module, plan.attr, stand_in)
    plan.container = runtime.module = stand_in
    if router is not None:
        plan.module.forward = RoutedForward(plan.module, runtime, router, dropped)
        stand_in.sees_routing = False  # the grouped computation runs from the layer's forward, past the container
    return runtime


def _kernel(plan: LayerPlan) -> Kernel:
    if plan.kind in ("ModuleList", "ModuleDict"):
        return _TemplateKernel(expert_item(plan.container, plan.keys[0]))
    if plan.expert_fn is not None:
        container, fn = plan.container, plan.expert_fn
        return lambda w, x: fn(container, x, w)
    return FUSED_KERNELS[type(plan.container).__name__](plan.container)


def _transformers_spec(plan: LayerPlan):
    c = plan.container
    return ExpertsSpec(layer=plan.layer, prefix=plan.where, num_experts=plan.num_experts, shapes=plan.shapes,
                       is_transposed=bool(c.is_transposed), is_concatenated=bool(getattr(c, "is_concatenated", True)))


def _dense_bytes(model: nn.Module, plans: Sequence[LayerPlan]) -> int:
    expert_ids = {id(t) for p in plans for t in p.container.parameters()}
    return sum(t.numel() * t.element_size() for t in model.parameters() if id(t) not in expert_ids)
