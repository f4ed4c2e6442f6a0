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

``quantize="int8" | "int4"``: the experts' weight matrices are saved packed in offload_moe's own format
(``quantize.quantize_matrix``, the quantizer of ``offload-moe quantize``), the slots hold the packed bytes and
the experts compute from them with the kernels ``load`` uses (``kernels.linear``): ``nn.Linear`` modules of
ModuleList/ModuleDict experts through a ``_PackedLinear``, transformers' experts modules through ``ExpertMLP``,
DBRX through its kernel. A weight the model uses otherwise (a user ``expert_fn``, a bare parameter) is refused.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from .attach import MoELayer, attach, check_assembly
from .cache import SlotLayout
from .config import OffloadConfig, configure, parse_dtype
from .errors import ConfigError, UnsupportedModelError
from .experts import OffloadedExperts
from .formats import DENSE, ExpertFormat
from .layers import (  # noqa: F401  (find_moe_layers... stay importable from offload_moe.generic)
    FUSED_KERNELS,
    ExpertFn,
    Kernel,
    LayerPlan,
    expert_item,
    find_moe_layers,
    packed_weights,
    plan_layers,
)
from .quant import DEFAULT_GROUP_SIZE, check_group_size
from .routing import Router, default_router, gate_of, top_k_of
from .runtime import ExpertOffload, OffloadHandle  # noqa: F401  (ExpertOffload stays importable from here)
from .saved_experts import SavedExperts, packed_slots, write_plans
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
QUANTIZE = ("int8", "int4")
OWN_OPTIONS = ("layers", "router", "replace_forward", "store", "offload_folder", "experts_attr", "expert_fn",
               "dropped_tokens", "quantize", "group_size")  # offload_experts' options that are no OffloadConfig setting


# == save_experts ===============================================================================================

def save_experts(model_or_layers: nn.Module | Sequence[nn.Module], folder: str | Path, *,
                 layers: Sequence[nn.Module | str] | None = None, experts_attr: str = "experts",
                 dtype: str | torch.dtype | None = None, expert_fn: ExpertFn | None = None,
                 quantize: str | None = None, group_size: int | None = None) -> Path:
    """Write the experts of a model's MoE layers to ``folder`` as safetensors, for ``offload_experts(store=...)``.

    One file per layer, one tensor per expert parameter, named ``layers.{L}.experts.{E}.{param}`` (L: the
    layer's position among the MoE layers found, E: the expert), in the experts' dtype or ``dtype``; then
    ``experts.json`` (layer names, expert counts, parameter shapes and dtypes, expert class). Each file is
    written to a temporary name and renamed into place, the manifest last, so an interrupted save leaves
    no folder that looks complete. The layers are found as ``offload_experts`` finds them, or named with
    ``layers=``; ``model_or_layers`` may also be a list of MoE layer modules. Refuses a folder holding a
    model (``config.json``): this never writes into a model's own files. Returns the folder.

    ``quantize="int8"`` (a scale per output channel) or ``"int4"`` (a scale and zero per ``group_size`` input
    columns, default 64) stores the weight matrices packed, as ``offload-moe quantize`` does
    (docs/quantization.md); ``dtype`` then applies to the other tensors (biases, norms).
    """
    if isinstance(model_or_layers, nn.Module):
        plans = plan_layers(model_or_layers, layers, experts_attr=experts_attr, need_gate=True, expert_fn=expert_fn)
    else:
        holder = nn.ModuleList(list(model_or_layers))  # names "0", "1"...: matched by order later
        plans = plan_layers(holder, list(holder), experts_attr=experts_attr, expert_fn=expert_fn)
    fmt = quantize_format(quantize, group_size)
    return write_plans(plans, Path(folder).expanduser(), parse_dtype(dtype), fmt=fmt, packed=_packing(plans, fmt))


def quantize_format(quantize: object, group_size: object) -> ExpertFormat:
    """The packed format ``quantize=`` and ``group_size=`` ask for (``DENSE``: none); a bad value is refused in one line."""
    if quantize is None:
        if group_size is not None:
            raise ConfigError(f"group_size={group_size!r} applies to quantize='int4'; give quantize='int4' or leave "
                              "group_size out")
        return DENSE
    if not isinstance(quantize, str) or quantize not in QUANTIZE:
        raise ConfigError(f"quantize={quantize!r}: offload_moe packs experts as 'int8' (a scale per output channel) or "
                          "'int4' (a scale and zero per group_size input columns); leave it out to keep them as they are")
    if quantize == "int8":
        if group_size is not None:
            raise ConfigError(f"group_size={group_size!r} applies to quantize='int4' only: int8 has one scale per "
                              "output channel; leave group_size out")
        return ExpertFormat("int8")
    return ExpertFormat("int4", (DEFAULT_GROUP_SIZE if group_size is None else check_group_size(group_size),))


def _packing(plans: Sequence[LayerPlan], fmt: ExpertFormat) -> dict[str, bool] | None:
    """The weights ``fmt`` packs (``layers.packed_weights``; None: it packs none), the same in every layer (refused
    otherwise), and checked against ``fmt``'s shape rules in each layer."""
    if fmt.kind is None:
        return None
    setting = f"quantize={fmt.kind!r}"
    packing = [packed_weights(plan, setting) for plan in plans]
    for plan, packed in zip(plans, packing):
        if packed != packing[0]:
            raise UnsupportedModelError(f"{setting}: {plan.where} packs {sorted(packed)}, unlike {plans[0].where} "
                                        f"({sorted(packing[0])}); offload layers of one kind per call: layers=[...]")
        for name, transposed in packed.items():
            rows, cols = plan.shapes[name][::-1] if transposed else plan.shapes[name]
            where = f"{plan.where}: expert tensor {name!r}"
            if fmt.kind == "int4" and rows % 2:
                raise ConfigError(f"{setting}: {where} has {rows} output rows; int4 packs rows in pairs and needs an "
                                  "even count. Use quantize='int8' for this model")
            if fmt.kind == "int4":
                check_group_size(fmt.block[0], cols, where)
    return packing[0]


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
    quantize: str | None = None,
    group_size: int | None = None,
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

    ``quantize="int8"`` or ``"int4"`` (``group_size``, default 64): the experts are saved packed as ``save_experts``
    saves them, the slots hold the packed bytes (``stats()["expert_bytes"]``, ``["expert_format"]``; budgets count
    them) and the experts compute from them with ``load``'s kernels (``kernels.linear``). It packs the weights of
    ``nn.Linear`` modules of ModuleList/ModuleDict experts, of transformers' experts modules and of DBRX; anything
    else is refused, naming the setting and the tensor. A ``store`` saved packed brings its own format (``quantize``
    may be left out); a ``store`` saved as it was is read, packed and written to ``offload_folder`` (or a temporary
    folder), never into the store.

    Returns the handle ``load`` gives as ``model.offload`` (``stats()``, ``reset_stats()``, ``close()``), also set
    as ``model.offload`` if the model has no such attribute; ``forward`` and ``generate`` take its lock, as after
    ``load``. Put the rest of the model on ``device`` yourself.
    """
    settings = _settings(config, overrides, dropped_tokens)
    asked = quantize_format(quantize, group_size)
    plans = plan_layers(model, layers, experts_attr=experts_attr, need_gate=router is None, expert_fn=expert_fn)
    routers = _routers(plans, router) if replace_forward else [None] * len(plans)
    _check_modes(plans, replace_forward, settings.prefetch)
    found = [MoELayer(p.layer, p.name, p.where, p.num_experts, p.shapes, gate_of(p.module, p.num_experts), p.module)
             for p in plans]
    dtype = settings.dtype or next(iter(plans[0].dtypes.values()))
    dense = _dense_bytes(model, plans)
    given = store if isinstance(store, SavedExperts) or store is None else SavedExperts(store, io="buffered")
    try:
        fmt = _store_format(asked, given, quantize)
        packed = _packing(plans, fmt)
        layout = None
        if packed is not None:
            slots, dtypes = packed_slots(plans[0].shapes, packed, fmt)
            layout = SlotLayout(slots, dtype, dtypes, fmt)
        assembly = check_assembly(found, settings, dtype=dtype, dense_bytes=dense, top_k=top_k_of(plans[0].module) or 2,
                                  layout=layout, model_config=getattr(model, "config", None))
        opened, owned = _open_store(plans, given, store is not given, offload_folder, assembly.io.io, fmt, packed)
    except BaseException:
        if given is not None:
            given.close()
        raise
    undo: list[Callable[[], None]] = []  # one per layer swapped: a failure in attach (a read, Ctrl-C) undoes the swaps
    try:
        return attach(model, assembly, opened,
                      install=lambda: [_swap(plan, routers[i], dropped_tokens, packed or {}, undo)
                                       for i, plan in enumerate(plans)],
                      folder=opened.folder, name=_model_name(model), owned_folder=owned)
    except BaseException:
        for restore in reversed(undo):
            restore()
        raise


def _store_format(asked: ExpertFormat, given: SavedExperts | None, quantize: str | None) -> ExpertFormat:
    """The format the experts run in: ``quantize=``'s, or that of a store saved packed (which must agree)."""
    if given is None or given.format.kind is None:
        return asked
    if asked.kind is not None and asked != given.format:
        raise ConfigError(f"store={str(given.folder)!r} holds experts packed as {given.format.name}, and "
                          f"quantize={quantize!r} asks for {asked.name}; leave quantize out to use the store as it is, "
                          "or give a store saved without quantize")
    return given.format


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


def _open_store(plans, given: SavedExperts | None, opened_here: bool, offload_folder, io: str, fmt: ExpertFormat,
                packed: dict[str, bool] | None) -> tuple[SavedExperts, Path | None]:
    """The store the experts run from, and the folder made for it (None: not ours). ``given`` (``store=``) as it is
    when its format is ``fmt`` (its read mode set to ``io`` if it was opened here), else its experts are packed
    into ``offload_folder`` or a temporary folder; without ``given``, the model's experts are written there."""
    if given is not None and given.format == fmt:
        if opened_here:
            given.set_io(io)
        given.match(plans, packed)
        return given, None
    owned = opened = None
    if offload_folder is None:
        owned = Path(tempfile.mkdtemp(prefix="offload_moe-experts-"))
    folder = owned or Path(offload_folder).expanduser()
    try:
        if given is None:
            write_plans(plans, folder, fmt=fmt, packed=packed)
        else:  # saved as it was: read each expert back, pack it into a folder of its own
            given.match(plans)
            if folder.resolve() == given.folder.resolve():
                raise ConfigError(f"offload_folder={str(offload_folder)!r} is the store= folder; the packed experts "
                                  "go to another folder, so give another offload_folder (or none: a temporary one)")
            write_plans(plans, folder, fmt=fmt, packed=packed, source=lambda plan, e: given.read_tensors(plan.layer, e))
            given.close()
        opened = SavedExperts(folder, io=io)
        opened.match(plans, packed)
    except BaseException:
        if opened is not None:
            opened.close()
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)
        raise
    return opened, owned


def _swap(plan: LayerPlan, router: Router | None, dropped: str, packed: dict[str, bool],
          undo: list[Callable[[], None]]):
    """Replace the layer's container by its offloaded stand-in (the expert weights are dropped here); ``packed``:
    the weights its slots hold packed. Appends to ``undo`` what puts the layer back as it was."""
    undo.append(_restorer(plan))
    if plan.kind == "transformers":
        spec = _transformers_spec(plan)
        stand_in = OffloadedExperts(plan.container, spec)
        setattr(plan.module, plan.attr, stand_in)
        return stand_in
    kernel = _kernel(plan, packed)
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


def _restorer(plan: LayerPlan) -> Callable[[], None]:
    """What puts ``plan``'s layer back as ``_swap`` found it: its container with the expert parameters ``_swap``
    deletes from it (and its submodules), and the layer's own forward."""
    module, attr, container = plan.module, plan.attr, plan.container
    parameters = [(m, dict(m._parameters)) for m in container.modules()]
    forward = module.__dict__.get("forward", _ABSENT)

    def restore() -> None:
        for owner, kept in parameters:
            owner._parameters.clear()
            owner._parameters.update(kept)
        setattr(module, attr, container)
        plan.container = container
        if forward is _ABSENT:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = forward

    return restore


_ABSENT = object()


def _kernel(plan: LayerPlan, packed: dict[str, bool]) -> Kernel:
    if plan.kind in ("ModuleList", "ModuleDict"):
        return _TemplateKernel(expert_item(plan.container, plan.keys[0]), packed=list(packed))
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
