"""traces.imports and `offload-moe trace import`: the routed experts vLLM and SGLang return, on responses built here
in the shapes their documentation gives (no server runs in the tests)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from typer.testing import CliRunner

import offload_moe.traces.imports as imports
from offload_moe.cli import app
from offload_moe.errors import TraceError
from offload_moe.profiling import sweep
from offload_moe.traces import import_routing, load_trace, parse_layers

EXPERTS, LAYERS, TOP_K = 16, 4, 2
rng = np.random.default_rng(0)


def routing(tokens: int, layers: int = LAYERS) -> np.ndarray:
    """[tokens, layers, top_k] distinct expert ids per token and layer, as a router picks them."""
    return np.stack([np.stack([rng.choice(EXPERTS, TOP_K, replace=False) for _ in range(layers)])
                     for _ in range(tokens)]).astype(np.int16)


def vllm_response(prompt: np.ndarray, *generated: np.ndarray) -> dict:
    """A /v1/completions response of a vLLM server started with --enable-return-routed-experts (v0.21's docs)."""
    return {"id": "cmpl-1", "object": "text_completion", "model": "Qwen/Qwen3-30B-A3B",
            "prompt_routed_experts": prompt.tolist(),
            "choices": [{"index": i, "text": "...", "finish_reason": "length", "routed_experts": g.tolist()}
                        for i, g in enumerate(generated)]}


def npy_base64(array: np.ndarray) -> str:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return base64.b64encode(buffer.getvalue()).decode()


def sglang_response(rows: np.ndarray, dtype: str | None = None) -> dict:
    """A /generate response of an SGLang server started with --enable-return-routed-experts, the request having
    asked "return_routed_experts": true: base64 bytes of the flat ids, int32 unless routed_experts_dtype says."""
    meta = {"id": "abc", "prompt_tokens": 3, "completion_tokens": len(rows) - 3, "finish_reason": {"type": "length"},
            "routed_experts": base64.b64encode(rows.astype(dtype or "int32").tobytes()).decode()}
    if dtype is not None:
        meta["routed_experts_dtype"] = dtype
    return {"text": "...", "meta_info": meta}


def jsonl(path, *items) -> str:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return str(path)


def test_vllm_responses_become_one_sequence_per_completion(tmp_path):
    """The prompt's rows then the first choice's; a further choice (n=2) is a sequence of its own; a base64 .npy
    string (later vLLM versions) reads as the nested lists do; blank lines are skipped."""
    a_prompt, a_gen, b_prompt, b_gen0, b_gen1, c_prompt, c_gen = (routing(n) for n in (5, 3, 4, 2, 6, 3, 4))
    c = vllm_response(c_prompt, c_gen)
    c["prompt_routed_experts"], c["choices"][0]["routed_experts"] = npy_base64(c_prompt), npy_base64(c_gen)
    path = tmp_path / "responses.jsonl"
    path.write_text(json.dumps(vllm_response(a_prompt, a_gen)) + "\n\n" + json.dumps(vllm_response(b_prompt, b_gen0, b_gen1))
                    + "\n" + json.dumps(c) + "\n")
    trace = import_routing(path, engine="vllm", num_experts=EXPERTS)
    expected = np.concatenate([a_prompt, a_gen, b_prompt, b_gen0, b_gen1, c_prompt, c_gen])
    assert np.array_equal(trace.experts.numpy(), expected)
    assert trace.sequence_lengths.tolist() == [8, 6, 6, 7]
    assert trace.metadata["model"] == "Qwen/Qwen3-30B-A3B"
    assert (trace.num_experts, trace.top_k, trace.layers) == (EXPERTS, TOP_K, [0, 1, 2, 3])
    assert trace.metadata["imported_from"] == "vllm"
    assert "4 sequences of vllm responses from responses.jsonl" == trace.metadata["source"]


def test_sglang_responses_are_reshaped_and_their_empty_layer_slots_left_out(tmp_path):
    """SGLang's payload is flat int32 [tokens * layers * top_k]; a line may hold a batch (a JSON list); a slot of
    -1 for every token (a dense layer) is left out and the kept slots keep their numbers; routed_experts_dtype
    names a narrower wire dtype."""
    slots = LAYERS + 1
    rows = [routing(n, slots) for n in (6, 4, 5)]
    for r in rows:
        r[:, 0] = -1  # layer 0 is dense: no routed experts
    path = jsonl(tmp_path / "sglang.jsonl", sglang_response(rows[0]), [sglang_response(rows[1]),
                                                                       sglang_response(rows[2], "int16")])
    trace = import_routing(path, engine="sglang", num_experts=EXPERTS, num_layers=slots, top_k=TOP_K,
                           model="Qwen/Qwen3-30B-A3B")
    assert np.array_equal(trace.experts.numpy(), np.concatenate(rows)[:, 1:])
    assert trace.layers == [1, 2, 3, 4]
    assert trace.sequence_lengths.tolist() == [6, 4, 5]
    assert trace.metadata["model"] == "Qwen/Qwen3-30B-A3B"


def test_arrays_saved_by_a_script(tmp_path):
    """.npy: one sequence [T, L, k]; .npz: one sequence an array, in the file's order; flat arrays with the shape given."""
    a, b = routing(7), routing(3)
    np.save(tmp_path / "one.npy", a)
    assert np.array_equal(import_routing(tmp_path / "one.npy", engine="vllm", num_experts=EXPERTS).experts.numpy(), a)
    np.savez(tmp_path / "many.npz", first=a, second=b.reshape(-1).astype(np.int32))
    trace = import_routing(tmp_path / "many.npz", engine="sglang", num_experts=EXPERTS, num_layers=LAYERS, top_k=TOP_K)
    assert np.array_equal(trace.experts.numpy(), np.concatenate([a, b]))
    assert trace.sequence_lengths.tolist() == [7, 3]


def test_the_cli_imports_and_the_trace_profiles(tmp_path):
    """`trace import` writes a trace that `profile` (here the library's sweep) replays, with --layers naming the
    model's layer numbers of vLLM's MoE-layer slots (a model whose layer 0 is dense)."""
    path = jsonl(tmp_path / "r.jsonl", *(vllm_response(routing(6), routing(10)) for _ in range(3)))
    out = tmp_path / "traces" / "vllm.safetensors"
    result = CliRunner().invoke(app, ["trace", "import", path, "--from", "vllm", "--num-experts", str(EXPERTS),
                                      "--layers", "1-4", "--top-k", str(TOP_K), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "48 tokens x 4 layers x top-2 of 16 experts" in result.output
    trace = load_trace(out)
    assert trace.layers == [1, 2, 3, 4] and trace.sequence_lengths.tolist() == [16, 16, 16]
    results = sweep(trace, policies=["lru"], capacities=[16], predictors=["none", "transition"])
    assert all(r.requests == 48 * 4 * 2 for r in results)


@pytest.mark.parametrize(("engine", "lines", "options", "message"), [
    ("vllm", ['{"model": "m", "choices": [{"text": "x"}]}'], {},
     r"line 1: no 'prompt_routed_experts' and no 'routed_experts'.*--enable-return-routed-experts"),
    ("vllm", ["{}", "{not json"], {}, r"line 1: no 'prompt_routed_experts'"),
    ("vllm", [json.dumps({"prompt_routed_experts": [[[1, 2]]] * 3}), "{not json"], {"top_k": 2},
     r"line 2 is not valid JSON"),
    ("vllm", ['{"prompt_routed_experts": [[[1, 2], [3]]]}'], {}, r"line 1, prompt_routed_experts is not a regular"),
    ("vllm", ['{"prompt_routed_experts": [[[1.5, 2]]]}'], {}, r"not a regular .* whole expert ids"),
    ("vllm", ['{"prompt_routed_experts": [[[1, 2]], [[3, 99]]]}'], {},
     r"line 1, prompt_routed_experts: expert id 99 at token 1, layer slot 0 is outside 0..15"),
    ("vllm", ['{"prompt_routed_experts": "bm90IG5weQ=="}'], {}, r"line 1, prompt_routed_experts is a string but not base64 .npy"),
    ("vllm", ['{"prompt_routed_experts": "***"}'], {}, r"line 1, prompt_routed_experts is not valid base64"),
    ("vllm", ['{"prompt_routed_experts": [[[1, 2]]]}', '{"prompt_routed_experts": [[[1, 2, 3]]]}'], {},
     r"line 2, prompt_routed_experts: 3 experts per token, where 2 were expected"),
    ("vllm", ['{"prompt_routed_experts": [[[1, 2]]]}'], {"top_k": 4}, r"2 experts per token, where 4 were expected \(--top-k"),
    ("vllm", ["[1, 2]"], {}, r"line 1, response 0: expected a JSON object"),
    ("sglang", ['{"text": "x"}'], {"num_layers": 4, "top_k": 2}, r"line 1: no 'meta_info'"),
    ("sglang", ['{"meta_info": {}}'], {"num_layers": 4, "top_k": 2}, r"routed_experts is missing.*\"return_routed_experts\": true"),
    ("sglang", ['{"meta_info": {"routed_experts": "AAAAAAAA"}}'], {"num_layers": 4, "top_k": 2},
     r"holds 6 bytes, not a whole number of int32 ids"),
    ("sglang", ['{"meta_info": {"routed_experts": "AAAAAAAAAAA="}}'], {"num_layers": 4, "top_k": 1},
     r"holds 2 expert ids, not a whole number of tokens of 4 layers x top-1"),
    ("sglang", ['{"meta_info": {"routed_experts": "AAAA", "routed_experts_dtype": "float32"}}'], {"num_layers": 1, "top_k": 1},
     r"routed_experts_dtype 'float32' is not one of"),
    ("sglang", ['{"meta_info": {"routed_experts": "AAAA"}}'], {}, r"give the model's number of layer slots \(--num-layers\)"),
    ("tgi", ["{}"], {}, r"--from 'tgi' is not a serving engine"),
])
def test_malformed_responses_are_refused_naming_the_line_and_field(tmp_path, engine, lines, options, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TraceError, match=message):
        import_routing(path, engine=engine, num_experts=EXPERTS, **options)


def test_a_response_whose_empty_layers_differ_from_the_first_is_refused(tmp_path):
    first, second = routing(3, 3), routing(3, 3)
    first[:, 0] = -1
    path = jsonl(tmp_path / "r.jsonl", sglang_response(first), sglang_response(second))
    with pytest.raises(TraceError, match=r"line 2, meta_info.routed_experts: layer slots \[\] carry no routed experts "
                                         r"where earlier responses had \[0\]"):
        import_routing(path, engine="sglang", num_experts=EXPERTS, num_layers=3, top_k=TOP_K)


def test_a_file_without_responses_and_a_wrong_layer_count_are_refused(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(TraceError, match="holds no responses with routed experts"):
        import_routing(empty, engine="vllm", num_experts=EXPERTS)
    path = jsonl(tmp_path / "r.jsonl", vllm_response(routing(2), routing(2)))
    with pytest.raises(TraceError, match=r"--layers names 3 layers but the responses route 4 \(layer slots 0-3\)"):
        import_routing(path, engine="vllm", num_experts=EXPERTS, layers=[1, 2, 3])
    with pytest.raises(TraceError, match="does not exist|cannot be opened|No such file"):
        import_routing(tmp_path / "missing.jsonl", engine="vllm", num_experts=EXPERTS)


def test_lines_are_read_one_at_a_time_with_a_bound(tmp_path, monkeypatch):
    """A large file is streamed a line at a time; a line longer than the bound is refused by number, not read whole."""
    monkeypatch.setattr(imports, "LINE_LIMIT", 400)
    small = json.dumps(vllm_response(routing(1), routing(1)))
    big = json.dumps(vllm_response(routing(30), routing(30)))
    assert len(small) < 400 < len(big)
    path = jsonl(tmp_path / "r.jsonl", json.loads(small), json.loads(big))
    with pytest.raises(TraceError, match=r"line 2 is longer than 400 bytes"):
        import_routing(path, engine="vllm", num_experts=EXPERTS)


def test_parse_layers():
    assert parse_layers("0-3") == [0, 1, 2, 3]
    assert parse_layers("1, 3,5-6") == [1, 3, 5, 6]
    for bad in ("a", "5-2", "", "-1"):
        with pytest.raises(TraceError, match="--layers"):
            parse_layers(bad)
