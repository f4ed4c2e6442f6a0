"""The files ``save_experts`` writes, and ``SavedExperts``, the store that reads them back one expert at a time.

A saved-experts folder holds one safetensors file per MoE layer, one tensor per expert parameter
named ``layers.{L}.experts.{E}.{param}``, and ``experts.json``, the manifest, written last so that
an interrupted save never looks complete. ``SavedExperts`` offers the movers the same reads as
``ExpertStore`` does for a transformers checkpoint.

Saved packed (``save_experts(quantize="int8" | "int4")``), each weight matrix ``param`` is stored as the
components of offload_moe's own format (docs/quantization.md), ``layers.{L}.experts.{E}.{param}.qweight`` and
``...scales`` (int8) or ``...scales_and_zeros`` (int4, ``[1, in/G, out, 2]``: one row part); the manifest
(version 2) says the format and which parameters are packed, so the slots hold exactly those bytes.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import atomic_write
from .errors import CheckpointError, ConfigError
from .files import inside, read_json
from .formats import DENSE, ExpertFormat
from .layers import LayerPlan, expert_item
from .quantize import quantize_matrix
from .safetensors_io import read_header, short_repr, write_safetensors
from .store import Piece, PieceStore

MANIFEST = "experts.json"
FORMAT = "offload_moe.experts"
VERSIONS = (1, 2)  # 2: experts packed as int8 / int4 (the manifest's "quantization")
BITS = {"int8": 8, "int4": 4}
_TENSOR = re.compile(r"^layers\.([0-9]{1,9})\.experts\.([0-9]{1,9})\.(.+)$", re.ASCII)
MAX_COUNT = 2**31  # bound of every id, count and size in a manifest


@dataclass
class SavedLayer:
    """One layer's entry in a saved-experts folder: each expert's parameters as the model holds them (``shapes``),
    the ones stored packed (``packed``: True where the expert uses it as [in, out], packed as its transpose), and the
    tensors a slot holds (``slots``: a packed weight as its components)."""

    layer: int
    name: str | None
    num_experts: int
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    packed: dict[str, bool] = field(default_factory=dict)
    slots: dict[str, tuple[int, ...]] = field(default_factory=dict)


def pack_weight(w: torch.Tensor, transposed: bool, fmt: ExpertFormat) -> dict[str, torch.Tensor]:
    """One expert's weight matrix as its components in ``fmt`` (``quantize.quantize_matrix``, of its transpose where
    ``transposed``), by component name; int4's scales and zeros with a leading row-part dimension of 1, as a slot
    holds them. On the meta device: their shapes and dtypes, nothing computed."""
    components = quantize_matrix(w.t() if transposed else w, BITS[fmt.kind], fmt.block[0] if fmt.block else None)
    if "scales_and_zeros" in components:
        components["scales_and_zeros"] = components["scales_and_zeros"].unsqueeze(0)  # [1, in/G, out, 2]
    return components


def packed_slots(shapes: dict[str, tuple[int, ...]], packed: dict[str, bool],
                 fmt: ExpertFormat) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    """One expert's slot tensors when its ``packed`` weights are stored in ``fmt``: each of those as its components
    ``"<param>.<component>"``, the other tensors as they are. Returns (their shapes, the components' dtypes)."""
    slots, dtypes = {}, {}
    for name, shape in shapes.items():
        if name not in packed:
            slots[name] = shape
            continue
        for component, t in pack_weight(torch.empty(shape, device="meta"), packed[name], fmt).items():
            slots[f"{name}.{component}"], dtypes[f"{name}.{component}"] = tuple(t.shape), t.dtype
    return slots, dtypes


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
        self.format, self.packed = DENSE, {}
        if is_folder:
            self.folder = path
            self.format, self.layers, files = _read_manifest(path)
            for entry in self.layers.values():
                entry.slots, dtypes = _slots(path / MANIFEST, entry, self.format)
                self.packed.update(dtypes)
        else:  # one file: read_header refuses anything but a regular safetensors file
            self.folder, self.layers, files = path.parent, {}, [path]
        for file in files:
            self._index(file, is_folder)
        if not is_folder:
            for entry in self.layers.values():
                entry.shapes = dict(entry.slots)
        self._check_complete()

    def _index(self, file: Path, manifest: bool) -> None:
        header = read_header(file)
        for name, info in header.items():
            m = _TENSOR.match(name)
            if m is None:
                raise CheckpointError(
                    f"{file}: tensor {short_repr(name)} is not named layers.L.experts.E.<param> (numbers of at most "
                    "9 digits); this file was not written by save_experts"
                )
            layer, expert, param = int(m.group(1)), int(m.group(2)), m.group(3)
            if not manifest and param.endswith(".qweight"):
                raise CheckpointError(f"{file} holds packed experts ({name!r}); open the folder it was saved in, whose "
                                      f"{MANIFEST} says how they are packed")
            if expert >= len(header):  # each expert has a tensor of its own, so no number is beyond the count
                raise CheckpointError(f"{file}: tensor {name!r} is for expert {expert}, but the file holds only "
                                      f"{len(header)} tensors; it was not written by save_experts, save the experts again")
            entry = self.layers.setdefault(layer, SavedLayer(layer, None, 0, {}))
            entry.num_experts = max(entry.num_experts, expert + 1)
            if entry.slots.setdefault(param, info.shape) != info.shape:
                raise CheckpointError(
                    f"{file}: tensor {name!r} has shape {list(info.shape)} but the manifest or expert 0 gives "
                    f"{list(entry.slots[param])}; the file is corrupted or was written by another model"
                )
            if self.packed.get(param, info.dtype) != info.dtype:
                raise CheckpointError(
                    f"{file}: tensor {name!r} is {str(info.dtype).removeprefix('torch.')}, but {self.format.name} "
                    f"stores it as {str(self.packed[param]).removeprefix('torch.')}; the file is corrupted, save the "
                    "experts again"
                )
            entry.dtypes.setdefault(param, info.dtype)
            self.pieces.setdefault((layer, expert), []).append(
                Piece(param, (slice(None),), info.file, info.offset, info.nbytes, info.dtype, info.shape, False, name))

    def _check_complete(self) -> None:
        for entry in self.layers.values():
            for expert in range(entry.num_experts):
                have = {p.param for p in self.pieces.get((entry.layer, expert), [])}
                if have != set(entry.slots):
                    raise CheckpointError(
                        f"{self.folder}: expert {expert} of layer {entry.layer} ({entry.name or '?'}) has "
                        f"{sorted(have)}, expected {sorted(entry.slots)}; a file is missing or incomplete, save the "
                        "experts again"
                    )

    def match(self, plans: Sequence[LayerPlan], packed: dict[str, bool] | None = None) -> None:
        """Give each plan the store's layer id (by module name, or by order for a store without names);
        raises CheckpointError if the store lacks a layer or its experts differ from the model's. A packed store
        also needs each layer's packed weights to be ``packed``, the ones the model computes packed
        (``layers.packed_weights``)."""
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
            if packed is not None and entry.packed != packed:
                raise CheckpointError(
                    f"{self.folder}: layer {plan.name!r} has its {sorted(entry.packed)} packed as {self.format.name}, but "
                    f"the model's {plan.where} computes {sorted(packed)} packed; save this model's experts again"
                )
            plan.layer = entry.layer

    def read_tensors(self, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """One expert's tensors as stored, read into new CPU tensors (each piece is a whole tensor here)."""
        out = {}
        for piece in self.expert_pieces(layer, expert):
            out[piece.param] = torch.empty(piece.shape, dtype=piece.dtype)
            self.read_piece(piece, out[piece.param])
        return out

    # -- what the movers call (reads and mappings are PieceStore's) ------------------------------------
    def describe(self, layer: int, expert: int) -> str:
        files = sorted({str(p.file) for p in self.pieces.get((layer, expert), [])})
        return ", ".join(files) or str(self.folder)

    def _rows(self, layer: int, param: str) -> int:
        return self.layers[layer].slots[param][0]


def _slots(path: Path, entry: SavedLayer, fmt: ExpertFormat) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
    where = f"save_experts manifest {path}: layer {entry.layer} ({entry.name or '?'})"
    for name, transposed in entry.packed.items():
        rows, cols = entry.shapes[name][::-1] if transposed else entry.shapes[name]
        # checked here, before the quantizer: its advice on a group size that fits scans every divisor of the
        # columns, which for a manifest's 2**31 - 1 takes minutes
        if fmt.kind == "int4" and (rows % 2 or cols % fmt.block[0]):
            raise CheckpointError(f"{where}: packed weight {name!r} of {rows} rows x {cols} columns is no int4 matrix "
                                  f"in groups of {fmt.block[0]} (an even row count, columns a multiple of the group); "
                                  "the manifest is corrupted, save the experts again")
    try:
        return packed_slots(entry.shapes, entry.packed, fmt)
    except (ConfigError, ValueError, RuntimeError) as e:  # a shape the format cannot pack, or too large to size
        raise CheckpointError(f"{where}: {e}; the manifest is corrupted, save the experts again") from None


def _read_manifest(folder: Path) -> tuple[ExpertFormat, dict[int, SavedLayer], list[Path]]:
    """The format, layers and files of ``experts.json``, every field checked: the manifest is untrusted data too."""
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
    if manifest.get("version") not in VERSIONS or type(manifest.get("version")) is not int:
        raise CheckpointError(f"save_experts manifest {path}: version {short_repr(manifest.get('version'))} is not one "
                              f"this offload_moe reads ({', '.join(map(str, VERSIONS))}); a newer offload_moe wrote it, "
                              "upgrade offload_moe or save the experts again")
    fmt = _manifest_format(path, manifest.get("quantization"))
    entries = manifest.get("layers")
    if not isinstance(entries, list):
        raise _bad(path, "layers", entries, "a list of layer entries")
    layers, files = {}, []
    for i, entry in enumerate(entries):
        layer, file = _manifest_layer(folder, path, f"layers[{i}]", entry, fmt)
        if layer.layer in layers or file in files:
            raise _bad(path, f"layers[{i}]", entry, "a layer whose id and file no other entry has")
        layers[layer.layer] = layer
        files.append(file)
    return fmt, layers, files


def _manifest_format(path: Path, quantization: object) -> ExpertFormat:
    """The manifest's ``"quantization"``: absent (plain tensors), ``{"bits": 8}`` or ``{"bits": 4, "group_size": G}``."""
    if quantization is None:
        return DENSE
    bits = quantization.get("bits") if isinstance(quantization, dict) else None
    if bits == 8 and type(bits) is int and set(quantization) == {"bits"}:
        return ExpertFormat("int8")
    group = quantization.get("group_size") if bits == 4 and type(bits) is int else None
    if type(group) is int and 2 <= group < MAX_COUNT and group % 2 == 0 and set(quantization) == {"bits", "group_size"}:
        return ExpertFormat("int4", (group,))
    raise _bad(path, "quantization", quantization, '{"bits": 8} or {"bits": 4, "group_size": <an even count>}')


def _manifest_layer(folder: Path, path: Path, where: str, entry: object, fmt: ExpertFormat) -> tuple[SavedLayer, Path]:
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
    shapes, packed = {}, {}
    for name, param in params.items():
        shape = param.get("shape")
        if not isinstance(shape, list):
            raise _bad(path, f"{where}.params.{name}.shape", shape, "a list of sizes")
        shapes[name] = tuple(_count(path, f"{where}.params.{name}.shape", d) for d in shape)
        if param.get("packed", False) is not False:
            transposed = param.get("transposed", False)
            if param["packed"] is not True or fmt.kind is None or len(shape) != 2 or type(transposed) is not bool:
                raise _bad(path, f"{where}.params.{name}", param, 'a matrix of a store with a "quantization", '
                           '"packed": true and "transposed": true or false')
            packed[name] = transposed
    file = inside(folder, entry.get("file"), f"save_experts manifest {path} ({where}.file)")
    return SavedLayer(ident, module, num_experts, shapes, packed=packed), file


def _count(path: Path, field: str, value: object) -> int:
    if type(value) is not int or not 0 <= value < MAX_COUNT:  # bool is not a count
        raise _bad(path, field, value, f"a non-negative integer below {MAX_COUNT}")
    return value


def _bad(path: Path, field: str, value: object, want: str) -> CheckpointError:
    return CheckpointError(f"save_experts manifest {path}: {field} is {short_repr(value)}, where {want} belongs; "
                           "the manifest is corrupted, run save_experts again")


def write_plans(plans: Sequence[LayerPlan], folder: Path, dtype: torch.dtype | None = None, *,
                fmt: ExpertFormat = DENSE, packed: dict[str, bool] | None = None,
                source: Callable[[LayerPlan, int], dict[str, torch.Tensor]] | None = None) -> Path:
    """Write the experts of ``plans`` and the manifest into ``folder`` (see ``save_experts``). Packed (``fmt``
    int8 or int4): the weights ``packed`` names (the same in every layer, ``layers.packed_weights``) as their
    components, a layer's experts quantized in memory before its file is written. ``source(plan, expert)``: the
    expert's tensors (default: the model's, ``plan.expert_tensors``)."""
    if (folder / "config.json").exists():
        raise ConfigError(
            f"{folder} holds a model (config.json); save_experts never writes into a model's files. Pick another folder"
        )
    if source is None:
        for plan in plans:
            _check_materialised(plan)
    folder.mkdir(parents=True, exist_ok=True)
    _uncommit(folder)
    entries = []
    packed = packed if fmt.kind is not None else {}
    for plan in plans:
        file = f"experts-{plan.layer:05d}.safetensors"
        tensors = []
        for e in range(plan.num_experts):
            for n, t in (source or LayerPlan.expert_tensors)(plan, e).items():
                if n in packed:
                    tensors += [(f"layers.{plan.layer}.experts.{e}.{n}.{c}", v) for c, v in pack_weight(t, packed[n], fmt).items()]
                else:
                    tensors.append((f"layers.{plan.layer}.experts.{e}.{n}", t.to(dtype) if packed and dtype else t))
        # packed: the components in their own dtypes, largest elements first, so each starts aligned (io="mmap" views it)
        write_safetensors(folder / file, tensors, None if packed else dtype, aligned=bool(packed))
        entries.append(_manifest_entry(plan, file, dtype, packed))
    manifest = {"format": FORMAT, "version": 2 if fmt.kind else 1}
    if fmt.kind is not None:
        manifest["quantization"] = {"bits": BITS[fmt.kind], **({"group_size": fmt.block[0]} if fmt.block else {})}
    atomic_write(folder / MANIFEST, json.dumps({**manifest, "layers": entries}, indent=1).encode())
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


def _manifest_entry(plan: LayerPlan, file: str, dtype: torch.dtype | None, packed: dict[str, bool]) -> dict:
    first = expert_item(plan.container, plan.keys[0]) if plan.kind in ("ModuleList", "ModuleDict") else plan.container
    return {
        "id": plan.layer, "module": plan.name, "file": file, "container": plan.kind, "keys": plan.keys,
        "num_experts": plan.num_experts, "expert_class": f"{type(first).__module__}.{type(first).__qualname__}",
        "params": {n: {"shape": list(s), "packed": True, "transposed": packed[n]} if n in packed else
                   {"shape": list(s), "dtype": str(dtype or plan.dtypes[n]).removeprefix("torch.")}
                   for n, s in plan.shapes.items()},
    }
