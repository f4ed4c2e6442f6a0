"""``offload-moe demo``: the bundled MoE model completes Python with a quarter of its experts resident.

The model in ``offload_moe/demo_model/`` (see its README.md) ships with the package, so the
demo needs no download. It is loaded like any other checkpoint with ``offload_moe.load``:
24 of its 96 experts fit in the cache and the rest stream from ``model.safetensors`` as the
router asks for them. Completions print as they are generated.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from .checkpoint import demo_model_path, load_config
from .generation import load_tokenizer, text_streamer
from .hardware import get_profile
from .loader import load

# Each prompt stops inside a line: the tokenizer learned a newline together with the next line's
# indentation, so a prompt ending in a bare newline reads to the model like the end of a block.
DEMO_PROMPTS = (
    "import argparse\n\n\ndef main():\n    parser = argparse.ArgumentParser(",
    'def read_lines(path):\n    """Return the lines of the file at *path*, without line endings."""\n    with open(path',
    'import os\n\n\ndef list_python_files(folder):\n    """Return the names of the .py files in *folder*."""\n'
    "    return [name for name in os.listdir(folder)",
)
REPETITION_PENALTY = 1.1  # greedy decoding of a model this small loops without it
CACHE_SHARE = 0.25  # of all experts


@dataclass
class DemoResult:
    """What the demo generated and what the expert cache did meanwhile."""

    completions: list[str]
    stats: dict
    new_tokens: int
    seconds: float
    cache_experts: int
    total_experts: int
    load_options: dict  # what run_demo passed to offload_moe.load besides the folder

    def load_call(self, width: int = 80) -> str:
        """The ``offload_moe.load(...)`` call the demo made, broken between arguments to fit ``width`` columns."""
        head = "offload_moe.load("
        parts = ["offload_moe.demo_model_path()"] + [f"{k}={v!r}" for k, v in self.load_options.items()]
        lines, line = [], head
        for i, part in enumerate(parts):
            part += ")" if i == len(parts) - 1 else ","
            if line.strip() and len(line) + 1 + len(part) > width and line != head:
                lines.append(line)
                line = " " * len(head) + part
            else:
                line += ("" if line == head else " ") + part
        return "\n".join(lines + [line])

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


def run_demo(
    device: str | None = None,
    new_tokens: int = 40,
    console: Console | None = None,
    prompts: tuple[str, ...] = DEMO_PROMPTS,
    profile: str | Path | None = None,
) -> DemoResult:
    """Load the bundled model with 25% of its experts resident, stream completions of ``prompts``, return the stats.

    ``device`` defaults to the hardware ``profile``'s, else the CPU; the cache stays at 25% of the
    experts whatever the profile, since that is what the demo shows. On CPU the bf16 checkpoint
    is computed in float32 (faster there); elsewhere in its own dtype.
    """
    device = device or (get_profile(profile).device if profile is not None else "cpu")
    console = console or Console()
    folder = demo_model_path()
    config = load_config(folder)
    total = config.num_hidden_layers * config.num_local_experts
    capacity = max(2, int(total * CACHE_SHARE))
    tokenizer = load_tokenizer(folder)
    options = {"device": device, "cache_experts": capacity, "dtype": "float32" if device == "cpu" else None,
               "prefetch": "gate", "prefetch_margin": 0}
    model = load(folder, **options, progress=False)
    try:
        _print_header(console, config, capacity, total, model.offload.device)
        completions, generated, seconds = [], 0, 0.0
        for prompt in prompts:
            text, count, took = _complete(model, tokenizer, prompt, new_tokens, console)
            completions.append(text)
            generated += count
            seconds += took
        stats = model.offload.stats()
    finally:
        model.offload.close()
    return DemoResult(completions, stats, generated, seconds, capacity, total, options)


def _print_header(console: Console, config, capacity: int, total: int, device: torch.device) -> None:
    params = config.num_hidden_layers * config.num_local_experts * 3 * config.hidden_size * config.intermediate_size
    console.print(
        f"[bold]offload-moe demo[/]: a Mixtral-architecture model trained on the Python standard library "
        f"({config.num_hidden_layers} layers x {config.num_local_experts} experts, top-{config.num_experts_per_tok}, "
        f"{params / 1e6:.1f} M expert parameters), bundled with the package."
    )
    console.print(
        f"[bold]{capacity} of {total}[/] experts fit in the cache on {device}; the others stream from "
        f"model.safetensors when the router picks them.\n"
    )


def _complete(model, tokenizer, prompt: str, new_tokens: int, console: Console) -> tuple[str, int, float]:
    """Stream one greedy completion (with a mild repetition penalty); returns its text, its number of new tokens and the seconds it took."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.offload.device)  # [1, S]
    # console.out: no rich markup, wrapping or highlighting, since code is full of brackets
    streamer = text_streamer(tokenizer, lambda text: console.out(text, end="", style="green", highlight=False))
    console.rule(style="dim")
    console.out(prompt, end="", style="bold", highlight=False)
    start = time.perf_counter()
    with torch.inference_mode():
        tokens = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, repetition_penalty=REPETITION_PENALTY,
                                streamer=streamer, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    console.out("")
    new = tokens[0, ids.shape[1]:]
    return tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), seconds
