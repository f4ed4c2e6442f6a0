"""offload-moe serve over HTTP: the real OpenAI client against a server on 127.0.0.1, errors, a full queue, a
failing read, disconnects, the API key, metrics, and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from faults import Faults

from typer.testing import CliRunner

from offload_moe.cli import app
from offload_moe.errors import ConfigError
from offload_moe.generation import load_with_tokenizer
from offload_moe.serve import Engine, build_server, require_serve_extra

MODEL = "demo"
CHAT = [{"role": "user", "content": "def add(a, b):"}]


class Running:
    """A server on a free port of 127.0.0.1, in a thread of this process (so faults injected here reach it)."""

    def __init__(self, engine: Engine, **options):
        self.engine = engine
        self.server, sock = build_server(engine, model_name=MODEL, port=0, **options)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started)

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def wait_for(condition, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server():
    model, tokenizer = load_with_tokenizer(None, cache_experts=24, dtype="float32", progress=False)
    running = Running(Engine(model, tokenizer, max_batch=2, max_queue=1))
    yield running
    running.stop()
    running.engine.shutdown(timeout=0)


@pytest.fixture
def client(server):
    wait_for(lambda: server.engine.stats()["batch_size"] == 0 and server.engine.stats()["queue_depth"] == 0)
    return server.client()


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_chat_answers_with_the_chat_template_and_counts_tokens(client, server):
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    tokenizer = server.engine.tokenizer
    prompt = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    expected = server.engine.generate([tokenizer(prompt, add_special_tokens=False).input_ids], max_tokens=8)[0]
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == expected.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (expected.prompt_tokens, 8)


def test_streamed_chat_gives_the_same_text_then_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8 and not chunks[-1].choices


def test_completions_with_a_stop_string(client):
    whole = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=6, temperature=0)
    text = whole.choices[0].text
    assert whole.usage.completion_tokens == 6 and text
    cut = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=6, temperature=0, stop=[text[2:4]])
    assert cut.choices[0].text == text[:text.index(text[2:4])] and cut.choices[0].finish_reason == "stop"


def test_concurrent_greedy_requests_get_the_answers_they_get_alone(client):
    prompts = ["def add(a, b):", "class Stack:", "import numpy as np\n"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=8, temperature=0).choices[0].text
             for p in prompts]
    with ThreadPoolExecutor(2) as pool:  # max_batch 2, queue 1: all three fit
        together = list(pool.map(lambda p: client.completions.create(model=MODEL, prompt=p, max_tokens=8,
                                                                     temperature=0).choices[0].text, prompts))
    assert together == alone


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": CHAT, "max_tokens": 0}, "max_tokens"),
    ({"messages": CHAT, "temperature": "hot"}, "temperature"),
    ({"messages": CHAT, "n": 2}, "n"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"messages": CHAT, "stop": [""]}, "stop"),
])
def test_a_bad_request_answers_400_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, **body)
    assert e.value.status_code == 400 and e.value.body["param"] == param and param.split("[")[0] in e.value.message


def test_a_token_id_outside_the_vocabulary_answers_400_and_others_are_served(client, server):
    vocab = server.engine.model.config.vocab_size
    for bad in (vocab, -1, 2**70):
        r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": [5, bad], "max_tokens": 2})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        assert "vocabulary" in r.json()["error"]["message"]
    assert client.completions.create(model=MODEL, prompt=[5, vocab - 1], max_tokens=2).usage.completion_tokens == 2


def test_an_unknown_model_and_broken_json_are_refused(client, server):
    with pytest.raises(openai.NotFoundError, match="runs 'demo'"):
        client.completions.create(model="gpt-4", prompt="x")
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_a_full_queue_answers_429_with_retry_after(server):
    # max_batch 2 and max_queue 1: two long streams decode, a third waits, the fourth is refused
    streams = [server.client().completions.create(model=MODEL, prompt="def f():", max_tokens=2000, temperature=0,
                                                  stream=True) for _ in range(2)]
    for s in streams:
        next(iter(s))
    waiting = threading.Thread(target=lambda: server.client().completions.create(model=MODEL, prompt="x", max_tokens=2))
    waiting.start()
    wait_for(lambda: server.engine.stats()["queue_depth"] == 1)
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["code"] == "queue_full"
    for s in streams:
        s.close()
    waiting.join(30)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server):
    before = server.engine.stats()["cancelled"]
    with httpx.stream("POST", f"{server.url}/v1/chat/completions",
                      json={"model": MODEL, "messages": CHAT, "max_tokens": 2000, "temperature": 0,
                            "stream": True}) as r:
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        wait_for(lambda: server.engine.stats()["batch_size"] == 1)
    wait_for(lambda: server.engine.stats()["batch_size"] == 0, timeout=10)
    assert server.engine.stats()["cancelled"] == before + 1


def test_a_failing_expert_read_answers_500_and_the_server_serves_on(client, server, monkeypatch):
    faults = Faults(monkeypatch)
    faults.arm("eio")
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model=MODEL, prompt="def read(path):", max_tokens=20, temperature=0)
    assert e.value.status_code == 500 and "Input/output error" in e.value.message
    faults.clear()
    assert client.completions.create(model=MODEL, prompt="def read(path):", max_tokens=4).usage.completion_tokens == 4
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_metrics_count_requests_tokens_and_the_expert_cache(client, server):
    client.completions.create(model=MODEL, prompt="x", max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line and not line.startswith("#")}
    assert values['offload_moe_requests_total{outcome="finished"}'] >= 1
    assert values["offload_moe_generated_tokens_total"] >= 3
    assert values["offload_moe_time_to_first_token_seconds_count"] >= 1
    for name in ("queue_depth", "tokens_per_second", "expert_cache_hits_total", "expert_cache_misses_total",
                 "expert_cache_hit_rate", "expert_bytes_loaded_total", "expert_stall_seconds_total",
                 "prefetch_recall"):
        assert f"offload_moe_{name}" in values
    assert values["offload_moe_expert_cache_misses_total"] > 0
    assert values['offload_moe_http_responses_total{path="/v1/completions",status="200"}'] >= 1


def test_expert_loads_leave_out_experts_computed_from_the_mapping():
    from offload_moe.serve.metrics import _cache_metrics

    model, tokenizer = load_with_tokenizer(None, cache_experts=8, io="mmap", progress=False)  # bf16: mappable
    try:
        with Engine(model, tokenizer, max_batch=1, close_model=False) as engine:
            engine.generate(["def add(a, b):"], max_tokens=4)
        stats = model.offload.stats()
    finally:
        model.offload.close()
    values = {m.name: m.samples[0].value for m in _cache_metrics(stats)}
    assert stats["mapped_experts"] > 0 and values["offload_moe_expert_cache_misses"] == stats["misses"]
    assert values["offload_moe_expert_loads"] == stats["misses"] - stats["mapped_experts"] + stats["prefetch_issued"]
    assert values["offload_moe_expert_loads"] < stats["misses"] + stats["prefetch_issued"]


def test_an_api_key_is_required_when_set(server):
    keyed = Running(server.engine, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            keyed.client("wrong").models.list()
        assert [m.id for m in keyed.client("s3cret").models.list().data] == [MODEL]
        assert httpx.get(f"{keyed.url}/health").status_code == 200  # health and metrics stay open
    finally:
        keyed.stop()


def test_without_the_serve_extra_serve_says_what_to_install(monkeypatch):
    """The engine needs no extra (tests/test_architecture.py keeps fastapi, uvicorn and prometheus_client
    imported inside functions only); serving says which command installs them."""
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r'pip install "offload_moe\[serve\]" \(fastapi is missing\)'):
        require_serve_extra()
    result = CliRunner().invoke(app, ["serve", "--port", "0"])  # refused before the model loads
    assert isinstance(result.exception, ConfigError) and "offload_moe[serve]" in str(result.exception)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_sigterm_stops_accepting_ends_the_stream_closes_and_exits_0():
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "offload_moe", "serve", "--port", str(port), "--cache-experts", "24",
                             "--dtype", "float32", "--shutdown-timeout", "1", "--model-name", MODEL],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read()
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=120)
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": "def f():", "max_tokens": 900, "temperature": 0,
                                "stream": True}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]", rest[-3:]
        assert "shut down" in json.loads(rest[-2].removeprefix("data: "))["error"]["message"]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
