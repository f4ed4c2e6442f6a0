"""The files ``save_experts`` writes, and ``SavedExperts``, the store that reads them back one expert at a time.

A saved-experts folder holds one safetensors file per MoE layer, one tensor per expert parameter
named ``layers.{L}.experts.{E}.{param}``, and ``experts.json``, the manifest, written last so that
an interrupted save never looks complete. ``SavedExperts`` offers the movers the same reads as
``ExpertStore`` does for a transformers checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_write
from .errors import CheckpointError, ConfigError
from .files import inside, read_json
from .layers import LayerPlan, expert_item
from .safetensors_io import read_header, short_repr, write_safetensors
from .store import Piece, PieceStore

MANIFEST = "experts.json"
FORMAT = "offload_moe.experts"
_TENSOR = re.compile(r"^layers\.([0-9]{1,9})\.experts\.([0-9]{1,9})\.(.+)$", re.ASCII)
MAX_COUNT = 2**31  # bound of every id, count and size in a manifest


@dataclass
class SavedLayer:
    """One layer's entry in a saved-experts folder."""

    layer: int
    name: str | None
    num_experts: int
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)


class SavedExperts(PieceStore):
    """Index of experts written by ``save_experts`` (a folder with its manifest, or one of its safetensors
    files), and positional reads of one expert at a time: the store the movers read from.

    A folder is read through its manifest, which ``save_experts`` writes last, so a folder whose save was
    interrupted is refused. A single file is described by its tensor names alone. ``match`` pairs the
    saved layers with the model's by name, or by order when the names differ and the counts agree.
    """

    def __init__(self, path: str | Path, io: str = "direct"):
        path = Path(path).expanduser()
        try:
            is_folder = stat.S_ISDIR(os.stat(path).st_mode)
        except FileNotFoundError:
            raise CheckpointError(f"{path} does not exist; write the experts first with save_experts(model, folder)") from None
        except OSError as e:
            raise CheckpointError(f"{path} cannot be reached: {e.strerror or e}; make it readable") from None
        super().__init__(io)
        if is_folder:
            self.folder = path
            self.layers, files = _read_manifest(path)
        else:  # one file: read_header refuses anything but a regular safetensors file
            self.folder, self.layers, files = path.parent, {}, [path]
        for file in files:
            self._index(file)
        self._check_complete()

    def _index(self, file: Path) -> None:
        header = read_header(file)
        for name, info in header.items():
            m = _TENSOR.match(name)
            if m is None:
                raise CheckpointError(
                    f"{file}: tensor {short_repr(name)} is not named layers.L.experts.E.<param> (numbers of at most "
                    "9 digits); this file was not written by save_experts"
                )
            layer, expert, param = int(m.group(1)), int(m.group(2)), m.group(3)
            if expert >= len(header):  # each expert has a tensor of its own, so no number is beyond the count
                raise CheckpointError(f"{file}: tensor {name!r} is for expert {expert}, but the file holds only "
                                      f"{len(header)} tensors; it was not written by save_experts, save the experts again")
            entry = self.layers.setdefault(layer, SavedLayer(layer, None, 0, {}))
            entry.num_experts = max(entry.num_experts, expert + 1)
            if entry.shapes.setdefault(param, info.shape) != info.shape:
                raise CheckpointError(
                    f"{file}: tensor {name!r} has shape {list(info.shape)} but the manifest or expert 0 gives "
                    f"{list(entry.shapes[param])}; the file is corrupted or was written by another model"
                )
            entry.dtypes.setdefault(param, info.dtype)
            self.pieces.setdefault((layer, expert), []).append(
                Piece(param, (slice(None),), info.file, info.offset, info.nbytes, info.dtype, info.shape, False, name))

    def _check_complete(self) -> None:
        for entry in self.layers.values():
            for expert in range(entry.num_experts):
                have = {p.param for p in self.pieces.get((entry.layer, expert), [])}
                if have != set(entry.shapes):
                    raise CheckpointError(
                        f"{self.folder}: expert {expert} of layer {entry.layer} ({entry.name or '?'}) has "
                        f"{sorted(have)}, expected {sorted(entry.shapes)}; a file is missing or incomplete, save the "
                        "experts again"
                    )

    def match(self, plans: Sequence[LayerPlan]) -> None:
        """Give each plan the store's layer id (by module name, or by order for a store without names);
        raises CheckpointError if the store lacks a layer or its experts differ from the model's."""
        by_name = {e.name: e for e in self.layers.values() if e.name is not None}
        ordered = sorted(self.layers.values(), key=lambda e: e.layer)
        named = bool(by_name) and all(p.name in by_name for p in plans)
        if not named and len(ordered) != len(plans):
            raise CheckpointError(
                f"{self.folder} holds experts for {len(ordered)} MoE layer(s) {sorted(by_name)}, and the model has "
                f"{len(plans)} ({[p.name for p in plans]}); write this model's experts with save_experts(model, folder)"
            )
        for i, plan in enumerate(plans):
            entry = by_name[plan.name] if named else ordered[i]
            if entry.num_experts != plan.num_experts or entry.shapes != plan.shapes:
                raise CheckpointError(
                    f"{self.folder}: layer {plan.name!r} has {entry.num_experts} saved experts of {entry.shapes}, but "
                    f"the model's {plan.where} has {plan.num_experts} of {plan.shapes}; save this model's experts again"
                )
            plan.layer = entry.layer

    # -- what the movers call (reads and mappings are PieceStore's) ------------------------------------
    def describe(self, layer: int, expert: int) -> str:
        files = sorted({str(p.file) for p in self.pieces.get((layer, expert), [])})
        return ", ".join(files) or str(self.folder)

    def _rows(self, layer: int, param: str) -> int:
        return self.layers[layer].shapes[param][0]


def _read_manifest(folder: Path) -> tuple[dict[int, SavedLayer], list[Path]]:
    """The layers and files of ``experts.json``, every field checked: the manifest is untrusted data too."""
    path = folder / MANIFEST
    if not os.path.lexists(path):
        raise CheckpointError(
            f"{folder} has no {MANIFEST}: it was not written by save_experts, or the save was interrupted "
            "(the manifest is written last); run save_experts again"
        )
    manifest = read_json(path, "save_experts manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a save_experts manifest (no \"format\": \"{FORMAT}\"); "
                              "run save_experts again")
    entries = manifest.get("layers")
    if not isinstance(entries, list):
        raise _bad(path, "layers", entries, "a list of layer entries")
    layers, files = {}, []
    for i, entry in enumerate(entries):
        layer, file = _manifest_layer(folder, path, f"layers[{i}]", entry)
        if layer.layer in layers or file in files:
            raise _bad(path, f"layers[{i}]", entry, "a layer whose id and file no other entry has")
        layers[layer.layer] = layer
        files.append(file)
    return layers, files


def _manifest_layer(folder: Path, path: Path, where: str, entry: object) -> tuple[SavedLayer, Path]:
    if not isinstance(entry, dict):
        raise _bad(path, where, entry, "an object")
    ident = _count(path, f"{where}.id", entry.get("id"))
    num_experts = _count(path, f"{where}.num_experts", entry.get("num_experts"))
    module = entry.get("module")
    if module is not None and not isinstance(module, str):
        raise _bad(path, f"{where}.module", module, "the layer's module name, a string")
    params = entry.get("params")
    if not isinstance(params, dict) or not all(isinstance(p, dict) for p in params.values()):
        raise _bad(path, f"{where}.params", params, "an object of parameter names to {\"shape\": [...]}")
    shapes = {}
    for name, param in params.items():
        shape = param.get("shape")
        if not isinstance(shape, list):
            raise _bad(path, f"{where}.params.{name}.shape", shape, "a list of sizes")
        shapes[name] = tuple(_count(path, f"{where}.params.{name}.shape", d) for d in shape)
    file = inside(folder, entry.get("file"), f"save_experts manifest {path} ({where}.file)")
    return SavedLayer(ident, module, num_experts, shapes), file


def _count(path: Path, field: str, value: object) -> int:
    if type(value) is not int or not 0 <= value < MAX_COUNT:  # bool is not a count
        raise _bad(path, field, value, f"a non-negative integer below {MAX_COUNT}")
    return value


def _bad(path: Path, field: str, value: object, want: str) -> CheckpointError:
    return CheckpointError(f"save_experts manifest {path}: {field} is {short_repr(value)}, where {want} belongs; "
                           "the manifest is corrupted, run save_experts again")


def write_plans(plans: Sequence[LayerPlan], folder: Path, dtype: torch.dtype | None = None) -> Path:
    """Write the experts of ``plans`` and the manifest into ``folder`` (see ``save_experts``)."""
    if (folder / "config.json").exists():
        raise ConfigError(
            f"{folder} holds a model (config.json); save_experts never writes into a model's files. Pick another folder"
        )
    for plan in plans:
        _check_materialised(plan)
    folder.mkdir(parents=True, exist_ok=True)
    _uncommit(folder)
    entries = []
    for plan in plans:
        file = f"experts-{plan.layer:05d}.safetensors"
        tensors = [(f"layers.{plan.layer}.experts.{e}.{n}", t)
                   for e in range(plan.num_experts) for n, t in plan.expert_tensors(e).items()]
        write_safetensors(folder / file, tensors, dtype)
        entries.append(_manifest_entry(plan, file, dtype))
    atomic_write(folder / MANIFEST, json.dumps({"format": FORMAT, "version": 1, "layers": entries}, indent=1).encode())
    return folder


def _uncommit(folder: Path) -> None:
    """Remove a previous save's manifest before its files are rewritten; refuse a manifest that is not ours."""
    path = folder / MANIFEST
    if not os.path.lexists(path):
        return
    manifest = read_json(path, "save_experts manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConfigError(f"{path} exists and was not written by save_experts; pick another folder")
    path.unlink()


def _check_materialised(plan: LayerPlan) -> None:
    for name, t in plan.expert_tensors(0).items():
        if t.device.type == "meta":
            raise ConfigError(
                f"{plan.where}: expert tensor {name!r} is on the meta device (not loaded), so it cannot be saved; pass "
                "offload_experts(store=...) a folder written by save_experts from a model with real weights"
            )


def _manifest_entry(plan: LayerPlan, file: str, dtype: torch.dtype | None) -> dict:
    first = expert_item(plan.container, plan.keys[0]) if plan.kind in ("ModuleList", "ModuleDict") else plan.container
    return {
        "id": plan.layer, "module": plan.name, "file": file, "container": plan.kind, "keys": plan.keys,
        "num_experts": plan.num_experts, "expert_class": f"{type(first).__module__}.{type(first).__qualname__}",
        "params": {n: {"shape": list(s), "dtype": str(dtype or plan.dtypes[n]).removeprefix("torch.")}
                   for n, s in plan.shapes.items()},
    }
