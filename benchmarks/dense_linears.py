"""The dense part of one decode step on the CPU in bf16, with offload_moe's GEMV and with torch's kernel.

A benchmark, not a test. Builds the dense ``nn.Linear`` layers of a model's decode step (attention q, k, v, o per
layer and ``lm_head``; Mixtral's shapes by default), routes them as ``attach`` does (``kernels.route_dense_linears``)
and times one token through all of them, in child processes run alternately with ``$OFFLOAD_MOE_GEMV=on`` and
``off`` (the machine's speed drifts: compare the rounds side by side). Prints a table and the load average.

    python benchmarks/dense_linears.py --layers 4 --vocab 32000 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

SHAPES = {  # hidden, q heads x head_dim, kv heads x head_dim
    "mixtral": (4096, 4096, 1024),
    "qwen3": (2048, 4096, 512),
}


def build(shape: str, layers: int, vocab: int) -> nn.Module:
    hidden, q, kv = SHAPES[shape]
    blocks = [nn.ModuleDict({"q_proj": nn.Linear(hidden, q, bias=False), "k_proj": nn.Linear(hidden, kv, bias=False),
                             "v_proj": nn.Linear(hidden, kv, bias=False), "o_proj": nn.Linear(q, hidden, bias=False)})
              for _ in range(layers)]
    model = nn.ModuleDict({"layers": nn.ModuleList(blocks), "lm_head": nn.Linear(hidden, vocab, bias=False)})
    return model.to(torch.bfloat16).requires_grad_(False)


def step(model: nn.Module, x: torch.Tensor) -> None:
    for block in model["layers"]:
        for name in ("q_proj", "k_proj", "v_proj"):
            block[name](x)
        block["o_proj"](torch.ones(1, block["o_proj"].in_features, dtype=torch.bfloat16))
    model["lm_head"](x)


def child(args) -> None:
    from offload_moe import kernels

    torch.set_num_threads(args.threads)
    model = build(args.shape, args.layers, args.vocab)
    undo = kernels.route_dense_linears(model, skip=[], device=torch.device("cpu"))
    x = torch.randn(1, SHAPES[args.shape][0], dtype=torch.bfloat16)
    times = []
    with torch.inference_mode():
        for i in range(args.warmup + args.steps):
            start = time.perf_counter()
            step(model, x)
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
    undo()
    mib = sum(p.numel() * 2 for p in model.parameters()) / 2**20
    print(json.dumps({"ms": statistics.median(times) * 1e3, "mib": mib}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mixtral")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=10, help="timed steps per process (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="off/on pairs of processes, alternating")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    runs: dict[str, list[float]] = {"off": [], "on": []}
    mib = 0.0
    for _ in range(args.rounds):
        for gemv in ("off", "on"):
            out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], check=True, capture_output=True,
                                 text=True, env={**os.environ, "OFFLOAD_MOE_GEMV": gemv})
            found = json.loads(out.stdout.strip().splitlines()[-1])
            runs[gemv].append(found["ms"])
            mib = found["mib"]
    print(f"{args.shape} dense step: {args.layers} layers of q, k, v, o + lm_head [{args.vocab}, H] = {mib:.0f} MiB bf16, "
          f"{args.threads} threads; load average {os.getloadavg()[0]:.2f}")
    print(f"{'round':>5} {'torch ms':>9} {'gemv ms':>8} {'ratio':>6}")
    for i, (off, on) in enumerate(zip(runs["off"], runs["on"])):
        print(f"{i:>5} {off:9.1f} {on:8.1f} {off / on:6.2f}")
    off, on = statistics.median(runs["off"]), statistics.median(runs["on"])
    ratio = statistics.median(a / b for a, b in zip(runs["off"], runs["on"]))  # of the rounds side by side
    print(f"{'med':>5} {off:9.1f} {on:8.1f} {ratio:6.2f}   ({mib / 1024 / (off / 1e3):.1f} vs "
          f"{mib / 1024 / (on / 1e3):.1f} GiB/s)")


if __name__ == "__main__":
    main()
