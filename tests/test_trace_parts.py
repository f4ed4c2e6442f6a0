"""Chunked recording (traces.record_trace_file, traces.parts): the trace written in parts as it is recorded, joined
at the end into what record_trace gives; killed or failing midway, the parts written stay a valid trace."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

import offload_moe
from offload_moe.errors import TraceError
from offload_moe.profiling import replay
from offload_moe.traces import (TENSORS, Trace, TraceFile, load_trace, merge_trace_parts, parts_folder,
                                read_trace_chunks, record_trace, record_trace_file, save_trace)


def batches(count: int = 6, seed: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (1 + i % 2, 3 + i), generator=g) for i in range(count)]  # [B, S], uneven


def assert_same(got: Trace, want: Trace) -> None:
    assert got.metadata == want.metadata
    for name in TENSORS:
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None and b is None) or torch.equal(a, b), name


@pytest.fixture(scope="module")
def model(model_dir):
    model = offload_moe.load(model_dir("mixtral"), cache_experts=2, dtype="float32", progress=False)
    yield model
    model.offload.close()


@pytest.mark.parametrize("chunk", [1, 10, 10_000])
def test_a_chunked_recording_is_the_recording(model, tmp_path, chunk):
    """Parts of one batch each, of a few batches, or one part: the file joined at the end is record_trace's."""
    written = []
    out = tmp_path / "t.safetensors"
    path = record_trace_file(model, batches(), out, source="ids", chunk_tokens=chunk, predict_margin=1,
                             on_batch=lambda: written.append(len(list(parts_folder(out).glob("part-*")))))
    assert path == out and not parts_folder(out).exists()
    assert written[-1] == {1: 6, 10: 3, 10_000: 0}[chunk]  # the last part is written after the last batch
    assert_same(load_trace(out), record_trace(model, batches(), source="ids", predict_margin=1))


def test_a_chunked_recording_with_generation_is_the_recording(model, tmp_path):
    prompts = [torch.arange(4), torch.arange(10, 13)]
    out = record_trace_file(model, prompts, tmp_path / "g.safetensors", source="gen", chunk_tokens=5, max_new_tokens=3)
    want = record_trace(model, prompts, source="gen", max_new_tokens=3)
    assert_same(load_trace(out), want)
    assert want.sequences() == [(0, 6), (6, 11)]


def test_a_recording_that_fails_midway_keeps_the_parts_written(model, tmp_path):
    out = tmp_path / "t.safetensors"
    done = []

    def fail_at_the_fourth() -> None:
        done.append(1)
        if len(done) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        record_trace_file(model, batches(), out, source="ids", chunk_tokens=8, on_batch=fail_at_the_fourth)
    assert not out.exists()
    folder = parts_folder(out)
    kept = load_trace(folder)  # batches 1-4 make 3, 4 + 4, 5 + 12 tokens: parts of 11 and 17, after batches 2 and 4
    assert_same(kept, record_trace(model, batches()[:4], source="ids"))
    # the folder is a trace to every reader
    assert sum(p.num_tokens for p in read_trace_chunks(folder, tokens=5)) == kept.num_tokens == 28
    assert replay(folder, "lru", 3, engine="fast", chunk_tokens=5) == replay(kept, "lru", 3, engine="fast")
    # a new recording to the same file does not write over it; the parts join into one file
    with pytest.raises(TraceError, match=r"t.safetensors.parts holds the parts of an earlier recording .* remove the folder"):
        record_trace_file(model, batches(), out, source="ids")
    assert_same(load_trace(merge_trace_parts(folder, tmp_path / "joined.safetensors")), kept)


@pytest.mark.slow  # a fresh process imports torch and transformers (5-20 s); the failure above is the fast case
def test_a_recording_killed_with_sigkill_keeps_the_parts_written(model_dir, tmp_path):
    """A process killed (SIGKILL, nothing runs after it) while recording: its parts folder reads as the trace of
    the batches written before."""
    out = tmp_path / "t.safetensors"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from transformers import AutoModelForCausalLM
        from offload_moe.traces import record_trace_file
        model = AutoModelForCausalLM.from_pretrained({str(model_dir("mixtral"))!r}, dtype=torch.float32).eval()
        done = []
        def kill_at_the_fifth():
            done.append(1)
            if len(done) == 5:
                os.kill(os.getpid(), signal.SIGKILL)
        g = torch.Generator().manual_seed(3)
        batches = [torch.randint(0, 96, (1 + i % 2, 3 + i), generator=g) for i in range(8)]
        record_trace_file(model, batches, {str(out)!r}, source="ids", chunk_tokens=1, on_batch=kill_at_the_fifth)
    """)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=300)
    assert ran.returncode == -signal.SIGKILL, ran.stderr
    assert not out.exists()
    kept = load_trace(parts_folder(out))
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(model_dir("mixtral"), dtype=torch.float32).eval()
    assert_same(kept, record_trace(reference, batches(5), source="ids"))


def test_a_parts_folder_is_checked_as_a_trace_file_is(tmp_path):
    folder = tmp_path / "t.safetensors.parts"
    folder.mkdir()
    metadata = {"model": "m", "num_experts": "4", "top_k": "1", "layers": "[0, 1]", "source": "t"}
    part = Trace(experts=torch.zeros(3, 2, 1, dtype=torch.int16), metadata=metadata)
    save_trace(part, folder / "part-000000.safetensors")
    index = folder / "index.json"
    for parts, message in [
        (["../x.safetensors"], "is not a trace parts index"),
        ([], "is not a trace parts index"),
        (["part-000000.safetensors", "part-000000.safetensors"], "is not a trace parts index"),
        (["part-000001.safetensors"], "does not exist"),
    ]:
        index.write_text(json.dumps({"format": "offload_moe.trace.parts", "version": "1", "parts": parts}))
        with pytest.raises(TraceError, match=message):
            load_trace(folder)
    save_trace(Trace(experts=torch.zeros(2, 2, 1, dtype=torch.int16), metadata={**metadata, "model": "other"}),
               folder / "part-000001.safetensors")
    index.write_text(json.dumps({"format": "offload_moe.trace.parts", "version": "1",
                                 "parts": ["part-000000.safetensors", "part-000001.safetensors"]}))
    with pytest.raises(TraceError, match="are not of one trace"):
        TraceFile.open(folder)


def test_the_commands_record_in_parts_show_and_merge_a_parts_folder(tmp_path):
    """`trace record --chunk-tokens 2` writes a part a prompt and joins them; `trace show` and `trace merge` take a
    parts folder."""
    from typer.testing import CliRunner

    from offload_moe.cli import app

    runner = CliRunner()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def f(x):\nimport os\nclass A:\n")
    recorded = tmp_path / "t.safetensors"
    done = runner.invoke(app, ["trace", "record", "--prompts", str(prompts), "--out", str(recorded),
                               "--chunk-tokens", "2", "--margin", "1"])
    assert done.exit_code == 0, done.output
    assert not parts_folder(recorded).exists() and len(load_trace(recorded).sequences()) == 3
    folder = parts_folder(tmp_path / "k.safetensors")
    folder.mkdir()
    whole = load_trace(recorded)
    pieces = list(read_trace_chunks(recorded, tokens=4))  # parts of 4 rows, as a recording in parts of 4 would
    names = [f"part-{i:06d}.safetensors" for i in range(len(pieces))]
    for name, piece in zip(names, pieces):
        save_trace(piece, folder / name)
    (folder / "index.json").write_text(json.dumps({"format": "offload_moe.trace.parts", "version": "1", "parts": names}))
    shown = runner.invoke(app, ["trace", "show", str(folder)])
    assert shown.exit_code == 0 and f"{whole.num_tokens} tokens x 6 layers" in shown.output, shown.output
    merged = runner.invoke(app, ["trace", "merge", str(folder), "--out", str(tmp_path / "m.safetensors")])
    assert merged.exit_code == 0, merged.output
    joined = load_trace(tmp_path / "m.safetensors")
    assert_same(joined, load_trace(folder))
    for name in ("experts", "scores", "predicted", "token_ids"):
        assert torch.equal(getattr(joined, name), getattr(whole, name))


def test_the_command_says_where_a_stopped_recording_kept_its_parts(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import offload_moe.cli as cli
    from offload_moe.traces import TraceParts

    def stopped(model, texts, out, **options):  # a recording that wrote a part, then failed
        TraceParts(out).append(Trace(experts=torch.zeros(2, 1, 1, dtype=torch.int16), metadata={
            "model": "m", "num_experts": "2", "top_k": "1", "layers": "[0]", "source": "t"}))
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(cli, "record_prompts_file", stopped)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\n")
    out = tmp_path / "t.safetensors"
    result = CliRunner().invoke(cli.app, ["trace", "record", "--prompts", str(prompts), "--out", str(out)])
    assert isinstance(result.exception, RuntimeError)
    assert f"kept in {parts_folder(out)}" in " ".join(result.output.split()) and "trace merge" in result.output
    assert load_trace(parts_folder(out)).num_tokens == 2


def test_a_merge_never_writes_into_the_parts_it_joins(tmp_path):
    """An ``out`` inside the parts folder (its index, a part, the folder itself, a new file there) or the trace file
    merged is refused before anything is written: the folder is left as it is and still reads as the trace."""
    folder = parts_folder(tmp_path / "t.safetensors")
    folder.mkdir()
    metadata = {"model": "m", "num_experts": "4", "top_k": "1", "layers": "[0, 1]", "source": "t"}
    names = [f"part-{i:06d}.safetensors" for i in range(2)]
    for i, name in enumerate(names):
        save_trace(Trace(experts=torch.full((3, 2, 1), i, dtype=torch.int16), metadata=metadata), folder / name)
    (folder / "index.json").write_text(json.dumps({"format": "offload_moe.trace.parts", "version": "1", "parts": names}))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    for out in (folder / "index.json", folder / names[0], folder, folder / "joined.safetensors"):
        with pytest.raises(TraceError, match=r"would replace what the merge reads .* write the joined trace to a file "
                                             r"outside it$"):
            merge_trace_parts(folder, out)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    joined = merge_trace_parts(folder, tmp_path / "t.safetensors")
    with pytest.raises(TraceError, match="would replace what the merge reads"):
        merge_trace_parts(joined, joined)
    assert_same(load_trace(joined), load_trace(folder))


def test_an_earlier_recordings_parts_are_refused_before_the_model_loads(tmp_path, monkeypatch):
    import offload_moe.traces.recording as recording
    from offload_moe.traces import record_prompts_file

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the parts folder was refused")

    monkeypatch.setattr(recording, "load_with_tokenizer", load)
    out = tmp_path / "t.safetensors"
    parts_folder(out).mkdir()
    with pytest.raises(TraceError, match=r"t\.safetensors\.parts holds the parts of an earlier recording"):
        record_prompts_file(tmp_path / "model", ["import os"], out, source="prompts")


@pytest.mark.parametrize("tensors", [
    {"experts": torch.full((3, 2, 1), 9, dtype=torch.int16), "sequence_lengths": torch.tensor([3])},  # id 9 of 4
    {"experts": torch.zeros((3, 2, 1), dtype=torch.int16), "sequence_lengths": torch.tensor([5, 5])},  # not 3 tokens
], ids=["expert_id", "sequence_lengths"])
def test_a_merge_of_parts_that_do_not_read_makes_no_file(tmp_path, tensors):
    """The rows are checked as load_trace checks them before anything is written: no joined file that fails later."""
    from safetensors.torch import save_file

    folder = parts_folder(tmp_path / "t.safetensors")
    folder.mkdir()
    metadata = {"model": "m", "num_experts": "4", "top_k": "1", "layers": "[0, 1]", "source": "t"}
    save_trace(Trace(experts=torch.zeros(3, 2, 1, dtype=torch.int16), metadata=metadata,
                     sequence_lengths=torch.tensor([1, 2])), folder / "part-000000.safetensors")
    save_file(tensors, str(folder / "part-000001.safetensors"), metadata=metadata)
    (folder / "index.json").write_text(json.dumps({"format": "offload_moe.trace.parts", "version": "1",
                                                   "parts": ["part-000000.safetensors", "part-000001.safetensors"]}))
    with pytest.raises(TraceError, match=r"part-000001\.safetensors"):
        load_trace(folder)
    with pytest.raises(TraceError, match=r"part-000001\.safetensors"):
        merge_trace_parts(folder, tmp_path / "t.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors.parts"]


def test_a_truncated_part_says_to_record_again(tmp_path):
    folder = parts_folder(tmp_path / "t.safetensors")
    folder.mkdir()
    metadata = {"model": "m", "num_experts": "4", "top_k": "1", "layers": "[0, 1]", "source": "t"}
    part = save_trace(Trace(experts=torch.zeros(3, 2, 1, dtype=torch.int16), metadata=metadata),
                      folder / "part-000000.safetensors")
    part.write_bytes(part.read_bytes()[:-2])
    (folder / "index.json").write_text(json.dumps({"format": "offload_moe.trace.parts", "version": "1",
                                                   "parts": ["part-000000.safetensors"]}))
    for path in (folder, part):
        with pytest.raises(TraceError, match=r"part-000000\.safetensors is truncated: .*; re-record the trace$"):
            TraceFile.open(path)
