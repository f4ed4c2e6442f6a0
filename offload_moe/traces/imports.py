"""Traces from serving engines: the routed experts vLLM and SGLang return with each response, as a ``Trace``.

Both engines, started with ``--enable-return-routed-experts``, hand back the experts each token was routed
to in the layout a trace already uses, ``[tokens, layers, top_k]``:

- vLLM: ``prompt_routed_experts`` on the response (the prompt's tokens) and ``routed_experts`` on each choice
  (the generated tokens), as nested JSON lists of int16 ids (v0.21's documentation); a string there is read
  as base64 ``.npy`` bytes (later versions; not confirmed from their documentation);
- SGLang: ``meta_info["routed_experts"]`` on a ``/generate`` response, when the request asked
  ``return_routed_experts``: base64 bytes of a flat int32 array (or the dtype ``meta_info["routed_experts_dtype"]``
  names) of logical shape ``[tokens, layers, top_k]``; the number of layers and top_k are not in the payload.

A saved file is JSON lines, one response (or a JSON list of responses) a line, read one line at a time so
a large file costs the trace's own memory and one line's; or ``.npy``/``.npz`` arrays a script saved (each
array one sequence). Each response's prompt and generated tokens are one sequence of the trace.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import re
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import TraceError
from ..files import open_regular, parse_json
from .format import MAX_EXPERTS, MAX_LAYER, Trace

ENGINES = ("vllm", "sglang")
LINE_LIMIT = 1 << 30  # bytes of one JSON line: a response of a million tokens x 64 layers x top-8 is about 1 GB
WIRE_DTYPES = ("int8", "uint8", "int16", "uint16", "int32", "int64")  # what SGLang's routed_experts_dtype may name
NPY_MAGIC = b"\x93NUMPY"


def import_routing(path: str | Path, *, engine: str, num_experts: int, top_k: int | None = None,
                   num_layers: int | None = None, layers: Sequence[int] | None = None,
                   model: str | None = None) -> Trace:
    """The routing a serving ``engine`` (``vllm`` or ``sglang``) returned, saved at ``path``, as a ``Trace``.

    ``num_experts`` (experts per layer) is not in any response and must be given. SGLang's payload is flat,
    so it needs ``num_layers`` (the layer slots of its payload) and ``top_k``; vLLM's arrays carry both,
    which are checked against these when given. Layer slots that are -1 for every token (SGLang's
    placeholder for a layer without routed experts) are left out. ``layers``: the model's layer numbers of
    the slots kept (default: the slot numbers). ``model``: the metadata's model name (default: the
    responses' ``model`` field).
    """
    path = Path(path)
    engine = engine.lower()
    if engine not in ENGINES:
        raise TraceError(f"--from {engine!r} is not a serving engine offload_moe reads; use one of {', '.join(ENGINES)}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise TraceError(f"num_experts={num_experts} must be from 1 to {MAX_EXPERTS} (a trace stores expert ids as int16)")
    if engine == "sglang" and (num_layers is None or top_k is None):
        raise TraceError("SGLang returns each response's experts as one flat array: give the model's number of layer "
                         "slots (--num-layers) and experts per token (--top-k) to shape it")
    shape = _Shape(num_experts, top_k, num_layers)
    chunks: list[np.ndarray] = []  # int16 [T_i, L, k], one per sequence
    names: set[str] = set()
    for where, rows, name in _sequences(path, engine, shape):
        chunks.append(shape.checked(rows, where))
        if name:
            names.add(name)
    if not chunks:
        raise TraceError(f"{path} holds no responses with routed experts; save one API response per line "
                         f"(JSON lines) from a server started with --enable-return-routed-experts")
    kept = shape.kept
    if layers is None:
        layers = kept
    elif len(layers) != len(kept):
        raise TraceError(f"--layers names {len(layers)} layers but the responses route {len(kept)} "
                         f"(layer slots {_span(kept)}); give one model layer number per routed layer")
    experts = torch.from_numpy(np.concatenate(chunks))
    metadata = {
        "model": model or (names.pop() if len(names) == 1 else "unknown"),
        "num_experts": str(num_experts),
        "top_k": str(experts.shape[2]),
        "layers": json.dumps([int(x) for x in layers]),
        "source": f"{len(chunks)} sequences of {engine} responses from {path.name}",
        "imported_from": engine,
    }
    lengths = torch.tensor([len(c) for c in chunks], dtype=torch.int64)
    trace = Trace(experts=experts, metadata=metadata, sequence_lengths=lengths)
    trace.validate(path)
    return trace


def parse_layers(text: str) -> list[int]:
    """``"0-47"``, ``"1,3,5"`` or a mix (``"0,2-5"``) as a list of layer numbers."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        match = re.fullmatch(r"(\d{1,10})(?:\s*-\s*(\d{1,10}))?", part)
        if match is None:
            raise TraceError(f"--layers {part!r} is neither a layer number (3) nor a range (0-47)")
        low = int(match[1])
        high = int(match[2]) if match[2] is not None else low
        if high < low or high > MAX_LAYER:
            raise TraceError(f"--layers {part!r} is not a range of layer numbers 0..{MAX_LAYER} from low to high")
        out += range(low, high + 1)
    if not out:
        raise TraceError("--layers is empty; e.g. --layers 0-47 or --layers 1,3,5")
    return out


class _Shape:
    """What every sequence must agree on: layer slots, top_k, which slots carry no routing; ids in range."""

    def __init__(self, num_experts: int, top_k: int | None, num_layers: int | None):
        self.num_experts, self.top_k, self.num_layers = num_experts, top_k, num_layers
        self.empty: list[int] | None = None  # slots that are -1 for every token: no routed experts there

    @property
    def kept(self) -> list[int]:
        return [s for s in range(self.num_layers) if s not in self.empty]

    def checked(self, rows: np.ndarray, where: str) -> np.ndarray:
        """``rows`` [T, slots, k] as int16 [T, L, k] without the empty slots, once its shape and ids are checked."""
        if rows.ndim != 3 or 0 in rows.shape:
            raise TraceError(f"{where}: routed experts have shape {list(rows.shape)}; expected "
                             "[tokens, layers, top_k] with none of them 0")
        if not np.issubdtype(rows.dtype, np.integer):
            raise TraceError(f"{where}: routed experts are {rows.dtype}, not whole expert ids")
        _, slots, k = rows.shape
        for what, option, value, seen in (("layer slots", "--num-layers", self.num_layers, slots),
                                          ("experts per token", "--top-k", self.top_k, k)):
            if value is not None and value != seen:
                raise TraceError(f"{where}: {seen} {what}, where {value} were expected ({option}, or the first "
                                 "response); every response must come from the same model")
        self.num_layers, self.top_k = slots, k
        empty = [s for s in range(slots) if bool((rows[:, s] == -1).all())]
        if self.empty is None:
            if len(empty) == slots:
                raise TraceError(f"{where}: every expert id is -1 (no routed experts at any layer)")
            self.empty = empty
        elif empty != self.empty:
            raise TraceError(f"{where}: layer slots {empty} carry no routed experts where earlier responses had "
                             f"{self.empty}; every response must come from the same model")
        kept = rows[:, self.kept]
        low, high = int(kept.min()), int(kept.max())
        if low < 0 or high >= self.num_experts:
            bad = low if low < 0 else high
            token, pos, _ = (int(i[0]) for i in np.nonzero(kept == bad))
            raise TraceError(f"{where}: expert id {bad} at token {token}, layer slot {self.kept[pos]} is outside "
                             f"0..{self.num_experts - 1} (--num-experts {self.num_experts})")
        return kept.astype(np.int16)


def _sequences(path: Path, engine: str, shape: _Shape) -> Iterator[tuple[str, np.ndarray, str | None]]:
    """(where, routed experts [T, slots, k] of one sequence, the model named) for each sequence in the file."""
    if path.suffix in (".npy", ".npz"):
        yield from _saved_arrays(path, shape)
        return
    with open_regular(path, "responses file", TraceError) as f:
        number = 0
        while True:
            line = f.readline(LINE_LIMIT + 1)
            if not line:
                return
            number += 1
            where = f"{path}, line {number}"
            if len(line) > LINE_LIMIT:
                raise TraceError(f"{where} is longer than {LINE_LIMIT:,} bytes; save one response a line")
            if not line.strip():
                continue
            item = parse_json(line, where, TraceError)
            responses = item if isinstance(item, list) else [item]
            for i, response in enumerate(responses):
                here = where if len(responses) == 1 else f"{where}, response {i}"
                if not isinstance(response, dict):
                    raise TraceError(f"{here}: expected a JSON object (an API response), got {type(response).__name__}")
                reader = _vllm_sequences if engine == "vllm" else _sglang_sequences
                for rows_where, rows in reader(response, here, shape):
                    yield rows_where, rows, response.get("model") if isinstance(response.get("model"), str) else None


def _vllm_sequences(response: dict, where: str, shape: _Shape) -> Iterator[tuple[str, np.ndarray]]:
    """The prompt's rows, then each choice's generated rows; the first choice continues the prompt's sequence,
    each further choice (n > 1) is a sequence of its own."""
    prompt = response.get("prompt_routed_experts")
    choices = response.get("choices", response.get("outputs"))
    if choices is not None and not isinstance(choices, list):
        raise TraceError(f"{where}: 'choices' is {type(choices).__name__}, not a list")
    generated = []
    for i, choice in enumerate(choices or []):
        value = choice.get("routed_experts") if isinstance(choice, dict) else None
        if value is not None:
            generated.append((f"{where}, choices[{i}].routed_experts", _vllm_array(value, f"{where}, choices[{i}].routed_experts")))
    if prompt is None and not generated:
        raise TraceError(f"{where}: no 'prompt_routed_experts' and no 'routed_experts' in its choices; start vLLM "
                         "with --enable-return-routed-experts and save its whole responses")
    rows = _vllm_array(prompt, f"{where}, prompt_routed_experts") if prompt is not None else None
    if generated:
        first_where, first = generated[0]
        yield first_where, first if rows is None else _joined(rows, first, where)
        yield from generated[1:]
    else:
        yield f"{where}, prompt_routed_experts", rows


def _joined(prompt: np.ndarray, generated: np.ndarray, where: str) -> np.ndarray:
    if prompt.ndim != 3 or generated.ndim != 3 or prompt.shape[1:] != generated.shape[1:]:
        raise TraceError(f"{where}: prompt_routed_experts {list(prompt.shape)} and routed_experts {list(generated.shape)} "
                         "differ in layers or top_k; both are [tokens, layers, top_k]")
    return np.concatenate([prompt, generated])


def _vllm_array(value: object, where: str) -> np.ndarray:
    """Nested lists [T][L][k], or a base64 string of ``.npy`` bytes."""
    if isinstance(value, str):
        array = _npy(_base64(value, where), where)
        return array[0] if array.ndim == 4 and array.shape[0] == 1 else array  # a batch of one
    if not isinstance(value, list):
        raise TraceError(f"{where} is {type(value).__name__}; expected nested lists [tokens][layers][top_k] of expert ids")
    try:
        array = np.asarray(value)
    except ValueError:
        array = None
    if array is None or array.dtype == object or (array.size and not np.issubdtype(array.dtype, np.integer)):
        raise TraceError(f"{where} is not a regular [tokens][layers][top_k] array of whole expert ids "
                         "(rows of different lengths, or values that are not integers)")
    return array


def _sglang_sequences(response: dict, where: str, shape: _Shape) -> Iterator[tuple[str, np.ndarray]]:
    meta = response.get("meta_info")
    if not isinstance(meta, dict):
        raise TraceError(f"{where}: no 'meta_info' object; save SGLang's /generate responses whole (the routed "
                         "experts are in meta_info.routed_experts)")
    payload = meta.get("routed_experts")
    here = f"{where}, meta_info.routed_experts"
    if payload is None:
        raise TraceError(f"{here} is missing; start SGLang with --enable-return-routed-experts and send "
                         "\"return_routed_experts\": true with each request")
    if isinstance(payload, list):
        flat = _vllm_array(payload, here).reshape(-1)
    elif isinstance(payload, str):
        dtype = meta.get("routed_experts_dtype", "int32")
        if dtype not in WIRE_DTYPES:
            raise TraceError(f"{where}, meta_info.routed_experts_dtype {dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
        data = _base64(payload, here)
        if len(data) % np.dtype(dtype).itemsize:
            raise TraceError(f"{here} holds {len(data)} bytes, not a whole number of {dtype} ids")
        flat = np.frombuffer(data, dtype=dtype)
    else:
        raise TraceError(f"{here} is {type(payload).__name__}; expected a base64 string of int32 expert ids")
    per_token = shape.num_layers * shape.top_k
    if flat.size % per_token:
        raise TraceError(f"{here} holds {flat.size} expert ids, not a whole number of tokens of "
                         f"{shape.num_layers} layers x top-{shape.top_k} ({per_token} a token); check --num-layers and --top-k")
    yield here, flat.reshape(-1, shape.num_layers, shape.top_k)


def _saved_arrays(path: Path, shape: _Shape) -> Iterator[tuple[str, np.ndarray, None]]:
    """Each array of a ``.npy`` or ``.npz`` file: [T, L, k], or [T, L * k] or flat with --num-layers and --top-k."""
    with open_regular(path, "arrays file", TraceError) as f:
        try:
            loaded = np.load(f, allow_pickle=False)
            arrays = ([(path.name, loaded)] if isinstance(loaded, np.ndarray)
                      else [(f"{path}[{name!r}]", loaded[name]) for name in loaded.files])
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
            raise TraceError(f"{path} is not a readable .npy/.npz file of integer arrays ({e})") from None
    for where, array in arrays:
        if array.ndim != 3:
            if shape.num_layers is None or shape.top_k is None:
                raise TraceError(f"{where} has shape {list(array.shape)}; give --num-layers and --top-k to read it "
                                 "as [tokens, layers, top_k]")
            per_token = shape.num_layers * shape.top_k
            if array.size % per_token:
                raise TraceError(f"{where} holds {array.size} ids, not a whole number of tokens of {per_token}")
            array = array.reshape(-1, shape.num_layers, shape.top_k)
        yield where, array, None


def _base64(text: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise TraceError(f"{where} is not valid base64 ({e})") from None


def _npy(data: bytes, where: str) -> np.ndarray:
    if not data.startswith(NPY_MAGIC):
        raise TraceError(f"{where} is a string but not base64 .npy bytes; expected nested lists or base64 .npy")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise TraceError(f"{where} holds unreadable .npy bytes ({e})") from None


def _span(slots: list[int]) -> str:
    return f"{slots[0]}-{slots[-1]}" if slots == list(range(slots[0], slots[-1] + 1)) else ",".join(map(str, slots))
