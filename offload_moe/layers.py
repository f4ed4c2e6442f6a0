"""The MoE layers of any PyTorch model, found or named, and their experts described (``LayerPlan``).

An MoE layer is a module with an ``experts`` container (an ``nn.ModuleList`` / ``nn.ModuleDict`` of 2 or
more identical expert modules, or fused ``[E, ...]`` expert parameters) next to a ``gate`` or ``router``.
``plan_layers`` describes each one's experts: their keys, the shapes and dtypes a slot holds, and how to
view one expert's tensors in the model. ``offload_experts`` and ``save_experts`` start from these plans.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError, UnsupportedModelError
from .experts import OffloadedExperts, expert_params, is_experts_module
from .formats import QuantizedWeight
from .kernels import Scratch, linear

COUNT_NAMES = ("num_experts", "moe_num_experts", "num_local_experts", "n_routed_experts")

Kernel = Callable[..., torch.Tensor]  # kernel(slot_tensors, x, *args, **kwargs) -> y
ExpertFn = Callable[[nn.Module, torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]


class Offloaded:
    """Mixin of the modules ``offload_experts`` puts in place of an expert container: a layer that holds one
    is offloaded already."""


def expert_item(container: nn.Module, key: str) -> nn.Module:
    """Expert ``key`` of a ModuleList (by position) or ModuleDict (by name)."""
    return container[int(key)] if isinstance(container, nn.ModuleList) else container[key]


@dataclass
class LayerPlan:
    """One MoE layer as offload_moe sees it: its experts container, their layout, and its cache layer id."""

    layer: int  # the cache's layer id (the store's)
    name: str  # dotted name in the model ("" for the model itself)
    module: nn.Module
    attr: str  # the container is getattr(module, attr)
    container: nn.Module
    kind: str  # "ModuleList", "ModuleDict", "fused" or "transformers"
    keys: list[str]  # expert e is container item keys[e]
    shapes: dict[str, tuple[int, ...]]  # per-expert tensors, as the slot holds them
    dtypes: dict[str, torch.dtype]
    expert_fn: ExpertFn | None = None

    @property
    def num_experts(self) -> int:
        return len(self.keys)

    @property
    def where(self) -> str:
        return f"{self.name + '.' if self.name else ''}{self.attr}"

    def expert_tensors(self, expert: int) -> dict[str, torch.Tensor]:
        """Expert ``expert``'s tensors under their slot names (views of the model's parameters)."""
        if self.kind in ("ModuleList", "ModuleDict"):
            return _module_tensors(expert_item(self.container, self.keys[expert]))
        params = _fused_params(self.container, self.kind)
        return {n: p.reshape(self.num_experts, *self.shapes[n])[expert] for n, p in params.items()}


def _module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _fused_params(container: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    return expert_params(container) if kind == "transformers" else dict(container.named_parameters())


def _expert_count(module: nn.Module) -> int | None:
    for name in COUNT_NAMES:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
            return value
    return None


def _is_container(module: object) -> bool:
    """A ModuleList/ModuleDict of 2 or more modules, or a module with an expert count and [E * n, ...] parameters."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return len(module) >= 2
    count = _expert_count(module) if isinstance(module, nn.Module) else None
    return count is not None and any(p.dim() >= 2 and p.shape[0] % count == 0 for p in module.parameters())


def find_moe_layers(model: nn.Module, *, experts_attr: str = "experts",
                    need_gate: bool = True) -> list[tuple[str, nn.Module]]:
    """The MoE layers of ``model``, outermost first: modules whose ``experts_attr`` is an expert container
    (a ModuleList/ModuleDict of 2 or more modules, or fused expert parameters) next to a ``gate`` or
    ``router`` module (unless ``need_gate`` is False). Layers inside a found layer are not searched."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(f + ".") or (f == "" and name) for f, _ in found):
            continue
        if not _is_container(getattr(module, experts_attr, None)):
            continue
        if need_gate and not any(isinstance(getattr(module, g, None), nn.Module) for g in ("gate", "router")):
            continue
        found.append((name, module))
    return found


def plan_layers(model: nn.Module, layers: Sequence[nn.Module | str] | nn.Module | str | None = None, *,
                experts_attr: str = "experts", need_gate: bool = True,
                expert_fn: ExpertFn | None = None) -> list[LayerPlan]:
    """Find (or look up) the MoE layers of ``model`` and describe their experts; raises if there are none."""
    found = _named_layers(model, layers) if layers is not None else find_moe_layers(
        model, experts_attr=experts_attr, need_gate=need_gate)
    if not found:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no MoE layer offload_moe can find. It looks for a module with an "
            f"`{experts_attr}` attribute holding an nn.ModuleList or nn.ModuleDict of 2 or more identical expert "
            f"modules (or fused expert parameters with a {'/'.join(COUNT_NAMES)} attribute), next to a `gate` or "
            "`router` module. Name the MoE layers with layers=[module or dotted name, ...], the container with "
            "experts_attr='...' if it is not called `experts`, and give router=... for layers without a gate"
        )
    return [_plan(i, name, module, experts_attr, expert_fn) for i, (name, module) in enumerate(found)]


def _named_layers(model: nn.Module, layers) -> list[tuple[str, nn.Module]]:
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for item in [layers] if isinstance(layers, (str, nn.Module)) else list(layers):
        if isinstance(item, str):
            try:
                out.append((item, model.get_submodule(item)))
            except AttributeError:
                raise ConfigError(f"layers=[{item!r}]: {type(model).__name__} has no submodule named {item!r}") from None
        elif isinstance(item, nn.Module) and id(item) in names:
            out.append((names[id(item)], item))
        else:
            raise ConfigError(
                f"layers=[...] holds a {type(item).__name__} that is not a submodule of the model; "
                "pass the MoE layer modules themselves or their dotted names"
            )
    return out


def _plan(layer: int, name: str, module: nn.Module, attr: str, expert_fn: ExpertFn | None) -> LayerPlan:
    container = getattr(module, attr, None)
    where = f"{name + '.' if name else ''}{attr}"
    if isinstance(container, (Offloaded, OffloadedExperts)):
        raise ConfigError(f"{where} is already offloaded; call offload_experts once per model")
    if isinstance(container, (nn.ModuleList, nn.ModuleDict)):
        return _items_plan(layer, name, module, attr, container, where)
    if isinstance(container, nn.Module) and _expert_count(container) is not None:
        return _fused_plan(layer, name, module, attr, container, where, expert_fn)
    raise UnsupportedModelError(
        f"{where} is a {type(container).__name__}, not an expert container: offload_moe offloads an nn.ModuleList "
        "or nn.ModuleDict of identical experts, or a module of fused [E, ...] expert parameters with a num_experts "
        "attribute"
    )


def _items_plan(layer, name, module, attr, container, where) -> LayerPlan:
    items = list(container.items()) if isinstance(container, nn.ModuleDict) else \
        [(str(i), m) for i, m in enumerate(container)]
    common = Counter(type(m) for _, m in items).most_common(1)[0][0] if items else None
    experts = [(k, m) for k, m in items if type(m) is common]  # other children (a dropout...) stay as they are
    if len(experts) < 2:
        raise UnsupportedModelError(f"{where} holds {len(experts)} expert module(s); an MoE layer needs at least 2")
    key0, first = experts[0]
    for key, expert in experts[1:]:
        difference = _difference(first, expert)
        if difference:
            raise UnsupportedModelError(
                f"{where}: expert {key!r} differs from expert {key0!r} ({difference}). offload_moe computes every "
                "expert of a layer with one template and one slot size, so the experts must be identical modules "
                "(same class, parameter names, shapes and dtypes)"
            )
    tensors = _module_tensors(first)
    _check_floating(where, key0, tensors)
    kind = "ModuleDict" if isinstance(container, nn.ModuleDict) else "ModuleList"
    return LayerPlan(layer, name, module, attr, container, kind, [k for k, _ in experts],
                     {n: tuple(t.shape) for n, t in tensors.items()}, {n: t.dtype for n, t in tensors.items()})


def _difference(a: nn.Module, b: nn.Module) -> str:
    if repr(a) != repr(b):
        return f"{repr(a)!r} vs {repr(b)!r}"
    ta, tb = _module_tensors(a), _module_tensors(b)
    for n in sorted(set(ta) | set(tb)):
        if n not in ta or n not in tb:
            return f"only one of them has {n!r}"
        if ta[n].shape != tb[n].shape or ta[n].dtype != tb[n].dtype:
            return f"{n!r} is {list(ta[n].shape)} {ta[n].dtype} vs {list(tb[n].shape)} {tb[n].dtype}"
    return ""


def _check_floating(where: str, key: str, tensors: dict[str, torch.Tensor]) -> None:
    for n, t in tensors.items():
        if not t.is_floating_point():
            raise UnsupportedModelError(
                f"{where}: expert {key!r} has the {t.dtype} tensor {n!r}; expert slots hold one floating dtype, so "
                "integer buffers cannot be offloaded"
            )
    if not tensors:
        raise UnsupportedModelError(f"{where}: expert {key!r} has no parameters, so there is nothing to offload")


def _fused_plan(layer, name, module, attr, container, where, expert_fn) -> LayerPlan:
    count = _expert_count(container)
    kind = "transformers" if is_experts_module(container) else "fused"
    if kind == "fused" and expert_fn is None and type(container).__name__ not in FUSED_KERNELS:
        raise UnsupportedModelError(
            f"{where} is a {type(container).__name__} with fused expert parameters, and offload_moe does not know how "
            "one of its experts computes; pass expert_fn=lambda container, x, weights: ... (weights: that expert's "
            f"slices by parameter name). Known fused containers: {', '.join(FUSED_KERNELS)}"
        )
    shapes = {}
    for n, p in _fused_params(container, kind).items():
        if p.dim() < 2 or p.shape[0] % count:
            raise UnsupportedModelError(
                f"{where}: parameter {n!r} of shape {list(p.shape)} has no leading expert dimension of {count} "
                "(num_experts); every parameter of a fused expert container must be [E, ...] or [E * n, ...]"
            )
        shapes[n] = tuple(p.shape[1:]) if p.shape[0] == count else (p.shape[0] // count, *p.shape[1:])
    dtypes = {n: p.dtype for n, p in _fused_params(container, kind).items()}
    return LayerPlan(layer, name, module, attr, container, kind, [str(e) for e in range(count)], shapes, dtypes,
                     expert_fn)


class _DbrxKernel:
    """One DBRX expert: ``DbrxExpertGLU.forward(x, w1, v1, w2)`` with its slices, or the same computation with
    packed weights (``offload_experts(quantize=...)``; w2, used as [in, out], is packed as its transpose)."""

    def __init__(self, container: nn.Module):
        self.mlp = container.mlp
        self.scratch = Scratch()  # where packed weights are dequantized: the model's one (``attach`` sets it)

    def __call__(self, w: dict, x: torch.Tensor) -> torch.Tensor:
        w1, v1, w2 = w["mlp.w1"], w["mlp.v1"], w["mlp.w2"]
        if not isinstance(w1, QuantizedWeight):
            return self.mlp(x, w1, v1, w2)
        h = self.mlp.activation_fn(linear(x, w1, None, self.scratch)) * linear(x, v1, None, self.scratch)
        return linear(h, w2, None, self.scratch)


FUSED_KERNELS: dict[str, Callable[[nn.Module], Kernel]] = {"DbrxExperts": _DbrxKernel}
# The weight matrices of a known fused container that quantize= packs, each True where it is used as [in, out]
# (packed as its transpose, F.linear's [out, in]); its kernel computes with them packed.
FUSED_PACKED: dict[str, dict[str, bool]] = {"DbrxExperts": {"mlp.w1": False, "mlp.v1": False, "mlp.w2": True}}


def packed_weights(plan: LayerPlan, setting: str) -> dict[str, bool]:
    """The expert weight matrices ``setting`` (``quantize=...``) packs in ``plan``'s layer, each with True where the
    expert uses it as [in, out] (it is packed as its transpose, F.linear's [out, in]). The other tensors (biases,
    norms) stay in the compute dtype. Raises ConfigError naming ``setting`` and the tensor where the experts
    cannot compute from packed weights: a matrix that is not an ``nn.Linear``'s weight, or a user ``expert_fn``."""
    if plan.kind == "transformers":
        transposed = bool(plan.container.is_transposed)
        return {name: transposed for name, shape in plan.shapes.items() if len(shape) == 2}
    if plan.kind == "fused":
        if plan.expert_fn is not None:
            raise ConfigError(
                f"{setting}: {plan.where} is computed by your expert_fn, which takes float weights, and packed "
                "experts are computed by offload_moe's own kernels; leave quantize out for this model"
            )
        return dict(FUSED_PACKED[type(plan.container).__name__])
    expert = expert_item(plan.container, plan.keys[0])
    linears = {f"{n}.weight" if n else "weight" for n, m in expert.named_modules()
               if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward}
    packed = {name: False for name in plan.shapes if name in linears}
    for name, shape in plan.shapes.items():
        if name not in packed and len(shape) >= 2:
            raise ConfigError(
                f"{setting}: {plan.where}: expert tensor {name!r} of shape {list(shape)} is not the weight of an "
                "nn.Linear, and offload_moe computes packed experts through nn.Linear only; leave quantize out for "
                "this model"
            )
    if not packed:
        raise ConfigError(f"{setting}: {plan.where}: the experts hold no nn.Linear weight to pack; leave quantize out")
    return packed
