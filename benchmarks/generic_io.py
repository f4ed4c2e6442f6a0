"""offload_experts on a custom PyTorch MoE: single-token steps under each I/O mode, side by side. A benchmark.

The model is the shape a researcher writes by hand: 8 MoE layers, each with an ``experts`` ModuleList of
16 ``Sequential(Linear(1024, 4096), GELU, Linear(4096, 1024))`` (32 MiB each in float32, 4 GiB in all) and a
softmax top-2 ``gate``; the layer's own forward loops over its experts. Its experts are saved once with
``save_experts`` (``--folder``, reused), then each I/O mode runs 8 warm-up and ``--steps`` timed single-token
steps with a quarter of the experts in slots, beside the model with every expert resident.

    python benchmarks/generic_io.py --json benchmarks/results/generic_io.json
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from offload_moe.generic import offload_experts, save_experts

HIDDEN, INNER, EXPERTS, TOP_K, LAYERS = 1024, 4096, 16, 2, 8


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.top_k = TOP_K
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(HIDDEN, INNER), nn.GELU(), nn.Linear(INNER, HIDDEN)) for _ in range(EXPERTS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, index = self.gate(x).softmax(-1).topk(TOP_K, dim=-1)  # [T, k]
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            chosen = index == e
            rows = chosen.any(-1)
            if rows.any():
                out[rows] += expert(x[rows]) * (weights * chosen).sum(-1)[rows, None]
        return out


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def steps_per_s(model: nn.Module, inputs: list[torch.Tensor], warmup: int = 8) -> float:
    with torch.inference_mode():
        for x in inputs[:warmup]:
            model(x)
        start = time.perf_counter()
        for x in inputs[warmup:]:
            model(x)
        return (len(inputs) - warmup) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="/tmp/offload_moe-generic-io", help="the saved experts (reused if present)")
    parser.add_argument("--io", default="direct,buffered,mmap", help="comma-separated I/O modes")
    parser.add_argument("--steps", type=int, default=32, help="timed single-token steps per mode")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()

    torch.manual_seed(0)
    ref = Model().eval()
    folder = Path(args.folder)
    if not (folder / "experts.json").exists():
        save_experts(ref, folder)
    inputs = [torch.randn(1, HIDDEN, generator=torch.Generator().manual_seed(i)) for i in range(8 + args.steps)]
    capacity = EXPERTS * LAYERS // 4
    rows = []
    for io in args.io.split(","):
        model = copy.deepcopy(ref)
        handle = offload_experts(model, store=folder, cache_experts=capacity, io=io)
        speed = steps_per_s(model, inputs)
        s = handle.stats()
        handle.close()
        rows.append({"io": io, "steps_per_s": speed, "hit_rate": s["hits"] / max(s["hits"] + s["misses"], 1),
                     "mapped_experts": s["mapped_experts"], "bytes_loaded": s["bytes_loaded"]})
    rows.append({"io": "all resident", "steps_per_s": steps_per_s(ref, inputs)})
    print(f"custom MoE, {LAYERS} layers x {EXPERTS} experts of {2 * HIDDEN * INNER * 4 / 2**20:.0f} MiB, "
          f"{capacity} slots (25%), {args.steps} timed steps; {time.strftime('%Y-%m-%d')}, torch {torch.__version__}\n")
    print("| I/O | steps/s | hit rate | mapped experts | MiB read into slots |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['io']} | {r['steps_per_s']:.1f} | {r.get('hit_rate', 1.0):.2f} | {r.get('mapped_experts', '-')} | "
              f"{r.get('bytes_loaded', 0) / 2**20:.0f} |")
    if args.json:
        from offload_moe.atomic import atomic_write

        machine = {"platform": platform.platform(), "cpus": torch.get_num_threads(), "python": platform.python_version(),
                   "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
        atomic_write(args.json, json.dumps({"rows": rows, "machine": machine}, indent=2).encode())


if __name__ == "__main__":
    main()
