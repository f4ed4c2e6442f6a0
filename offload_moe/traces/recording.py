"""Recording traces: hooks on a model's experts modules that keep each token's routing, and the prompts to run.

    model = offload_moe.load(folder, cache_experts=32)
    trace = record_trace(model, [input_ids], source="held-out stdlib files")
    path = record_trace_file(model, batches, "long.safetensors", source="...")  # written in parts as it goes
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from ..errors import TraceError
from ..experts import find_experts_modules, layer_number
from ..files import parse_json, read_text
from ..generation import load_with_tokenizer
from ..prefetch import GatePredictor
from ..routing import find_routers
from .format import Trace
from .parts import TraceParts

PROMPTS_LIMIT = 64 * 2**20  # bytes of a prompts file
RECORD_CHUNK_TOKENS = 1024  # tokens a chunked recording keeps in memory before it writes them as a part


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

    def take(self, **trace_options) -> Trace:
        """``trace(**trace_options)``, and what was recorded is let go: the next call starts from here."""
        trace = self.trace(**trace_options)
        for kept in (self._experts, self._scores, self._predicted):
            for calls in kept.values():
                calls.clear()
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
    ids, lengths = [], []
    with TraceRecorder(model, predict_margin=predict_margin) as recorder:
        for sequence_ids, sequence_lengths in _sequences(model, recorder, batches_of_input_ids, max_new_tokens, on_batch):
            ids.append(sequence_ids)
            lengths.extend(sequence_lengths)
        # built outside inference mode, so that the trace's tensors can be edited like any others
        return recorder.trace(source=source, model_name=model_name, token_ids=torch.cat(ids) if ids else None,
                              sequence_lengths=lengths)


def record_trace_file(model: nn.Module, batches_of_input_ids: Iterable[torch.Tensor], out: str | Path, *, source: str,
                      chunk_tokens: int = RECORD_CHUNK_TOKENS, model_name: str | None = None,
                      predict_margin: int | None = None, max_new_tokens: int = 0,
                      on_batch: Callable[[], None] | None = None) -> Path:
    """``record_trace``, written to the trace file ``out`` as it goes: memory holds ``chunk_tokens`` tokens (and
    one batch, or one prompt and its generated tokens), however long the recording.

    Once ``chunk_tokens`` or more are recorded, at the end of a batch (or of a prompt's generation), they
    are written as a part into ``PATH.parts`` (``traces.parts``); at the end the parts are joined into
    ``out``, which then holds what ``save_trace(record_trace(...), out)`` would, and the folder goes. Killed
    or failing midway, the recording leaves the parts folder, a valid trace of every part written, which
    ``load_trace`` and ``offload-moe profile --trace`` read; a folder left by an earlier recording to ``out``
    is refused, never written over. Returns ``out``.
    """
    if chunk_tokens < 1:
        raise TraceError(f"chunk_tokens={chunk_tokens}: a part of the recording holds at least one token")
    parts = TraceParts(out)
    ids, lengths = [], []
    with TraceRecorder(model, predict_margin=predict_margin) as recorder:
        def write_part() -> None:
            parts.append(recorder.take(source=source, model_name=model_name, token_ids=torch.cat(ids),
                                       sequence_lengths=lengths))
            ids.clear()
            lengths.clear()

        for sequence_ids, sequence_lengths in _sequences(model, recorder, batches_of_input_ids, max_new_tokens, on_batch):
            ids.append(sequence_ids)
            lengths.extend(sequence_lengths)
            if recorder.num_tokens >= chunk_tokens:
                write_part()
        if lengths:
            write_part()
    return parts.finish()


def _sequences(model: nn.Module, recorder: TraceRecorder, batches_of_input_ids: Iterable[torch.Tensor],
               max_new_tokens: int, on_batch: Callable[[], None] | None) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Run each batch through the model inside ``recorder``; yields, as each is recorded, the token ids fed [n]
    and the lengths of the sequences they make: a batch's rows, or a prompt and its generated tokens."""
    device = _input_device(model)
    for batch in batches_of_input_ids:
        batch = torch.as_tensor(batch)
        batch = batch.unsqueeze(0) if batch.dim() == 1 else batch  # [B, S]
        if max_new_tokens > 0:
            for row in batch:
                before = recorder.num_tokens
                with torch.inference_mode():
                    out = model.generate(row[None].to(device), max_new_tokens=max_new_tokens, do_sample=False,
                                         pad_token_id=_pad_id(model))
                fed = recorder.num_tokens - before  # the prompt, then one step per new token but the last
                yield out[0, :fed].cpu(), [fed]
        else:
            with torch.inference_mode():
                model(input_ids=batch.to(device))
            yield batch.reshape(-1).cpu(), [batch.shape[1]] * batch.shape[0]
        if on_batch is not None:
            on_batch()


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
    model, batches = _loaded(model_path, prompts, load_options)
    try:
        return record_trace(model, batches, source=source, predict_margin=predict_margin,
                            max_new_tokens=max_new_tokens, on_batch=on_prompt)
    finally:
        model.offload.close()


def record_prompts_file(model_path: str | Path | None, prompts: list[str], out: str | Path, *, source: str,
                        chunk_tokens: int = RECORD_CHUNK_TOKENS, predict_margin: int | None = 1, max_new_tokens: int = 0,
                        on_prompt: Callable[[], None] | None = None, **load_options) -> Path:
    """``record_prompts``, written to the trace file ``out`` in parts as it goes (``record_trace_file``); returns ``out``."""
    TraceParts(out)  # an earlier recording's parts folder is refused before the model loads (minutes, for a large one)
    model, batches = _loaded(model_path, prompts, load_options)
    try:
        return record_trace_file(model, batches, out, source=source, chunk_tokens=chunk_tokens,
                                 predict_margin=predict_margin, max_new_tokens=max_new_tokens, on_batch=on_prompt)
    finally:
        model.offload.close()


def _loaded(model_path: str | Path | None, prompts: list[str], load_options: dict) -> tuple[nn.Module, list[torch.Tensor]]:
    """The model at ``model_path`` loaded with ``load_options``, and ``prompts`` tokenized by its tokenizer [1, S] each."""
    if not prompts:
        raise TraceError("no prompts to record")
    batches = []

    def tokenize(tokenizer, config) -> None:  # a prompt that cannot be recorded is refused before the model loads
        batches.extend(tokenizer(p, return_tensors="pt").input_ids for p in prompts)  # [1, S] each
        empty = [i for i, b in enumerate(batches) if b.shape[1] == 0]
        if empty:
            raise TraceError(f"prompt {empty[0] + 1} tokenizes to nothing; remove it")

    model, _ = load_with_tokenizer(model_path, before_load=tokenize, **{"progress": False, **load_options})
    return model, batches
