"""offload_moe.serve.Engine: batched decoding equals unbatched, joining and leaving the batch, cancel, a full
queue, a failing expert read, stop strings, sampling seeds, shutdown."""

from __future__ import annotations

import time

import pytest
import torch
from faults import Faults

from offload_moe.errors import ConfigError, ExpertLoadError, ModelClosedError
from offload_moe.generation import load_with_tokenizer
from offload_moe.serve import Engine, EngineClosedError, Params, QueueFullError
from offload_moe.serve.engine import Job, _first_stop, _stop_prefix

# Prompts of different lengths: decoded together they are left-padded, and rows of different lengths join the batch.
PROMPTS = ["def add(a, b):", "import os\nimport sys\n\ndef main():", "class Stack:", "x"]
LONG = 400  # tokens: a request that is still decoding when the test acts on it


@pytest.fixture(scope="module")
def loaded():
    model, tokenizer = load_with_tokenizer(None, cache_experts=24, dtype="float32", progress=False)
    yield model, tokenizer
    model.offload.close()


@pytest.fixture
def engine(loaded):
    model, tokenizer = loaded
    e = Engine(model, tokenizer, max_batch=4, max_queue=8, close_model=False)
    yield e
    e.shutdown(timeout=0)


@pytest.fixture(scope="module")
def alone(loaded):
    """Each prompt's 10 greedy tokens from transformers' generate, one prompt at a time."""
    model, tokenizer = loaded
    out = {}
    for p in PROMPTS:
        ids = tokenizer(p, return_tensors="pt").input_ids
        with torch.inference_mode():
            seq = model.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        out[p] = seq[0, ids.shape[1]:].tolist()
    return out


def wait_for(condition, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_batched_greedy_tokens_equal_each_request_alone(engine, alone):
    one_by_one = {p: engine.generate([p], max_tokens=10)[0].token_ids for p in PROMPTS}
    together = engine.generate(PROMPTS, max_tokens=10)
    assert one_by_one == alone
    assert {p: c.token_ids for p, c in zip(PROMPTS, together)} == alone
    assert all(c.finish_reason == "length" and c.completion_tokens == 10 for c in together)
    s = engine.stats()
    assert s["decode_rows"] > s["decode_steps"]  # some steps decoded several requests


def test_a_request_joins_the_running_batch_and_leaves_when_done(engine, alone):
    first = engine.submit(PROMPTS[1], Params(max_tokens=10))
    wait_for(lambda: len(first.tokens) >= 3)
    steps = engine.stats()["decode_steps"]
    second = engine.submit(PROMPTS[0], Params(max_tokens=10))
    a, b = first.result(20), second.result(20)
    assert a.token_ids == alone[PROMPTS[1]] and b.token_ids == alone[PROMPTS[0]]
    s = engine.stats()
    # the second joined before the first ended: fewer steps than one after the other (9 + 9)
    assert s["decode_steps"] - steps < 9 + 9 - (3 - 1)
    wait_for(lambda: engine.stats()["batch_size"] == 0)


def test_a_cancelled_request_leaves_at_the_next_step(engine, alone):
    long = engine.submit(PROMPTS[0], Params(max_tokens=LONG))
    short = engine.submit(PROMPTS[2], Params(max_tokens=10))
    wait_for(lambda: len(long.tokens) >= 2)
    long.cancel()
    c = long.result(10)
    assert c.finish_reason == "cancelled" and c.completion_tokens < LONG
    assert short.result(20).token_ids == alone[PROMPTS[2]]
    wait_for(lambda: engine.stats()["batch_size"] == 0)
    assert engine.stats()["cancelled"] >= 1


def test_a_full_queue_refuses_with_a_retry_time(loaded):
    model, tokenizer = loaded
    with Engine(model, tokenizer, max_batch=1, max_queue=1, close_model=False) as engine:
        running = engine.submit("def f():", Params(max_tokens=LONG))
        wait_for(lambda: len(running.tokens) >= 1)
        waiting = engine.submit("def g():", Params(max_tokens=2))
        with pytest.raises(QueueFullError, match="max_queue=1") as refused:
            engine.submit("def h():", Params(max_tokens=2))
        assert refused.value.retry_after >= 1
        assert engine.stats()["rejected"] == 1 and engine.stats()["queue_depth"] == 1
        running.cancel()
        assert waiting.result(20).completion_tokens == 2


def test_a_failing_expert_read_fails_only_the_requests_of_its_step(engine, alone, monkeypatch):
    faults = Faults(monkeypatch)
    real = faults.preadv

    def fail_once(fd, buffers, offset):  # the first read fails, later ones succeed
        try:
            return real(fd, buffers, offset)
        finally:
            if faults.reads:
                faults.clear()

    monkeypatch.setattr(faults, "preadv", fail_once)
    running = engine.submit(PROMPTS[1], Params(max_tokens=LONG))
    wait_for(lambda: len(running.tokens) >= 2)
    faults.arm("eio")
    newcomer = engine.submit(PROMPTS[0], Params(max_tokens=10))
    wait_for(lambda: running.done or newcomer.done)
    failed = [j for j in (running, newcomer) if j.done and j.finish == "error"]
    assert failed, "one of the two steps met the failing read"
    assert all(isinstance(j.error, ExpertLoadError) and "Input/output error" in str(j.error) for j in failed)
    assert engine.stats()["failed_steps"] == 1
    if newcomer not in failed:  # the decode step failed: the newcomer's prefill was a step of its own
        assert newcomer.result(20).token_ids == alone[PROMPTS[0]]
    running.cancel()
    assert engine.generate([PROMPTS[3]], max_tokens=10)[0].token_ids == alone[PROMPTS[3]]  # it serves on


def test_stop_strings_end_the_text_before_them(engine):
    full = engine.generate(["def add(a, b):"], max_tokens=12)[0].text
    stop = full[3:6]
    c = engine.generate(["def add(a, b):"], max_tokens=12, stop=(stop,))[0]
    assert c.finish_reason == "stop" and c.text == full[:full.index(stop)]
    streamed = "".join(e.text for e in engine.submit("def add(a, b):", Params(max_tokens=12, stop=(stop,))))
    assert streamed == c.text
    assert _first_stop("ab\nc", ("\n",), 0) == 2 and _stop_prefix("abc<|e", ("<|end|>",)) == 3


def test_sampling_repeats_from_its_seed_and_differs_across_seeds(engine):
    settings = dict(max_tokens=16, temperature=1.0, top_p=0.9)
    a, b = engine.generate(["def add(a, b):"] * 2, seed=7, **settings)
    c = engine.generate(["def add(a, b):"], seed=8, **settings)[0]
    assert a.token_ids == b.token_ids != c.token_ids


def test_bad_requests_are_refused_before_they_queue(engine):
    with pytest.raises(ValueError, match="temperature"):
        Params(temperature=-1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        engine.submit([5] * 2000)
    with pytest.raises(ValueError, match="empty"):
        engine.submit([])


def test_token_ids_outside_the_vocabulary_are_refused_before_they_queue(engine):
    vocab = engine.model.config.vocab_size
    for bad in (vocab, -1, 2**70):
        with pytest.raises(ConfigError, match="vocabulary"):
            engine.submit([5, bad])
    assert engine.generate([[5, vocab - 1]], max_tokens=2)[0].completion_tokens == 2


def test_a_prompt_that_cannot_become_a_tensor_fails_only_itself(engine, alone):
    running = engine.submit(PROMPTS[1], Params(max_tokens=LONG))
    wait_for(lambda: len(running.tokens) >= 2)
    bad = Job(0, [2**70], Params(max_tokens=2), None)  # past submit's checks: torch.tensor overflows in prefill
    with engine._wake:
        engine._waiting.append(bad)
        engine._wake.notify()
    assert bad.result(20).finish_reason == "error" and "Overflow" in str(bad.error)
    tokens = len(running.tokens)
    wait_for(lambda: len(running.tokens) > tokens)
    assert not running.done  # the running batch decodes on
    running.cancel()


def test_shutdown_finishes_in_time_cancels_the_rest_and_closes_the_model(tmp_path):
    model, tokenizer = load_with_tokenizer(None, cache_experts=24, dtype="float32", progress=False)
    engine = Engine(model, tokenizer, max_batch=2)
    quick = engine.submit("def f():", Params(max_tokens=3))
    slow = engine.submit("def g():", Params(max_tokens=100_000 // 100))
    wait_for(lambda: len(slow.tokens) >= 1)
    start = time.monotonic()
    engine.shutdown(timeout=0.5)
    assert time.monotonic() - start < 10
    assert quick.result(0).finish_reason == "length"
    assert slow.result(0).finish_reason in ("cancelled", "stop")
    with pytest.raises(EngineClosedError):
        engine.submit("def h():")
    with pytest.raises(ModelClosedError):
        model.offload.cache.check_open()
