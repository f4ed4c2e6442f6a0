"""The path of one decoded token through offload_moe: which of its functions run, per MoE layer. A benchmark.

Loads the bundled demo model (6 MoE layers, 16 experts, top-2) under a few settings, runs a prompt and a few
decode steps, then profiles ONE decode step with ``sys.setprofile`` and counts, per MoE layer:

- calls: every call into a function of ``offload_moe`` (a generator's resumption counts as a call);
- functions and modules: the distinct ones called in the whole step;
- module entries: calls from a function of one of our modules into one of another (policies.lru is a module);
  a call that comes from the model (transformers, torch, a hook) is no entry;
- re-entries: a call into module M while M is already further down the stack with another of our modules in
  between (a policy calling back into the cache, a mover calling back into the cache): the path goes back;
- lock takes: acquisitions of the expert cache's lock (the model's own ``forward`` wrapper, once per step,
  holds it from outside and is not counted).

Prints tables (``rich``) and writes JSON (``--json``). ``measure_path`` is what tests/test_decode_path.py uses.

    python benchmarks/decode_path.py
    python benchmarks/decode_path.py --json results/decode_path.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

PACKAGE = "offload_moe"

SETTINGS: dict[str, dict] = {  # short names: the table has a column for each, in 80 columns
    "resident": {},  # every expert in a slot
    "none": {"cache_experts": 24, "prefetch": "none"},  # of 96 experts; LRU
    "gate": {"cache_experts": 24, "prefetch": "gate"},
    "trans": {"cache_experts": 24, "prefetch": "transition"},
    "mmap": {"cache_experts": 24, "prefetch": "gate", "io": "mmap"},
    "lfu": {"cache_experts": 24, "prefetch": "gate", "policy": "lfu"},
}


@dataclass
class PathCount:
    """What one profiled call of the model ran of ours. Per-layer figures are totals over ``layers``."""

    layers: int
    calls: int = 0
    functions: Counter = field(default_factory=Counter)  # "module:function" -> calls
    entries: Counter = field(default_factory=Counter)  # "caller -> callee" (modules) -> calls
    reentries: Counter = field(default_factory=Counter)  # "module:function <- caller" -> calls
    lock_takes: int = 0
    most_entries: Counter = field(default_factory=Counter)  # "caller -> callee" -> most within one stretch

    @property
    def modules(self) -> set[str]:
        return {name.partition(":")[0] for name in self.functions}

    def per_layer(self, n: int) -> float:
        return n / self.layers

    def summary(self) -> dict:
        return {
            "layers": self.layers,
            "calls_per_layer": self.per_layer(self.calls),
            "functions": len(self.functions),
            "modules": sorted(self.modules),
            "entries_per_layer": self.per_layer(sum(self.entries.values())),
            "reentries": sum(self.reentries.values()),
            "lock_takes_per_layer": self.per_layer(self.lock_takes),
            "entries": {k: self.per_layer(v) for k, v in self.entries.most_common()},
            "most_entries_in_one_stretch": dict(self.most_entries.most_common()),
            "reentry_calls": dict(self.reentries),
            "function_calls": dict(sorted(self.functions.items())),
        }


class _CountingLock:
    """Stands in for the cache's lock while profiling: the same lock, its acquisitions counted."""

    def __init__(self, lock, count: PathCount):
        self._lock, self._count = lock, count

    def acquire(self, *args, **kwargs):
        self._count.lock_takes += 1
        return self._lock.acquire(*args, **kwargs)

    def release(self):
        self._lock.release()

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self._lock.release()


def _ours(frame) -> str | None:
    """The module of ``frame`` without the package prefix, or None if it is not one of ours."""
    name = frame.f_globals.get("__name__", "")
    if name == PACKAGE or name.startswith(PACKAGE + "."):
        return name[len(PACKAGE) + 1:] or PACKAGE
    return None


def measure_path(run: Callable[[], object], layers: int, cache=None) -> PathCount:
    """Profile ``run()`` (one call of a model, on this thread) and count the calls into offload_moe it makes.

    ``layers``: the MoE layers the call passes, to give figures per layer. ``cache``: an ``ExpertCache`` whose lock
    acquisitions are to be counted. ``most_entries`` is the most entries of each kind within one stretch: from one
    call the model makes into our code (a layer's experts, a hook) to the next.
    """
    count = PathCount(layers)
    stretch: Counter = Counter()

    def profile(frame, event, arg):
        if event != "call":
            return
        module = _ours(frame)
        if module is None:
            return
        function = f"{module}:{frame.f_code.co_qualname}"
        count.calls += 1
        count.functions[function] += 1
        caller = _ours(frame.f_back) if frame.f_back is not None else None
        if caller is None:  # the model calls in: a new stretch
            count.most_entries |= stretch
            stretch.clear()
        elif caller != module:
            pair = f"{caller} -> {module}"
            count.entries[pair] += 1
            stretch[pair] += 1
        below, back = [], frame.f_back
        while back is not None:
            m = _ours(back)
            if m is not None:
                below.append(m)
            back = back.f_back
        if below and below[0] != module and module in below[1:]:
            count.reentries[f"{function} <- {below[0]}"] += 1

    lock = None
    if cache is not None:
        lock, cache.lock = cache.lock, _CountingLock(cache.lock, count)
    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
        if lock is not None:
            cache.lock = lock
    count.most_entries |= stretch
    return count


def decode_step_path(settings: dict, prompt: int = 5, warmup: int = 3) -> PathCount:
    """Load the demo model with ``settings``, run a ``prompt``-token prefill and ``warmup`` decode steps, then
    measure one more decode step."""
    import offload_moe
    from offload_moe.checkpoint import demo_model_path
    from offload_moe.generation import kv_cache_kwargs, kv_cache_of

    model = offload_moe.load(demo_model_path(), progress=False, **settings)
    try:
        cache = model.offload.cache
        layers = len(model.offload.layers)
        with torch.no_grad():
            past = kv_cache_of(model(torch.arange(1, prompt + 1)[None], use_cache=True))
            for t in range(warmup):
                step = torch.tensor([[prompt + 1 + t]])
                past = kv_cache_of(model(step, use_cache=True, **kv_cache_kwargs(model, past)))
            step, kwargs = torch.tensor([[prompt + 1 + warmup]]), kv_cache_kwargs(model, past)
            return measure_path(lambda: model(step, use_cache=True, **kwargs), layers, cache)
    finally:
        model.offload.close()


def _table(results: dict[str, PathCount]):
    from rich.table import Table

    names = list(results)
    table = Table(title="one decode step, per MoE layer", title_justify="left")
    table.add_column("", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right")
    rows = [
        ("calls", lambda c: f"{c.per_layer(c.calls):.1f}"),
        ("functions (step)", lambda c: str(len(c.functions))),
        ("modules (step)", lambda c: str(len(c.modules))),
        ("module entries", lambda c: f"{c.per_layer(sum(c.entries.values())):.1f}"),
        ("re-entries (step)", lambda c: str(sum(c.reentries.values()))),
        ("lock takes", lambda c: f"{c.per_layer(c.lock_takes):.2f}"),
    ]
    for label, cell in rows:
        table.add_row(label, *(cell(results[n]) for n in names))
    pairs = sorted({p for c in results.values() for p in c.entries},
                   key=lambda p: -max(c.entries.get(p, 0) for c in results.values()))
    entries = Table(title="module entries per MoE layer (caller -> callee)", title_justify="left")
    entries.add_column("", no_wrap=True)
    for name in names:
        entries.add_column(name, justify="right")
    for pair in pairs:
        cells = [f"{c.per_layer(c.entries[pair]):.2f}" if c.entries[pair] else "" for c in results.values()]
        entries.add_row(pair.replace("policies.", ""), *cells)
    return table, entries


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--settings", nargs="*", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {name: decode_step_path(SETTINGS[name]) for name in args.settings}
    console = Console(width=80)
    for table in _table(results):
        console.print(table)
    for name, c in results.items():
        for call, n in c.reentries.items():
            console.print(f"re-entry ({name}): {call} x{n}")
    if args.json:
        import offload_moe

        out = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "torch": torch.__version__,
               "offload_moe": offload_moe.__version__, "machine": platform.machine(),
               "settings": {n: {"load": SETTINGS[n], **results[n].summary()} for n in results}}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1, default=list)
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
