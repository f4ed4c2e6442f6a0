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
    python benchmarks/decode.py --shape mini --layers 16 --budgets 0.25 --memory-limit 0.3x,0.5x,1x,2x \
        --only "lru,lru mmap,lru auto" --repeats 2                        # over-RAM in minutes (Linux, root)
    python benchmarks/decode.py --quant bf16,int8,int4 --budgets 0.25 --rounds 3   # expert formats side by side
    python benchmarks/decode.py --peers llama.cpp --budgets 0.25,1 --tokens 16 --peer-memory-limit 0.5 \
        --folder /var/tmp/peers                                          # beside llama.cpp (benchmarks/peers/)

``--memory-limit`` runs each configuration (ours and the peers) in a child process placed in a fresh memory
cgroup of that size (cgroup v1's memory controller or a v2 child with ``memory.max``; removed afterwards), which
bounds the page cache as a machine with that much RAM would; a size like ``4GiB`` or a share of the checkpoint's
bytes like ``0.5x``. Before each run the checkpoint's pages are dropped from the page cache (``posix_fadvise``
DONTNEED on its files), so every run starts cold: 2 untimed decode steps (``--warmup``), then the timed ones.
The configurations of a limit run interleaved, ``--repeats`` rounds; the table gives each one's median and range,
and the cgroup's peak memory.
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

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks.cgroups, benchmarks.peers

from benchmarks.cgroups import MemoryCgroup, run_limited  # noqa: E402,F401 (MemoryCgroup: tests/test_memory.py)
from offload_moe.generation import kv_cache_kwargs, kv_cache_of  # noqa: E402

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


def shape_kwargs(shape: str, vocab: int | None = None) -> dict:
    """``SHAPES[shape]``, with ``vocab`` tokens instead of its own where given."""
    return {**SHAPES[shape], **({"vocab_size": vocab} if vocab else {})}


VARIANTS = ("no reuse", "lru", "full", "full buffered", "lru buffered", "lru mmap", "full mmap", "lru auto", "full auto")


def write_checkpoint(shape: str, layers: int, folder: Path, dtype: torch.dtype, vocab: int | None = None) -> Path:
    from offload_moe.synthetic import write_synthetic_checkpoint

    if (folder / "config.json").exists():
        return folder
    kwargs = shape_kwargs(shape, vocab)
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
    vocab = min(1000, model.config.get_text_config().vocab_size)
    ids = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0)).to(device)
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
                      mapped_per_token=s["mapped_experts"] / tokens, io=s["io"], io_reason=s["io_reason"])
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


def run_offload(folder: Path, device: str, capacity: int, variant: str, tokens: int, trace, host_memory,
                warmup: int = 2) -> dict:
    import offload_moe

    predicted = "gate" if trace is None else "transition"
    settings = {  # "lru" and "full" read with io="direct"; "... auto" with the default, io="auto"
        "no reuse": dict(prefetch="none", io="direct"),
        "lru": dict(prefetch="none", io="direct"),
        "full": dict(prefetch=predicted, io="direct", host_memory=host_memory if device.startswith("cuda") else None),
        "lru auto": dict(prefetch="none"),
        "full auto": dict(prefetch=predicted, host_memory=host_memory if device.startswith("cuda") else None),
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
        return decode(model, device, tokens, trace, warmup)
    finally:
        model.offload.close()
        del model
        gc.collect()


def run_resident(folder: Path, device: str, tokens: int, trace, warmup: int = 2) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").to(device).eval()
    for p in model.parameters():  # own the memory: no lazily mapped file pages in the timed steps
        p.data = p.data.clone()
    try:
        return decode(model, device, tokens, trace, warmup)
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


def run_accelerate(folder: Path, device: str, budget_bytes: int, tokens: int, trace, warmup: int = 2) -> dict:
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
        result = decode(model, device if key == 0 else "cpu", tokens, trace, warmup)
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
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary size instead of the shape's: a small one keeps a few-layer checkpoint's "
                             "dense share (embeddings, lm_head) near a full model's")
    parser.add_argument("--tokens", type=int, default=8, help="decode steps timed per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed decode steps before the timed ones")
    parser.add_argument("--budgets", default="0.125,0.25,0.5,1.0", help="shares of all experts resident")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--trace", help="routing trace to replay (int16 [tokens, layers, top_k] safetensors)")
    parser.add_argument("--host-memory", default="64GiB", help="warm tier for the full runtime on CUDA")
    parser.add_argument("--skip", default="", help="comma-separated columns to skip: accelerate, resident, "
                        + ", ".join(VARIANTS))
    parser.add_argument("--only", default="", help="comma-separated columns to run, instead of all but --skip")
    parser.add_argument("--folder", help="keep the checkpoint here (reused if present)")
    parser.add_argument("--drop-caches", action="store_true",
                        help="empty the page cache before each configuration, so each starts cold (Linux, root)")
    parser.add_argument("--memory-limit", default="",
                        help="run each configuration in a child process in a memory cgroup of this size (4GiB, or a "
                             "share of the checkpoint: 0.5x); several, comma-separated, run one after another")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of the configurations, interleaved")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--quant", help="compare expert formats instead (e.g. bf16,int8,int4): the checkpoint and its "
                        "quantize_experts copies, LRU + prefetch, io='direct', at each budget; see quant_main")
    parser.add_argument("--rounds", type=int, default=3, help="with --quant: interleaved rounds, medians reported")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # one configuration, in a child process (--memory-limit)
    add_peer_arguments(parser)
    args = parser.parse_args()
    if args.child:
        return run_child(json.loads(args.child))
    if args.quant:
        return quant_main(args)
    if args.peers:
        return run_peers(args)

    dtype = getattr(torch, args.dtype)
    columns = _columns(args.only, args.skip, args.device)
    tmp = None if args.folder else tempfile.mkdtemp(prefix="decode-bench-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    folder = Path(args.folder or Path(tmp) / f"{args.shape}-{args.layers}")
    try:
        write_checkpoint(args.shape, args.layers, folder, dtype, args.vocab)
        import offload_moe

        full_plan = offload_moe.plan(folder, device_memory="1TiB")
        total, expert_bytes = full_plan.total_experts, full_plan.expert_bytes
        checkpoint_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        limits = [parse_limit(x, checkpoint_bytes) for x in args.memory_limit.split(",") if x.strip()] or [None]
        bandwidth = measure_bandwidth(folder, args.device)
        rows = []
        report = {
            "shape": args.shape, "layers": args.layers, "tokens": args.tokens, "warmup": args.warmup,
            "device": args.device, "dtype": args.dtype, "trace": args.trace, "drop_caches": args.drop_caches,
            "expert_bytes": expert_bytes, "total_experts": total, "checkpoint_bytes": checkpoint_bytes,
            "bandwidth": bandwidth, "repeats": args.repeats, "rows": rows, "machine": machine(args.device),
        }
        cold = drop_caches if args.drop_caches else (lambda: drop_file_pages(folder.glob("*.safetensors")))
        for limit in limits:
            run = Runner(folder, args, limit)
            resident = None
            if "resident" in columns:
                runs = []
                for _ in range(args.repeats):
                    cold()
                    runs.append(run("resident", {}))
                resident = run.median(runs)
            for share in [float(b) for b in args.budgets.split(",")]:
                capacity = expert_capacity(share, total)
                row = {"limit": limit, "budget": share, "capacity_experts": capacity}
                results: dict[str, list[dict]] = {c: [] for c in columns if c != "resident"}
                for _ in range(args.repeats):  # interleaved: one run of each configuration a round
                    for column in results:
                        cold()
                        if column == "accelerate":
                            budget = full_plan.dense_bytes + capacity * expert_bytes
                            results[column].append(run("accelerate", {"budget_bytes": budget}))
                        else:
                            results[column].append(run("offload", {"capacity": capacity, "variant": column}))
                for column, runs in results.items():
                    row[column] = run.median(runs)
                if resident is not None:
                    row["resident"] = resident
                best = row.get("full") or row.get("lru")
                if best is not None and "loads_per_token" in best:
                    # every byte loaded costs bandwidth, prefetched or not
                    transfer = best["loads_per_token"] * expert_bytes / bandwidth
                    row["bound_s_per_token"] = max(transfer, resident.get("s_per_token", 0.0) if resident else 0.0)
                    row["transfer_s_per_token"] = transfer
                rows.append(row)
                print_row(row)
                if args.json:  # after every row: a run stopped at a time limit keeps the rows it finished
                    from offload_moe.atomic import atomic_write

                    atomic_write(args.json, json.dumps(report, indent=2).encode())
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table(report)


def _columns(only: str, skip: str, device: str) -> list[str]:
    names = ["accelerate", *VARIANTS, "resident"]
    chosen = [c.strip() for c in only.split(",") if c.strip()] or names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise SystemExit(f"--only names unknown column(s) {unknown}; the columns are {', '.join(names)}")
    skipped = {c.strip() for c in skip.split(",") if c.strip()}
    cuda = device.startswith("cuda")
    return [c for c in chosen if c not in skipped and not (cuda and c.endswith("mmap"))]  # mmap: CPU only


def parse_limit(text: str, checkpoint_bytes: int) -> int:
    """``4GiB`` -> bytes; ``0.5x`` -> half the checkpoint's bytes."""
    from offload_moe.values import parse_bytes

    text = text.strip()
    if text.lower().endswith("x"):
        return int(float(text[:-1]) * checkpoint_bytes)
    return parse_bytes(text, "--memory-limit")


class Runner:
    """Runs one configuration: in this process, or with ``limit`` in a child process in a fresh memory cgroup."""

    def __init__(self, folder: Path, args, limit: int | None):
        self.folder, self.args, self.limit = folder, args, limit
        self.trace = None
        if args.trace and limit is None:
            from safetensors.torch import load_file

            self.trace = load_file(args.trace)["experts"]

    def __call__(self, kind: str, kwargs: dict) -> dict:
        a = self.args
        common = dict(device=a.device, tokens=a.tokens, warmup=a.warmup)
        if self.limit is not None:
            spec = dict(kind=kind, folder=str(self.folder), trace=a.trace, host_memory=a.host_memory, **common, **kwargs)
            return run_in_cgroup(spec, self.limit)
        try:
            if kind == "resident":
                return run_resident(self.folder, trace=self.trace, **common)
            if kind == "accelerate":
                return run_accelerate(self.folder, trace=self.trace, **common, **kwargs)
            return run_offload(self.folder, trace=self.trace, host_memory=a.host_memory, **common, **kwargs)
        except Exception as e:  # one configuration failing must not lose the others' figures
            traceback.print_exc()
            return {"error": f"{type(e).__name__}: {e}"}

    @staticmethod
    def median(runs: list[dict]) -> dict:
        """The run of median speed, with every run's tokens/s; a failed run counts as the slowest."""
        ok = sorted((r for r in runs if "tokens_per_s" in r), key=lambda r: r["tokens_per_s"])
        if not ok:
            return runs[0]
        out = dict(ok[(len(ok) - 1) // 2])
        out["runs_tokens_per_s"] = [r.get("tokens_per_s") for r in runs]
        out["errors"] = [r["error"] for r in runs if "error" in r]
        return out


def run_child(spec: dict) -> None:
    """``--child``: one configuration, its result printed as the last line of stdout (JSON). With ``threads``
    (the llama.cpp side by side), torch runs on that many threads, and the result says how many it had."""
    threads = spec.pop("threads", None)
    if threads:
        torch.set_num_threads(threads)
    trace, trace_path = None, spec.pop("trace")
    if trace_path:
        from safetensors.torch import load_file

        trace = load_file(trace_path)["experts"]
    kind, folder = spec.pop("kind"), Path(spec.pop("folder"))
    host_memory = spec.pop("host_memory")
    if kind == "resident":
        result = run_resident(folder, trace=trace, **spec)
    elif kind == "accelerate":
        result = run_accelerate(folder, trace=trace, **spec)
    else:
        result = run_offload(folder, trace=trace, host_memory=host_memory, **spec)
    if threads:
        result["threads"] = torch.get_num_threads()
    print(json.dumps(result))


def run_in_cgroup(spec: dict, limit: int) -> dict:
    """Run ``spec`` (``run_child``) in a child process in a fresh memory cgroup of ``limit`` bytes, removed after;
    the result, with the cgroup's peak memory, or ``error`` if the child failed (an out-of-memory kill, say)."""
    done = run_limited([sys.executable, __file__, "--child", json.dumps(spec)], limit, capture_stderr=False)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"error": done.error(), "peak_bytes": done.peak_bytes, "limit_bytes": limit}
    result = json.loads(lines[-1])
    result.update(peak_bytes=done.peak_bytes, limit_bytes=limit)
    return result


def drop_file_pages(files) -> None:
    """Drop ``files``' pages from the page cache (``posix_fadvise`` DONTNEED on each; no root needed), so that the
    next run reading them starts cold."""
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def expert_capacity(share: float, total_experts: int) -> int:
    """A budget (``share`` of all experts in slots) as a number of slots: at least 2."""
    return max(2, round(share * total_experts))


QUANT_FORMATS = {"bf16": None, "int8": 8, "int4": 4}


def quant_main(args) -> None:
    """``--quant``: decode the same synthetic checkpoint as stored (bf16) and as ``quantize_experts`` writes it
    (int8, int4 in groups of 64), each with the same number of experts resident (``--budgets``), LRU and
    prefetch, ``io="direct"``. The formats run interleaved, ``--rounds`` times, because the machine is shared:
    the table gives each one's median tokens/s, its ratio to bf16, and the load average around the runs. With
    ``--memory-limit`` (one size, or a share of the first format's checkpoint) each run is a child process in a
    fresh memory cgroup of that size, as a machine with that much RAM: the case of a checkpoint larger than RAM."""
    formats = [f.strip() for f in args.quant.split(",") if f.strip()]
    unknown = [f for f in formats if f not in QUANT_FORMATS]
    if unknown:
        sys.exit(f"--quant: {', '.join(unknown)} unknown; choose among {', '.join(QUANT_FORMATS)}")
    tmp = None if args.folder else tempfile.mkdtemp(prefix="decode-bench-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    folder = Path(args.folder or Path(tmp) / f"{args.shape}-{args.layers}")
    trace = None
    if args.trace:
        from safetensors.torch import load_file

        trace = load_file(args.trace)["experts"]
    try:
        write_checkpoint(args.shape, args.layers, folder, getattr(torch, args.dtype), args.vocab)
        folders = {f: quantized_copy(folder, QUANT_FORMATS[f]) for f in formats}
        report = quant_rounds(folders, args, trace)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        from offload_moe.atomic import atomic_write

        atomic_write(args.json, json.dumps(report, indent=2).encode())
    print_quant_table(report)


def quantized_copy(folder: Path, bits: int | None) -> Path:
    """``folder`` itself (None), or its ``quantize_experts`` copy beside it (made once, reused)."""
    if bits is None:
        return folder
    import offload_moe

    out = folder.with_name(f"{folder.name}-int{bits}")
    if not (out / "config.json").exists():
        print(f"quantizing {folder} to int{bits} ...", file=sys.stderr)
        offload_moe.quantize_experts(folder, out, bits=bits, progress=False)
    return out


def quant_rounds(folders: dict[str, Path], args, trace) -> dict:
    import offload_moe

    total = offload_moe.plan(folders[next(iter(folders))], device_memory="1TiB").total_experts
    report = {"shape": args.shape, "layers": args.layers, "tokens": args.tokens, "device": args.device,
              "dtype": args.dtype, "trace": args.trace, "rounds": args.rounds, "threads": torch.get_num_threads(),
              "total_experts": total, "load_average": [os.getloadavg()], "machine": machine(args.device), "rows": []}
    limit = None
    if args.memory_limit:  # one limit for every format: a share like 0.3x is of the first format's checkpoint
        first = folders[next(iter(folders))]
        limit = parse_limit(args.memory_limit, sum(f.stat().st_size for f in first.glob("*.safetensors")))
        report.update(limit_bytes=limit, checkpoint_bytes={f: sum(x.stat().st_size for x in d.glob("*.safetensors"))
                                                          for f, d in folders.items()})
    for share in [float(b) for b in args.budgets.split(",")]:
        capacity = expert_capacity(share, total)
        runs: dict[str, list[dict]] = {f: [] for f in folders}
        for r in range(args.rounds):
            for name, folder in folders.items():  # interleaved: each round runs every format once
                if args.drop_caches:
                    drop_caches()
                if limit is None:
                    runs[name].append(run_format(folder, args.device, capacity, args.tokens, trace))
                else:  # in a fresh memory cgroup, the files' pages dropped first: "full" is run_format's settings
                    drop_file_pages(folder.glob("*.safetensors"))
                    result = Runner(folder, args, limit)("offload", {"capacity": capacity, "variant": "full"})
                    if "error" in result:  # killed at the limit, say: the slowest possible, and said
                        result.update(tokens_per_s=0.0, expert_bytes=0)
                    runs[name].append(result)
                shown = runs[name][-1].get("error") or f"{runs[name][-1]['tokens_per_s']:.3f} tok/s"
                print(f"budget {share:.1%} round {r + 1}: {name} {shown}", file=sys.stderr)
        medians = {f: sorted(x["tokens_per_s"] for x in v)[len(v) // 2] for f, v in runs.items()}
        report["rows"].append({"budget": share, "capacity_experts": capacity, "runs": runs, "median_tokens_per_s": medians,
                               "expert_bytes": {f: max(x["expert_bytes"] for x in v) for f, v in runs.items()}})
        report["load_average"].append(os.getloadavg())
    return report


def run_format(folder: Path, device: str, capacity: int, tokens: int, trace) -> dict:
    import offload_moe

    model = offload_moe.load(folder, device=device, cache_experts=capacity, io="direct", progress=False,
                             prefetch="gate" if trace is None else "transition")
    try:
        return decode(model, device, tokens, trace)
    finally:
        model.offload.close()
        del model
        gc.collect()


def print_quant_table(report: dict) -> None:
    m = report["machine"]
    load = ", ".join(f"{a[0]:.1f}" for a in report["load_average"])
    print(f"\n{report['shape']} shape, {report['layers']} layers, {report['total_experts']} experts, {report['device']}, "
          f"{report['threads']} threads, io=direct, LRU + prefetch; median of {report['rounds']} interleaved rounds of "
          f"{report['tokens']} tokens; load average (1 min) {load}; {m['date']}, torch {m['torch']}")
    if report.get("limit_bytes"):
        sizes = ", ".join(f"{f} {b / 2**30:.2f} GiB" for f, b in report["checkpoint_bytes"].items())
        print(f"each run in a memory cgroup of {report['limit_bytes'] / 2**30:.2f} GiB, the files dropped from the page "
              f"cache first (checkpoints: {sizes}); 0.000 tok/s: killed at the limit")
    formats = list(report["rows"][0]["median_tokens_per_s"]) if report["rows"] else []
    print("\n| budget | " + " | ".join(f"{f} tok/s (MiB/expert)" for f in formats)
          + " | " + " | ".join(f"{f} / bf16" for f in formats if f != "bf16") + " |")
    print("|" + "---|" * (1 + len(formats) + len([f for f in formats if f != "bf16"])))
    for row in report["rows"]:
        med = row["median_tokens_per_s"]
        cells = [f"{med[f]:.3f} ({row['expert_bytes'][f] / 2**20:.0f})" for f in formats]
        ratios = [f"{med[f] / med['bf16']:.2f}x" if med.get("bf16") else "-" for f in formats if f != "bf16"]
        print(f"| {row['budget']:.1%} ({row['capacity_experts']}) | " + " | ".join(cells + ratios) + " |")


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
    from benchmarks.peers import side_by_side

    tmp = None if args.folder else tempfile.mkdtemp(prefix="peers-bench-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    folder = Path(args.folder or tmp) / f"{args.shape}-{args.layers}{f'-v{args.vocab}' if args.vocab else ''}-hub"
    in_ram, limited = [v.strip() for v in args.peer_variants.split(",")]
    try:
        side_by_side.run(shape_kwargs=shape_kwargs(args.shape, args.vocab), layers=args.layers, folder=folder,
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


def _speed(result: dict | None) -> str:
    if result is None:
        return "-"
    if "tokens_per_s" not in result:
        return "oom" if "out of memory" in result.get("error", "") else "failed"
    runs = [r for r in result.get("runs_tokens_per_s", []) if r is not None]
    spread = f" ({min(runs):.2f}-{max(runs):.2f})" if len(runs) > 1 else ""
    failed = len(result.get("errors", []))
    return f"{result['tokens_per_s']:.2f}{spread}" + (f" +{failed} oom" if failed else "")


def print_row(row: dict) -> None:
    parts = [f"{k}: {_speed(v)} tok/s" for k, v in row.items() if isinstance(v, dict)]
    limit = f"limit {row['limit'] / 2**30:.2f} GiB, " if row.get("limit") else ""
    print(f"{limit}budget {row['budget']:.1%} ({row['capacity_experts']} experts): " + ", ".join(parts), file=sys.stderr)


def print_table(report: dict) -> None:
    m = report["machine"]
    print(f"\n{report['shape']} shape, {report['layers']} layers, {report['total_experts']} experts of "
          f"{report['expert_bytes'] / 2**20:.0f} MiB, checkpoint {report['checkpoint_bytes'] / 2**30:.2f} GiB, "
          f"{report['device']}, {report['dtype']}, "
          f"{'trace ' + report['trace'] if report['trace'] else 'router-chosen routing'}; "
          f"bandwidth {report['bandwidth'] / 2**30:.2f} GiB/s; {m['date']}, torch {m['torch']}, "
          f"transformers {m['transformers']}, {m['cpus']} CPUs")
    if any(row.get("limit") for row in report["rows"]):
        return print_limit_table(report)
    cols = ["accelerate", *VARIANTS, "resident"]
    print("\n| budget | " + " | ".join(f"{c} tok/s" for c in cols)
          + " | full: loads/tok | full: stall s/tok | full: prefetch recall | bound s/tok | full s/tok / bound | full / accelerate |")
    print("|" + "---|" * (len(cols) + 7))
    for row in report["rows"]:
        cells = [_speed(row.get(c)) for c in cols]
        full = row.get("full", {})
        ratio = full.get("s_per_token", 0) / row["bound_s_per_token"] if full and row.get("bound_s_per_token") else 0
        speedup = (full["tokens_per_s"] / row["accelerate"]["tokens_per_s"]) \
            if "tokens_per_s" in full and "tokens_per_s" in row.get("accelerate", {}) else 0
        print(f"| {row['budget']:.1%} ({row['capacity_experts']}) | " + " | ".join(cells)
              + f" | {full.get('loads_per_token', 0):.2f} | {full.get('stall_per_token', 0):.3f} | "
                f"{full.get('prefetch_recall', 0):.2f} | {row.get('bound_s_per_token', 0):.3f} | {ratio:.2f} | {speedup:.1f}x |")


def print_limit_table(report: dict) -> None:
    """One row a (memory limit, budget): each configuration's median tokens/s (range over the rounds), its peak
    memory in the cgroup, and what io="auto" chose."""
    cols = [c for c in ["accelerate", *VARIANTS, "resident"] if any(c in row for row in report["rows"])]
    size = report["checkpoint_bytes"]
    print(f"\nmedian tokens/s (range over {report['repeats']} rounds); each run in a fresh memory cgroup, "
          f"page cache of the checkpoint dropped first, {report['warmup']} untimed steps, {report['tokens']} timed")
    print("\n| memory limit | experts in slots | " + " | ".join(f"{c} tok/s" for c in cols)
          + " | peak GiB (" + ", ".join(cols) + ") | auto chose |")
    print("|" + "---|" * (len(cols) + 4))
    for row in report["rows"]:
        auto = next((row[c] for c in ("lru auto", "full auto") if c in row), {})
        peaks = ", ".join(f"{row[c]['peak_bytes'] / 2**30:.2f}" if row.get(c, {}).get("peak_bytes") else "-"
                          for c in cols)
        print(f"| {row['limit'] / 2**30:.2f} GiB ({row['limit'] / size:.2g}x) | {row['budget']:.1%} "
              f"({row['capacity_experts']}) | " + " | ".join(_speed(row.get(c)) for c in cols)
              + f" | {peaks} | {auto.get('io', '-')} |")


if __name__ == "__main__":
    main()
