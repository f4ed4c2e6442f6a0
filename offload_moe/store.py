"""The cold tier: an index of every routed expert in a checkpoint, and reads of one expert at a time.

Checkpoints keep experts in one of two layouts, and the store reads both:

- per expert, as ``nn.Linear`` weights: ``...experts.E.w1.weight`` (Mixtral: w1 gate,
  w3 up, w2 down) or ``...experts.E.gate_proj.weight`` / ``up_proj`` / ``down_proj``;
- fused 3D tensors in the module's own layout: ``...experts.gate_up_proj`` [E, 2I, H],
  ``...experts.down_proj`` [E, H, I], GPT-OSS's transposed form and biases.

Each expert becomes a list of ``Piece``s: a byte range of one file, and the part of
one slot tensor it fills. Nothing is read until ``read_piece`` is asked.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError
from .formats import DENSE, PER_PART, ExpertFormat, dequantize_dense
from .kernels import RowBlocks, linear  # noqa: F401  (the expert math lived here; importable from here still)
from .safetensors_io import FileReader, MappedFiles, TensorInfo, checkpoint_files, read_header, short_repr

GATE_NAMES = ("w1", "gate_proj")
UP_NAMES = ("w3", "up_proj")
DOWN_NAMES = ("w2", "down_proj")
_PER_EXPERT = re.compile(r"^([0-9]+)\.(\w+)\.(weight|bias)$", re.ASCII)
MAX_INDEX_DIGITS = 9  # an expert or layer number; more digits than any model has experts


@dataclass(frozen=True)
class ExpertsSpec:
    """What one experts module holds, as the runtime needs it to place checkpoint bytes.

    ``shapes`` are the per-expert tensors (the module's 3D parameters without the
    leading expert dimension); the flags are the ones ``use_experts_implementation`` sets.
    """

    layer: int
    prefix: str  # the module's name in the model, e.g. "model.layers.3.mlp.experts"
    num_experts: int
    shapes: dict[str, tuple[int, ...]]
    is_transposed: bool = False
    is_concatenated: bool = True


@dataclass(frozen=True)
class Piece:
    """One tensor's bytes for one expert, and where they go in the slot.

    The destination is ``views[param][index]``; the source is a ``shape`` tensor of
    ``dtype`` at ``offset`` in ``file``, transposed first if ``transpose``.
    """

    param: str
    index: tuple[slice, ...]
    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    transpose: bool
    name: str  # checkpoint tensor name, for messages

    @property
    def whole(self) -> bool:
        return all(s == slice(None) for s in self.index) and not self.transpose


class PieceStore:
    """What the movers and the expert cache ask of a store: the ``Piece``s of each (layer, expert), positional
    reads of them, and with ``io="mmap"`` views of them in the mapped files. ``ExpertStore`` (a transformers
    checkpoint) and ``SavedExperts`` (the files ``save_experts`` writes) fill ``pieces``.
    """

    format: ExpertFormat = DENSE  # how packed weights are stored (``formats``); plain tensors by default
    packed: dict[str, torch.dtype] = {}  # slot tensors kept in their checkpoint dtype (a packed format's components)

    def __init__(self, io: str):
        self.reader = FileReader(io)
        self.maps = MappedFiles() if io == "mmap" else None
        self._mapped: dict[tuple[int, int], dict | None] = {}
        self.pieces: dict[tuple[int, int], list[Piece]] = defaultdict(list)

    def set_io(self, io: str) -> None:
        """Read with ``io`` from now on: what ``io="auto"`` chose, set before any expert is read."""
        if io != self.reader.io:
            self.close()
            self.reader = FileReader(io)
            self.maps = MappedFiles() if io == "mmap" else None

    def _rows(self, layer: int, param: str) -> int:
        """Rows of the slot tensor ``param`` of ``layer``'s experts (for row blocks)."""
        raise NotImplementedError

    def describe(self, layer: int, expert: int) -> str:
        raise NotImplementedError

    # -- reads ---------------------------------------------------------------
    def expert_pieces(self, layer: int, expert: int) -> list[Piece]:
        return self.pieces[(layer, expert)]

    def read_piece(self, piece: Piece, out: torch.Tensor) -> int:
        """Read ``piece``'s bytes into the contiguous CPU tensor ``out`` (of ``piece.nbytes`` bytes)."""
        return self.reader.read_into(piece.file, piece.offset, out)

    def mapped(self, layer: int, expert: int, dtype: torch.dtype) -> dict[str, torch.Tensor | RowBlocks] | None:
        """The expert's tensors as views of the mapped checkpoint (``io="mmap"``), or None where that needs a copy.

        A tensor maps when the checkpoint holds it in ``dtype`` (a packed weight: as it is packed) and the
        module's layout, whole (fused checkpoints) or as blocks of rows (a gate and an up projection stored
        apart). Anything else (another dtype, a transposed or interleaved layout) is loaded into a slot
        as in the other modes. Packed weights come back through the store's ``format``, as a slot's do.
        """
        key = (layer, expert)
        cached = self._mapped.get(key, False)
        if self.maps is None or cached is None:
            return None
        try:
            # one stat per file: views of a file that changed since they were made are not used again
            if cached and all(self.maps.current(m.path) is m for m in cached[0]):
                return cached[1]
            self._mapped.pop(key, None)  # stale views go now, whether or not new ones can be made
            made = self._map_expert(key, dtype)
        except OSError as e:  # the file cannot be mapped: every expert is read into slots instead
            self.maps = None
            warnings.warn(f"io='mmap': cannot map {self.describe(layer, expert)} ({e.strerror or e}); "
                          "experts are read into slots instead, as with io='buffered'", stacklevel=2)
            return None
        self._mapped[key] = made
        return None if made is None else made[1]

    def _map_expert(self, key: tuple[int, int], dtype: torch.dtype):
        """(the mappings used, the expert's views in them), or None if the expert cannot be computed in place."""
        by_param: dict[str, list[Piece]] = defaultdict(list)
        for piece in self.pieces[key]:
            if piece.dtype != self.packed.get(piece.param, dtype) or piece.transpose or piece.offset % piece.dtype.itemsize:
                return None  # a conversion, a transpose, or bytes too misaligned to view as the dtype
            by_param[piece.param].append(piece)
        maps = {f: self.maps.current(f) for f in sorted({p.file for p in self.pieces[key]})}
        out: dict[str, torch.Tensor | RowBlocks] = {}
        for param, pieces in by_param.items():
            if len(pieces) == 1 and pieces[0].whole:
                p = pieces[0]
                out[param] = maps[p.file].tensor(p.offset, p.dtype, p.shape)
                continue
            blocks = _row_blocks(pieces, self._rows(key[0], param))
            if blocks is None:
                return None
            views = tuple(maps[p.file].tensor(p.offset, p.dtype, p.shape) for p in blocks)
            out[param] = views if param in self.packed else RowBlocks(views)  # a packed weight's row parts
        return tuple(maps.values()), self.format.weights(out)

    def willneed(self, layer: int, expert: int) -> None:
        """Ask the kernel to start reading an expert's mapped bytes now (``io="mmap"``)."""
        if self.maps is not None:
            for p in self.pieces[(layer, expert)]:
                self.maps.willneed(p.file, p.offset, p.nbytes)

    def close(self) -> None:
        self.reader.close()
        self._mapped.clear()
        if self.maps is not None:
            self.maps.close()


class ExpertStore(PieceStore):
    """Index of a checkpoint's routed experts, and positional reads of their bytes.

    ``rename`` maps a checkpoint tensor name to the model's parameter name (the
    loader passes transformers' own renaming rules). Tensors that are not routed
    experts are kept in ``dense`` under their model names. ``format`` (from the config's
    ``quantization_config``) says how quantized experts are packed: their components go into the
    slots as they are (``slot_layout``), and ``read_dense`` applies the scales of dense block-FP8 weights.
    ``headers``: each file's tensors as its header gives them, read once here.
    """

    def __init__(self, folder: Path, specs: Iterable[ExpertsSpec], rename: Callable[[str], str] = lambda k: k,
                 io: str = "buffered", format: ExpertFormat = DENSE):
        self.folder = Path(folder)
        self.specs = {s.layer: s for s in specs}
        self.files = checkpoint_files(self.folder)
        super().__init__(io)
        self.format = format
        self.packed = {}
        self.layouts: dict[int, dict[str, tuple[int, ...]]] = {layer: {} for layer in self.specs}  # slot tensors
        self.dense: dict[str, TensorInfo] = {}
        self.dense_scales: dict[str, TensorInfo] = {}  # checkpoint name of a dense FP8 weight -> its scale_inv
        by_prefix = {s.prefix: s for s in self.specs.values()}
        self.headers: dict[Path, dict[str, TensorInfo]] = {path: read_header(path) for path in self.files}
        for path in self.files:
            for name, info in self.headers[path].items():
                key = rename(name)
                spec, rest = _owner(key, by_prefix)
                if spec is None or not self._add_expert_tensor(spec, rest, info):
                    self._add_dense(key, info)
        self._check_dense_scales()
        self._check_complete()

    def slot_tensors(self) -> dict[str, tuple[int, ...]]:
        """One expert's slot tensors and their shapes (every layer's are the same): the module's parameters,
        a packed weight as its components (``packed`` gives their dtypes)."""
        return dict(self.layouts[min(self.layouts)]) if self.layouts else {}

    # -- dense tensors ---------------------------------------------------------
    def _add_dense(self, key: str, info: TensorInfo) -> None:
        if self.format.kind == "fp8" and info.name.endswith("weight_scale_inv"):
            self.dense_scales[info.name.removesuffix("_scale_inv")] = info
        else:
            self.dense[key] = info

    def _check_dense_scales(self) -> None:
        names = {info.name for info in self.dense.values()}
        for weight, scale in self.dense_scales.items():
            if weight not in names:
                raise CheckpointError(f"{scale.file}: {short_repr(scale.name)} scales a weight {short_repr(weight)} "
                                      "that the checkpoint does not hold; the checkpoint is incomplete")
        for info in self.dense.values():
            if info.dtype.itemsize == 1 and info.dtype.is_floating_point and info.name not in self.dense_scales:
                raise CheckpointError(f"{info.file}: float8 tensor {short_repr(info.name)} has no "
                                      f"{short_repr(info.name + '_scale_inv')}; without its scales it cannot be read")

    def read_dense(self, info: TensorInfo) -> torch.Tensor:
        """A dense tensor; a block-FP8 weight comes back dequantized (float32), as transformers loads it on the CPU.
        Its pages are dropped from the page cache after a buffered read (``FileReader.read_tensor``)."""
        value = self.reader.read_tensor(info, keep_cached=False)  # the model keeps its own copy
        scale = self.dense_scales.get(info.name)
        if scale is not None:
            value = dequantize_dense(value, self.reader.read_tensor(scale, keep_cached=False), self.format.block,
                                     info.name, info.file)
        return value

    # -- index ---------------------------------------------------------------
    def _add_expert_tensor(self, spec: ExpertsSpec, rest: str, info: TensorInfo) -> bool:
        base, component = self.format.component_of(rest, info.dtype)
        if component is None and (not info.dtype.is_floating_point or info.dtype.itemsize < 2):
            raise CheckpointError(
                f"{info.file}: expert tensor {short_repr(info.name)} has dtype {str(info.dtype).removeprefix('torch.')}, "
                "but offload_moe reads experts in bf16, fp16 or fp32, or packed as config.json's quantization_config "
                f"says (here: {self.format.name}); the checkpoint is corrupted, or quantized without its "
                "quantization_config in config.json"
            )
        if base in spec.shapes:  # fused [E, ...] in the module's own layout
            if component is None:
                self._add_fused(spec, base, info)
            else:
                self._add_packed(spec, base, (slice(None),), component, info, fused=True)
            return True
        m = _PER_EXPERT.match(base)
        if m is None:
            return False
        digits, proj, kind = m.group(1), m.group(2), m.group(3)
        if len(digits) > MAX_INDEX_DIGITS or int(digits) >= spec.num_experts:
            shown = digits if len(digits) <= 12 else f"{digits[:12]}... ({len(digits)} digits)"
            raise CheckpointError(
                f"{info.file}: tensor {short_repr(info.name)} is for expert {shown}, but the config gives "
                f"{spec.num_experts} experts per layer; the checkpoint and config.json disagree"
            )
        expert = int(digits)
        param, index = self._destination(spec, proj, kind, info)
        if component is not None:  # a packed weight is always [out, in]: its rows are the part it fills
            self._add_packed(spec, param, (index[-1],), component, info, expert=expert)
            return True
        want = _indexed_shape(spec.shapes[param], index)
        transpose = spec.is_transposed and len(info.shape) == 2
        got = info.shape[::-1] if transpose else info.shape
        if tuple(got) != want:
            raise CheckpointError(
                f"{info.file}: expert tensor {short_repr(info.name)} has shape {list(info.shape)}, expected "
                f"{list(want[::-1] if transpose else want)} from config.json; the checkpoint does not match its config"
            )
        self._place(spec, param, spec.shapes[param], None, info)
        self.pieces[(spec.layer, expert)].append(
            Piece(param, index, info.file, info.offset, info.nbytes, info.dtype, info.shape, transpose, info.name)
        )
        return True

    def _add_packed(self, spec: ExpertsSpec, param: str, rows: tuple[slice], component: str, info: TensorInfo, *,
                    fused: bool = False, expert: int = 0) -> None:
        """One component of a packed weight, of every expert (``fused``: leading dimension E) or of ``expert``,
        covering ``rows`` of the weight [out, in]. Its slot tensor is ``param.component``."""
        shape = spec.shapes[param]
        if len(shape) != 2:
            raise CheckpointError(f"{info.file}: {short_repr(info.name)} packs {spec.prefix}'s {param!r}, of shape "
                                  f"{list(shape)}, but only weight matrices are packed; the checkpoint is corrupted")
        out, cols = shape[::-1] if spec.is_transposed else shape  # the weight as F.linear takes it
        start, stop, step = rows[0].indices(out)
        part_rows = len(range(start, stop, step))
        if (component in PER_PART or self.format.kind == "int4") and step != 1:  # scales, or int4's tiles of rows
            raise CheckpointError(f"{info.file}: {short_repr(info.name)} packs interleaved rows, which "
                                  "offload_moe does not read; please report this model")
        try:
            slot = self.format.components(out, cols, out // part_rows)[component]
            want, dtypes = self.format.components(part_rows, cols)[component]
        except (ValueError, KeyError) as e:
            reason = str(e) if isinstance(e, ValueError) else f"{component!r} is not a component of {self.format.name}"
            raise CheckpointError(f"{info.file}: expert tensor {short_repr(info.name)}: {reason}; the checkpoint "
                                  "does not match its config") from None
        index = rows
        if component in PER_PART:  # the scales of one row part: one entry of the slot's [parts, ...]
            want, index = want[1:], (slice(start // part_rows, start // part_rows + 1),)
        if fused:
            want = (spec.num_experts, *want)
        if tuple(info.shape) != tuple(want) or info.dtype not in dtypes:
            raise CheckpointError(
                f"{info.file}: {self.format.name} tensor {short_repr(info.name)} is "
                f"{str(info.dtype).removeprefix('torch.')} {list(info.shape)}, but with a weight of {part_rows} rows and "
                f"{cols} columns it must be {' or '.join(str(d).removeprefix('torch.') for d in dtypes)} {list(want)}; "
                "the checkpoint does not match its config"
            )
        name = f"{param}.{component}"
        self._place(spec, name, slot[0], info.dtype, info)
        if not fused:
            self.pieces[(spec.layer, expert)].append(
                Piece(name, index, info.file, info.offset, info.nbytes, info.dtype, info.shape, False, info.name))
            return
        per_expert = info.nbytes // spec.num_experts
        for e in range(spec.num_experts):
            self.pieces[(spec.layer, e)].append(
                Piece(name, index, info.file, info.offset + e * per_expert, per_expert, info.dtype, tuple(want[1:]),
                      False, f"{info.name}[{e}]"))

    def _place(self, spec: ExpertsSpec, name: str, shape: tuple[int, ...], dtype: torch.dtype | None,
               info: TensorInfo) -> None:
        """Note slot tensor ``name`` of ``shape`` (a ``dtype``: kept as the checkpoint stores it); every checkpoint
        tensor placed into it must agree."""
        layout = self.layouts[spec.layer]
        if layout.setdefault(name, tuple(shape)) != tuple(shape) or (
                dtype is not None and self.packed.setdefault(name, dtype) != dtype) or (dtype is None and name in self.packed):
            raise CheckpointError(f"{info.file}: expert tensor {short_repr(info.name)} is stored unlike the other "
                                  f"tensors of {spec.prefix}'s {name!r} (mixed layouts or dtypes); the checkpoint is "
                                  "inconsistent")

    def _destination(self, spec: ExpertsSpec, proj: str, kind: str, info: TensorInfo) -> tuple[str, tuple[slice, ...]]:
        suffix = "" if kind == "weight" else "_bias"
        whole = (slice(None),)
        if proj in DOWN_NAMES:
            return "down_proj" + suffix, whole
        if proj == "gate_up_proj":
            return "gate_up_proj" + suffix, whole
        if proj in UP_NAMES and "up_proj" + suffix in spec.shapes:  # an ungated expert
            return "up_proj" + suffix, whole
        if proj in GATE_NAMES + UP_NAMES and "gate_up_proj" + suffix in spec.shapes:
            along_columns = spec.is_transposed and kind == "weight"  # [H, 2I] rather than [2I, H]
            half = spec.shapes["gate_up_proj" + suffix][1 if along_columns else 0] // 2
            part = 0 if proj in GATE_NAMES else 1
            rows = slice(part * half, (part + 1) * half) if spec.is_concatenated else slice(part, None, 2)
            return "gate_up_proj" + suffix, ((slice(None), rows) if along_columns else (rows,))
        raise CheckpointError(
            f"{info.file}: tensor {short_repr(info.name)} looks like an expert's {proj!r} projection, which offload_moe "
            f"does not know how to place into {sorted(spec.shapes)}; please report this model"
        )

    def _add_fused(self, spec: ExpertsSpec, param: str, info: TensorInfo) -> None:
        want = (spec.num_experts, *spec.shapes[param])
        if info.shape != want:
            raise CheckpointError(
                f"{info.file}: fused expert tensor {short_repr(info.name)} has shape {list(info.shape)}, expected {list(want)} "
                "from config.json; the checkpoint does not match its config"
            )
        self._place(spec, param, spec.shapes[param], None, info)
        per_expert = info.nbytes // spec.num_experts
        for e in range(spec.num_experts):
            self.pieces[(spec.layer, e)].append(
                Piece(param, (slice(None),), info.file, info.offset + e * per_expert, per_expert,
                      info.dtype, want[1:], False, f"{info.name}[{e}]")
            )

    def _check_complete(self) -> None:
        first = None
        for spec in self.specs.values():
            layout = self.layouts[spec.layer]
            for param, shape in spec.shapes.items():
                packed = {n for n in layout if n.startswith(param + ".")}
                want = {f"{param}.{c}" for c in self.format.component_names}
                if packed and packed != want:
                    raise CheckpointError(
                        f"{self.folder}: {spec.prefix}'s {param!r} is packed as {self.format.name}, but the checkpoint "
                        f"lacks its {', '.join(sorted(want - packed))}; a shard may be missing")
                if not packed:
                    layout.setdefault(param, shape)  # never seen: reported below as no values found
            for e in range(spec.num_experts):
                covered = defaultdict(int)
                for p in self.pieces.get((spec.layer, e), []):
                    covered[p.param] += _prod(_indexed_shape(layout[p.param], p.index))
                for param, shape in layout.items():
                    if covered[param] != _prod(shape):
                        raise CheckpointError(
                            f"{self.folder}: the checkpoint has no complete {param!r} for expert {e} of "
                            f"{spec.prefix} (found {covered[param]} of {_prod(shape)} values); "
                            "a shard may be missing or the checkpoint may not match config.json"
                        )
            if first is not None and layout != self.layouts[first.layer]:
                raise CheckpointError(
                    f"{self.folder}: the experts of {spec.prefix} are stored as {sorted(layout)}, unlike those of "
                    f"{first.prefix} ({sorted(self.layouts[first.layer])}); offload_moe needs one expert layout a model")
            first = first or spec

    def describe(self, layer: int, expert: int) -> str:
        files = sorted({p.file.name for p in self.pieces.get((layer, expert), [])})
        return ", ".join(str(self.folder / f) for f in files) or str(self.folder)

    def _rows(self, layer: int, param: str) -> int:
        return self.layouts[layer][param][0]


def _owner(key: str, by_prefix: dict[str, ExpertsSpec]) -> tuple[ExpertsSpec | None, str]:
    head, _, _ = key.rpartition(".")
    while head:
        spec = by_prefix.get(head)
        if spec is not None:
            return spec, key[len(head) + 1 :]
        head, _, _ = head.rpartition(".")
    return None, ""


def _row_blocks(pieces: list[Piece], rows: int) -> list[Piece] | None:
    """``pieces`` in row order if they tile rows 0..``rows`` of a tensor as consecutive blocks, else None."""
    spans = []
    for p in pieces:
        if len(p.index) != 1 or p.index[0].step not in (None, 1):
            return None
        start, stop, _ = p.index[0].indices(rows)
        spans.append((start, stop, p))
    spans.sort(key=lambda s: s[0])
    end = 0
    for start, stop, _ in spans:
        if start != end:
            return None
        end = stop
    return [p for _, _, p in spans] if end == rows else None


def _indexed_shape(shape: tuple[int, ...], index: tuple[slice, ...]) -> tuple[int, ...]:
    return tuple(torch.empty(shape, device="meta")[index].shape)


def _prod(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
