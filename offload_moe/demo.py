"""``offload-moe demo``: a small MoE model run with a quarter of its experts resident.

Until the bundled trained model lands, the demo writes a small random
Mixtral-architecture checkpoint to a temporary folder, so it needs no download.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from .loader import load
from .synthetic import write_synthetic_checkpoint

DEMO_CONFIG = dict(
    vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
    max_position_embeddings=512, tie_word_embeddings=False,
)


def run_demo(device: str = "cpu", new_tokens: int = 24, console: Console | None = None) -> dict:
    """Write the demo checkpoint, load it with 25% of experts resident, generate, and return the stats."""
    console = console or Console()
    with tempfile.TemporaryDirectory(prefix="offload-moe-demo-") as tmp:
        folder = write_synthetic_checkpoint(Path(tmp) / "demo-mixtral", "mixtral", seed=0, **DEMO_CONFIG)
        total = DEMO_CONFIG["num_hidden_layers"] * DEMO_CONFIG["num_local_experts"]
        model = load(folder, device=device, cache_experts=total // 4, dtype="float32")
        console.print(
            f"[bold]demo model[/]: Mixtral architecture, {DEMO_CONFIG['num_hidden_layers']} layers x "
            f"{DEMO_CONFIG['num_local_experts']} experts (top-2), random weights; "
            f"{total // 4} of {total} experts resident on {device}"
        )
        prompt = torch.arange(1, 17, device=model.offload.device).unsqueeze(0)  # [1, 16]
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - start
        generated = out[0, prompt.shape[1]:].tolist()
        console.print(f"generated token ids: {generated}")
        stats = model.offload.stats()
        model.offload.close()
    return {"stats": stats, "tokens": generated, "seconds": seconds, "tokens_per_s": len(generated) / seconds}
