"""A decoded token's path through offload_moe crosses each module in one direction, a few times per layer.

Measured by benchmarks/decode_path.py (``measure_path``) on the bundled demo model (6 MoE layers, top-2): one decode
step is profiled and every call between two of our modules is counted.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "benchmarks" / "decode_path.py"

# The arrows the design allows (caller -> callee); any other one is a new dependency in the token's path.
ARROWS = {"experts -> cache", "experts -> prefetch", "experts -> kernels", "runtime -> cache",
          "cache -> policies.lru", "cache -> policies.fifo", "cache -> policies.lfu", "policies.lfu -> policies.heap",
          "cache -> transfer", "cache -> sources", "sources -> store", "store -> safetensors_io", "store -> kernels",
          "store -> formats", "cache -> formats", "kernels -> formats",  # a packed weight made from its components
          "kernels -> gemv"}  # bf16 at 1-4 tokens on the CPU, where the calibration chose it
# The most entries within one layer, whatever it loads: the experts module opens the cache's lease once
# (use, enter, prefetch, exit, and one step of its iterator per expert and one to end: 7 for two experts),
# asks the prefetcher twice (predict on the device, then name the loads) and runs a kernel per expert.
PER_LAYER = {"experts -> cache": 7, "experts -> prefetch": 2, "experts -> kernels": 2}


def _benchmark():
    spec = importlib.util.spec_from_file_location("decode_path_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("settings", [
    {"cache_experts": 24, "prefetch": "gate"},
    {"cache_experts": 24, "prefetch": "transition", "policy": "lfu", "io": "mmap"},
], ids=["gate", "lfu-transition-mmap"])
def test_one_decode_step_crosses_each_module_forward_only(settings):
    path = _benchmark().decode_step_path(settings)
    assert path.layers == 6 and path.calls > 0
    assert not path.reentries  # no module calls back into one further down the stack (a policy into the cache)
    assert set(path.entries) <= ARROWS, set(path.entries) - ARROWS
    for arrow, bound in PER_LAYER.items():
        assert path.most_entries[arrow] <= bound, (arrow, path.most_entries[arrow])
    assert path.lock_takes <= path.layers + 1  # the lease's, once a layer, and the token count's, once a step
