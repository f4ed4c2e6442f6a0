"""One expert's SwiGLU on the CPU under each weight format torch ships, against the machine's read bandwidth.

A benchmark, not a test. At decode an expert sees one token (or a few), so its matmuls are GEMVs
whose time is the time to stream the weights from RAM. For each expert shape of a real model and
for T = 1 and 4 tokens, this times one expert's gate, up and down projections under:

- f32, bf16 and f16 ``F.linear`` (f32 is the reference for errors);
- bf16 and f16 weights reordered once into oneDNN's blocked layout (``mkldnn._reorder_linear_weight``,
  run by ``mkldnn._linear_pointwise``), and f16 weights prepacked for fbgemm (``quantized.linear_dynamic_fp16``);
- offload_moe's bf16 GEMV (``gemv.bf16_linear``, compiled with numba; 1 to 4 tokens, torch's beyond), on weights [out, in]
  (``bf16 numba``) or stored [in, out] as GPT-OSS stores them (``bf16 numba.T``); only with numba installed;
- int8 weight-only (per-channel scales): ``torch._weight_int8pack_mm``, and dequantize-then-matmul
  (int8 -> bf16 or f16 into a reused buffer, ``F.linear``, scales applied to the output);
- int4 weight-only (group-wise scale and zero): ``torch._weight_int4pack_mm_for_cpu`` at group sizes
  32, 64 and 128, and dequantize-then-matmul (nibbles -> bf16 or f16, group affine, ``F.linear``);
- ``+fuse``: gate and up as one [2I, H] matmul instead of two.

Each option cycles through enough copies of an expert that its weights, as stored, exceed the
working set (1 GiB by default, several times the last-level cache), so every call streams them from
RAM. Each round times a read-bandwidth probe (``torch.sum`` and a f32 ``torch.mv`` over a buffer of
the working set's size; the faster counts) right before the option's passes. The machine is shared
and its speed drifts, so the table gives the best of the rounds, and "x bw" is that speed over the
best probe of the same rounds (the JSON also has medians). Errors are the expert's output against
f32 on the same bf16 weights. Prints a table per shape (80 columns) and writes JSON (``--json``).

    python benchmarks/expert_kernels.py --json benchmarks/results/expert_kernels.json
    python benchmarks/expert_kernels.py --quick                    # smoke run
    python benchmarks/expert_kernels.py --shapes qwen3,mixtral --threads 1 --options "bf16,f16+fuse,int8 mm"
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from offload_moe import gemv
from offload_moe.atomic import atomic_write

# (hidden H, expert intermediate I) of one routed expert.
SHAPES = {
    "mixtral": (4096, 14336),      # Mixtral-8x7B
    "qwen3": (2048, 768),          # Qwen3-30B-A3B
    "deepseek-v2-lite": (2048, 1408),
    "gpt-oss": (2880, 2880),       # gpt-oss-20b (its biases and clamped SwiGLU are left out: only matmuls differ)
    "tiny": (256, 128),            # for the smoke test
}
DEFAULT_SHAPES = ("mixtral", "qwen3", "deepseek-v2-lite", "gpt-oss")
INT4_GROUPS = (32, 64, 128)
GiB = 2**30


class Scratch:
    """One reused buffer per (shape, dtype): a dequantize-then-matmul writes its weights here each call, as a
    runtime would, instead of allocating (and page-faulting) a fresh one."""

    def __init__(self):
        self.buffers: dict = {}

    def get(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        key = (shape, dtype)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(shape, dtype=dtype)
        return self.buffers[key]


class Source:
    """One f32 weight [N, K] (or a range of its rows) and its quantizations, worked out once for the whole
    matrix and shared by every option: rows quantize independently, so gate and up are row ranges of gate_up."""

    def __init__(self, weight: torch.Tensor, rows: slice = slice(None), memo: dict | None = None):
        self.full, self.rows_, self.memo = weight, rows, {} if memo is None else memo

    @property
    def f32(self) -> torch.Tensor:
        return self.full[self.rows_]

    def rows(self, start: int, stop: int) -> "Source":
        return Source(self.full, slice(start, stop), self.memo)

    def int8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """q int8 [N, K], scale f32 [N]; w ~ q * scale[:, None] (per output channel, symmetric)."""
        if "int8" not in self.memo:
            scale = (self.full.abs().amax(1) / 127).clamp(min=1e-12)
            self.memo["int8"] = torch.round(self.full / scale[:, None]).clamp(-127, 127).to(torch.int8), scale
        return tuple(t[self.rows_] for t in self.memo["int8"])

    def int4(self, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q uint8 [N, K] in 0..15, scale and zero f32 [N, K / group]; w ~ (q - 8) * scale + zero (tinygemm's
        convention: group-wise, asymmetric)."""
        key = ("int4", group)
        if key not in self.memo:
            n, k = self.full.shape
            g = self.full.reshape(n, k // group, group)
            lo, hi = g.amin(-1), g.amax(-1)
            scale = ((hi - lo) / 15).clamp(min=1e-12)
            q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
            self.memo[key] = q, scale, lo + 8 * scale
        return tuple(t[self.rows_] for t in self.memo[key])


@dataclass(frozen=True)
class Kernel:
    """A way to store a [N, K] weight and to apply it to activations [T, K] of dtype ``act``."""

    name: str
    family: str                                    # what the runtime would store: f32, 16-bit, int8, int4
    act: torch.dtype
    pack: Callable[[Source, Scratch], Any]         # weight -> stored form
    linear: Callable[[torch.Tensor, Any], torch.Tensor]
    min_group: int = 1                             # K must be a multiple of this


# ---- f32 and 16-bit --------------------------------------------------------------------------------------

def _plain(dtype: torch.dtype, family: str, name: str) -> Kernel:
    return Kernel(name, family, dtype, lambda w, s: w.f32.to(dtype).contiguous(), lambda x, w: F.linear(x, w))


def _onednn(dtype: torch.dtype, name: str) -> Kernel:
    return Kernel(name, "16-bit", dtype,
                  lambda w, s: torch.ops.mkldnn._reorder_linear_weight(w.f32.to(dtype), 1),
                  lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""))


def _numba_bf16(transposed: bool) -> Kernel:
    """offload_moe's bf16 GEMV (``gemv.bf16_linear``), on a weight [out, in] or one stored [in, out]."""
    if transposed:
        return Kernel("bf16 numba.T", "16-bit", torch.bfloat16, lambda w, s: w.f32.t().to(torch.bfloat16).contiguous(),
                      lambda x, w: gemv.bf16_linear(x, w, transposed=True) if gemv.fits(x, w, transposed=True)
                      else x @ w)
    return Kernel("bf16 numba", "16-bit", torch.bfloat16, lambda w, s: w.f32.to(torch.bfloat16).contiguous(),
                  lambda x, w: gemv.bf16_linear(x, w) if gemv.fits(x, w) else F.linear(x, w))


def _fbgemm_f16() -> Kernel:
    return Kernel("f16 fbgemm", "16-bit", torch.float32,
                  lambda w, s: torch.ops.quantized.linear_prepack_fp16(w.f32.contiguous()),
                  lambda x, w: torch.ops.quantized.linear_dynamic_fp16(x, w))


# ---- int8 ------------------------------------------------------------------------------------------------

@dataclass
class Int8Dequant:
    q: torch.Tensor        # int8 [N, K]
    scale: torch.Tensor    # [N], activation dtype
    buffer: torch.Tensor   # [N, K], activation dtype, shared by every expert of the option


def _int8_mm() -> Kernel:
    def pack(w, s):
        q, scale = w.int8()
        return q.contiguous(), scale.bfloat16()
    return Kernel("int8 mm", "int8", torch.bfloat16, pack, lambda x, p: torch._weight_int8pack_mm(x, p[0], p[1]))


def _int8_dequant(dtype: torch.dtype, name: str) -> Kernel:
    def pack(w, scratch):
        q, scale = w.int8()
        return Int8Dequant(q.contiguous(), scale.to(dtype), scratch.get(tuple(q.shape), dtype))

    def linear(x, p: Int8Dequant):
        p.buffer.copy_(p.q)
        return F.linear(x, p.buffer) * p.scale  # per-channel scales commute with the matmul
    return Kernel(name, "int8", dtype, pack, linear)


# ---- int4 ------------------------------------------------------------------------------------------------

@dataclass
class Int4Dequant:
    nibbles: torch.Tensor  # uint8 [N, K/2]: low nibble column j, high nibble column j + K/2
    scale: torch.Tensor    # [N, K/group, 1], activation dtype
    shift: torch.Tensor    # [N, K/group, 1]: zero - 8 * scale, so that w = q * scale + shift
    group: int
    buffer: torch.Tensor   # [N, K], activation dtype, shared
    byte: torch.Tensor     # uint8 [N, K/2], shared


LOW_NIBBLE = torch.tensor(15, dtype=torch.uint8)  # a tensor: a Python 15 costs a conversion each call


def _int4_mm(group: int) -> Kernel:
    def pack(w, s):
        q, scale, zero = w.int4(group)
        scales_and_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().bfloat16()  # [K/g, N, 2]
        return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1), scales_and_zeros
    return Kernel(f"int4 mm g{group}", "int4", torch.bfloat16, pack,
                  lambda x, p: torch._weight_int4pack_mm_for_cpu(x, p[0], group, p[1]), min_group=group)


def _int4_dequant(group: int, dtype: torch.dtype, name: str) -> Kernel:
    def pack(w, scratch):
        q, scale, zero = w.int4(group)
        n, k = q.shape
        nibbles = q[:, : k // 2] | (q[:, k // 2:] << 4)
        return Int4Dequant(nibbles.contiguous(), scale[..., None].to(dtype), (zero - 8 * scale)[..., None].to(dtype),
                           group, scratch.get((n, k), dtype), scratch.get((n, k // 2), torch.uint8))

    def linear(x, p: Int4Dequant):
        n, half = p.nibbles.shape
        torch.bitwise_and(p.nibbles, LOW_NIBBLE, out=p.byte)
        p.buffer[:, :half].copy_(p.byte)
        torch.bitwise_right_shift(p.nibbles, 4, out=p.byte)
        p.buffer[:, half:].copy_(p.byte)
        p.buffer.view(n, -1, p.group).mul_(p.scale).add_(p.shift)
        return F.linear(x, p.buffer)
    return Kernel(name, "int4", dtype, pack, linear, min_group=group)


def kernels() -> dict[str, Kernel]:
    found = [
        _plain(torch.float32, "f32", "f32"),
        _plain(torch.bfloat16, "16-bit", "bf16"),
        _plain(torch.float16, "16-bit", "f16"),
        _onednn(torch.bfloat16, "bf16 onednn"),
        _onednn(torch.float16, "f16 onednn"),
        _fbgemm_f16(),
        *((_numba_bf16(False), _numba_bf16(True)) if gemv.available() else ()),
        _int8_mm(),
        _int8_dequant(torch.bfloat16, "int8>bf16"),
        _int8_dequant(torch.float16, "int8>f16"),
        *(_int4_mm(g) for g in INT4_GROUPS),
        _int4_dequant(32, torch.bfloat16, "int4>bf16 g32"),
        _int4_dequant(32, torch.float16, "int4>f16 g32"),
    ]
    return {k.name: k for k in found}


# Options: a kernel, with gate and up as two matmuls or one fused [2I, H] matmul (+fuse).
DEFAULT_OPTIONS = ("f32", "bf16", "bf16+fuse", "f16", "f16+fuse", "bf16 onednn", "bf16 onednn+fuse", "f16 onednn",
                   "f16 fbgemm", "int8 mm", "int8 mm+fuse", "int8>bf16", "int8>f16", "int4 mm g32", "int4 mm g64",
                   "int4 mm g128", "int4 mm g64+fuse", "int4>bf16 g32", "int4>f16 g32")


@dataclass
class Expert:
    """One expert's stored weights: ``gate_up`` when fused, else ``gate`` and ``up``; always ``down``."""

    down: Any
    gate: Any = None
    up: Any = None
    gate_up: Any = None


def make_weights(hidden: int, inter: int, seed: int) -> tuple[Source, Source]:
    """bf16 weights as a checkpoint holds them, kept in f32: gate_up [2I, H] (gate rows first), down [H, I]."""
    gen = torch.Generator().manual_seed(seed)
    gate_up = (torch.randn(2 * inter, hidden, generator=gen) * 0.02).bfloat16().float()
    down = (torch.randn(hidden, inter, generator=gen) * 0.02).bfloat16().float()
    return Source(gate_up), Source(down)


def pack_expert(kernel: Kernel, fused: bool, gate_up: Source, down: Source, scratch: Scratch) -> Expert:
    inter = down.f32.shape[1]
    if fused:
        return Expert(down=kernel.pack(down, scratch), gate_up=kernel.pack(gate_up, scratch))
    return Expert(down=kernel.pack(down, scratch), gate=kernel.pack(gate_up.rows(0, inter), scratch),
                  up=kernel.pack(gate_up.rows(inter, 2 * inter), scratch))


def swiglu(kernel: Kernel, expert: Expert, x: torch.Tensor) -> torch.Tensor:
    """down(silu(gate(x)) * up(x)); x [T, H] in the kernel's activation dtype."""
    if expert.gate_up is not None:
        gate, up = kernel.linear(x, expert.gate_up).chunk(2, -1)  # [T, I] each
    else:
        gate, up = kernel.linear(x, expert.gate), kernel.linear(x, expert.up)
    return kernel.linear(F.silu(gate) * up, expert.down)  # [T, H]


def stored_bytes(packed: Any, logical: int) -> int:
    """Bytes of a stored weight; ``logical`` (its 16-bit bytes) for oneDNN-blocked and opaque forms."""
    if isinstance(packed, torch.Tensor):
        return logical if packed.is_mkldnn else packed.nbytes
    if isinstance(packed, tuple):
        return sum(t.nbytes for t in packed)
    if isinstance(packed, Int8Dequant):
        return packed.q.nbytes + packed.scale.nbytes
    if isinstance(packed, Int4Dequant):
        return packed.nibbles.nbytes + packed.scale.nbytes + packed.shift.nbytes
    return logical


def expert_bytes(expert: Expert, hidden: int, inter: int) -> int:
    sizes = {"down": hidden * inter, "gate": hidden * inter, "up": hidden * inter, "gate_up": 2 * hidden * inter}
    return sum(stored_bytes(getattr(expert, k), 2 * n) for k, n in sizes.items() if getattr(expert, k) is not None)


def copy_expert(kernel: Kernel, expert: Expert, fused: bool, weights: tuple[Source, Source], scratch: Scratch) -> Expert:
    """Another expert with the same values in its own memory (cloning is much cheaper than packing again)."""
    def clone(p):
        if isinstance(p, torch.Tensor):
            return p.clone()
        if isinstance(p, tuple):
            return tuple(t.clone() for t in p)
        if isinstance(p, Int8Dequant):
            return Int8Dequant(p.q.clone(), p.scale, p.buffer)
        if isinstance(p, Int4Dequant):
            return Int4Dequant(p.nibbles.clone(), p.scale.clone(), p.shift.clone(), p.group, p.buffer, p.byte)
        return None
    parts = {k: clone(getattr(expert, k)) for k in ("down", "gate", "up", "gate_up") if getattr(expert, k) is not None}
    if any(v is None for v in parts.values()):  # an opaque packed form (fbgemm): pack again
        return pack_expert(kernel, fused, *weights, scratch)
    return Expert(**parts)


# ---- measurement -----------------------------------------------------------------------------------------

class Probe:
    """Read bandwidth over a buffer of the working set's size: f32 ``torch.sum`` and ``torch.mv``."""

    def __init__(self, nbytes: int):
        cols = 4096
        self.matrix = torch.ones(max(1, nbytes // (4 * cols)), cols)  # written: real pages, not the zero page
        self.vector = torch.ones(cols)
        self.nbytes = self.matrix.nbytes
        self.sum(), self.mv()

    def sum(self) -> float:
        start = time.perf_counter()
        self.matrix.sum()
        return self.nbytes / (time.perf_counter() - start)

    def mv(self) -> float:
        start = time.perf_counter()
        torch.mv(self.matrix, self.vector)
        return self.nbytes / (time.perf_counter() - start)

    def best(self, repeats: int = 1) -> float:
        return max(max(self.sum(), self.mv()) for _ in range(repeats))


class Cycle:
    """Calls one expert after another, round the whole working set, so that each call finds its weights in RAM."""

    def __init__(self, kernel: Kernel, experts: list[Expert]):
        self.kernel, self.experts, self.next = kernel, experts, 0

    def seconds_per_call(self, x: torch.Tensor, budget: float) -> float:
        """Mean over one pass of the working set, cut short after ``budget`` seconds (one call at least)."""
        calls, start = 0, time.perf_counter()
        while calls < len(self.experts):
            swiglu(self.kernel, self.experts[self.next], x)
            self.next = (self.next + 1) % len(self.experts)
            calls += 1
            if time.perf_counter() - start > budget:
                break
        return (time.perf_counter() - start) / calls


@dataclass
class Settings:
    threads: int
    working_set: int
    rounds: int
    tokens: tuple[int, ...]
    max_seconds: float
    options: tuple[str, ...] = DEFAULT_OPTIONS
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    seed: int = 0


def errors(kernel: Kernel, expert: Expert, references: dict, inputs: dict) -> dict:
    """Max abs and relative (Frobenius) error of the expert's output against f32, the worse over token counts."""
    worst_abs, worst_rel = 0.0, 0.0
    for t, x in inputs.items():
        y, ref = swiglu(kernel, expert, x.to(kernel.act)).float(), references[t]
        worst_abs = max(worst_abs, (y - ref).abs().max().item())
        worst_rel = max(worst_rel, ((y - ref).norm() / ref.norm()).item())
    return {"max_abs_err": worst_abs, "rel_err": worst_rel,
            "ref_max_abs": max(r.abs().max().item() for r in references.values())}


def measure_option(option: str, hidden: int, inter: int, weights: tuple[Source, Source], references: dict,
                   inputs: dict, probe: Probe, settings: Settings) -> dict:
    name, fused = option.removesuffix("+fuse"), option.endswith("+fuse")
    kernel = kernels()[name]
    row: dict = {"option": option, "kernel": name, "family": kernel.family, "fused": fused}
    if hidden % kernel.min_group or inter % kernel.min_group:
        row["skipped"] = f"H={hidden} or I={inter} is not a multiple of the group size {kernel.min_group}"
        return row
    scratch = Scratch()
    start = time.perf_counter()
    first = pack_expert(kernel, fused, *weights, scratch)
    per_expert = expert_bytes(first, hidden, inter)
    count = max(2, -(-settings.working_set // per_expert))
    experts = [first] + [copy_expert(kernel, first, fused, weights, scratch) for _ in range(count - 1)]
    row.update(pack_seconds=time.perf_counter() - start, stored_bytes_per_expert=per_expert,
               bf16_bytes_per_expert=6 * hidden * inter, experts_cycled=count, working_set_bytes=count * per_expert)
    cycle = Cycle(kernel, experts)
    xs = {t: x.to(kernel.act) for t, x in inputs.items()}
    budget = settings.max_seconds / (settings.rounds * len(xs))
    samples: dict = {t: [] for t in xs}
    with torch.inference_mode():
        row.update(errors(kernel, first, references, inputs))
        for x in xs.values():  # warm-up: output buffers, oneDNN primitives, the scratch buffers' pages
            swiglu(kernel, experts[-1], x)
        began = time.perf_counter()
        for r in range(settings.rounds):
            bandwidth = probe.best()
            for t, x in xs.items():
                samples[t].append((cycle.seconds_per_call(x, budget), bandwidth))
            if r >= 1 and time.perf_counter() - began > settings.max_seconds:  # slow options: two rounds
                break
    row["tokens"] = {}
    for t, pairs in samples.items():
        best, median = min(s for s, _ in pairs), statistics.median(s for s, _ in pairs)
        best_bw = max(bw for _, bw in pairs)
        row["tokens"][str(t)] = {
            "ms": best * 1e3, "median_ms": median * 1e3, "gbps": per_expert / best / 1e9,
            "x_bw": per_expert / best / best_bw,  # best of the rounds over the best probe of the same rounds
            "x_bw_median": statistics.median(per_expert / s / bw for s, bw in pairs),
            "bw_gbps": best_bw / 1e9, "rounds": len(pairs),
        }
    return row


def measure_shape(shape: str, probe: Probe, settings: Settings, progress: Callable[[str], None]) -> dict:
    hidden, inter = SHAPES[shape]
    weights = make_weights(hidden, inter, settings.seed)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    inputs = {t: torch.randn(t, hidden, generator=gen).bfloat16() for t in settings.tokens}
    references = {}
    with torch.inference_mode():
        for t, x in inputs.items():
            gate, up = F.linear(x.float(), weights[0].f32).chunk(2, -1)
            references[t] = F.linear(F.silu(gate) * up, weights[1].f32)
    rows = []
    for option in settings.options:
        progress(f"{shape}: {option}")
        rows.append(measure_option(option, hidden, inter, weights, references, inputs, probe, settings))
    return {"shape": shape, "hidden": hidden, "intermediate": inter, "options": rows,
            "bandwidth_after_gbps": probe.best(3) / 1e9}


def picks(result: dict, tokens: str = "1") -> dict:
    """The fastest option per family at ``tokens`` tokens (what the runtime should store and run)."""
    best: dict = {}
    for row in result["options"]:
        if "skipped" in row or tokens not in row["tokens"]:
            continue
        ms = row["tokens"][tokens]["ms"]
        if row["family"] not in best or ms < best[row["family"]]["ms"]:
            best[row["family"]] = {"option": row["option"], "ms": ms, "x_bw": row["tokens"][tokens]["x_bw"]}
    return best


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "date": time.strftime("%Y-%m-%d")}


def print_tables(report: dict) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console(width=80)
    s = report["settings"]
    m = report["machine"]
    console.print(f"{m['cpu']}, {s['threads']} threads, torch {m['torch']}, {m['date']}; "
                  f"bandwidth at start: sum {report['bandwidth']['sum_gbps']:.1f} GB/s, "
                  f"mv {report['bandwidth']['mv_gbps']:.1f} GB/s; working set {s['working_set'] / GiB:.2f} GiB")
    tokens = [str(t) for t in s["tokens"]]
    for result in report["shapes"]:
        table = Table(title=f"{result['shape']}: H {result['hidden']}, I {result['intermediate']}",
                      box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
        table.add_column("option", no_wrap=True)
        table.add_column("MiB", justify="right")
        for t in tokens:
            table.add_column(f"T{t} ms", justify="right")
            table.add_column("GB/s" if t == tokens[0] else "", justify="right")
            table.add_column("x bw", justify="right")
        table.add_column("rel err", justify="right")
        for row in result["options"]:
            if "skipped" in row:
                table.add_row(row["option"], "", *(["-"] * 3 * len(tokens)), "n/a")
                continue
            cells = [row["option"], f"{row['stored_bytes_per_expert'] / 2**20:.1f}"]
            for t in tokens:
                r = row["tokens"][t]
                cells += [f"{r['ms']:.2f}", f"{r['gbps']:.1f}", f"{r['x_bw']:.2f}"]
            table.add_row(*cells, f"{row['rel_err']:.1e}")
        console.print(table)
        best = picks(result)
        console.print("fastest at T=1: " + "; ".join(f"{fam}: {p['option']} ({p['x_bw']:.2f} bw)"
                                                    for fam, p in best.items()))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"comma-separated: {', '.join(SHAPES)}")
    parser.add_argument("--options", default=",".join(DEFAULT_OPTIONS),
                        help="comma-separated kernels, each optionally with +fuse (gate and up as one matmul)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--working-set", type=float,
                        help="GiB of stored weights each option cycles through, well beyond the last-level cache "
                             "(default 1; 1/16 with --quick)")
    parser.add_argument("--rounds", type=int, help="timed passes per option; the best is reported, the median too in the JSON "
                             "(default 5; 2 with --quick)")
    parser.add_argument("--tokens", default="1,4", help="tokens per expert call")
    parser.add_argument("--max-seconds", type=float, default=6.0,
                        help="timing budget per option: a pass of the working set stops early after its share")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1/16 GiB working set, 2 rounds")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    shapes = tuple(s.strip() for s in args.shapes.split(",") if s.strip())
    options = tuple(o.strip() for o in args.options.split(",") if o.strip())
    known = kernels()
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"--shapes: unknown shape {s!r}; choose from {', '.join(SHAPES)}")
    for o in options:
        if o.removesuffix("+fuse") not in known:
            raise SystemExit(f"--options: unknown kernel {o!r}; choose from {', '.join(known)} (each may end in +fuse)")
    if args.threads < 1:
        raise SystemExit(f"--threads must be at least 1, got {args.threads}")
    working_set = args.working_set if args.working_set is not None else 1 / 16 if args.quick else 1.0
    rounds = args.rounds if args.rounds is not None else 2 if args.quick else 5
    if working_set <= 0 or rounds < 1:
        raise SystemExit(f"--working-set must be positive and --rounds at least 1, got {working_set} and {rounds}")
    settings = Settings(threads=args.threads, working_set=int(working_set * GiB), rounds=rounds, tokens=tuple(int(t) for t in args.tokens.split(",")),
                        max_seconds=args.max_seconds, options=options, shapes=shapes)
    torch.set_num_threads(settings.threads)
    gemv.compile_kernels()  # numba's compile (or disk-cache load) stays out of the timings
    probe = Probe(settings.working_set)
    sums = [probe.sum() for _ in range(5)]
    mvs = [probe.mv() for _ in range(5)]
    report = {"machine": machine(), "settings": {**settings.__dict__, "probe_bytes": probe.nbytes},
              "bandwidth": {"sum_gbps": max(sums) / 1e9, "mv_gbps": max(mvs) / 1e9}, "shapes": []}
    for shape in shapes:
        report["shapes"].append(measure_shape(shape, probe, settings, lambda m: print(m, flush=True)))
        if args.json:  # after every shape: a run stopped early keeps what it finished
            atomic_write(args.json, json.dumps(report, indent=2).encode())
    print_tables(report)
    return report


if __name__ == "__main__":
    main()
