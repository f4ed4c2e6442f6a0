"""Our own quantized expert store: a checkpoint's routed experts as int8 or int4, everything else as it was.

``quantize_experts(path, out, bits=4)`` reads a bf16, fp16 or float32 checkpoint the way ``load`` does
(``open_checkpoint``: the store's index says which tensors are routed experts and in which layout) and
writes a new folder in offload_moe's format version 1 (docs/quantization.md):

- dense tensors copied byte for byte, under their own names;
- each routed-expert weight ``T`` replaced by ``T.qweight`` and ``T.scales`` (int8, one scale per output
  channel) or ``T.qweight`` and ``T.scales_and_zeros`` (int4, group-wise, two values a byte, in the layout
  torch's CPU int4 kernel computes from), always of ``F.linear``'s [out, in] weight, a fused tensor keeping
  its leading expert dimension; expert biases are copied as they are;
- the other files of the folder copied, and ``config.json`` given a ``quantization_config``.

One expert tensor is in memory at a time, plus the shard being gathered (``shard_size``). Everything is
written into a hidden folder beside ``out`` and renamed to ``out`` only when complete; on any error or
Ctrl-C that folder is removed, and one a killed run left is removed by the next run to the same ``out``.
The source folder is only read.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .atomic import atomic_write, output_folder, remove_stale_temporaries
from .checkpoint import open_checkpoint, resolve_model_path
from .checksums import MANIFEST as CHECKSUM_MANIFEST
from .errors import CheckpointError, ConfigError, OutputError
from .files import open_regular
from .formats import quant_method
from .model_config import read_config
from .progress import progress_bar
from .quant import DEFAULT_GROUP_SIZE, check_group_size, quantize_int4, quantize_int8
from .safetensors_io import TensorInfo, write_safetensors
from .store import ExpertStore, Piece

log = logging.getLogger("offload_moe")

QUANT_METHOD = "offload_moe"
FORMAT_VERSION = 1
BITS = (8, 4)
SHARD_BYTES = 2 * 2**30  # the most tensor bytes gathered in memory before a shard is written
INDEX = "model.safetensors.index.json"
COMPONENTS = {8: ("qweight", "scales"), 4: ("qweight", "scales_and_zeros")}
# Not copied: the weights themselves in other formats, and a checksum manifest of the source's expert bytes.
NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


@dataclass(frozen=True)
class QuantizedCheckpoint:
    """What ``quantize_experts`` wrote: the folder, the settings, and the expert bytes before and after."""

    folder: Path
    bits: int
    group_size: int | None
    expert_tensors: int  # weights quantized (biases, copied as they are, not counted)
    source_expert_bytes: int
    expert_bytes: int

    @property
    def ratio(self) -> float:
        """The quantized experts' bytes over the source's."""
        return self.expert_bytes / self.source_expert_bytes


@dataclass(frozen=True)
class ExpertTensor:
    """One routed-expert tensor of the source as the store indexes it: ``pieces`` holds one piece per expert
    for a fused ``[E, ...]`` tensor, else the one piece; ``transposed``: stored [in, out] per expert."""

    info: TensorInfo
    pieces: tuple[Piece, ...]
    fused: bool
    transposed: bool
    bias: bool


def quantize_experts(path: str | Path, out: str | Path, *, bits: int, group_size: int | None = None,
                     shard_size: int = SHARD_BYTES, progress: bool = True,
                     trust_remote_code: bool = False) -> QuantizedCheckpoint:
    """Write a copy of the checkpoint at ``path`` to the new folder ``out`` with its routed experts quantized.

    ``bits=8``: int8, symmetric, one float32 scale per output channel. ``bits=4``: int4, asymmetric, a
    bfloat16 scale and zero per ``group_size`` input columns (default 64), two values packed a byte.
    Dense weights, biases, the tokenizer and the other files are copied; ``config.json`` gains
    ``"quantization_config": {"quant_method": "offload_moe", ...}``. The format: docs/quantization.md.

    Refuses a source that is quantized already (a ``quantization_config``), an ``out`` that exists and is
    not an empty folder, and an ``out`` inside the source. Streams one expert tensor at a time; shards of
    about ``shard_size`` bytes. Writes into a hidden folder beside ``out`` and renames it at the end, so
    ``out`` appears complete or not at all. ``progress``: a bar on stderr. Returns what was written.
    """
    group_size = _check_settings(bits, group_size, shard_size)
    folder = resolve_model_path(path)
    config = _source_config(folder, trust_remote_code)
    out = _check_out(folder, Path(out).expanduser())
    with open_checkpoint(folder, trust_remote_code=trust_remote_code) as checkpoint:
        tensors = source_tensors(checkpoint.store)
        _check_quantizable(tensors, bits, group_size)
        with output_folder(out.parent):
            work = _work_folder(out)
            try:
                result = _write_tensors(checkpoint.store, tensors, work, bits, group_size, shard_size,
                                        progress, f"quantizing {folder.name}")
                _copy_files(folder, work)
                atomic_write(work / "config.json", _quantized_config(config, bits, group_size))
                _publish(work, out)
            except BaseException:
                shutil.rmtree(work, ignore_errors=True)
                raise
    written = QuantizedCheckpoint(out, bits, group_size, *result)
    log.info("wrote %s: %d expert tensors as int%d, %.2f of their bytes", out, written.expert_tensors, bits,
             written.ratio)
    return written


# -- checks, before anything is written ------------------------------------------------------------------
def _check_settings(bits: object, group_size: object, shard_size: object) -> int | None:
    if bits not in BITS or type(bits) is not int:
        raise ConfigError(f"bits={bits!r}: offload_moe stores experts as int8 (bits=8) or int4 (bits=4)")
    if type(shard_size) is not int or shard_size < 1:
        raise ConfigError(f"shard_size={shard_size!r}: give the shard size in bytes, a positive integer")
    if bits == 8:
        if group_size is not None:
            raise ConfigError(f"group_size={group_size!r} applies to bits=4 only: int8 has one scale per output "
                              "channel; leave group_size out")
        return None
    return DEFAULT_GROUP_SIZE if group_size is None else check_group_size(group_size)


def _source_config(folder: Path, trust_remote_code: bool) -> dict:
    config = read_config(folder, trust_remote_code)
    quantized = config.get("quantization_config")
    if quantized is not None:
        method = quant_method(quantized, folder / "config.json")
        raise CheckpointError(
            f"{folder / 'config.json'} has a quantization_config (quant_method {method!r}): this checkpoint is "
            "quantized already. quantize_experts starts from a bf16, fp16 or float32 checkpoint; use this one as it is"
        )
    return config


def _check_out(source: Path, out: Path) -> Path:
    """``out`` made absolute; refused if it is or lies inside ``source``, or exists and is not an empty folder."""
    where, origin = out.resolve(), source.resolve()
    if where == origin or origin in where.parents:
        raise ConfigError(f"the output folder {out} lies inside the model folder {source}; quantize_experts never "
                          "writes into its source. Choose a folder outside it")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"the output {out} exists and is not a folder; choose a new folder")
    if out.is_dir() and any(out.iterdir()):
        raise ConfigError(f"the output folder {out} exists and is not empty; choose a new folder or remove it")
    return where


def source_tensors(store: ExpertStore) -> list[tuple[TensorInfo, ExpertTensor | None]]:
    """Every tensor of the checkpoint in file order, with its place among the routed experts (None: dense),
    as the store indexed them (from the headers it read)."""
    dense = {(info.file, info.name) for info in store.dense.values()}
    places = {(p.file, p.offset): (layer, p) for (layer, _), pieces in store.pieces.items() for p in pieces}
    found = []
    for file in store.files:
        for info in sorted(store.headers[file].values(), key=lambda i: i.offset):
            expert = None if (info.file, info.name) in dense else _expert_tensor(store, info, places)
            found.append((info, expert))
    return found


def _expert_tensor(store: ExpertStore, info: TensorInfo, places: dict) -> ExpertTensor:
    layer, first = places[(info.file, info.offset)]
    spec = store.specs[layer]
    bias = first.param.endswith("_bias")
    if len(info.shape) == len(first.shape) + 1:  # fused [E, ...] in the module's own layout
        pieces = tuple(places[(info.file, info.offset + e * first.nbytes)][1] for e in range(spec.num_experts))
        return ExpertTensor(info, pieces, True, spec.is_transposed and not bias, bias)
    return ExpertTensor(info, (first,), False, first.transpose, bias)


def _check_quantizable(tensors: list[tuple[TensorInfo, ExpertTensor | None]], bits: int,
                       group_size: int | None) -> None:
    """int4 packs two columns a byte in groups that tile each row: refuse, naming the tensor, what cannot."""
    for info, expert in tensors:
        if bits == 8 or expert is None or expert.bias:
            continue
        columns = expert.pieces[0].shape[0 if expert.transposed else -1]
        rows = expert.pieces[0].shape[-1 if expert.transposed else 0]
        if rows % 2:
            raise ConfigError(f"{info.file}: expert tensor {info.name!r} has {rows} output rows; int4 packs rows in "
                              "pairs and needs an even count. Use bits=8 for this model")
        if columns % 2:
            raise ConfigError(f"{info.file}: expert tensor {info.name!r} has {columns} input columns; int4 packs two "
                              "a byte and needs an even count. Use bits=8 for this model")
        check_group_size(group_size, columns, f"{info.file}: expert tensor {info.name!r}")


# -- writing ----------------------------------------------------------------------------------------------
def _work_folder(out: Path) -> Path:
    """A new hidden folder beside ``out``, named as atomic.py names its temporary files, so that the next run
    removes one a killed run left (``remove_stale_temporaries``)."""
    remove_stale_temporaries(out)
    work = out.parent / f".{out.name}.offload-moe-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        work.mkdir()
    except OSError as e:
        raise OutputError(f"cannot make a folder in {out.parent}: {e.strerror or e}; choose a folder you can write to") from e
    return work


def _write_tensors(store: ExpertStore, tensors: list[tuple[TensorInfo, ExpertTensor | None]], folder: Path,
                   bits: int, group_size: int | None, shard_size: int, progress: bool,
                   what: str) -> tuple[int, int, int]:
    """Write every tensor into shards in ``folder``; returns (weights quantized, their bytes before, after)."""
    shards = Shards(folder, shard_size)
    count = before = after = 0
    with progress_bar(progress, what, sum(info.nbytes for info, _ in tensors)) as advance:
        for info, expert in tensors:
            if expert is None or expert.bias:
                shards.add(info.name, store.read_dense(info))
                advance(info.nbytes)
                continue
            for name, component in quantize_tensor(store, expert, bits, group_size, advance).items():
                shards.add(name, component)
                after += component.nbytes
            count, before = count + 1, before + info.nbytes
    shards.finish()
    return count, before, after


def quantize_tensor(store: ExpertStore, expert: ExpertTensor, bits: int, group_size: int | None,
                    advance: Callable[[int], None] = lambda n: None) -> dict[str, torch.Tensor]:
    """The components of one expert weight (``T.qweight`` and ``T.scales`` or ``T.scales_and_zeros``), read and quantized
    one expert at a time; a fused tensor's components keep its leading expert dimension."""
    parts: list[torch.Tensor] | None = None
    for e, piece in enumerate(expert.pieces):
        w = torch.empty(piece.shape, dtype=piece.dtype)
        store.read_piece(piece, w)
        advance(piece.nbytes)
        quantized = tuple(quantize_matrix(w.t() if expert.transposed else w, bits, group_size).values())
        if not expert.fused:
            parts = list(quantized)
            break
        if parts is None:
            parts = [torch.empty((len(expert.pieces), *c.shape), dtype=c.dtype) for c in quantized]
        for whole, c in zip(parts, quantized):
            whole[e] = c
    return {f"{expert.info.name}.{n}": c.contiguous() for n, c in zip(COMPONENTS[bits], parts)}


def quantize_matrix(w: torch.Tensor, bits: int, group_size: int | None = None) -> dict[str, torch.Tensor]:
    """One weight ``w`` [out, in] (F.linear's layout; bf16, fp16 or float32) -> its components as the format stores
    them, by name: int8 ``qweight`` and float32 ``scales``, or int4 ``qweight`` and ``scales_and_zeros`` [in/G, out, 2].
    int4's scales and zeros are stored in bfloat16: 0.28 of bf16's bytes at groups of 64, where float32 takes 0.31;
    and bfloat16 is what the CPU int4 kernel takes with bf16 activations, so it uses them as they lie. The one
    quantizer of both ``quantize_experts`` and ``offload_experts(quantize=...)``; on the meta device it gives the
    components' shapes and dtypes without computing them."""
    w = w.float().contiguous()
    if bits == 8:
        return dict(zip(COMPONENTS[8], quantize_int8(w)))
    packed, scales_and_zeros = quantize_int4(w, group_size)
    return dict(zip(COMPONENTS[4], (packed, scales_and_zeros.to(torch.bfloat16))))


class Shards:
    """Tensors gathered into safetensors files of at most ``limit`` bytes (or one tensor), each written when
    full; ``finish`` names them ``model-0000K-of-0000N.safetensors`` and writes the index when N > 1."""

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: list[tuple[Path, list[str], int]] = []
        self.names: set[str] = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise CheckpointError(f"{self.folder}: the quantized checkpoint would hold two tensors named {name!r}; the "
                                  "source already has a tensor of that name (a .qweight, .scales or .scales_and_zeros suffix)")
        self.names.add(name)
        if self.pending and self.pending_bytes + tensor.nbytes > self.limit:
            self._flush()
        self.pending[name] = tensor
        self.pending_bytes += tensor.nbytes

    def _flush(self) -> None:
        path = write_safetensors(self.folder / f".shard-{len(self.written) + 1}.safetensors", self.pending.items(),
                                 aligned=True)
        self.written.append((path, list(self.pending), self.pending_bytes))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending or not self.written:
            self._flush()
        n = len(self.written)
        weight_map = {}
        for k, (path, names, _) in enumerate(self.written, 1):
            final = f"model-{k:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            total = sum(size for _, _, size in self.written)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            atomic_write(self.folder / INDEX, json.dumps(index, indent=2).encode() + b"\n")


def _copy_files(source: Path, folder: Path) -> None:
    """Copy the folder's other files (config, tokenizer, generation config, card...); not its subfolders, the
    weights in other formats, nor a checksum manifest of the source's experts."""
    skipped = []
    for entry in sorted(os.scandir(source), key=lambda e: e.name):
        name = entry.name
        if name in ("config.json", INDEX, CHECKSUM_MANIFEST) or name.endswith(NOT_COPIED) or entry.is_dir():
            skipped.append(name)
            continue
        with open_regular(source / name, "model file") as src:
            atomic_write(folder / name, lambda dst: shutil.copyfileobj(src, dst, 2**20))
    extra = [n for n in skipped if n not in ("config.json", INDEX) and not n.endswith(".safetensors")]
    if extra:
        log.info("not copied from %s: %s", source, ", ".join(extra))


def _quantized_config(config: dict, bits: int, group_size: int | None) -> bytes:
    settings = {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "bits": bits}
    if group_size is not None:
        settings["group_size"] = group_size
    return json.dumps({**config, "quantization_config": settings}, indent=2).encode() + b"\n"


def _publish(work: Path, out: Path) -> None:
    """Rename the finished folder to ``out`` (an empty folder there is replaced) and make the rename durable."""
    _fsync(work)
    try:
        os.rename(work, out)
    except OSError as e:
        raise OutputError(f"cannot rename the finished folder to {out}: {e.strerror or e} (something was written "
                          "there meanwhile?); choose a new folder") from e
    _fsync(out.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
