"""Decode speed and stalls under expert budgets, side by side in one run. A benchmark, not a test.

A synthetic checkpoint with real layer dimensions (Mixtral-8x7B: hidden 4096, expert
14336, 8 experts, top-2; or Qwen3-30B-A3B: hidden 2048, expert 768, 128 experts, top-8)
and fewer layers is decoded greedily by:

- accelerate's offload: transformers with ``device_map``, ``max_memory`` and an offload folder;
- offload_moe without cache reuse (every needed expert is loaded every time);
- offload_moe with LRU and no prefetch;
- offload_moe in full (LRU, gate prefetch; on CUDA a pinned host tier too), and the same with
  ``io="buffered"``, which lets the page cache serve re-reads as accelerate's disk offload does;
- on CPU, LRU and the full runtime with ``io="mmap"``: a miss is computed in place from the mapped
  checkpoint, as accelerate's disk offload computes from its mapped files, and prefetch asks the
  kernel to read ahead;
- everything resident (plain transformers), the upper bound;
- the transfer bound: misses per token x expert bytes / the bandwidth this script measures
  (direct disk reads on CPU, pinned host-to-device copies on CUDA).

``--trace FILE`` replays a routing trace (int16 [tokens, layers, top_k]) through the
routers, so that random weights see realistic routing. Prints a markdown table and
writes JSON (``--json``).

    python benchmarks/decode.py --layers 2 --tokens 8                 # CPU, Mixtral shape
    python benchmarks/decode.py --shape qwen3 --layers 4 --device cuda
    python benchmarks/decode.py --trace profiles/traces/demo-heldout.safetensors
    python benchmarks/decode.py --layers 11 --budgets 0.25 --drop-caches   # larger than RAM; each column starts cold
    python benchmarks/decode.py --peers llama.cpp --budgets 0.25,1 --tokens 16 --peer-memory-limit 0.5 \
        --folder /var/tmp/peers                                          # beside llama.cpp (benchmarks/peers/)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from offload_moe.generation import kv_cache_kwargs, kv_cache_of

SHAPES = {
    "mixtral": dict(model_type="mixtral", hidden_size=4096, intermediate_size=14336, num_local_experts=8,
                    num_experts_per_tok=2, num_attention_heads=32, num_key_value_heads=8, vocab_size=32000),
    "qwen3": dict(model_type="qwen3_moe", hidden_size=2048, moe_intermediate_size=768, intermediate_size=6144,
                  num_experts=128, num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4,
                  head_dim=128, vocab_size=32000, norm_topk_prob=True),
    # A small shape with the same structure, for a quick look and for CI-sized machines.
    "mini": dict(model_type="mixtral", hidden_size=1024, intermediate_size=3584, num_local_experts=8,
                 num_experts_per_tok=2, num_attention_heads=16, num_key_value_heads=4, vocab_size=8000),
}


VARIANTS = ("no reuse", "lru", "full", "full buffered", "lru buffered", "lru mmap", "full mmap")


def write_checkpoint(shape: str, layers: int, folder: Path, dtype: torch.dtype) -> Path:
    from offload_moe.synthetic import write_synthetic_checkpoint

    if (folder / "config.json").exists():
        return folder
    kwargs = dict(SHAPES[shape])
    model_type = kwargs.pop("model_type")
    print(f"writing a {shape}-shaped checkpoint with {layers} layers to {folder} ...", file=sys.stderr)
    # Fused experts: transformers' disk offload cannot serve per-expert checkpoints, whose experts it fuses
    # while loading (the fused tensor is missing from its offload index); both sides read the same files.
    return write_synthetic_checkpoint(folder, model_type, dtype=dtype, num_hidden_layers=layers,
                                      max_position_embeddings=4096, tie_word_embeddings=False,
                                      shard_bytes=2 * 2**30, layout="fused", **kwargs)


class TraceRouting:
    """Forward hooks that make every router return the trace's experts (uniform weights) for each token."""

    def __init__(self, model, trace: torch.Tensor):
        self.trace = trace.long()  # [tokens, layers, top_k]
        self.row = 0
        self.handles = []
        routers = [m for name, m in model.named_modules() if name.endswith(".gate") or name.endswith(".router")]
        routers = [r for r in routers if hasattr(r, "weight") and r.weight.dim() == 2]
        if len(routers) > self.trace.shape[1]:
            raise SystemExit(f"the trace has {self.trace.shape[1]} layers, the model {len(routers)}")
        for pos, router in enumerate(routers):
            self.handles.append(router.register_forward_hook(self._hook(pos, pos == len(routers) - 1)))

    def _hook(self, pos: int, last: bool):
        def hook(module, args, output):
            logits = output[0]
            tokens = logits.shape[0]
            rows = torch.arange(self.row, self.row + tokens) % self.trace.shape[0]
            index = self.trace[rows, pos].to(logits.device)  # [T, k]
            weights = torch.full(index.shape, 1.0 / index.shape[1], dtype=output[1].dtype, device=logits.device)
            if last:
                self.row += tokens
            return (logits, weights, index)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def decode(model, device: str, tokens: int, trace: torch.Tensor | None, warmup: int = 2) -> dict:
    """Prefill 16 tokens, take ``warmup`` untimed decode steps, then time ``tokens`` greedy decode steps."""
    hooks = TraceRouting(model, trace) if trace is not None else None
    ids = torch.randint(0, 1000, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
    try:
        with torch.inference_mode():
            out = model(ids, use_cache=True)
            past, nxt = kv_cache_of(out), out.logits[:, -1:].argmax(-1)
            for _ in range(warmup):
                out = model(nxt, **kv_cache_kwargs(model, past), use_cache=True)
                past, nxt = kv_cache_of(out), out.logits[:, -1:].argmax(-1)
            offload = getattr(model, "offload", None)
            if offload is not None:
                offload.cache.drain()
                offload.reset_stats()
            _sync(device)
            start = time.perf_counter()
            for _ in range(tokens):
                out = model(nxt, **kv_cache_kwargs(model, past), use_cache=True)
                past, nxt = kv_cache_of(out), out.logits[:, -1:].argmax(-1)
            _sync(device)
            seconds = time.perf_counter() - start
    finally:
        if hooks is not None:
            hooks.remove()
    result = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "s_per_token": seconds / tokens}
    if getattr(model, "offload", None) is not None:
        s = model.offload.stats()
        result.update(misses_per_token=s["misses"] / tokens, loads_per_token=s["bytes_loaded"] / s["expert_bytes"] / tokens,
                      stall_per_token=s["stall_seconds"] / tokens,
                      hit_rate=s["hit_rate"], prefetch_recall=s["prefetch_recall"],
                      prediction_recall=s["prediction_recall"], expert_bytes=s["expert_bytes"],
                      capacity_experts=s["capacity_experts"], disk_bandwidth=s["bandwidth"]["disk"],
                      h2d_bandwidth=s["bandwidth"]["host_to_device"],
                      mapped_per_token=s["mapped_experts"] / tokens)
    return result


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_bandwidth(folder: Path, device: str, nbytes: int = 512 * 2**20) -> float:
    """Bytes/s of the tier a miss costs: direct disk reads on CPU, pinned host-to-device copies on CUDA."""
    if device.startswith("cuda"):
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        return 5 * nbytes / (time.perf_counter() - start)
    from offload_moe.safetensors_io import FileReader

    files = sorted(folder.glob("*.safetensors"), key=lambda f: f.stat().st_size, reverse=True)
    chunk = 64 * 2**20
    size = min(nbytes, (files[0].stat().st_size - 2**20) // chunk * chunk)
    reader = FileReader("direct")
    buf = torch.empty(chunk, dtype=torch.uint8)
    start, done = time.perf_counter(), 0
    while done < size:
        reader.read_into(files[0], 2**20 + done, buf)
        done += chunk
    seconds = time.perf_counter() - start
    reader.close()
    return done / seconds


def run_offload(folder: Path, device: str, capacity: int, variant: str, tokens: int, trace, host_memory) -> dict:
    import offload_moe

    settings = {
        "no reuse": dict(prefetch="none"),
        "lru": dict(prefetch="none"),
        "full": dict(prefetch="gate" if trace is None else "transition",
                     host_memory=host_memory if device.startswith("cuda") else None),
        # The page cache as an unbudgeted warm tier, as accelerate's disk offload gets it.
        "full buffered": dict(prefetch="gate" if trace is None else "transition", io="buffered"),
        "lru buffered": dict(prefetch="none", io="buffered"),
        # CPU only: a miss is computed in place from the mapped checkpoint (no copy into a slot).
        "lru mmap": dict(prefetch="none", io="mmap"),
        "full mmap": dict(prefetch="gate" if trace is None else "transition", io="mmap"),
    }[variant]

    model = offload_moe.load(folder, device=device, cache_experts=capacity, progress=False, **settings)
    if variant == "no reuse":
        model.offload.cache.reuse = False
    try:
        return decode(model, device, tokens, trace)
    finally:
        model.offload.close()
        del model
        gc.collect()


def run_resident(folder: Path, device: str, tokens: int, trace) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").to(device).eval()
    for p in model.parameters():  # own the memory: no lazily mapped file pages in the timed steps
        p.data = p.data.clone()
    try:
        return decode(model, device, tokens, trace)
    finally:
        del model
        gc.collect()


def largest_layer_bytes(folder: Path) -> int:
    """Bytes of the checkpoint's largest decoder layer (tensors named ``...layers.N....``)."""
    from offload_moe.safetensors_io import checkpoint_files, read_header

    sizes: dict[str, int] = {}
    for file in checkpoint_files(folder):
        for name, info in read_header(file).items():
            m = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            if m:
                sizes[m[1]] = sizes.get(m[1], 0) + info.nbytes
    return max(sizes.values(), default=0)


def accelerate_max_memory(device: str, budget_bytes: int, layer_bytes: int) -> dict:
    """``max_memory`` for accelerate. On CUDA, GPU 0 gets the budget plus one decoder layer: accelerate keeps
    the largest layer's size free there to onload offloaded layers, and without it a budget smaller than a
    layer puts the whole model on disk (then it runs on the CPU, or not at all)."""
    if device.startswith("cuda"):
        return {0: budget_bytes + layer_bytes, "cpu": budget_bytes}
    return {"cpu": budget_bytes}


def run_accelerate(folder: Path, device: str, budget_bytes: int, tokens: int, trace) -> dict:
    """transformers + accelerate offload: experts that do not fit in ``budget_bytes`` go to an offload folder."""
    from transformers import AutoModelForCausalLM

    offload = Path(tempfile.mkdtemp(prefix="accelerate-offload-", dir=folder.parent))
    try:
        key = 0 if device.startswith("cuda") else "cpu"
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype="auto", device_map="auto",
            max_memory=accelerate_max_memory(device, budget_bytes, largest_layer_bytes(folder)),
            offload_folder=str(offload),
        ).eval()
        placed = getattr(model, "hf_device_map", {})
        result = decode(model, device if key == 0 else "cpu", tokens, trace)
        result["placement"] = {v: sum(1 for x in placed.values() if x == v) for v in set(map(str, placed.values()))}
        del model
        gc.collect()
        return result
    finally:
        shutil.rmtree(offload, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mixtral")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8, help="decode steps timed per configuration")
    parser.add_argument("--budgets", default="0.125,0.25,0.5,1.0", help="shares of all experts resident")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--trace", help="routing trace to replay (int16 [tokens, layers, top_k] safetensors)")
    parser.add_argument("--host-memory", default="64GiB", help="warm tier for the full runtime on CUDA")
    parser.add_argument("--skip", default="", help="comma-separated columns to skip: accelerate, resident, "
                        + ", ".join(VARIANTS))
    parser.add_argument("--folder", help="keep the checkpoint here (reused if present)")
    parser.add_argument("--drop-caches", action="store_true",
                        help="empty the page cache before each configuration, so each starts cold (Linux, root)")
    parser.add_argument("--json", help="write the results here")
    add_peer_arguments(parser)
    args = parser.parse_args()
    if args.peers:
        return run_peers(args)

    dtype = getattr(torch, args.dtype)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    tmp = None if args.folder else tempfile.mkdtemp(prefix="decode-bench-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    folder = Path(args.folder or Path(tmp) / f"{args.shape}-{args.layers}")
    trace = None
    if args.trace:
        from safetensors.torch import load_file

        trace = load_file(args.trace)["experts"]
    try:
        write_checkpoint(args.shape, args.layers, folder, dtype)
        import offload_moe

        total = offload_moe.plan(folder, device_memory="1TiB").total_experts
        expert_bytes = offload_moe.plan(folder, device_memory="1TiB").expert_bytes
        bandwidth = measure_bandwidth(folder, args.device)
        rows = []
        report = {
            "shape": args.shape, "layers": args.layers, "tokens": args.tokens, "device": args.device, "dtype": args.dtype,
            "trace": args.trace, "drop_caches": args.drop_caches, "expert_bytes": expert_bytes, "total_experts": total, "bandwidth": bandwidth, "rows": rows,
            "machine": machine(args.device),
        }
        cold = drop_caches if args.drop_caches else (lambda: None)
        cold()
        resident = None if "resident" in skip else run_resident(folder, args.device, args.tokens, trace)
        for share in [float(b) for b in args.budgets.split(",")]:
            capacity = max(2, round(share * total))
            row = {"budget": share, "capacity_experts": capacity}
            for variant in VARIANTS:
                if variant not in skip and not (args.device.startswith("cuda") and variant.endswith("mmap")):  # CPU only
                    cold()
                    row[variant] = run_offload(folder, args.device, capacity, variant, args.tokens, trace, args.host_memory)
            if "accelerate" not in skip:
                dense = offload_moe.plan(folder, device_memory="1TiB").dense_bytes
                cold()
                try:
                    row["accelerate"] = run_accelerate(folder, args.device, dense + capacity * expert_bytes, args.tokens, trace)
                except Exception as e:  # the baseline failing must not lose offload_moe's figures
                    traceback.print_exc()
                    row["accelerate_error"] = f"{type(e).__name__}: {e}"
            if resident is not None:
                row["resident"] = resident
            best = row.get("full") or row.get("lru")
            if best is not None:
                # every byte loaded costs bandwidth, prefetched or not
                transfer = best["loads_per_token"] * expert_bytes / bandwidth
                row["bound_s_per_token"] = max(transfer, resident["s_per_token"] if resident else 0.0)
                row["transfer_s_per_token"] = transfer
            rows.append(row)
            print_row(row)
            if args.json:  # after every budget: a run stopped at a time limit keeps the rows it finished
                from offload_moe.atomic import atomic_write

                atomic_write(args.json, json.dumps(report, indent=2).encode())
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table(report)


def add_peer_arguments(parser: argparse.ArgumentParser) -> None:
    """``--peers llama.cpp``: the side by side with llama.cpp (benchmarks/peers/side_by_side.py) instead of the
    budget table; ``--budgets``, ``--tokens``, ``--layers``, ``--shape``, ``--folder`` and ``--json`` apply."""
    group = parser.add_argument_group("peers (--peers llama.cpp)")
    group.add_argument("--peers", choices=["llama.cpp"], help="time llama.cpp beside offload_moe, interleaved")
    group.add_argument("--threads", type=int, default=2, help="threads, ours and the peer's")
    group.add_argument("--peer-precisions", default="bf16,int8,int4",
                       help="ours beside llama.cpp's: bf16/f16, int8/q8_0, int4/q4_0")
    group.add_argument("--peer-repeats", type=int, default=3, help="interleaved rounds")
    group.add_argument("--peer-memory-limit", type=float, default=None,
                       help="also run both in a memory cgroup of this share of the checkpoint (0.5), ours at "
                            "the smallest budget (Linux, root)")
    group.add_argument("--peer-variants", default="full mmap,full",
                       help="our variant in RAM, then in the cgroup")
    group.add_argument("--llama-cpp-cache", help="llama.cpp's build folder (default ~/.cache/offload-moe/llama.cpp/VERSION)")


def run_peers(args) -> None:
    """``--peers llama.cpp``: the checkpoint (bf16, per-expert, hub names, a synthetic tokenizer), its int8 and
    int4 copies and GGUF files are kept in ``--folder`` (default: a temporary folder, removed after)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks.peers
    from benchmarks.peers import side_by_side

    tmp = None if args.folder else tempfile.mkdtemp(prefix="peers-bench-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    folder = Path(args.folder or tmp) / f"{args.shape}-{args.layers}-hub"
    in_ram, limited = [v.strip() for v in args.peer_variants.split(",")]
    try:
        side_by_side.run(shape_kwargs=SHAPES[args.shape], layers=args.layers, folder=folder,
                         precisions=[p.strip() for p in args.peer_precisions.split(",") if p.strip()],
                         budgets=[float(b) for b in args.budgets.split(",")], threads=args.threads,
                         tokens=args.tokens, repeats=args.peer_repeats, limit_share=args.peer_memory_limit,
                         cache_dir=args.llama_cpp_cache, in_ram_variant=in_ram, limited_variant=limited,
                         json_path=args.json)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def drop_caches() -> None:
    """Write back dirty pages and empty the page cache, so that the next configuration starts cold."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    except OSError as e:
        sys.exit(f"--drop-caches: cannot write /proc/sys/vm/drop_caches ({e.strerror}); run as root on Linux, "
                 "or leave the option out")


def machine(device: str) -> dict:
    import transformers

    info = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "date": time.strftime("%Y-%m-%d")}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_row(row: dict) -> None:
    parts = [f"{k}: {v['tokens_per_s']:.3f} tok/s" for k, v in row.items() if isinstance(v, dict)]
    print(f"budget {row['budget']:.1%} ({row['capacity_experts']} experts): " + ", ".join(parts), file=sys.stderr)


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"\n{report['shape']} shape, {report['layers']} layers, {report['total_experts']} experts of "
          f"{report['expert_bytes'] / 2**20:.0f} MiB, {report['device']}, {report['dtype']}, "
          f"{'trace ' + report['trace'] if report['trace'] else 'router-chosen routing'}; "
          f"bandwidth {report['bandwidth'] / 2**30:.2f} GiB/s; {m['date']}, torch {m['torch']}")
    cols = ["accelerate", *VARIANTS, "resident"]
    print("\n| budget | " + " | ".join(f"{c} tok/s" for c in cols)
          + " | full: loads/tok | full: stall s/tok | full: prefetch recall | bound s/tok | full s/tok / bound | full / accelerate |")
    print("|" + "---|" * (len(cols) + 7))
    for row in report["rows"]:
        cells = [f"{row[c]['tokens_per_s']:.3f}" if c in row else "-" for c in cols]
        full = row.get("full", {})
        ratio = full.get("s_per_token", 0) / row["bound_s_per_token"] if full and row.get("bound_s_per_token") else 0
        speedup = (full["tokens_per_s"] / row["accelerate"]["tokens_per_s"]) if full and "accelerate" in row else 0
        print(f"| {row['budget']:.1%} ({row['capacity_experts']}) | " + " | ".join(cells)
              + f" | {full.get('loads_per_token', 0):.2f} | {full.get('stall_per_token', 0):.3f} | "
                f"{full.get('prefetch_recall', 0):.2f} | {row.get('bound_s_per_token', 0):.3f} | {ratio:.2f} | {speedup:.1f}x |")


if __name__ == "__main__":
    main()
