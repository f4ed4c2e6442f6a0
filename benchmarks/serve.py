"""Serving under concurrent streaming clients: aggregate tokens/s, time to first token and expert loads per
generated token, for 1, 2, 4 and 8 clients side by side in one run. A benchmark, not a test.

One ``offload-moe serve`` server (in this process, on a free port of 127.0.0.1) runs the model with a
quarter of its experts in slots; each client is a thread that streams ``--requests`` completions of
``--tokens`` greedy tokens one after the other through the HTTP API. Expert loads are the cache's
misses plus prefetches over the run, divided by the tokens generated. The clients run in this process
too, so on a small machine they take some CPU from the server: the figures are a lower bound.

    python benchmarks/serve.py                                   # the bundled model, 25% of its experts in slots
    python benchmarks/serve.py --synthetic mini --layers 4       # a Mixtral-structured synthetic checkpoint
    python benchmarks/serve.py --clients 1,8 --tokens 32 --json serve.json

``--synthetic SHAPE`` writes (once, into ``--folder``) a checkpoint of ``benchmarks/decode.py``'s shapes
(``mixtral``: Mixtral-8x7B's layer dimensions; ``mini``: the same structure, smaller) with random weights,
the bundled model's vocabulary and tokenizer, so that it can be served. Random routing spreads tokens over
the experts more evenly than a trained model does.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))

from decode import SHAPES, expert_capacity  # noqa: E402

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


def run_clients(url: str, engine: Engine, clients: int, requests: int, tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for r in range(requests):
            out = stream_one(url, PROMPTS[(i + r * clients) % len(PROMPTS)], tokens)
            with lock:
                results.append(out)

    model = engine.model
    model.offload.reset_stats()
    before = engine.stats()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    s, after = model.offload.stats(), engine.stats()
    generated = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft"] for r in results)
    steps = after["decode_steps"] - before["decode_steps"]
    return {"clients": clients, "requests": len(results), "tokens": generated, "seconds": seconds,
            "tokens_per_s": generated / seconds, "ttft_median": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))],
            "expert_loads": s["misses"] + s["prefetch_issued"],
            "loads_per_token": (s["misses"] + s["prefetch_issued"]) / max(1, generated),
            "mean_batch": (after["decode_rows"] - before["decode_rows"]) / max(1, steps), "hit_rate": s["hit_rate"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,2,4,8", help="comma-separated numbers of concurrent clients")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after the other")
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per request")
    parser.add_argument("--resident", type=float, default=0.25, help="share of all experts in slots")
    parser.add_argument("--synthetic", choices=sorted(SHAPES), help="serve a synthetic checkpoint of this shape")
    parser.add_argument("--layers", type=int, default=4, help="layers of the synthetic checkpoint")
    parser.add_argument("--folder", type=Path, help="where the synthetic checkpoint is (written once)")
    parser.add_argument("--dtype", default="float32", help="compute dtype (float32 is fastest on most CPUs)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    if args.synthetic:
        folder = args.folder or Path(tempfile.gettempdir()) / f"offload-moe-serve-{args.synthetic}-{args.layers}"
        path = synthetic_checkpoint(args.synthetic, args.layers, folder)
    else:
        path = demo_model_path()
    config = json.loads((Path(path) / "config.json").read_text())
    total = config["num_hidden_layers"] * (config.get("num_local_experts") or config.get("num_experts"))
    slots = expert_capacity(args.resident, total)
    model, tokenizer = load_with_tokenizer(path, cache_experts=slots, dtype=args.dtype, progress=False)
    engine = Engine(model, tokenizer, max_batch=8, max_queue=64)
    server, sock = build_server(engine, model_name="bench", port=0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        stream_one(url, PROMPTS[0], 4)  # warm-up: first-call costs out of the figures
        rows = [run_clients(url, engine, int(c), args.requests, args.tokens) for c in args.clients.split(",")]
    finally:
        server.should_exit = True
        thread.join(30)
        engine.shutdown(timeout=0)
    report = {"model": str(path), "experts": f"{slots} of {total} in slots", "tokens_per_request": args.tokens,
              "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
              "rows": rows}
    print_table(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def print_table(report: dict) -> None:
    rows = report["rows"]
    one = rows[0]
    print(f"\n{report['model']}: {report['experts']}, {report['tokens_per_request']} greedy tokens per request\n")
    print("| clients | requests | tokens/s | vs first row | TTFT median s | TTFT p95 s | loads/token | vs first row "
          "| mean batch | hit rate |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['tokens_per_s'] / one['tokens_per_s']:.2f}x "
              f"| {r['ttft_median']:.3f} | {r['ttft_p95']:.3f} | {r['loads_per_token']:.2f} "
              f"| {r['loads_per_token'] / max(1e-9, one['loads_per_token']):.2f} | {r['mean_batch']:.2f} "
              f"| {r['hit_rate']:.3f} |")


if __name__ == "__main__":
    main()
