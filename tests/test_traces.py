"""Routing traces: file round trip, validation errors, recording against transformers' own router, summaries."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import offload_moe
from offload_moe.traces import (
    Trace,
    TraceError,
    expert_usage_entropy,
    load_trace,
    random_repeat_rate,
    record_trace,
    repeat_rate,
    save_trace,
)


def make_trace(tokens: int = 10, layers=(0, 1, 2), num_experts: int = 4, top_k: int = 2, seed: int = 0) -> Trace:
    g = torch.Generator().manual_seed(seed)
    experts = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens * len(layers))])
    return Trace(
        experts=experts.view(tokens, len(layers), top_k).to(torch.int16),
        scores=torch.rand(tokens, len(layers), top_k, generator=g),
        token_ids=torch.arange(tokens, dtype=torch.int32),
        sequence_lengths=torch.tensor([tokens - 3, 3]),
        metadata={"model": "tiny", "num_experts": str(num_experts), "top_k": str(top_k),
                  "layers": json.dumps(list(layers)), "source": "unit test"},
    )


def test_round_trip_keeps_tensors_and_metadata(tmp_path):
    trace = make_trace()
    path = save_trace(trace, tmp_path / "sub" / "t.safetensors")
    back = load_trace(path)
    for name in ("experts", "scores", "token_ids", "sequence_lengths"):
        assert torch.equal(getattr(back, name), getattr(trace, name)), name
    assert back.metadata == trace.metadata
    assert (back.num_tokens, back.num_experts, back.top_k, back.layers) == (10, 4, 2, [0, 1, 2])
    assert back.sequences() == [(0, 7), (7, 10)]
    assert [p.name for p in path.parent.iterdir()] == ["t.safetensors"]  # no temp file left behind


def test_round_trip_without_optional_tensors(tmp_path):
    trace = make_trace()
    trace.scores = trace.token_ids = trace.sequence_lengths = None
    back = load_trace(save_trace(trace, tmp_path / "t.safetensors"))
    assert torch.equal(back.experts, trace.experts)
    assert back.scores is None and back.token_ids is None and back.sequences() == [(0, 10)]


def test_failed_save_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = save_trace(make_trace(seed=1), tmp_path / "t.safetensors")
    before = path.read_bytes()

    def broken(fd):  # the new bytes are in the temporary file when the disk fills up
        raise OSError("disk full")

    monkeypatch.setattr("offload_moe.atomic.os.fsync", broken)
    with pytest.raises(OSError, match="disk full"):
        save_trace(make_trace(seed=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


def write_raw(path, tensors, metadata):
    save_file(tensors, path, metadata=metadata)
    return path


GOOD_META = {"model": "tiny", "num_experts": "4", "top_k": "2", "layers": "[0, 1, 2]", "source": "test"}


@pytest.mark.parametrize("tensors, metadata, message", [
    ({"scores": torch.zeros(2, 3, 2)}, GOOD_META, "no 'experts' tensor"),
    ({"experts": torch.zeros(2, 3, 2, dtype=torch.int32)}, GOOD_META, "'experts' is int32"),
    ({"experts": torch.zeros(2, 3, dtype=torch.int16)}, GOOD_META, "with 2 dimension"),
    ({"experts": torch.full((2, 3, 2), 4, dtype=torch.int16)}, GOOD_META, "expert id 4, outside 0..3"),
    ({"experts": torch.full((2, 3, 2), -1, dtype=torch.int16)}, GOOD_META, "expert id -1"),
    ({"experts": torch.zeros(2, 3, 2, dtype=torch.int16)}, {**GOOD_META, "layers": "[0, 1]"}, "metadata says 2 layers"),
    ({"experts": torch.zeros(2, 3, 2, dtype=torch.int16)}, {k: v for k, v in GOOD_META.items() if k != "source"},
     "metadata lacks source"),
    ({"experts": torch.zeros(2, 3, 2, dtype=torch.int16)}, {**GOOD_META, "num_experts": "four"}, "num_experts='four' must be a whole number"),
    ({"experts": torch.zeros(2, 3, 2, dtype=torch.int16), "scores": torch.zeros(2, 3, 1)}, GOOD_META, "'scores' has shape"),
    ({"experts": torch.zeros(2, 3, 2, dtype=torch.int16), "sequence_lengths": torch.tensor([3])}, GOOD_META,
     "sum to the 2 traced tokens"),
])
def test_load_rejects_malformed_files(tmp_path, tensors, metadata, message):
    path = write_raw(tmp_path / "bad.safetensors", tensors, metadata)
    with pytest.raises(TraceError, match=message) as info:
        load_trace(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, offload_moe.OffloadMoEError)


EXPERTS = torch.zeros(2, 3, 2, dtype=torch.int16)


@pytest.mark.parametrize("field, value, message", [
    ("num_experts", "1000000000", "num_experts='1000000000' must be a whole number from 1 to 32767"),
    ("num_experts", "40000", "num_experts='40000' must be a whole number from 1 to 32767"),
    ("num_experts", "1e30", "num_experts='1e30' must be a whole number"),
    ("num_experts", "-4", "num_experts='-4' must be a whole number"),
    ("num_experts", "0", "num_experts='0' must be a whole number"),
    ("num_experts", "True", "num_experts='True' must be a whole number"),
    ("num_experts", "\u0664", "num_experts=.* must be a whole number"),  # an Arabic-Indic 4, which int() accepts
    ("num_experts", "9" * 5000, r"num_experts='9999.*\(5000 characters\) must be a whole number"),
    ("top_k", "5", "top_k='5' must be a whole number from 1 to 4"),
    ("layers", "[]", "layers='\\[\\]'; it must be a non-empty JSON list"),
    ("layers", "[0, 0, 1]", "distinct layer numbers"),
    ("layers", "[-1, 0, 1]", "distinct layer numbers"),
    ("layers", "[true, 1, 2]", "distinct layer numbers"),
    ("layers", "[0, 1, 2.0]", "distinct layer numbers"),
    ("layers", "[0, 1, 1e400]", "distinct layer numbers"),
    ("layers", "[0, 1, 99999999999]", "distinct layer numbers 0..2147483647"),
    ("layers", '{"0": 1}', "non-empty JSON list"),
    ("layers", "[" * 100_000, "metadata 'layers' nests JSON too deeply"),
    ("layers", "[0, 1, " + "9" * 5000 + "]", "metadata 'layers' cannot be parsed"),
])
def test_load_rejects_metadata_out_of_bounds(tmp_path, field, value, message):
    path = write_raw(tmp_path / "bad.safetensors", {"experts": EXPERTS}, {**GOOD_META, field: value})
    with pytest.raises(TraceError, match=message) as info:
        load_trace(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("tensors, message", [
    ({"experts": torch.zeros(0, 3, 2, dtype=torch.int16)}, "holds no tokens"),
    # each length is far too long, and their int64 sum wraps around to exactly the 4 traced tokens
    ({"experts": torch.zeros(4, 3, 2, dtype=torch.int16), "sequence_lengths": torch.tensor([2**62, 2**62, 2**62, 2**62 + 4])},
     "'sequence_lengths' must be positive and sum to the 4 traced tokens"),
    ({"experts": EXPERTS, "sequence_lengths": torch.tensor([5, -3])}, "'sequence_lengths' must be positive"),
    ({"experts": EXPERTS, "sequence_lengths": torch.tensor([1, 1, 0])}, "'sequence_lengths' must be positive"),
])
def test_load_rejects_counts_the_data_cannot_hold(tmp_path, tensors, message):
    path = write_raw(tmp_path / "bad.safetensors", tensors, GOOD_META)
    with pytest.raises(TraceError, match=message):
        load_trace(path)


def test_a_trace_without_layers_is_refused_before_any_summary():
    trace = Trace(experts=torch.zeros(3, 0, 2, dtype=torch.int16),
                  metadata={**GOOD_META, "layers": "[]"})
    with pytest.raises(TraceError, match="non-empty JSON list"):
        trace.validate()


def test_metadata_values_must_be_text():
    trace = make_trace()
    trace.metadata["num_experts"] = True
    with pytest.raises(TraceError, match="metadata 'num_experts' is bool"):
        trace.validate()


def test_load_refuses_fifos_and_devices_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(TraceError, match="not a regular file"):
        load_trace(fifo)
    with pytest.raises(TraceError, match="not a regular file"):
        load_trace("/dev/zero")


def test_load_rejects_missing_and_garbage_files(tmp_path):
    with pytest.raises(TraceError, match="does not exist; record one"):
        load_trace(tmp_path / "missing.safetensors")
    with pytest.raises(TraceError, match="is a folder"):
        load_trace(tmp_path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(TraceError, match="not a readable safetensors file"):
        load_trace(garbage)


def test_save_refuses_an_invalid_trace(tmp_path):
    trace = make_trace()
    trace.experts[0, 0, 0] = 9
    with pytest.raises(TraceError, match="expert id 9"):
        save_trace(trace, tmp_path / "t.safetensors")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- recording


def router_choices(folder, batches):
    """What transformers' own model routes each token to: forward hooks on its router modules."""
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    routers = [m for name, m in ref.named_modules() if name.endswith("mlp.gate")]
    seen: dict[int, list] = {i: [] for i in range(len(routers))}
    handles = [r.register_forward_hook(lambda m, a, out, i=i: seen[i].append(out)) for i, r in enumerate(routers)]
    with torch.no_grad():
        for batch in batches:
            ref(input_ids=batch)
    for h in handles:
        h.remove()
    index = torch.stack([torch.cat([out[2] for out in seen[i]]) for i in seen], dim=1)   # [T, L, k]
    scores = torch.stack([torch.cat([out[1] for out in seen[i]]) for i in seen], dim=1)  # [T, L, k]
    return ref, index, scores


def test_record_trace_matches_the_reference_router(model_dir):
    folder = model_dir("mixtral")
    g = torch.Generator().manual_seed(3)
    batches = [torch.randint(0, 96, (1, 12), generator=g), torch.randint(0, 96, (2, 7), generator=g)]
    ref, want_index, want_scores = router_choices(folder, batches)
    model = offload_moe.load(folder, cache_experts=2, dtype="float32", progress=False)
    trace = record_trace(model, batches, source="random ids")
    model.offload.close()
    assert trace.experts.dtype == torch.int16 and trace.experts.shape == (26, 3, 2)
    assert not trace.experts.is_inference() and not trace.scores.is_inference()
    assert torch.equal(trace.experts.long(), want_index)
    torch.testing.assert_close(trace.scores, want_scores.float())
    assert torch.equal(trace.token_ids, torch.cat([b.reshape(-1) for b in batches]).int())
    assert trace.sequences() == [(0, 12), (12, 19), (19, 26)]
    assert trace.metadata["source"] == "random ids" and trace.layers == [0, 1, 2]
    assert trace.num_experts == 4 and trace.top_k == 2
    # the plain transformers model records the same routing through its own experts modules
    assert torch.equal(record_trace(ref, batches, source="reference").experts, trace.experts)


def test_record_trace_of_an_offload_experts_model_equals_that_of_load(model_dir):
    """offload_experts on a transformers model: the stand-ins see the same routing, the recorder the same trace,
    with gate predictions too."""
    folder = model_dir("mixtral")
    batches = [torch.randint(0, 96, (1, 12), generator=torch.Generator().manual_seed(3))]
    loaded = offload_moe.load(folder, cache_experts=2, dtype="float32", progress=False)
    want = record_trace(loaded, batches, source="ids", predict_margin=1)
    loaded.offload.close()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    handle = offload_moe.offload_experts(model, cache_experts=2)
    got = record_trace(model, batches, source="ids", predict_margin=1)
    assert handle.stats()["misses"] > 0  # the experts ran from the cache while recording
    handle.close()
    assert torch.equal(got.experts, want.experts) and torch.equal(got.predicted, want.predicted)
    torch.testing.assert_close(got.scores, want.scores)
    assert got.layers == want.layers and got.num_experts == want.num_experts


def test_record_trace_removes_its_hooks_also_on_error(model_dir):
    model = offload_moe.load(model_dir("mixtral"), cache_experts=2, dtype="float32", progress=False)
    record_trace(model, [torch.arange(5)], source="ok")
    assert all(not m._forward_pre_hooks for m in model.offload.modules)
    with pytest.raises(IndexError):
        record_trace(model, [torch.arange(5), torch.tensor([[10_000]])], source="token id out of range")
    assert all(not m._forward_pre_hooks for m in model.offload.modules)
    model.offload.close()


def test_record_trace_of_nothing_is_an_error(model_dir):
    model = offload_moe.load(model_dir("mixtral"), cache_experts=2, dtype="float32", progress=False)
    with pytest.raises(TraceError, match="nothing was recorded"):
        record_trace(model, [], source="empty")
    model.offload.close()


# ---------------------------------------------------------------- summaries


def trace_of(rows: list[list[list[int]]], num_experts: int = 4, lengths=None) -> Trace:
    experts = torch.tensor(rows, dtype=torch.int16)  # [T, L, k]
    meta = {"model": "m", "num_experts": str(num_experts), "top_k": str(experts.shape[2]),
            "layers": json.dumps(list(range(experts.shape[1]))), "source": "hand made"}
    return Trace(experts=experts, metadata=meta, sequence_lengths=None if lengths is None else torch.tensor(lengths))


def test_repeat_rates_count_pairs_within_sequences():
    # layer 0: first choice 0,0,1,1 -> pairs (0,0) same, (0,1) differ, (1,1) same
    # layer 1: top-2 sets {2,3},{3,1},{0,1},{2,0} -> overlaps: yes, yes, yes
    rows = [[[0, 1], [2, 3]], [[0, 2], [3, 1]], [[1, 0], [0, 1]], [[1, 3], [2, 0]]]
    trace = trace_of(rows)
    assert repeat_rate(trace) == pytest.approx([2 / 3, 0.0])
    assert repeat_rate(trace, first_choice=False) == pytest.approx([1.0, 1.0])
    split = trace_of(rows, lengths=[2, 2])  # the pair across the boundary no longer counts
    assert repeat_rate(split) == pytest.approx([1.0, 0.0])


def test_usage_entropy_in_bits():
    uniform = trace_of([[[0, 1]], [[2, 3]]])
    single = trace_of([[[0, 0]], [[0, 0]]])
    assert expert_usage_entropy(uniform) == pytest.approx([2.0])
    assert expert_usage_entropy(single) == pytest.approx([0.0])


def test_random_baselines_refuse_impossible_routers():
    for num_experts, top_k in ((0, 1), (4, 0), (4, 5)):
        with pytest.raises(TraceError, match=f"num_experts={num_experts}, top_k={top_k}"):
            random_repeat_rate(num_experts, top_k, first_choice=False)


def test_random_baselines_match_the_mixtral_paper():
    assert random_repeat_rate(8, 2) == pytest.approx(0.125)
    assert random_repeat_rate(8, 2, first_choice=False) == pytest.approx(0.464, abs=1e-3)  # "46%" in Table 5
    assert random_repeat_rate(16, 2, first_choice=False) == pytest.approx(1 - math.comb(14, 2) / math.comb(16, 2))


# ---------------------------------------------------------------- gate predictions and generation


def test_recorded_gate_predictions_are_what_the_runtime_prefetcher_names(model_dir):
    """Decoding one token at a time with prefetch='gate', the prefetcher's guesses equal the trace's ``predicted``."""
    model = offload_moe.load(model_dir("mixtral"), cache_experts=4, dtype="float32", prefetch="gate",
                             prefetch_margin=1, progress=False)
    named = []  # (pos, [1, k + margin]) in call order
    predictor = model.offload.prefetcher.predictor
    original = predictor.predict_device

    def spy(pos, hidden):
        out = original(pos, hidden)
        named.extend((pos, ids) for ids in out.values())
        return out

    predictor.predict_device = spy
    prompt = torch.tensor([[5, 17, 3]])
    trace = record_trace(model, [prompt], source="test", predict_margin=1, max_new_tokens=4)
    model.offload.close()
    assert trace.metadata["predicted_by"] == "gate" and trace.prediction_margin == 1
    assert trace.predicted.shape == (3 + 3, 3, 3)  # the prompt, then 3 decoding steps; layers; top-2 + 1
    assert bool((trace.predicted[:, -1] == -1).all())  # nothing lies beyond the last layer
    decode = [(pos, ids) for pos, ids in named if ids.shape[0] == 1]  # the one-token decoding steps
    assert len(decode) == 3 * 2
    for step in range(3):
        for pos in range(2):
            got, want = trace.predicted[3 + step, pos], decode[step * 2 + pos][1][0]
            assert got.tolist() == want.tolist(), (step, pos)
    prefill = torch.cat([ids for pos, ids in named if ids.shape[0] == 3 and pos == 0])
    assert trace.predicted[:3, 0].tolist() == prefill.tolist()


def test_record_with_generation_traces_the_fed_tokens(model_dir):
    model = offload_moe.load(model_dir("mixtral"), cache_experts=4, dtype="float32", progress=False)
    prompts = [torch.tensor([1, 2, 3, 4]), torch.tensor([7, 8])]
    trace = record_trace(model, prompts, source="test", max_new_tokens=5)
    model.offload.close()
    assert trace.sequences() == [(0, 8), (8, 14)]  # prompt + 4 steps (the 5th token is never fed back)
    assert trace.token_ids[:4].tolist() == [1, 2, 3, 4] and trace.token_ids[8:10].tolist() == [7, 8]
    assert trace.predicted is None and "predicted_by" not in trace.metadata


def test_predictions_survive_a_round_trip_and_are_validated(tmp_path):
    trace = make_trace()
    trace.predicted = torch.full((10, 3, 3), 1, dtype=torch.int16)
    with pytest.raises(TraceError, match="predicted_by"):
        trace.validate()
    trace.metadata["predicted_by"] = "gate"
    back = load_trace(save_trace(trace, tmp_path / "t.safetensors"))
    assert torch.equal(back.predicted, trace.predicted) and back.prediction_margin == 1
    trace.predicted[0, 0, 0] = 7
    with pytest.raises(TraceError, match="'predicted' holds expert id 7"):
        trace.validate()
    trace.predicted = torch.ones((10, 2, 3), dtype=torch.int16)
    with pytest.raises(TraceError, match="'predicted' has shape"):
        trace.validate()


# ---------------------------------------------------------------- prompts files


def test_read_prompts_from_text_and_jsonl(tmp_path):
    from offload_moe.traces import read_prompts

    text = tmp_path / "p.txt"
    text.write_text("def f(x):\n\n  import os\n")
    assert read_prompts(text) == ["def f(x):", "  import os"]
    lines = tmp_path / "p.jsonl"
    lines.write_text('"one\\ntwo"\n{"prompt": "three"}\n\n{"text": "four"}\n')
    assert read_prompts(lines) == ["one\ntwo", "three", "four"]
    lines.write_text('{"prompt": "ok"}\n{"nope": 1}\n')
    with pytest.raises(TraceError, match="line 2"):
        read_prompts(lines)
    lines.write_text("not json\n")
    with pytest.raises(TraceError, match="line 1 is not valid JSON"):
        read_prompts(lines)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(TraceError, match="holds no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(TraceError, match="prompts file .*missing.txt does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_read_prompts_refuses_what_is_not_a_small_utf8_file(tmp_path, monkeypatch):
    from offload_moe.traces import read_prompts, recording

    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(TraceError, match="latin.txt is not UTF-8 text"):
        read_prompts(latin)
    fifo = tmp_path / "pipe.txt"
    os.mkfifo(fifo)
    with pytest.raises(TraceError, match="pipe.txt is not a regular file"):
        read_prompts(fifo)
    with pytest.raises(TraceError, match="not a regular file"):
        read_prompts("/dev/zero")
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "\n")
    with pytest.raises(TraceError, match="deep.jsonl, line 1 nests JSON too deeply"):
        read_prompts(deep)
    dup = tmp_path / "dup.jsonl"
    dup.write_text('{"prompt": "a", "prompt": "b"}\n')
    with pytest.raises(TraceError, match="dup.jsonl, line 1 has the key 'prompt' twice"):
        read_prompts(dup)
    monkeypatch.setattr(recording, "PROMPTS_LIMIT", 10)
    big = tmp_path / "big.txt"
    big.write_text("x" * 11)
    with pytest.raises(TraceError, match="big.txt is larger than 10 bytes"):
        read_prompts(big)


# ---------------------------------------------------------------- synthetic traces


def test_synthetic_traces_follow_their_skew_and_locality():
    from offload_moe.traces import synthesize_trace

    def make(**kw):
        return synthesize_trace(**{"tokens": 2000, "layers": 3, "num_experts": 16, "top_k": 2, **kw})

    uniform, skewed = make(skew=0.0, locality=0.0), make(skew=2.0, locality=0.0)
    assert min(expert_usage_entropy(uniform)) > 3.95  # log2(16) = 4
    assert max(expert_usage_entropy(skewed)) < 3.0
    assert max(repeat_rate(uniform)) < 0.1  # 1/16 by chance
    sticky = make(skew=0.0, locality=0.9)
    assert min(repeat_rate(sticky, first_choice=False)) > 0.9
    for trace in (uniform, skewed, sticky):
        assert trace.experts.shape == (2000, 3, 2)
        assert bool((trace.experts[..., 0] != trace.experts[..., 1]).all())  # a token's experts are distinct
    assert torch.equal(make(seed=4).experts, make(seed=4).experts) and not torch.equal(make(seed=4).experts, make().experts)
    split = make(sequences=3, locality=1.0, skew=0.0)
    assert split.sequences() == [(0, 667), (667, 1334), (1334, 2000)]
    assert repeat_rate(split, first_choice=False) == [1.0, 1.0, 1.0]  # within each sequence every token repeats


def test_synthetic_trace_bad_settings():
    from offload_moe.traces import synthesize_trace

    with pytest.raises(TraceError, match="must not exceed"):
        synthesize_trace(tokens=10, layers=2, num_experts=4, top_k=5)
    with pytest.raises(TraceError, match="locality"):
        synthesize_trace(tokens=10, layers=2, num_experts=4, top_k=2, locality=1.5)
    with pytest.raises(TraceError, match="at least 1"):
        synthesize_trace(tokens=0, layers=2, num_experts=4, top_k=2)
    with pytest.raises(TraceError, match="num_experts=40000 is too many"):
        synthesize_trace(tokens=10, layers=2, num_experts=40000, top_k=2)


def test_first_tokens_of_a_trace_cut_the_sequence_they_end_in():
    trace = make_trace()  # 10 tokens in sequences of 7 and 3
    trace.predicted = torch.zeros((10, 3, 3), dtype=torch.int16)
    trace.metadata["predicted_by"] = "gate"
    head = trace.first(8)
    head.validate()
    assert head.num_tokens == 8 and head.sequences() == [(0, 7), (7, 8)]
    assert torch.equal(head.experts, trace.experts[:8]) and head.predicted.shape == (8, 3, 3)
    assert trace.first(5).sequences() == [(0, 5)] and trace.first(50) is trace
    with pytest.raises(TraceError, match="at least one"):
        trace.first(0)
