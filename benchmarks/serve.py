"""Serving under concurrent streaming clients: aggregate tokens/s, time to first token and expert loads per
generated token, for 1, 2, 4 and 8 clients and for several cache configurations side by side in one run.
A benchmark, not a test.

Each configuration (``--configs``: an eviction policy, ``:off`` for the cache's rule for steps of several
tokens turned off, as it was before that rule) is one ``offload-moe serve`` server (in this process, on a
free port of 127.0.0.1) over its own copy of the model with a quarter of its experts in slots. Each
client is a thread that streams completions of ``--tokens`` greedy tokens one after the
other through the HTTP API: every client count serves the same ``--requests`` requests (each of the 8
prompts in turn), shared out among its clients, so that one client and eight decode the same tokens.
The client counts run in turn and, for each, the configurations one after the other, so that the
machine's load falls on all of them alike. Expert loads are the cache's misses
plus prefetches over the run, divided by the tokens generated. ``floor`` is the fewest loads per token
any cache of that many slots could have paid for the same steps: a step that asks for more experts
than there are slots must load the rest. The clients run in this process too, so on a small machine
they take some CPU from the server: the figures are a lower bound.

    python benchmarks/serve.py                                   # the bundled model, 25% of its experts in slots
    python benchmarks/serve.py --synthetic mini --layers 2       # a Mixtral-structured synthetic checkpoint
    python benchmarks/serve.py --clients 1,8 --configs lru:off,forecast --tokens 32 --json serve.json
    python benchmarks/serve.py --peer llama.cpp --synthetic mini --layers 2 --configs lru   # beside llama-server

``--peer llama.cpp`` serves the same checkpoint with llama.cpp's ``llama-server`` too (``benchmarks/peers``: the
checkpoint written per expert with the hub's Mixtral names and a synthetic tokenizer, converted to f16 GGUF,
the precision the bf16 checkpoint pairs with there; ``llama-server`` built once with
``python -m benchmarks.peers.llama_cpp build-server``), with ``--parallel 8`` slots (continuous batching) and
the same threads, and the same clients stream from it. It holds the whole model in RAM (mapped): it does
not offload, so its row has no loads.

``--synthetic SHAPE`` writes (once, into ``--folder``) a checkpoint of ``benchmarks/decode.py``'s shapes
(``mixtral``: Mixtral-8x7B's layer dimensions; ``mini``: the same structure, smaller) with random weights,
the bundled model's vocabulary and tokenizer, so that it can be served. Random routing spreads tokens over
the experts more evenly than a trained model does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))

from decode import SHAPES, expert_capacity  # noqa: E402

import offload_moe  # noqa: E402
import transformers  # noqa: E402
from offload_moe import demo_model_path  # noqa: E402
from offload_moe.generation import load_with_tokenizer  # noqa: E402
from offload_moe.serve import Engine, build_server  # noqa: E402

PROMPTS = ["def read_lines(path):", "import numpy as np\n\ndef normalize(x):", "class Stack:\n    def __init__(self):",
           "def fib(n):", "# Sort a list of words by length\n", "def parse_args():", "for i in range(10):",
           "def merge(a, b):"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def synthetic_checkpoint(shape: str, layers: int, folder: Path) -> Path:
    """A random-weight checkpoint of ``shape`` with the bundled model's vocabulary and tokenizer files."""
    from offload_moe.synthetic import write_synthetic_checkpoint

    if not (folder / "config.json").exists():
        kwargs = dict(SHAPES[shape])
        model_type = kwargs.pop("model_type")
        kwargs["vocab_size"] = 4096  # the bundled tokenizer's
        print(f"writing a {shape}-shaped checkpoint with {layers} layers to {folder} ...", file=sys.stderr)
        write_synthetic_checkpoint(folder, model_type, dtype=torch.bfloat16, num_hidden_layers=layers,
                                   max_position_embeddings=4096, tie_word_embeddings=False, **kwargs)
    for name in TOKENIZER_FILES:
        if (demo_model_path() / name).exists() and not (folder / name).exists():
            shutil.copy(demo_model_path() / name, folder / name)
    return folder


def served_checkpoint(shape: str | None, layers: int, folder: Path | None) -> Path:
    """A synthetic checkpoint of ``shape`` with ``layers`` layers (in ``folder``, default a temporary folder named
    after them, written once), or the bundled model when ``shape`` is None."""
    if shape is None:
        return demo_model_path()
    folder = folder or Path(tempfile.gettempdir()) / f"offload-moe-serve-{shape}-{layers}"
    return synthetic_checkpoint(shape, layers, folder)


def total_experts(path: str | Path) -> int:
    """The routed experts of the checkpoint at ``path``, all layers together, from its config.json."""
    config = json.loads((Path(path) / "config.json").read_text())
    return config["num_hidden_layers"] * (config.get("num_local_experts") or config.get("num_experts"))


def stream_one(url: str, prompt: str, tokens: int) -> dict:
    """One streamed greedy completion: time to first text, tokens generated (from the usage chunk)."""
    start = time.perf_counter()
    ttft, used = None, 0
    body = {"model": "bench", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if ttft is None and chunk["choices"] and chunk["choices"][0]["text"]:
                ttft = time.perf_counter() - start
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
    return {"ttft": ttft if ttft is not None else time.perf_counter() - start, "tokens": used}


class StepCounter:
    """Counts the experts each forward pass asks the cache for (a wrapper around ``cache.use``; a step begins at
    the first MoE layer), to give the fewest loads any cache of ``slots`` slots could pay for those steps."""

    def __init__(self, cache):
        self.slots = cache.capacity
        self.first = min(cache.layer_names)
        self.steps: list[int] = []  # distinct experts asked for, all layers together, per step
        use = cache.use

        def counted(layer, experts, **kwargs):
            if layer == self.first or not self.steps:
                self.steps.append(0)
            self.steps[-1] += len(experts)
            return use(layer, experts, **kwargs)

        cache.use = counted

    def floor(self, since: int) -> int:
        """Loads that no cache of this size avoids over the steps from ``since`` on: a step asking for ``n`` experts
        finds at most ``slots`` of them resident."""
        return sum(max(0, n - self.slots) for n in self.steps[since:])


@dataclass
class Served:
    """One configuration: its model, engine, server thread and URL."""

    label: str
    engine: Engine
    counter: StepCounter
    url: str
    server: object
    thread: threading.Thread


def parse_configs(text: str) -> list[tuple[str, str, bool]]:
    """``lru:off,lru,forecast`` -> (label, policy, the rule for steps of several tokens on)."""
    out = []
    for item in text.split(","):
        policy, _, rule = item.strip().partition(":")
        if rule not in ("", "on", "off"):
            raise SystemExit(f"--configs: {item!r}: write POLICY or POLICY:off")
        out.append((item.strip(), policy, rule != "off"))
    return out


def serve_config(path: Path, label: str, policy: str, rule: bool, slots: int, dtype: str) -> Served:
    model, tokenizer = load_with_tokenizer(path, cache_experts=slots, dtype=dtype, policy=policy, progress=False)
    model.offload.cache.recycle = rule
    counter = StepCounter(model.offload.cache)
    engine = Engine(model, tokenizer, max_batch=8, max_queue=64)
    server, sock = build_server(engine, model_name="bench", port=0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    stream_one(url, PROMPTS[0], 4)  # warm-up: first-call costs out of the figures
    return Served(label, engine, counter, url, server, thread)


def stop(served: Served) -> None:
    served.server.should_exit = True
    served.thread.join(30)
    served.engine.shutdown(timeout=0)


def run_clients(served: Served, clients: int, requests: int, tokens: int) -> dict:
    engine, url = served.engine, served.url
    model = engine.model
    model.offload.reset_stats()
    before, first_step = engine.stats(), len(served.counter.steps)
    load_before = os.getloadavg()[0]
    results = drive_clients(url, clients, requests, tokens)
    s, after = model.offload.stats(), engine.stats()
    row = summarise(results, clients)
    steps = after["decode_steps"] - before["decode_steps"]
    asked = served.counter.steps[first_step:]
    loads = s["misses"] + s["prefetch_issued"]
    row.update({"config": served.label, "policy": s["policy"], "expert_loads": loads,
                "loads_per_token": loads / max(1, row["tokens"]),
                "floor_per_token": served.counter.floor(first_step) / max(1, row["tokens"]),
                "experts_per_step": sum(asked) / max(1, len(asked)), "steps": len(asked),
                "mean_batch": (after["decode_rows"] - before["decode_rows"]) / max(1, steps), "hit_rate": s["hit_rate"],
                "load_average": [load_before, os.getloadavg()[0]]})
    return row


def drive_clients(url: str, clients: int, requests: int, tokens: int) -> list[dict]:
    """``clients`` threads streaming ``requests`` completions in all, request ``j`` (prompt ``j`` of ``PROMPTS``, in
    turn) by client ``j % clients``, each client's one after the other; returns each request's ``stream_one``
    result with the wall time of the whole run as ``wall``."""
    results: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(i, requests, clients):
            out = stream_one(url, PROMPTS[j % len(PROMPTS)], tokens)
            with lock:
                results.append(out)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    return [{**r, "wall": seconds} for r in results]


def summarise(results: list[dict], clients: int) -> dict:
    """Aggregate tokens/s and TTFT median and p95 of one client count's requests."""
    seconds = results[0]["wall"]
    generated = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": generated, "seconds": seconds,
            "tokens_per_s": generated / seconds, "ttft_median": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))]}


class LlamaServer:
    """llama.cpp's ``llama-server`` on a free port of 127.0.0.1, over the GGUF conversion of ``folder``."""

    def __init__(self, folder: Path, *, threads: int, parallel: int = 8, context: int = 512):
        from benchmarks.peers import llama_cpp, side_by_side

        self.llama = llama = llama_cpp.LlamaCpp(llama_cpp.default_cache_dir())
        llama_cpp.build_server(llama)
        self.gguf = llama_cpp.convert(llama, folder, side_by_side.PAIRS["bf16"], threads=threads)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.log = folder.parent / f"{folder.name}-llama-server.log"
        command = llama_cpp.server_command(llama, self.gguf, port=port, threads=threads, parallel=parallel,
                                           context=context)
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"llama-server did not start: see {self.log}")
            time.sleep(0.5)
        stream_one(self.url, PROMPTS[0], 4)  # warm-up

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def run_clients(self, clients: int, requests: int, tokens: int) -> dict:
        load_before = os.getloadavg()[0]
        row = summarise(drive_clients(self.url, clients, requests, tokens), clients)
        row.update({"config": f"llama.cpp {self.gguf.name.rsplit('-', 1)[-1].removesuffix('.gguf')}",
                    "policy": None, "expert_loads": None, "loads_per_token": None, "floor_per_token": None,
                    "experts_per_step": None, "steps": None, "mean_batch": None, "hit_rate": None,
                    "load_average": [load_before, os.getloadavg()[0]]})
        return row

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,2,4,8", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--configs", default="lru:off,lru,forecast",
                        help="comma-separated cache configurations: an eviction policy, ':off' for the rule for steps "
                             "of several tokens turned off (ExpertCache.recycle, as before it existed)")
    parser.add_argument("--requests", type=int, default=16,
                        help="requests in all at every client count, shared out among the clients")
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per request")
    parser.add_argument("--resident", type=float, default=0.25, help="share of all experts in slots")
    parser.add_argument("--synthetic", choices=sorted(SHAPES), help="serve a synthetic checkpoint of this shape")
    parser.add_argument("--layers", type=int, default=4, help="layers of the synthetic checkpoint")
    parser.add_argument("--folder", type=Path, help="where the synthetic checkpoint is (written once)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (float32 is fastest on most CPUs)")
    parser.add_argument("--peer", choices=["llama.cpp"],
                        help="serve the same checkpoint with llama.cpp's llama-server too (needs --synthetic)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every (clients, configuration) this many times, in turn; the table gives medians")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    if args.peer and not args.synthetic:
        raise SystemExit("--peer llama.cpp: give --synthetic mini or mixtral (the bundled model is not converted "
                         "to GGUF)")
    if args.peer:
        from benchmarks.peers.side_by_side import write_checkpoint

        folder = args.folder or Path(tempfile.gettempdir()) / f"offload-moe-serve-peer-{args.synthetic}-{args.layers}"
        path = write_checkpoint(SHAPES[args.synthetic], args.layers, folder)
    else:
        path = served_checkpoint(args.synthetic, args.layers, args.folder)
    total = total_experts(path)
    slots = expert_capacity(args.resident, total)
    clients = [int(c) for c in args.clients.split(",")]
    load_at_start = os.getloadavg()
    served, peer = [], None
    try:
        for label, policy, rule in parse_configs(args.configs):
            served.append(serve_config(path, label, policy, rule, slots, args.dtype))
        if args.peer:
            peer = LlamaServer(Path(path), threads=torch.get_num_threads(),
                               context=args.tokens + 64)  # the longest prompt and its tokens, per slot
        runs = []
        for _ in range(args.rounds):
            for c in clients:
                runs += [run_clients(s, c, args.requests, args.tokens) for s in served]
                if peer is not None:
                    runs.append(peer.run_clients(c, args.requests, args.tokens))
        labels = [s.label for s in served] + ([runs[-1]["config"]] if peer is not None else [])
        rows = [merge_rounds([r for r in runs if r["config"] == label and r["clients"] == c])
                for c in clients for label in labels]
    finally:
        for s in served:
            stop(s)
        if peer is not None:
            peer.stop()
    report = {"model": str(path), "shape": args.synthetic or "bundled", "experts": f"{slots} of {total} in slots",
              "slots": slots, "tokens_per_request": args.tokens, "requests": args.requests,
              "rounds": args.rounds,
              "peer": {"gguf": str(peer.gguf), "llama_cpp": peer.llama.commit(), "threads": torch.get_num_threads(),
                       "parallel": 8} if peer is not None else None,
              "dtype": args.dtype, "date": datetime.date.today().isoformat(),
              "load_average": {"start": load_at_start, "end": os.getloadavg()},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "offload_moe": offload_moe.__version__},
              "rows": rows}
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def merge_rounds(runs: list[dict]) -> dict:
    """One row from the rounds of a (clients, configuration): medians of the timings and of the loads, each
    round's tokens/s kept."""
    row = dict(runs[0])
    for key in ("tokens_per_s", "ttft_median", "ttft_p95", "loads_per_token", "floor_per_token", "experts_per_step",
                "mean_batch", "hit_rate", "seconds"):
        if row[key] is not None:
            row[key] = statistics.median(r[key] for r in runs)
    row["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    row["load_average"] = [min(r["load_average"][0] for r in runs), max(r["load_average"][1] for r in runs)]
    return row


def print_table(report: dict) -> None:
    rows = report["rows"]
    fewest = min(x["clients"] for x in rows)
    ones = {r["config"]: r for r in rows if r["clients"] == fewest}
    base = next(iter(ones.values()))  # the first configuration's fewest clients: "before"
    la = report["load_average"]
    print(f"\n{report['model']} ({report['shape']}, {report['dtype']}): {report['experts']}, "
          f"{report['requests']} requests of {report['tokens_per_request']} greedy tokens at every client count, "
          f"{report['rounds']} round(s), medians; "
          f"load average {la['start'][0]:.2f} at start, {la['end'][0]:.2f} at end\n")
    print(f"| config | clients | tokens/s (rounds) | vs {fewest} client | TTFT median / p95 s | loads/token "
          f"| vs {fewest} client | vs {base['config']} {fewest} client | floor/token | experts/step | mean batch "
          "| hit rate | load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        one = ones[r["config"]]
        spread = "/".join(f"{x:.{0 if x >= 10 else 1}f}" for x in r["rounds_tokens_per_s"]) \
            if len(r["rounds_tokens_per_s"]) > 1 else ""
        print(f"| {r['config']} | {r['clients']} | {r['tokens_per_s']:.1f}{f' ({spread})' if spread else ''} "
              f"| {r['tokens_per_s'] / one['tokens_per_s']:.2f}x "
              f"| {r['ttft_median']:.3f} / {r['ttft_p95']:.3f} | {_num(r['loads_per_token'])} "
              f"| {_ratio(r['loads_per_token'], one['loads_per_token'])} "
              f"| {_ratio(r['loads_per_token'], base['loads_per_token'])} | {_num(r['floor_per_token'])} "
              f"| {_num(r['experts_per_step'], 1)} | {_num(r['mean_batch'])} | {_num(r['hit_rate'], 3)} "
              f"| {r['load_average'][0]:.1f}-{r['load_average'][1]:.1f} |")
    peer = next((r["config"] for r in rows if r["policy"] is None), None)
    if peer is None:
        return
    ours = [c for c in ones if c != peer]
    print(f"\nAggregate tokens/s, ours / {peer}, and TTFT median s (ours, {peer}):\n")
    print("| clients | " + " | ".join(ours) + " |")
    print("|---:|" + "---:|" * len(ours))
    for clients in sorted({r["clients"] for r in rows}):
        at = {r["config"]: r for r in rows if r["clients"] == clients}
        theirs = at[peer]
        print(f"| {clients} | " + " | ".join(
            f"{at[c]['tokens_per_s'] / theirs['tokens_per_s']:.2f}x ({at[c]['ttft_median']:.2f}, "
            f"{theirs['ttft_median']:.2f})" for c in ours) + " |")


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else ""


if __name__ == "__main__":
    main()
