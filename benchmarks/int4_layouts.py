"""int4 experts on a CPU whose torch kernel reads another layout than the stored (AVX-512) one.

A benchmark, not a test. Run it under the CPU code to measure (``ATEN_CPU_CAPABILITY`` is read when torch is
imported; on an AVX-512 machine ``avx2`` and ``default`` give the layouts of those CPUs):

    ATEN_CPU_CAPABILITY=avx2 python benchmarks/int4_layouts.py --json benchmarks/results/int4_layouts-avx2.json
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/int4_layouts.py --quick        # smoke run

One expert's three matrices (gate and up [I, H], down [H, I]; Mixtral-8x7B: H 4096, I 14336), int4 in groups of
``--group``, computed by ``kernels.quantized_linear`` as the runtime computes them, for one token (bf16):

- ``fallback``: the weight in the stored layout, which this torch's kernel cannot read: dequantized into the
  model's one buffer, then ``F.linear`` (every call; what offload_moe did on these CPUs before; the same
  code as ``quantized_linear``'s fallback, called directly so that it runs under any CPU code);
- ``kernel``: the weight in the layout the slot holds (``kernels.held_format``): torch's kernel, every call;

and, once per slot fill (per miss), the conversion of the stored bytes into that layout:

- ``convert``: ``quant.convert_int4_tiles`` from a staging buffer into the slot (what the mover does);
- ``copy``: a plain copy of the same bytes (the least a fill costs once the bytes are in memory);
- ``unpack+torch pack``: the codes unpacked and packed again by ``torch._convert_weight_to_int4pack_for_cpu``
  (the alternative the conversion replaces).

The per-call rows cycle through ``--copies`` copies of the expert so that each call reads its weights from RAM,
not from the last-level cache. Best of ``--rounds`` rounds, with the median beside it; the machine is shared and
noisy, so read the ratios, which are measured side by side. Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

from offload_moe import kernels, quant
from offload_moe.atomic import atomic_write
from offload_moe.formats import QuantizedWeight

SHAPES = {"mixtral": (4096, 14336), "qwen3": (2048, 768), "tiny": (256, 128)}  # (hidden H, intermediate I)


def expert(hidden: int, inner: int, group: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """One expert's gate, up and down projections as stored: int4 tiles (AVX-512) and bf16 scales and zeros."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, cols in ((inner, hidden), (inner, hidden), (hidden, inner)):
        packed, sz = quant.quantize_int4(torch.randn(rows, cols, generator=g) * 0.02, group)
        out.append({"qweight": packed, "scales_and_zeros": sz.bfloat16()})
    return out


def timed(options: dict[str, tuple[Callable[[], object], int]], rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each option ``(fn, calls)``, one figure per round of ``calls`` calls. The options take
    turns within each round, so that each round's figures share the machine's state."""
    out: dict[str, list[float]] = {name: [] for name in options}
    for fn, _ in options.values():
        fn()  # warm: allocations, lazy initialisation, first touch of the pages
    for _ in range(rounds):
        for name, (fn, calls) in options.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            out[name].append((time.perf_counter() - start) / calls)
    return out


def run(shape: str, group: int, copies: int, rounds: int) -> dict:
    hidden, inner = SHAPES[shape]
    layout = kernels.int4_kernel_layout()
    held = layout or quant.AVX512
    stored = [expert(hidden, inner, group, seed) for seed in range(copies)]  # [copy][matrix]
    slots = [[{"qweight": quant.convert_int4_tiles(m["qweight"], held), "scales_and_zeros": m["scales_and_zeros"]}
              for m in e] for e in stored]
    x = torch.randn(1, hidden, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(99))

    def expert_call(experts: list, int4_layout: quant.Int4Layout, scratch: kernels.Scratch) -> Callable[[], object]:
        weights = [[QuantizedWeight("int4", (m,), (group,), int4_layout) for m in e] for e in experts]
        turn = iter(range(10**12))

        def linear(x: torch.Tensor, w: QuantizedWeight) -> torch.Tensor:
            if int4_layout == held:  # as the runtime computes a slot's weight: the kernel
                return kernels.quantized_linear(x, w, None, scratch)
            return torch.nn.functional.linear(x, w.dequantize(scratch.take(w.shape, x.dtype, x.device)))  # its fallback

        def call():
            gate, up, down = weights[next(turn) % len(weights)]
            return linear(torch.nn.functional.silu(linear(x, gate)) * linear(x, up), down)
        return call

    kernel_scratch = kernels.Scratch()
    fallback, kernel = expert_call(stored, quant.AVX512, kernels.Scratch()), expert_call(slots, held, kernel_scratch)
    want, got = fallback(), kernel()
    error = ((got.float() - want.float()).norm() / want.float().norm()).item()
    kernel_path = kernel_scratch.buffer is None  # the kernel made no dequantized copy

    staging = [m["qweight"].clone() for m in stored[0]]
    slot = [torch.empty_like(q) for q in staging]
    times = timed({
        "fallback": (fallback, copies),
        "kernel": (kernel, copies),
        "convert": (lambda: [quant.convert_int4_tiles(s, held, out=d) for s, d in zip(staging, slot)], 1),
        "copy": (lambda: [d.copy_(s) for s, d in zip(staging, slot)], 1),
        "unpack+torch pack": (lambda: [torch._convert_weight_to_int4pack_for_cpu(quant.unpack_int4_tiles(s).int(), 1)
                                       for s in staging], 1),
    }, rounds)
    stored_bytes = sum(t.nbytes for m in stored[0] for t in m.values())
    return {"shape": shape, "hidden": hidden, "inner": inner, "group": group, "stored_bytes": stored_bytes,
            "layout": layout.name if layout else None, "kernel_path": kernel_path, "relative_error": error,
            "seconds": {k: {"best": min(v), "median": statistics.median(v), "rounds": v} for k, v in times.items()}}


def table(r: dict) -> str:
    s = r["seconds"]
    base = s["fallback"]["best"]
    lines = [f"{r['shape']} expert (H {r['hidden']}, I {r['inner']}), int4 groups of {r['group']}, "
             f"{r['stored_bytes'] / 2**20:.1f} MiB stored; torch's kernel layout: {r['layout']}; "
             f"kernel path taken: {r['kernel_path']}; kernel vs fallback rel err {r['relative_error']:.1e}",
             "| what | when | ms best | ms median | x fallback |", "|---|---|---|---|---|"]
    for name in s:
        when = "every call" if name in ("fallback", "kernel") else "once a fill"
        lines.append(f"| {name} | {when} | {s[name]['best'] * 1e3:.1f} | {s[name]['median'] * 1e3:.1f} | "
                     f"{s[name]['best'] / base:.3f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="mixtral", choices=sorted(SHAPES))
    parser.add_argument("--group", type=int, default=64, choices=sorted(quant.INT4_KERNEL_GROUPS))
    parser.add_argument("--copies", type=int, default=4, help="experts cycled through by the per-call rows")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="a tiny expert, 2 rounds: a smoke run")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.quick:
        args.shape, args.copies, args.rounds = "tiny", 2, 2
    report = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
              "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "result": run(args.shape, args.group, args.copies, args.rounds)}
    print(f"torch {report['torch']}, {report['cpu_capability']} code, {report['threads']} threads, "
          f"load average {' '.join(f'{v:.2f}' for v in report['load_average'])}")
    print(table(report["result"]))
    if args.json:
        atomic_write(args.json, json.dumps(report, indent=2).encode())
    return report


if __name__ == "__main__":
    main()
