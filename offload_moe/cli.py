"""The ``offload-moe`` command. Thin: parse options, call the library, print."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import OffloadMoEError

app = typer.Typer(
    name="offload-moe",
    help="Run Mixture-of-Experts models whose experts do not fit on your GPU (or in RAM).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)
state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        console.print(f"offload-moe {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    """Run Mixture-of-Experts models whose experts do not fit on your GPU (or in RAM).

    Example: offload-moe demo
    """
    state["debug"] = debug


@app.command()
def demo(
    device: Annotated[str, typer.Option(help="Compute device: cpu or cuda.")] = "cpu",
    tokens: Annotated[int, typer.Option(min=1, help="New tokens per prompt.")] = 40,
) -> None:
    """Complete three Python prompts with the bundled MoE model, 25% of its experts resident, and show the cache statistics.

    Example: offload-moe demo --tokens 64
    """
    from .demo import run_demo

    result = run_demo(device=device, new_tokens=tokens, console=console)
    s = result.stats
    requests = s["hits"] + s["misses"]
    rows = {
        "experts in cache": f"{s['capacity_experts']} of {s['total_experts']}",
        "hits": f"{s['hits']} of {requests} expert requests",
        "misses": f"{s['misses']} (the layer waited for a read)",
        "hit rate": f"{s['hit_rate']:.1%}",
        "evictions": str(s["evictions"]),
        "bytes loaded": f"{s['bytes_loaded'] / 2**20:.1f} MiB",
    }
    rows["next-layer prediction"] = (f"{s['prediction_recall']:.0%} of needed experts named a layer ahead by "
                                     f"the '{s['prefetch']}' predictor; {s['prefetch_used']} of "
                                     f"{s['prefetch_issued']} prefetches used")
    rows["tokens/s"] = f"{result.tokens_per_s:.1f} ({result.new_tokens} tokens on {s['device']})"
    table = Table(title="expert cache")
    table.add_column("statistic")
    table.add_column("value")
    for name, value in rows.items():
        table.add_row(name, value)
    console.print()
    console.print(table)
    console.print(
        f"Load it yourself: offload_moe.load(offload_moe.demo_model_path(), cache_experts={result.cache_experts})",
        highlight=False,
    )


@app.command()
def plan(
    model: Annotated[str, typer.Argument(help="Model folder (config.json + *.safetensors).")],
    device_memory: Annotated[Optional[str], typer.Option(help="Memory for the compute device, e.g. 12GiB.")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="float32, bfloat16 or float16; default: the checkpoint's.")] = None,
    context: Annotated[int, typer.Option(help="Tokens of KV cache to reserve.")] = 4096,
    profile: Annotated[Optional[str], typer.Option(help="Hardware profile name or TOML path (see `offload-moe profiles`).")] = None,
) -> None:
    """Show what goes where for MODEL under a device-memory budget, without loading any weights.

    Example: offload-moe plan ./Mixtral-8x7B --device-memory 12GiB
    """
    from .planning import plan as make_plan

    p = make_plan(model, device_memory=device_memory, dtype=dtype, context_length=context, profile=profile)
    table = Table(title=f"{p.model_type} in {p.device_memory / 2**30:.1f} GiB of device memory ({p.dtype})")
    table.add_column("part")
    table.add_column("where")
    table.add_column("size", justify="right")
    for row in p.rows():
        table.add_row(*row)
    console.print(table)
    if not p.fits:
        raise OffloadMoEError("the model does not fit: fewer than 2 expert slots remain after the dense weights")


@app.command()
def generate(
    model: Annotated[Optional[str], typer.Argument(help="Model folder; default: the bundled model.")] = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to complete.")] = ...,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 for greedy decoding.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling when temperature > 0.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda; default: the profile's, else cpu.")] = None,
    cache_experts: Annotated[Optional[int], typer.Option(help="Expert slots on the device.")] = None,
    cache_memory: Annotated[Optional[str], typer.Option(help="Memory for expert slots, e.g. 6GiB.")] = None,
    policy: Annotated[Optional[str], typer.Option(help="Eviction policy: lru, lfu, fifo, random.")] = None,
    prefetch: Annotated[str, typer.Option(help="Predictor: none, gate, transition.")] = "none",
    dtype: Annotated[Optional[str], typer.Option(help="float32, bfloat16 or float16.")] = None,
    profile: Annotated[Optional[str], typer.Option(help="Hardware profile name or TOML path.")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print text, timings and cache statistics as JSON.")] = False,
) -> None:
    """Complete one prompt, streaming the text; --json prints text, timings and statistics for scripts.

    Example: offload-moe generate --prompt "def fib(n):" --max-new-tokens 48 --json
    """
    import json

    from .generation import generate_text

    stream = None if json_output else (lambda text: console.out(text, end="", highlight=False))
    if stream is not None:
        console.out(prompt, end="", style="bold", highlight=False)
    result = generate_text(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           seed=seed, on_text=stream, device=device, cache_experts=cache_experts,
                           cache_memory=cache_memory, policy=policy, prefetch=prefetch, dtype=dtype, profile=profile)
    if json_output:
        print(json.dumps(result.as_dict(), default=str))
        return
    s = result.stats
    err.print(f"\n{result.new_tokens} tokens in {result.seconds:.2f} s ({result.tokens_per_s:.1f} tokens/s); "
              f"expert cache {s['capacity_experts']} of {s['total_experts']}: {s['hits']} hits, {s['misses']} misses",
              highlight=False)


@app.command()
def verify(
    model: Annotated[str, typer.Argument(help="Model folder (config.json + *.safetensors).")],
    manifest_dir: Annotated[Optional[str], typer.Option(help="Where the checksum manifest lives when the model folder is read-only.")] = None,
) -> None:
    """Check every expert's bytes against a SHA-256 manifest; the first run writes the manifest.

    Example: offload-moe verify ./Mixtral-8x7B --manifest-dir ~/.cache/offload-moe
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

    from .checksums import verify as check

    with Progress(TextColumn("[bold]hashing experts"), BarColumn(), DownloadColumn(binary_units=True),
                  console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("hash", total=None)
        result = check(model, manifest_dir=manifest_dir, progress=lambda n: bar.advance(task, n))
    if result.created:
        console.print(f"wrote checksums of {result.experts} experts to {result.manifest}")
        return
    if result.ok:
        console.print(f"all {result.experts} experts match {result.manifest}")
        return
    for layer, expert, files in result.bad:
        err.print(f"expert {expert} of layer {layer} differs from the manifest ({files})", highlight=False, soft_wrap=True)
    raise OffloadMoEError(f"{len(result.bad)} of {result.experts} experts differ from {result.manifest}; "
                          "re-download the files named above")


@app.command()
def profiles() -> None:
    """List the hardware profiles that --profile accepts.

    Example: offload-moe profiles
    """
    from .hardware import list_profiles, profiles_folder

    table = Table(title=f"hardware profiles ({profiles_folder()})")
    for col in ("name", "device", "device memory", "dtype", "policy", "suits"):
        table.add_column(col)
    for p in list_profiles():
        table.add_row(p.name, p.device, p.device_memory, p.dtype or "checkpoint's", p.policy or "lru", p.description)
    console.print(table)


def main() -> None:
    """Entry point: run the app; turn offload_moe errors into one line and exit code 1 (unless --debug)."""
    try:
        app()
    except OffloadMoEError as e:
        if "--debug" in sys.argv:
            raise
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
