"""Routing traces: which experts each token went to, recorded, written, read and summarised.

A trace uses vLLM's layout for routed experts, ``experts`` int16 ``[tokens, layers, top_k]``,
so traces stay exchangeable, and optionally keeps the routing weights (``scores``), the
``gate`` prefetcher's predictions (``predicted``), the token ids and the lengths of the
sequences the tokens came from. Rows are token positions in the
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
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write
from .errors import TraceError
from .experts import find_experts_modules, layer_number
from .files import open_regular, parse_json, read_text
from .generation import load_with_tokenizer
from .prefetch import GatePredictor
from .routing import find_routers

FORMAT = "offload_moe.trace"
VERSION = "1"
REQUIRED_METADATA = ("model", "num_experts", "top_k", "layers", "source")
MAX_EXPERTS = 32767  # expert ids are int16
MAX_LAYER = 2**31 - 1
PROMPTS_LIMIT = 64 * 2**20  # bytes of a prompts file
# name: (dtype, rank); "experts" is the only tensor a trace must have.
TENSORS = {
    "experts": (torch.int16, 3),          # [T, L, k]
    "scores": (torch.float32, 3),         # [T, L, k]
    "predicted": (torch.int16, 3),        # [T, L, m]: at layer l, the gate's top-m for layer l+1; -1: none
    "token_ids": (torch.int32, 1),        # [T]
    "sequence_lengths": (torch.int64, 1),  # [S], sums to T
}


@dataclass
class Trace:
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
    def num_experts(self) -> int:
        return int(self.metadata["num_experts"])

    @property
    def top_k(self) -> int:
        return int(self.metadata["top_k"])

    @property
    def layers(self) -> list[int]:
        return [int(x) for x in json.loads(self.metadata["layers"])]

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
    lengths = trace.sequence_lengths
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
    if not path.exists() and not path.is_symlink():
        raise TraceError(f"{path} does not exist; record one with offload_moe.traces.record_trace "
                         "or scripts/record_reference_traces.py")
    # a FIFO or a device is refused here, before safe_open could block on it or read it without end
    with open_regular(path, "trace file", TraceError):
        try:
            with safe_open(path, "pt") as f:
                metadata = dict(f.metadata() or {})
                tensors = {name: f.get_tensor(name) for name in f.keys() if name in TENSORS}
        except (SafetensorError, OSError, ValueError, TypeError) as e:
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
    With ``predict_margin``, it also keeps what the ``gate`` predictor names at each layer for the
    next: that layer's router applied to these hidden states, its top-(k + margin).
    """

    def __init__(self, model: nn.Module, *, predict_margin: int | None = None):
        self.model = model
        self.modules = _experts_modules(model)
        if not self.modules:
            raise TraceError(f"{type(model).__name__} has no routed-experts module to record")
        self.layers = [layer for layer, _, _ in self.modules]
        self._experts: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self._scores: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self._predicted: dict[int, list[torch.Tensor]] = {layer: [] for layer in self.layers}
        self._handles: list = []
        self.predict_margin = predict_margin
        self._routers = None
        self._gate = None  # made at the first call, once top_k is known
        if predict_margin is not None:
            if predict_margin < 0:
                raise TraceError(f"predict_margin={predict_margin} must be 0 or more")
            self._routers = find_routers(model, [(name, m.num_experts) for _, name, m in self.modules])
            if all(r is None for r in self._routers):
                raise TraceError(f"{type(model).__name__}: no router module found next to its experts, so the gate "
                                 "predictor's guesses cannot be recorded; record without predictions")

    def __enter__(self) -> TraceRecorder:
        for pos, (layer, _, module) in enumerate(self.modules):
            self._handles.append(module.register_forward_pre_hook(self._hook(pos, layer), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, pos: int, layer: int):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            values = list(args) + [kwargs[k] for k in ("hidden_states", "top_k_index", "top_k_weights") if k in kwargs]
            hidden, index, weights = values[0], values[1], values[2]  # [T, H], [T, k], [T, k]
            self._experts[layer].append(index.detach().to("cpu", torch.int16))
            self._scores[layer].append(weights.detach().to("cpu", torch.float32))
            if self._routers is not None:
                self._predicted[layer].append(self._predict(pos, hidden.detach(), index.shape[1]))

        return record

    def _predict(self, pos: int, hidden: torch.Tensor, top_k: int) -> torch.Tensor:
        """The gate predictor's experts for the next MoE layer [T, k + margin]; -1 where it has no router."""
        gate = self._gate
        if gate is None or gate.width != top_k + self.predict_margin:
            gate = self._gate = GatePredictor(self._routers, top_k, self.predict_margin, depth=1)
        named = gate.predict_device(pos, hidden).get(pos + 1)
        out = torch.full((hidden.shape[0], gate.width), -1, dtype=torch.int16)
        if named is not None:
            out[:, : named.shape[1]] = named.to("cpu", torch.int16)
        return out

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

        def stacked(parts: dict[int, list[torch.Tensor]]) -> torch.Tensor:  # [T, L, ...]
            return torch.stack([torch.cat(parts[layer]) for layer in self.layers], dim=1)

        experts = stacked(self._experts)
        metadata = {
            "model": model_name or _model_name(self.model),
            "num_experts": str(self.modules[0][2].num_experts),
            "top_k": str(experts.shape[2]),
            "layers": json.dumps(self.layers),
            "source": source,
        }
        predicted = None
        if self._routers is not None:
            predicted = stacked(self._predicted)
            metadata["predicted_by"] = "gate"
        lengths = torch.tensor(sequence_lengths, dtype=torch.int64) if sequence_lengths is not None else None
        ids = token_ids.to(torch.int32) if token_ids is not None else None
        trace = Trace(experts=experts, metadata=metadata, scores=stacked(self._scores), predicted=predicted,
                      token_ids=ids, sequence_lengths=lengths)
        trace.validate("recorded trace")
        return trace


def record_trace(model: nn.Module, batches_of_input_ids: Iterable[torch.Tensor], *, source: str,
                 model_name: str | None = None, predict_margin: int | None = None, max_new_tokens: int = 0,
                 on_batch: Callable[[], None] | None = None) -> Trace:
    """Run each batch through the model and return the routing of every token, in order.

    Each batch is ``[S]`` or ``[B, S]`` token ids (every position is traced, so use equal-length
    rows without padding); each row counts as one sequence. With ``max_new_tokens``, each row is
    instead continued by greedy generation and the trace holds the prompt's tokens and then each
    generated token's decoding step. With ``predict_margin``, the trace also keeps the gate
    predictor's guesses (``Trace.predicted``). ``source`` says where the tokens came from and is
    stored in the metadata. ``on_batch`` is called after each batch (for progress bars).
    """
    device = _input_device(model)
    ids, lengths = [], []
    with TraceRecorder(model, predict_margin=predict_margin) as recorder:
        with torch.inference_mode():
            for batch in batches_of_input_ids:
                batch = torch.as_tensor(batch)
                batch = batch.unsqueeze(0) if batch.dim() == 1 else batch  # [B, S]
                if max_new_tokens > 0:
                    for row in batch:
                        before = recorder.num_tokens
                        out = model.generate(row[None].to(device), max_new_tokens=max_new_tokens, do_sample=False,
                                             pad_token_id=_pad_id(model))
                        fed = recorder.num_tokens - before  # the prompt, then one step per new token but the last
                        ids.append(out[0, :fed].cpu())
                        lengths.append(fed)
                else:
                    model(input_ids=batch.to(device))
                    ids.append(batch.reshape(-1).cpu())
                    lengths.extend([batch.shape[1]] * batch.shape[0])
                if on_batch is not None:
                    on_batch()
        # built outside inference mode, so that the trace's tensors can be edited like any others
        return recorder.trace(source=source, model_name=model_name, token_ids=torch.cat(ids) if ids else None,
                              sequence_lengths=lengths)


def _pad_id(model: nn.Module) -> int | None:
    config = getattr(model, "generation_config", None)
    pad = getattr(config, "pad_token_id", None)
    eos = getattr(config, "eos_token_id", None)
    return pad if pad is not None else (eos[0] if isinstance(eos, list) else eos)


def _experts_modules(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """(layer number, module name, module) of each routed-experts module."""
    offload = getattr(model, "offload", None)
    if offload is not None:
        for layer, module in zip(offload.moe_layers, offload.modules):
            if not getattr(module, "sees_routing", False):
                raise TraceError(
                    f"{layer.where}: its experts are called one at a time by the layer's own forward (or past them, with "
                    "replace_forward=True), so the recorder cannot see the layer's routing; record a model whose "
                    "experts are called with (hidden_states, top_k_index, top_k_weights): fused experts, a "
                    "transformers model, or one from offload_moe.load")
        return [(layer.layer, layer.where, m) for layer, m in zip(offload.moe_layers, offload.modules)]
    return [(layer_number(name, i), name, m) for i, (name, m) in enumerate(find_experts_modules(model))]


def _model_name(model: nn.Module) -> str:
    offload = getattr(model, "offload", None)
    if offload is not None:
        return offload.name
    return str(getattr(model.config, "_name_or_path", "") or model.config.model_type)


def _input_device(model: nn.Module) -> torch.device:
    offload = getattr(model, "offload", None)
    return offload.device if offload is not None else model.get_input_embeddings().weight.device


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file: a ``.jsonl`` file holds one JSON string, or object with a ``prompt`` or
    ``text`` field, per line (for prompts that span lines); any other file holds one prompt per non-empty line."""
    path = Path(path)
    lines = read_text(path, "prompts file", TraceError, limit=PROMPTS_LIMIT).splitlines()
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        item = parse_json(line, f"{path}, line {number}", TraceError)
        text = item if isinstance(item, str) else item.get("prompt", item.get("text")) if isinstance(item, dict) else None
        if not isinstance(text, str):
            raise TraceError(f'{path}, line {number}: expected a JSON string or an object with a "prompt" or "text" string')
        prompts.append(text)
    if not prompts:
        raise TraceError(f"{path} holds no prompts; write one per line (or one JSON string per line in a .jsonl file)")
    return prompts


def record_prompts(model_path: str | Path | None, prompts: list[str], *, source: str, predict_margin: int | None = 1,
                   max_new_tokens: int = 0, on_prompt: Callable[[], None] | None = None, **load_options) -> Trace:
    """Load ``model_path`` (default: the bundled model) with ``load_options`` and record the routing of ``prompts``.

    Each prompt is one sequence: its tokens, then ``max_new_tokens`` greedy decoding steps. The gate
    predictor's guesses are kept with ``predict_margin`` (None: not recorded).
    """
    if not prompts:
        raise TraceError("no prompts to record")
    batches = []

    def tokenize(tokenizer, config) -> None:  # a prompt that cannot be recorded is refused before the model loads
        batches.extend(tokenizer(p, return_tensors="pt").input_ids for p in prompts)  # [1, S] each
        empty = [i for i, b in enumerate(batches) if b.shape[1] == 0]
        if empty:
            raise TraceError(f"prompt {empty[0] + 1} tokenizes to nothing; remove it")

    model, _ = load_with_tokenizer(model_path, before_load=tokenize, **{"progress": False, **load_options})
    try:
        return record_trace(model, batches, source=source, predict_margin=predict_margin,
                            max_new_tokens=max_new_tokens, on_batch=on_prompt)
    finally:
        model.offload.close()


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
    if not 1 <= top_k <= num_experts:
        raise TraceError(f"num_experts={num_experts}, top_k={top_k}: a router chooses 1 to num_experts experts")
    if first_choice:
        return 1 / num_experts
    return 1 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)



# ---------------------------------------------------------------- synthetic traces


def synthesize_trace(*, tokens: int, layers: int, num_experts: int, top_k: int, skew: float = 1.0,
                     locality: float = 0.3, sequences: int = 1, seed: int = 0) -> Trace:
    """A routing trace with controllable popularity skew and temporal locality, for profiling without a model.

    At each layer the experts get Zipf popularities ``1 / rank ** skew`` in a random order per
    layer (``skew=0``: uniform). Each of a token's ``top_k`` choices repeats one of the previous
    token's experts at that layer with probability ``locality``, and is otherwise drawn from
    the popularities; a token's experts are distinct. ``tokens`` are split into ``sequences``
    of near-equal length, and locality does not cross a sequence boundary.
    """
    if min(tokens, layers, num_experts, top_k, sequences) < 1:
        raise TraceError(f"tokens={tokens}, layers={layers}, num_experts={num_experts}, top_k={top_k} and "
                         f"sequences={sequences} must all be at least 1")
    if num_experts > MAX_EXPERTS:
        raise TraceError(f"num_experts={num_experts} is too many: a trace stores expert ids as int16, "
                         f"so at most {MAX_EXPERTS} experts per layer")
    if top_k > num_experts or sequences > tokens:
        raise TraceError(f"top_k={top_k} must not exceed num_experts={num_experts}, nor sequences={sequences} tokens={tokens}")
    if skew < 0 or not 0 <= locality <= 1:
        raise TraceError(f"skew={skew} must be >= 0 and locality={locality} within [0, 1]")
    import numpy as np

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_experts + 1) ** skew
    popularity = np.stack([rng.permutation(weights) for _ in range(layers)])  # [L, E]
    popularity /= popularity.sum(-1, keepdims=True)
    lengths = [tokens // sequences + (i < tokens % sequences) for i in range(sequences)]
    starts = set(np.cumsum([0, *lengths[:-1]]).tolist())
    out = np.empty((tokens, layers, top_k), dtype=np.int16)
    fresh = _draw_without_replacement(rng, popularity, tokens, top_k)  # [T, L, k], what no repeat would choose
    repeat = rng.random((tokens, layers, top_k)) < locality
    pick = rng.integers(0, top_k, (tokens, layers, top_k))
    for t in range(tokens):
        if t in starts:
            out[t] = fresh[t]
            continue
        for layer in range(layers):
            chosen: list[int] = []
            previous = out[t - 1, layer]
            for j in range(top_k):
                expert = int(previous[pick[t, layer, j]]) if repeat[t, layer, j] else int(fresh[t, layer, j])
                if expert in chosen:  # already taken: the next unused fresh draw, else any unused expert
                    expert = next((int(e) for e in fresh[t, layer] if int(e) not in chosen),
                                  next(e for e in range(num_experts) if e not in chosen))
                chosen.append(expert)
            out[t, layer] = chosen
    metadata = {
        "model": "synthetic",
        "num_experts": str(num_experts),
        "top_k": str(top_k),
        "layers": json.dumps(list(range(layers))),
        "source": f"offload_moe.traces.synthesize_trace(skew={skew}, locality={locality}, seed={seed})",
    }
    trace = Trace(experts=torch.from_numpy(out), metadata=metadata,
                  sequence_lengths=torch.tensor(lengths, dtype=torch.int64))
    trace.validate("synthetic trace")
    return trace


def _draw_without_replacement(rng, popularity, tokens: int, top_k: int):
    """``[T, L, k]`` distinct experts per (token, layer), drawn in order from ``popularity`` [L, E] (Gumbel top-k)."""
    import numpy as np

    out = np.empty((tokens, popularity.shape[0], top_k), dtype=np.int16)
    chunk = max(1, 2**22 // popularity.size)  # tokens at a time: a few tens of MB of noise, whatever the trace size
    log_popularity = np.log(popularity)[None]
    for start in range(0, tokens, chunk):
        n = min(chunk, tokens - start)
        keys = log_popularity - np.log(-np.log(rng.random((n, *popularity.shape))))  # [n, L, E], Gumbel-perturbed
        out[start:start + n] = np.argsort(-keys, axis=-1)[..., :top_k]
    return out
