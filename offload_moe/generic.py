"""Offload the experts of any PyTorch MoE model: custom layers, Switch Transformers, NLLB-MoE, DBRX.

``offload_moe.load`` builds a transformers model from a checkpoint. ``offload_experts`` takes a model
that is already built (its experts in memory, or on the meta device with ``store=``) and moves the
experts of its MoE layers into the same expert cache, store, prefetch and statistics.

An MoE layer is a module with an ``experts`` container and a ``gate`` or ``router``. The container is
replaced by a stand-in (``offload_moe.stand_ins``), so the layer above it keeps working unchanged:

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

import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .attach import MoELayer, attach, check_assembly
from .config import OffloadConfig, configure, parse_dtype
from .errors import ConfigError, UnsupportedModelError
from .experts import OffloadedExperts
from .layers import (  # noqa: F401  (find_moe_layers... stay importable from offload_moe.generic)
    FUSED_KERNELS,
    ExpertFn,
    Kernel,
    LayerPlan,
    expert_item,
    find_moe_layers,
    plan_layers,
)
from .routing import Router, default_router, gate_of, top_k_of
from .runtime import ExpertOffload, OffloadHandle  # noqa: F401  (ExpertOffload stays importable from here)
from .saved_experts import SavedExperts, write_plans
from .stand_ins import (  # noqa: F401  (the stand-ins stay importable from offload_moe.generic)
    LayerRuntime,
    OffloadedExpert,
    OffloadedFusedExperts,
    OffloadedModuleDict,
    OffloadedModuleList,
    RoutedForward,
    _TemplateKernel,
    grouped,
)
from .store import ExpertsSpec

DROPPED = ("zero", "identity")
OWN_OPTIONS = ("layers", "router", "replace_forward", "store", "offload_folder", "experts_attr", "expert_fn",
               "dropped_tokens")  # offload_experts' options that are no OffloadConfig setting


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
    assembly = check_assembly(found, settings, dtype=dtype, dense_bytes=dense, top_k=top_k_of(plans[0].module) or 2,
                              model_config=getattr(model, "config", None))
    opened, owned = _open_store(plans, store, offload_folder, assembly.io.io)
    return attach(model, assembly, opened,
                  install=lambda: [_swap(plan, routers[i], dropped_tokens) for i, plan in enumerate(plans)],
                  folder=opened.folder, name=_model_name(model), owned_folder=owned)


def _settings(config: OffloadConfig | None, overrides: dict, dropped: str) -> OffloadConfig:
    settings = configure(config, overrides, "offload_experts", OWN_OPTIONS)
    if dropped not in DROPPED:
        raise ConfigError(f"dropped_tokens={dropped!r}: use one of {', '.join(DROPPED)}")
    return settings


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
    owned = opened = None
    if store is None and offload_folder is None:
        owned = Path(tempfile.mkdtemp(prefix="offload_moe-experts-"))
    try:
        if store is None:
            store = owned or Path(offload_folder).expanduser()
            write_plans(plans, store)
        opened = store if isinstance(store, SavedExperts) else SavedExperts(store, io=io)
        opened.match(plans)
    except BaseException:
        if opened is not None:
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
