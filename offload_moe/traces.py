"""Routing traces: which experts each token went to, recorded, written, read and summarised.

A trace uses vLLM's layout for routed experts, ``experts`` int16 ``[tokens, layers, top_k]``,
so traces stay exchangeable, and optionally keeps the routing weights (``scores``), the token
ids and the lengths of the sequences the tokens came from. Rows are token positions in the
order they ran. On disk a trace is one safetensors file; ``metadata`` holds the model, its
number of experts, top-k, the model layer numbers and where the tokens came from.

    model = offload_moe.load(folder, cache_experts=32)
    trace = record_trace(model, [input_ids], source="held-out stdlib files")
    save_trace(trace, "profiles/traces/run.safetensors")
    trace = load_trace("profiles/traces/run.safetensors")
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write
from .errors import TraceError
from .experts import find_experts_modules, layer_number

FORMAT = "offload_moe.trace"
VERSION = "1"
REQUIRED_METADATA = ("model", "num_experts", "top_k", "layers", "source")
# name: (dtype, rank); "experts" is the only tensor a trace must have.
TENSORS = {
    "experts": (torch.int16, 3),          # [T, L, k]
    "scores": (torch.float32, 3),         # [T, L, k]
    "token_ids": (torch.int32, 1),        # [T]
    "sequence_lengths": (torch.int64, 1),  # [S], sums to T
}


@dataclass
class Trace:
    """Routed experts of a run of tokens through a model, ``experts[t, l]`` being token t's top-k at layer l.

    ``metadata`` maps str to str as stored in the file: ``model``, ``num_experts``, ``top_k``,
    ``layers`` (a JSON list of the model's layer numbers, one per column), ``source``.
    """

    experts: torch.Tensor                          # int16 [T, L, k]
    metadata: dict[str, str]
    scores: torch.Tensor | None = None             # float32 [T, L, k], routing weights
    token_ids: torch.Tensor | None = None          # int32 [T]
    sequence_lengths: torch.Tensor | None = None   # int64 [S]; consecutive rows of one sequence

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_experts(self) -> int:
        return int(self.metadata["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.metadata["top_k"])

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in json.loads(self.metadata["layers"])]

    def sequences(self) -> list[tuple[int, int]]:
        """``(start, end)`` row ranges of the sequences; the whole trace is one sequence without lengths."""
        if self.sequence_lengths is None:
            return [(0, self.num_tokens)]
        ends = torch.cumsum(self.sequence_lengths, 0).tolist()
        return list(zip([0, *ends[:-1]], ends))

    def validate(self, where: str | Path = "trace") -> None:
        """Raise ``TraceError`` naming ``where`` if a tensor or the metadata is malformed."""
        _check_metadata(self.metadata, where)
        for name, (dtype, rank) in TENSORS.items():
            tensor = getattr(self, name)
            if tensor is not None and (tensor.dtype != dtype or tensor.dim() != rank):
                raise TraceError(
                    f"{where}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')} with {tensor.dim()} "
                    f"dimension(s); a trace stores it as {str(dtype).removeprefix('torch.')} with {rank}"
                )
        _check_shapes(self, where)
        _check_expert_ids(self, where)


def _check_metadata(metadata: dict[str, str], where: str | Path) -> None:
    missing = [k for k in REQUIRED_METADATA if k not in metadata]
    if missing:
        raise TraceError(f"{where}: metadata lacks {', '.join(missing)}; a trace records {', '.join(REQUIRED_METADATA)}")
    try:
        numbers = int(metadata["num_experts"]), int(metadata["top_k"])
        layers = json.loads(metadata["layers"])
        if not isinstance(layers, list) or not all(isinstance(x, int) for x in layers):
            raise ValueError
    except ValueError:
        raise TraceError(
            f"{where}: metadata num_experts={metadata['num_experts']!r}, top_k={metadata['top_k']!r}, "
            f"layers={metadata['layers']!r}; they must be integers and a JSON list of integers"
        ) from None
    if min(numbers) < 1:
        raise TraceError(f"{where}: metadata num_experts and top_k must be at least 1, got {numbers}")


def _check_shapes(trace: Trace, where: str | Path) -> None:
    tokens, layers, k = trace.experts.shape
    if layers != len(trace.layers) or k != trace.top_k:
        raise TraceError(
            f"{where}: 'experts' has shape {list(trace.experts.shape)} but the metadata says "
            f"{len(trace.layers)} layers and top_k={trace.top_k}"
        )
    if trace.scores is not None and trace.scores.shape != trace.experts.shape:
        raise TraceError(f"{where}: 'scores' has shape {list(trace.scores.shape)}, unlike 'experts' {list(trace.experts.shape)}")
    if trace.token_ids is not None and len(trace.token_ids) != tokens:
        raise TraceError(f"{where}: 'token_ids' has {len(trace.token_ids)} entries for {tokens} traced tokens")
    lengths = trace.sequence_lengths
    if lengths is not None and (int(lengths.sum()) != tokens or bool((lengths < 1).any())):
        raise TraceError(f"{where}: 'sequence_lengths' must be positive and sum to the {tokens} traced tokens")


def _check_expert_ids(trace: Trace, where: str | Path) -> None:
    if trace.num_tokens == 0:
        return
    low, high = int(trace.experts.min()), int(trace.experts.max())
    if low < 0 or high >= trace.num_experts:
        bad = low if low < 0 else high
        raise TraceError(
            f"{where}: expert id {bad} is outside 0..{trace.num_experts - 1} (metadata num_experts="
            f"{trace.num_experts}); the trace was recorded for another model or is corrupted"
        )


# ---------------------------------------------------------------- files


def save_trace(trace: Trace, path: str | Path) -> Path:
    """Write ``trace`` to one safetensors file, atomically: readers see the old file or the new one."""
    from safetensors.torch import save

    path = Path(path)
    trace.validate(path)
    tensors = {name: getattr(trace, name).contiguous() for name in TENSORS if getattr(trace, name) is not None}
    metadata = {**trace.metadata, "format": FORMAT, "version": VERSION}
    return atomic_write(path, save(tensors, metadata=metadata))


def load_trace(path: str | Path) -> Trace:
    """Read and validate a trace written by ``save_trace`` (or any file in the same layout)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path} does not exist; record one with offload_moe.traces.record_trace "
                         "or scripts/record_reference_traces.py")
    try:
        with safe_open(path, "pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys() if name in TENSORS}
    except (SafetensorError, OSError, ValueError) as e:
        raise TraceError(f"{path} is not a readable safetensors file ({e}); re-record the trace") from None
    if "experts" not in tensors:
        raise TraceError(f"{path} has no 'experts' tensor; a trace stores the routed experts as int16 [tokens, layers, top_k]")
    trace = Trace(metadata={k: v for k, v in metadata.items() if k not in ("format", "version")}, **tensors)
    trace.validate(path)
    return trace


# ---------------------------------------------------------------- recording


class TraceRecorder:
    """Forward pre-hooks on a model's experts modules that keep each call's ``top_k_index`` and weights.

    Use as a context manager: the hooks are removed on exit, also after an error. Works on a
    model from ``offload_moe.load`` (its ``model.offload.modules``) and on a plain transformers
    MoE model (its experts modules), which see the same ``(hidden_states, top_k_index, top_k_weights)``.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.modules = _experts_modules(model)
        if not self.modules:
            raise TraceError(f"{type(model).__name__} has no routed-experts module to record")
        self.layers = [layer for layer, _ in self.modules]
        self._experts: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self._scores: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self._handles: list = []

    def __enter__(self) -> "TraceRecorder":
        for layer, module in self.modules:
            self._handles.append(module.register_forward_pre_hook(self._hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
            index, weights = values[1], values[2]  # [T, k] each
            self._experts[layer].append(index.detach().to("cpu", torch.int16))
            self._scores[layer].append(weights.detach().to("cpu", torch.float32))

        return record

    @property
    def num_tokens(self) -> int:
        """Tokens recorded so far (rows of the first layer)."""
        return sum(len(x) for x in self._experts[self.layers[0]])

    def trace(self, *, source: str, model_name: str | None = None, token_ids: torch.Tensor | None = None,
              sequence_lengths: list[int] | None = None) -> Trace:
        """The calls recorded so far as one ``Trace``; every layer must have seen the same tokens."""
        counts = {layer: sum(len(x) for x in self._experts[layer]) for layer in self.layers}
        if len(set(counts.values())) != 1:
            raise TraceError(f"layers saw different numbers of tokens {counts}; record whole forward passes")
        if not self._experts[self.layers[0]]:
            raise TraceError("nothing was recorded: run at least one forward pass inside the recorder")
        experts = torch.stack([torch.cat(self._experts[layer]) for layer in self.layers], dim=1)  # [T, L, k]
        scores = torch.stack([torch.cat(self._scores[layer]) for layer in self.layers], dim=1)
        metadata = {
            "model": model_name or _model_name(self.model),
            "num_experts": str(self.modules[0][1].num_experts),
            "top_k": str(experts.shape[2]),
            "layers": json.dumps(self.layers),
            "source": source,
        }
        lengths = torch.tensor(sequence_lengths, dtype=torch.int64) if sequence_lengths is not None else None
        ids = token_ids.to(torch.int32) if token_ids is not None else None
        trace = Trace(experts=experts, metadata=metadata, scores=scores, token_ids=ids, sequence_lengths=lengths)
        trace.validate("recorded trace")
        return trace


def record_trace(model: nn.Module, batches_of_input_ids: Iterable[torch.Tensor], *, source: str,
                 model_name: str | None = None) -> Trace:
    """Run one forward pass per batch and return the routing of every token, in order.

    Each batch is ``[S]`` or ``[B, S]`` token ids (every position is traced, so use equal-length
    rows without padding); each row counts as one sequence. ``source`` says where the tokens
    came from and is stored in the trace's metadata.
    """
    device = _input_device(model)
    ids, lengths = [], []
    with TraceRecorder(model) as recorder:
        with torch.inference_mode():
            for batch in batches_of_input_ids:
                batch = torch.as_tensor(batch)
                batch = batch.unsqueeze(0) if batch.dim() == 1 else batch  # [B, S]
                model(input_ids=batch.to(device))
                ids.append(batch.reshape(-1).cpu())
                lengths.extend([batch.shape[1]] * batch.shape[0])
        # built outside inference mode, so that the trace's tensors can be edited like any others
        return recorder.trace(source=source, model_name=model_name, token_ids=torch.cat(ids) if ids else None,
                              sequence_lengths=lengths)


def _experts_modules(model: nn.Module) -> list[tuple[int, nn.Module]]:
    offload = getattr(model, "offload", None)
    if offload is not None:
        return [(m.layer, m) for m in offload.modules]
    return [(layer_number(name, i), m) for i, (name, m) in enumerate(find_experts_modules(model))]


def _model_name(model: nn.Module) -> str:
    offload = getattr(model, "offload", None)
    if offload is not None:
        return Path(offload.folder).name
    return str(getattr(model.config, "_name_or_path", "") or model.config.model_type)


def _input_device(model: nn.Module) -> torch.device:
    offload = getattr(model, "offload", None)
    return offload.device if offload is not None else model.get_input_embeddings().weight.device


# ---------------------------------------------------------------- summaries


def expert_usage_entropy(trace: Trace) -> list[float]:
    """Per layer, the entropy in bits of how often each expert is chosen (any of the top-k).

    ``log2(num_experts)`` means every expert is used equally; 0 means one expert takes everything.
    """
    out = []
    for layer in range(trace.experts.shape[1]):
        counts = torch.bincount(trace.experts[:, layer].reshape(-1).long(), minlength=trace.num_experts).double()
        p = counts[counts > 0] / counts.sum()
        out.append(float(-(p * p.log2()).sum()))
    return out


def repeat_rate(trace: Trace, *, first_choice: bool = True) -> list[float]:
    """Per layer, the share of consecutive token pairs (within a sequence) that repeat an expert.

    ``first_choice``: token t+1's top-1 expert equals token t's top-1 (Mixtral paper, Table 5,
    "first choice"). Otherwise: the two tokens' top-k sets share an expert ("first or second choice").
    """
    same, pairs = torch.zeros(trace.experts.shape[1], dtype=torch.float64), 0
    for start, end in trace.sequences():
        a, b = trace.experts[start:end - 1].long(), trace.experts[start + 1:end].long()  # [P, L, k]
        if len(a) == 0:
            continue
        if first_choice:
            hit = a[..., 0] == b[..., 0]  # [P, L]
        else:
            hit = (a.unsqueeze(-1) == b.unsqueeze(-2)).flatten(-2).any(-1)  # [P, L]
        same += hit.double().sum(0)
        pairs += len(a)
    return (same / pairs).tolist() if pairs else [0.0] * trace.experts.shape[1]


def random_repeat_rate(num_experts: int, top_k: int, *, first_choice: bool = True) -> float:
    """``repeat_rate`` of a router choosing uniformly at random: 1/E for the first choice,
    else the chance two random top-k sets overlap."""
    if first_choice:
        return 1 / num_experts
    return 1 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)

