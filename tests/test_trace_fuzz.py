"""Fuzzed trace files: random metadata, tensors and headers either load (and then summarise and replay)
or raise TraceError, never another exception, and each within a time limit."""

from __future__ import annotations

import json
import struct
import tempfile
import time
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from typer.testing import CliRunner

from offload_moe.cli import app
from offload_moe.profiling import default_predictors, sweep, write_results
from offload_moe.traces import TraceError, expert_usage_entropy, load_trace, random_repeat_rate, repeat_rate

SECONDS_PER_EXAMPLE = 10  # generous for a shared CPU; a hang or a huge allocation takes far longer
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])

numbers = st.one_of(
    st.integers(-3, 40).map(str),
    st.sampled_from(["1000000000", "1e30", "-1", "0", "True", "false", "null", " 4", "+4", "4_0", "\u0664", "32767",
                     "32768", "9" * 5000, "4.0", "nan", "inf", ""]),
    st.text(max_size=8),
)
layer_lists = st.one_of(
    st.lists(st.integers(-2, 6), max_size=5).map(json.dumps),
    st.lists(st.one_of(st.integers(-2**70, 2**70), st.floats(allow_nan=False), st.booleans(), st.none(), st.text(max_size=3)),
             max_size=4).map(json.dumps),
    st.sampled_from(["[]", "{}", "3", '"[0]"', "[" * 5000, "[1e400]", "[0, " + "9" * 5000 + "]", "not json", "[NaN]"]),
    st.text(max_size=10),
)
metadata = st.fixed_dictionaries(
    {},
    optional={"model": st.text(max_size=5), "source": st.text(max_size=5), "num_experts": numbers, "top_k": numbers,
              "layers": layer_lists, "predicted_by": st.just("gate"), "format": st.text(max_size=3)},
)
DTYPES = [torch.int16, torch.int16, torch.int16, torch.int32, torch.int64, torch.float32, torch.uint8, torch.bool]


@st.composite
def tensors(draw, dtypes=DTYPES, max_rank=4):
    dtype = draw(st.sampled_from(dtypes))
    shape = draw(st.lists(st.integers(0, 5), min_size=1, max_size=max_rank))
    count = 1
    for n in shape:
        count *= n
    if dtype == torch.bool:
        values = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    elif dtype.is_floating_point:
        values = draw(st.lists(st.floats(width=32), min_size=count, max_size=count))
    else:
        info = torch.iinfo(dtype)
        values = draw(st.lists(st.one_of(st.integers(-2, 9), st.integers(info.min, info.max)), min_size=count,
                               max_size=count))
    return torch.tensor(values, dtype=dtype).reshape(shape)


trace_tensors = st.fixed_dictionaries(
    {"experts": tensors()},
    optional={"scores": tensors(), "predicted": tensors(), "token_ids": tensors(max_rank=2),
              "sequence_lengths": tensors(dtypes=[torch.int64], max_rank=1), "extra": tensors()},
)


def use(trace, folder: Path) -> None:
    """What `profile` does with a loaded trace."""
    expert_usage_entropy(trace)
    repeat_rate(trace), repeat_rate(trace, first_choice=False)
    random_repeat_rate(trace.num_experts, trace.top_k)
    trace.first(1)
    results = sweep(trace, policies=["lru", "belady"], capacities=[trace.top_k, trace.top_k + 3],
                    predictors=default_predictors(trace))
    write_results(results, trace, folder / "results", plots=False)


def loads_or_trace_error(path: Path) -> None:
    start = time.perf_counter()
    try:
        trace = load_trace(path)
    except TraceError as e:
        assert str(path) in str(e)
    else:
        use(trace, path.parent)
        shown = CliRunner().invoke(app, ["trace", "show", str(path)])  # the summary a user sees
        assert shown.exit_code == 0, shown.output
    assert time.perf_counter() - start < SECONDS_PER_EXAMPLE


@FUZZ
@given(tensors=trace_tensors, meta=metadata)
def test_random_trace_files_load_or_raise_trace_error(tensors, meta):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.safetensors"
        save_file(tensors, path, metadata=meta)
        loads_or_trace_error(path)


@st.composite
def plausible(draw):
    """A valid trace's tensors and metadata, with at most one field made bad, so that every check is reached
    and the loaded traces are summarised and replayed too."""
    tokens, layers, top_k = draw(st.integers(1, 6)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    num_experts = draw(st.integers(top_k, 12))
    count = tokens * layers * top_k
    ids = draw(st.lists(st.integers(0, num_experts - 1), min_size=count, max_size=count))
    tensors = {"experts": torch.tensor(ids, dtype=torch.int16).view(tokens, layers, top_k)}
    cuts = sorted(draw(st.sets(st.integers(1, tokens - 1), max_size=3))) if tokens > 1 else []
    lengths = [b - a for a, b in zip([0, *cuts], [*cuts, tokens])]
    meta = {"model": "m", "source": "s", "num_experts": str(num_experts), "top_k": str(top_k),
            "layers": json.dumps(draw(st.permutations(range(layers))))}
    if draw(st.booleans()):
        margin = draw(st.integers(0, 2))
        guesses = draw(st.lists(st.integers(-1, num_experts - 1), min_size=tokens * layers * (top_k + margin),
                                max_size=tokens * layers * (top_k + margin)))
        tensors["predicted"] = torch.tensor(guesses, dtype=torch.int16).view(tokens, layers, top_k + margin)
        meta["predicted_by"] = "gate"
    bad = draw(st.sampled_from([None, None, "num_experts", "top_k", "layers", "sequence_lengths", "experts"]))
    if bad in ("num_experts", "top_k"):
        meta[bad] = draw(numbers)
    elif bad == "layers":
        meta[bad] = draw(layer_lists)
    elif bad == "sequence_lengths":
        lengths = draw(st.lists(st.integers(-2**63, 2**63 - 1), max_size=4))
    elif bad == "experts":
        tensors["experts"] = tensors["experts"].flatten().clone()
        tensors["experts"][draw(st.integers(0, count - 1))] = draw(st.integers(-2**15, 2**15 - 1))
        tensors["experts"] = tensors["experts"].view(tokens, layers, top_k)
    if lengths or bad == "sequence_lengths":
        tensors["sequence_lengths"] = torch.tensor(lengths, dtype=torch.int64)
    return tensors, meta


@FUZZ
@given(case=plausible())
def test_plausible_traces_with_one_bad_number_load_or_raise_trace_error(case):
    tensors, meta = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.safetensors"
        save_file(tensors, path, metadata=meta)
        loads_or_trace_error(path)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False), st.text(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=5), inner, max_size=4)),
    max_leaves=12,
)
headers = st.fixed_dictionaries(
    {"experts": st.one_of(
        st.fixed_dictionaries({"dtype": st.sampled_from(["I16", "I32", "F32", "BOOL", "I8", "banana"]),
                               "shape": st.lists(st.one_of(st.integers(0, 4), st.integers(-1, 2**64)), max_size=4),
                               "data_offsets": st.lists(st.integers(-1, 2**64), min_size=0, max_size=3)}),
        json_values)},
    optional={"__metadata__": json_values},
)


@FUZZ
@given(header=headers, data=st.binary(max_size=64))
def test_random_headers_load_or_raise_trace_error(header, data):
    raw = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        loads_or_trace_error(path)


@FUZZ
@given(data=st.binary(max_size=64))
def test_random_bytes_load_or_raise_trace_error(data):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.safetensors"
        path.write_bytes(data)
        loads_or_trace_error(path)
