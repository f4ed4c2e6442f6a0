"""traces.read_trace_chunks: a trace file read in pieces of bounded size, equal to the whole when put together."""

from __future__ import annotations

import json

import psutil
import pytest
import torch
from safetensors.torch import save_file

from offload_moe.errors import TraceError
from offload_moe.traces import Trace, load_trace, read_trace_chunks, save_trace


def full_trace(tokens: int = 1000, layers: int = 3, experts: int = 8, k: int = 2) -> Trace:
    """A trace with every optional tensor, in 7 sequences of uneven lengths."""
    g = torch.Generator().manual_seed(0)
    lengths = [1, 200, 3, 400, 96, 250, tokens - 950]
    return Trace(experts=torch.randint(0, experts, (tokens, layers, k), generator=g, dtype=torch.int16),
                 metadata={"model": "m", "num_experts": str(experts), "top_k": str(k), "layers": json.dumps([1, 2, 4][:layers]),
                           "source": "test", "predicted_by": "gate"},
                 scores=torch.rand(tokens, layers, k, generator=g),
                 predicted=torch.randint(-1, experts, (tokens, layers, k + 1), generator=g, dtype=torch.int16),
                 token_ids=torch.arange(tokens, dtype=torch.int32),
                 sequence_lengths=torch.tensor(lengths, dtype=torch.int64))


@pytest.mark.parametrize("tokens", [1, 128, 999, 1000, 5000])
def test_the_pieces_put_together_are_the_trace(tmp_path, tokens):
    path = save_trace(full_trace(), tmp_path / "t.safetensors")
    whole = load_trace(path)
    pieces = list(read_trace_chunks(path, tokens=tokens))
    assert [p.num_tokens for p in pieces[:-1]] == [tokens] * (len(pieces) - 1) and 1 <= pieces[-1].num_tokens <= tokens
    for name in ("experts", "scores", "predicted", "token_ids"):
        assert torch.equal(torch.cat([getattr(p, name) for p in pieces]), getattr(whole, name)), name
    assert all(p.metadata == whole.metadata for p in pieces)
    # each piece's sequences are the trace's, cut at the piece's edges
    ends, offset = set(), 0
    for piece in pieces:
        assert int(piece.sequence_lengths.sum()) == piece.num_tokens
        ends |= {offset + e for e in torch.cumsum(piece.sequence_lengths, 0).tolist()}
        offset += piece.num_tokens
    edges = set(torch.cumsum(torch.tensor([p.num_tokens for p in pieces]), 0).tolist())
    assert ends == set(torch.cumsum(whole.sequence_lengths, 0).tolist()) | edges


def test_memory_holds_one_piece_not_the_trace(tmp_path):
    """96 MB of routing read in 2 MB pieces: the process grows by a few pieces at most, where load_trace holds all."""
    tokens, layers, k = 3_000_000, 4, 4
    experts = torch.randint(0, 64, (tokens, layers, k), dtype=torch.int16)
    metadata = {"model": "m", "num_experts": "64", "top_k": str(k), "layers": json.dumps(list(range(layers))), "source": "t"}
    path = save_trace(Trace(experts=experts, metadata=metadata), tmp_path / "big.safetensors")
    del experts
    process = psutil.Process()
    before = process.memory_info().rss
    grown, count = 0, 0
    for piece in read_trace_chunks(path, tokens=65536):
        count += piece.num_tokens
        grown = max(grown, process.memory_info().rss - before)
    assert count == tokens
    assert grown < 24 * 2**20, f"grew by {grown / 2**20:.1f} MiB reading 2 MiB pieces of a 92 MiB trace"


def test_a_bad_file_is_refused_as_load_trace_refuses_it(tmp_path):
    good = full_trace()
    path = tmp_path / "t.safetensors"
    save_file({"experts": good.experts[:, :, :1].clone()}, path, metadata=good.metadata | {"predicted_by": "gate"})
    with pytest.raises(TraceError, match=r"rows 0..99: 'experts' has shape \[100, 3, 1\] but the metadata says"):
        next(read_trace_chunks(path, tokens=100))
    save_file({"experts": good.experts, "scores": good.scores[:10]}, path, metadata=good.metadata)
    with pytest.raises(TraceError, match=r"'scores' has 10 rows for 1000 traced tokens"):
        next(read_trace_chunks(path))
    save_file({"experts": good.experts.int()}, path, metadata=good.metadata)
    with pytest.raises(TraceError, match=r"tensor 'experts' is int32 with 3 dimension\(s\); a trace stores it as int16"):
        next(read_trace_chunks(path))
    save_file({"experts": good.experts, "sequence_lengths": torch.tensor([999, 2])}, path, metadata=good.metadata)
    with pytest.raises(TraceError, match="'sequence_lengths' must be positive and sum to the 1000"):
        next(read_trace_chunks(path))
    bad = good.experts.clone()
    bad[700, 1, 0] = 8
    save_file({"experts": bad}, path, metadata=good.metadata)
    pieces = read_trace_chunks(path, tokens=256)
    assert next(pieces).num_tokens == 256  # the pieces before the bad row are read
    with pytest.raises(TraceError, match=r"rows 512..767: 'experts' holds expert id 8, outside 0..7"):
        list(pieces)
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(TraceError, match="not a safetensors file"):
        next(read_trace_chunks(path))
    with pytest.raises(TraceError, match="does not exist"):
        next(read_trace_chunks(tmp_path / "missing.safetensors"))
    # the header reader's errors are told as a trace file's, with the trace's remedy
    path.write_bytes(len(b"[]").to_bytes(8, "little") + b"[]")
    with pytest.raises(TraceError, match=r"corrupted safetensors header: it is a JSON list, not an object; re-record "
                                         r"this file$"):
        next(read_trace_chunks(path))
    with pytest.raises(TraceError, match=r"is a folder without index.json; give a trace file, or the parts folder"):
        next(read_trace_chunks(tmp_path))
    with pytest.raises(TraceError, match="at least one token"):
        next(read_trace_chunks(path, tokens=0))
