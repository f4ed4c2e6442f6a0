"""The trace format: ``Trace``, its checks, and its file (one safetensors file, written and read here).

A trace uses vLLM's layout for routed experts, ``experts`` int16 ``[tokens, layers, top_k]``,
so traces stay exchangeable, and optionally keeps the routing weights (``scores``), the
``gate`` prefetcher's predictions (``predicted``), the token ids and the lengths of the
sequences the tokens came from. Rows are token positions in the
order they ran. On disk a trace is one safetensors file; ``metadata`` holds the model, its
number of experts, top-k, the model layer numbers and where the tokens came from.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..atomic import atomic_write
from ..errors import CheckpointError, TraceError
from ..files import open_regular, parse_json, read_json
from ..safetensors_io import FileReader, TensorInfo, read_header

FORMAT = "offload_moe.trace"
VERSION = "1"
REQUIRED_METADATA = ("model", "num_experts", "top_k", "layers", "source")
MAX_EXPERTS = 32767  # expert ids are int16
MAX_LAYER = 2**31 - 1
# name: (dtype, rank); "experts" is the only tensor a trace must have.
TENSORS = {
    "experts": (torch.int16, 3),          # [T, L, k]
    "scores": (torch.float32, 3),         # [T, L, k]
    "predicted": (torch.int16, 3),        # [T, L, m]: at layer l, the gate's top-m for layer l+1; -1: none
    "token_ids": (torch.int32, 1),        # [T]
    "sequence_lengths": (torch.int64, 1),  # [S], sums to T
}


class _Described:
    """What a trace's metadata says of its shape, for a trace in memory and a trace on disk alike."""

    metadata: dict[str, str]

    @property
    def num_experts(self) -> int:
        return int(self.metadata["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.metadata["top_k"])

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in json.loads(self.metadata["layers"])]


@dataclass
class Trace(_Described):
    """Routed experts of a run of tokens through a model, ``experts[t, l]`` being token t's top-k at layer l.

    ``metadata`` maps str to str as stored in the file: ``model``, ``num_experts``, ``top_k``,
    ``layers`` (a JSON list of the model's layer numbers, one per column), ``source``; with
    ``predicted``, also ``predicted_by`` (the predictor, ``gate``).
    """

    experts: torch.Tensor                          # int16 [T, L, k]
    metadata: dict[str, str]
    scores: torch.Tensor | None = None             # float32 [T, L, k], routing weights
    predicted: torch.Tensor | None = None          # int16 [T, L, m], best first, -1 padded
    token_ids: torch.Tensor | None = None          # int32 [T]
    sequence_lengths: torch.Tensor | None = None   # int64 [S]; consecutive rows of one sequence

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def prediction_margin(self) -> int | None:
        """How many experts beyond top_k the stored predictions name, or None without predictions."""
        return None if self.predicted is None else self.predicted.shape[2] - self.top_k

    def first(self, tokens: int) -> Trace:
        """The trace's first ``tokens`` rows (all of it if it is shorter); the sequence they end in is cut there."""
        if tokens < 1:
            raise TraceError(f"tokens={tokens}: keep at least one token of the trace")
        if tokens >= self.num_tokens:
            return self
        lengths = None
        if self.sequence_lengths is not None:
            kept = [min(end, tokens) - start for start, end in self.sequences() if start < tokens]
            lengths = torch.tensor(kept, dtype=torch.int64)

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:tokens].clone()

        return Trace(experts=cut(self.experts), metadata=dict(self.metadata), scores=cut(self.scores),
                     predicted=cut(self.predicted), token_ids=cut(self.token_ids), sequence_lengths=lengths)

    def sequences(self) -> list[tuple[int, int]]:
        """``(start, end)`` row ranges of the sequences; the whole trace is one sequence without lengths."""
        if self.sequence_lengths is None:
            return [(0, self.num_tokens)]
        ends = torch.cumsum(self.sequence_lengths, 0).tolist()
        return list(zip([0, *ends[:-1]], ends))

    def validate(self, where: str | Path = "trace") -> None:
        """Raise ``TraceError`` naming ``where`` if a tensor or the metadata is malformed."""
        _check_metadata(self.metadata, where)
        for name in TENSORS:
            tensor = getattr(self, name)
            if tensor is not None:
                _check_kind(name, tensor.dtype, tensor.dim(), where)
        _check_shapes(self, where)
        _check_expert_ids(self, where)


def _check_kind(name: str, dtype: torch.dtype, rank: int, where: str | Path) -> None:
    """Raise TraceError unless the tensor ``name`` has the dtype and number of dimensions a trace stores it with."""
    want_dtype, want_rank = TENSORS[name]
    if dtype != want_dtype or rank != want_rank:
        raise TraceError(f"{where}: tensor {name!r} is {str(dtype).removeprefix('torch.')} with {rank} dimension(s); "
                         f"a trace stores it as {str(want_dtype).removeprefix('torch.')} with {want_rank}")


def _check_metadata(metadata: dict[str, str], where: str | Path) -> None:
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise TraceError(f"{where}: metadata lacks {', '.join(missing)}; a trace records {', '.join(REQUIRED_METADATA)}")
    odd = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if odd:
        raise TraceError(f"{where}: metadata {odd[0]!r} is {type(metadata[odd[0]]).__name__}; trace metadata maps text to text")
    num_experts = _metadata_int(metadata, "num_experts", MAX_EXPERTS, where,
                                f"a trace stores expert ids as int16, so at most {MAX_EXPERTS} experts per layer")
    _metadata_int(metadata, "top_k", num_experts, where, f"a token cannot choose more than num_experts={num_experts}")
    layers = parse_json(metadata["layers"], f"{where}: metadata 'layers'", TraceError)
    if (not isinstance(layers, list) or not layers
            or not all(type(x) is int and 0 <= x <= MAX_LAYER for x in layers) or len(set(layers)) != len(layers)):
        raise TraceError(f"{where}: metadata layers={_clip(metadata['layers'])}; it must be a non-empty JSON list of "
                         f"distinct layer numbers 0..{MAX_LAYER}, one per column of 'experts'")


def _metadata_int(metadata: dict[str, str], field: str, most: int, where: str | Path, why: str) -> int:
    """The metadata ``field`` as a count 1..``most``: plain decimal digits, nothing int() would also accept."""
    text = metadata[field]
    if not re.fullmatch(r"[0-9]{1,10}", text) or not 1 <= int(text) <= most:
        raise TraceError(f"{where}: metadata {field}={_clip(text)} must be a whole number from 1 to {most} ({why})")
    return int(text)


def _clip(text: str, limit: int = 60) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _check_shapes(trace: Trace, where: str | Path) -> None:
    tokens, layers, k = trace.experts.shape
    if layers != len(trace.layers) or k != trace.top_k:
        raise TraceError(
            f"{where}: 'experts' has shape {list(trace.experts.shape)} but the metadata says "
            f"{len(trace.layers)} layers and top_k={trace.top_k}"
        )
    if tokens < 1:
        raise TraceError(f"{where}: 'experts' holds no tokens (shape {list(trace.experts.shape)}); a trace holds at least one")
    predicted = trace.predicted
    if predicted is not None and (predicted.shape[:2] != trace.experts.shape[:2] or predicted.shape[2] < k):
        raise TraceError(f"{where}: 'predicted' has shape {list(predicted.shape)}; it should be "
                         f"[{tokens}, {layers}, top_k + margin] like 'experts' {list(trace.experts.shape)}")
    if predicted is not None and "predicted_by" not in trace.metadata:
        raise TraceError(f"{where}: 'predicted' is stored but the metadata lacks 'predicted_by' (the predictor's name)")
    if trace.scores is not None and trace.scores.shape != trace.experts.shape:
        raise TraceError(f"{where}: 'scores' has shape {list(trace.scores.shape)}, unlike 'experts' {list(trace.experts.shape)}")
    if trace.token_ids is not None and len(trace.token_ids) != tokens:
        raise TraceError(f"{where}: 'token_ids' has {len(trace.token_ids)} entries for {tokens} traced tokens")
    _check_sequence_lengths(trace.sequence_lengths, tokens, where)


def _check_sequence_lengths(lengths: torch.Tensor | None, tokens: int, where: str | Path) -> None:
    # each length in 1..tokens before summing, so the int64 sum cannot wrap around to the right total
    if lengths is not None and (len(lengths) > tokens or bool((lengths < 1).any()) or bool((lengths > tokens).any())
                                or int(lengths.sum()) != tokens):
        raise TraceError(f"{where}: 'sequence_lengths' must be positive and sum to the {tokens} traced tokens")


def _check_expert_ids(trace: Trace, where: str | Path) -> None:
    for name, lowest in (("experts", 0), ("predicted", -1)):
        ids = getattr(trace, name)
        if ids is None or ids.numel() == 0:
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < lowest or high >= trace.num_experts:
            bad = low if low < lowest else high
            raise TraceError(
                f"{where}: {name!r} holds expert id {bad}, outside {lowest}..{trace.num_experts - 1} (metadata "
                f"num_experts={trace.num_experts}); the trace was recorded for another model or is corrupted"
            )


# ---------------------------------------------------------------- files


def save_trace(trace: Trace, path: str | Path) -> Path:
    """Write ``trace`` to one safetensors file, atomically: readers see the old file or the new one."""
    path = Path(path)
    trace.validate(path)
    tensors = {name: getattr(trace, name).contiguous() for name in TENSORS if getattr(trace, name) is not None}
    metadata = {**trace.metadata, "format": FORMAT, "version": VERSION}
    return atomic_write(path, save(tensors, metadata=metadata))


def load_trace(path: str | Path) -> Trace:
    """Read and validate a trace written by ``save_trace`` (or any file in the same layout), or the parts folder
    a chunked recording leaves (``parts_folder``), its parts one after another."""
    path = _existing(path)
    if path.is_dir():
        return TraceFile.open(path).load()
    with _safe_open(path) as (f, metadata):
        tensors = {name: f.get_tensor(name) for name in f.keys() if name in TENSORS}
    if "experts" not in tensors:
        raise TraceError(f"{path} has no 'experts' tensor; a trace stores the routed experts as int16 [tokens, layers, top_k]")
    trace = Trace(metadata=metadata, **tensors)
    trace.validate(path)
    return trace


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise TraceError(f"{path} does not exist; record one with offload_moe.traces.record_trace "
                         "or scripts/record_reference_traces.py")
    return path


def read_trace_chunks(path: str | Path, *, tokens: int = 65536) -> Iterator[Trace]:
    """The trace at ``path`` (a file, or the parts folder of a chunked recording) as consecutive pieces of at most
    ``tokens`` rows, each a ``Trace`` with the file's metadata, read with positional reads: memory holds one piece
    (and the sequence lengths of one file), however long the trace. Each piece is validated as ``load_trace``
    validates a whole trace, the rows named in the error. A piece's ``sequence_lengths`` are those of the
    sequences cut to its rows, so a sequence that crosses a piece's end continues in the next piece. A piece
    never spans two parts of a folder. ``TraceFile`` offers more: the size before reading, fewer tensors,
    the pieces last first."""
    if tokens < 1:
        raise TraceError(f"tokens={tokens}: a piece holds at least one token")
    return TraceFile.open(path).pieces(tokens)


@dataclass(frozen=True)
class _Part:
    """One safetensors file of a trace: where its tensors are and how many rows it holds."""

    path: Path
    infos: dict[str, TensorInfo]
    tokens: int


@dataclass(frozen=True)
class TraceFile(_Described):
    """A trace on disk, opened but not read: its metadata, its size, and its rows in pieces (``pieces``).

    ``path`` is one trace file, or the parts folder a chunked recording writes (``parts_folder``), whose
    parts hold consecutive rows. Only the headers are read here; ``first`` keeps the first rows, as
    ``Trace.first`` does. A ``TraceFile`` is small to pickle: processes that replay it read the file themselves.
    """

    path: Path
    metadata: dict[str, str]
    parts: tuple[_Part, ...]
    num_tokens: int

    @classmethod
    def open(cls, path: str | Path) -> TraceFile:
        """Read the headers of the trace at ``path`` and check them as ``load_trace`` would (the rows are checked
        as they are read)."""
        path = _existing(path)
        files = _part_files(path) if path.is_dir() else [path]
        parts, metadata = [], None
        for file in files:
            infos = _read_header(file)
            part = _Part(file, infos, _check_layout(file, infos))  # a file with no routing is named as such first
            meta = _file_metadata(file)
            _check_metadata(meta, file)
            if parts and (meta != metadata or _row_layout(part) != _row_layout(parts[0])):
                raise TraceError(f"{file}: its metadata or tensors differ from {parts[0].path}'s; the parts of "
                                 f"{path} are not of one trace")
            parts.append(part)
            metadata = meta
        return cls(path, metadata, tuple(parts), sum(p.tokens for p in parts))

    @property
    def tensors(self) -> list[str]:
        """The trace tensors the file holds."""
        return [name for name in TENSORS if name in self.parts[0].infos]

    @property
    def prediction_margin(self) -> int | None:
        """How many experts beyond top_k the stored predictions name, or None without predictions."""
        info = self.parts[0].infos.get("predicted")
        return None if info is None else info.shape[2] - self.top_k

    def first(self, tokens: int) -> TraceFile:
        """The trace's first ``tokens`` rows (all of it if it is shorter); the sequence they end in is cut there."""
        if tokens < 1:
            raise TraceError(f"tokens={tokens}: keep at least one token of the trace")
        return replace(self, num_tokens=min(tokens, self.num_tokens))

    def pieces(self, tokens: int = 65536, *, tensors: Collection[str] | None = None,
               reverse: bool = False) -> Iterator[Trace]:
        """The rows as consecutive ``Trace`` pieces of at most ``tokens`` rows (``read_trace_chunks``), each validated.

        ``tensors``: read only these of the trace's tensors (``experts`` and the sequence lengths always);
        ``reverse``: the same pieces, last first.
        """
        if tokens < 1:
            raise TraceError(f"tokens={tokens}: a piece holds at least one token")
        wanted = set(TENSORS) if tensors is None else {"experts", "sequence_lengths", *tensors}
        ranges = []  # (part, start, end)
        offset = 0
        for part in self.parts:
            rows = min(part.tokens, self.num_tokens - offset)
            ranges += [(part, start, min(start + tokens, rows)) for start in range(0, rows, tokens)]
            offset += part.tokens
        reader = FileReader("buffered")
        try:
            ends, ends_of = None, None
            for part, start, end in reversed(ranges) if reverse else ranges:
                if ends_of is not part:  # the sequence lengths of one part at a time
                    ends, ends_of = _sequence_ends(reader, part), part
                rows = {name: _read_rows(reader, info, start, end) for name, info in part.infos.items()
                        if name in wanted and name in TENSORS and name != "sequence_lengths"}
                piece = Trace(metadata=dict(self.metadata), **rows, sequence_lengths=_cut(ends, start, end))
                piece.validate(f"{part.path}, rows {start}..{end - 1}")
                yield piece
        finally:
            reader.close()

    def load(self) -> Trace:
        """The whole trace (its first ``num_tokens`` rows) in memory, as ``load_trace`` reads it."""
        return concatenate(list(self.pieces(max(p.tokens for p in self.parts))))


def concatenate(pieces: list[Trace]) -> Trace:
    """Consecutive pieces of one trace (same metadata and tensors) as one ``Trace``; the sequences are the
    pieces' sequences, one after another."""
    def joined(name: str) -> torch.Tensor | None:
        parts = [getattr(p, name) for p in pieces]
        return None if parts[0] is None else torch.cat(parts)

    trace = Trace(metadata=dict(pieces[0].metadata), **{name: joined(name) for name in TENSORS if name != "experts"},
                  experts=joined("experts"))
    trace.validate("joined trace")
    return trace


def _row_layout(part: _Part) -> dict[str, tuple]:
    """A part's tensors by name: dtype and the shape of one row, which every part of a trace shares."""
    return {name: (info.dtype, info.shape[1:]) for name, info in part.infos.items()}


def _sequence_ends(reader: FileReader, part: _Part) -> torch.Tensor | None:
    """Where each sequence of ``part`` ends (cumulative lengths), checked; None without sequence lengths."""
    info = part.infos.get("sequence_lengths")
    if info is None:
        return None
    if info.shape[0] > part.tokens:  # more sequences than tokens: refused before it is read
        raise TraceError(f"{part.path}: 'sequence_lengths' names more sequences than the {part.tokens} traced tokens")
    lengths = _read_rows(reader, info, 0, None)
    _check_sequence_lengths(lengths, part.tokens, part.path)
    return torch.cumsum(lengths, 0)


# ---------------------------------------------------------------- the parts folder of a chunked recording

PARTS_FORMAT = "offload_moe.trace.parts"
PARTS_INDEX = "index.json"
_PART_NAME = re.compile(r"part-[0-9]{6,9}\.safetensors")


def parts_folder(path: str | Path) -> Path:
    """Where a chunked recording to ``path`` keeps its parts until it finishes: ``PATH.parts``."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


def _part_files(folder: Path) -> list[Path]:
    """The parts a trace's parts folder lists in its index, in order; each a plain file name in the folder."""
    index = folder / PARTS_INDEX
    if not index.exists():
        raise TraceError(f"{folder} is a folder without {PARTS_INDEX}; give a trace file, or the parts folder of a "
                         "chunked recording")
    data = read_json(index, "trace parts index", TraceError)
    names = data.get("parts") if isinstance(data, dict) and data.get("format") == PARTS_FORMAT else None
    if (not isinstance(names, list) or not names or not all(isinstance(n, str) and _PART_NAME.fullmatch(n) for n in names)
            or len(set(names)) != len(names)):
        raise TraceError(f"{index} is not a trace parts index (format {PARTS_FORMAT!r} with a non-empty list of "
                         f"distinct 'parts' named part-NNNNNN.safetensors); re-record the trace")
    return [folder / name for name in names]


def _file_metadata(path: Path) -> dict[str, str]:
    with _safe_open(path) as (_, metadata):
        return metadata


@contextmanager
def _safe_open(path: Path) -> Iterator[tuple[Any, dict[str, str]]]:
    """The trace file at ``path`` open with safetensors, and its metadata less ``format`` and ``version``; an error
    safetensors raises, in the ``with`` block too, is a TraceError: the file is not a readable safetensors file."""
    # a FIFO or a device is refused here, before safe_open could block on it or read it without end
    with open_regular(path, "trace file", TraceError):
        try:
            with safe_open(path, "pt") as f:
                metadata = {k: v for k, v in (f.metadata() or {}).items() if k not in ("format", "version")}
                yield f, metadata
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise TraceError(f"{path} is not a readable safetensors file ({e}); re-record the trace") from None


def _read_header(path: Path) -> dict[str, TensorInfo]:
    """``read_header(path)``, its CheckpointError told as a trace file's (what to do: re-record it)."""
    try:
        return read_header(path)
    except CheckpointError as e:
        message = str(e)
        if message.startswith("checkpoint file "):  # the file could not be opened or read
            message = "trace file " + message.removeprefix("checkpoint file ")
        raise TraceError(message.replace("re-download or re-save", "re-record")
                         .replace("re-download this shard", "re-record the trace")) from None


def _check_layout(path: Path, infos: dict[str, TensorInfo]) -> int:
    """The trace's number of tokens, once every tensor's dtype and rank are a trace's and its rows agree."""
    if "experts" not in infos:
        raise TraceError(f"{path} has no 'experts' tensor; a trace stores the routed experts as int16 [tokens, layers, top_k]")
    total = infos["experts"].shape[0]
    for name, info in infos.items():
        if name not in TENSORS:
            continue
        _check_kind(name, info.dtype, len(info.shape), path)
        if name != "sequence_lengths" and info.shape[0] != total:
            raise TraceError(f"{path}: {name!r} has {info.shape[0]} rows for {total} traced tokens")
    if total < 1:
        raise TraceError(f"{path}: 'experts' holds no tokens; a trace holds at least one")
    return total


def _read_rows(reader: FileReader, info: TensorInfo, start: int, end: int | None) -> torch.Tensor:
    """Rows ``start:end`` of the tensor ``info`` describes (all of them with ``end`` None), read from its file."""
    end = info.shape[0] if end is None else end
    row = math.prod(info.shape[1:])
    out = torch.empty((end - start, *info.shape[1:]), dtype=info.dtype)
    if out.numel():
        reader.read_into(info.file, info.offset + start * row * out.element_size(), out)
    return out


def _cut(ends: torch.Tensor | None, start: int, end: int) -> torch.Tensor | None:
    """The lengths of the sequences (whose ends are ``ends``) within rows ``start:end``."""
    if ends is None:
        return None
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    lengths = ends.clamp(max=end) - starts.clamp(min=start)
    return lengths[lengths > 0]
