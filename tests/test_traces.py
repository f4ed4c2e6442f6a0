"""Routing traces: file round trip, validation errors, recording against transformers' own router, summaries."""

from __future__ import annotations

import json
import math

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
    ({"experts": torch.full((2, 3, 2), 4, dtype=torch.int16)}, GOOD_META, "expert id 4 is outside 0..3"),
    ({"experts": torch.full((2, 3, 2), -1, dtype=torch.int16)}, GOOD_META, "expert id -1"),
    ({"experts": torch.zeros(2, 3, 2, dtype=torch.int16)}, {**GOOD_META, "layers": "[0, 1]"}, "metadata says 2 layers"),
    ({"experts": torch.zeros(2, 3, 2, dtype=torch.int16)}, {k: v for k, v in GOOD_META.items() if k != "source"},
     "metadata lacks source"),
    ({"experts": torch.zeros(2, 3, 2, dtype=torch.int16)}, {**GOOD_META, "num_experts": "four"}, "must be integers"),
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


def test_load_rejects_missing_and_garbage_files(tmp_path):
    with pytest.raises(TraceError, match="does not exist; record one"):
        load_trace(tmp_path / "missing.safetensors")
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


def test_random_baselines_match_the_mixtral_paper():
    assert random_repeat_rate(8, 2) == pytest.approx(0.125)
    assert random_repeat_rate(8, 2, first_choice=False) == pytest.approx(0.464, abs=1e-3)  # "46%" in Table 5
    assert random_repeat_rate(16, 2, first_choice=False) == pytest.approx(1 - math.comb(14, 2) / math.comb(16, 2))
