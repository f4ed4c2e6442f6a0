"""One offload_moe decode configuration in this process, its result printed as JSON (the last line of stdout).

The side by side runs ours, as it runs llama-bench, in a child process of its own: the same thread count,
a fresh process each time, and, with a memory limit, in a fresh memory cgroup. The timing is
benchmarks/decode.py's (``run_offload``): 16 prompt tokens, 2 untimed decode steps, then the timed ones.

    python -m benchmarks.peers.ours '{"folder": "...", "capacity": 4, "variant": "full mmap", "tokens": 16, "threads": 2}'
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

DECODE = Path(__file__).resolve().parent.parent / "decode.py"


def decode_module():
    spec = importlib.util.spec_from_file_location("decode_benchmark", DECODE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    decode = decode_module()
    result = decode.run_offload(Path(spec["folder"]), "cpu", spec["capacity"], spec["variant"], spec["tokens"],
                                None, None)
    result["threads"] = torch.get_num_threads()
    return result


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
