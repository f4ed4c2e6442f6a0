"""The ``offload-moe`` command. Thin: parse options, call the library, print."""

from __future__ import annotations

import json
import math
import sys
import textwrap
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ._version import __version__
from .atomic import output_folder
from .chat import ChatSession, prompt_lines, run_chat
from .checksums import verify as check
from .config import MIN_CACHE_EXPERTS, OffloadConfig
from .demo import run_demo
from .errors import OffloadMoEError
from .generation import generate_text
from .hardware import get_profile, list_profiles, profiles_folder
from .planning import plan as make_plan
from .profiling import (
    CHUNK_TOKENS,
    default_predictors,
    default_workers,
    profile_capacities,
    sweep,
    sweep_size,
    trace_to_profile,
    write_results,
)
from .progress import progress_bar
from .quantize import quantize_experts
from .serve import MAX_QUEUE, SHUTDOWN_TIMEOUT, serve_model
from .traces import (
    PARTS_INDEX,
    RECORD_CHUNK_TOKENS,
    Trace,
    TraceFile,
    expert_usage_entropy,
    import_routing,
    merge_trace_parts,
    parse_layers,
    parts_folder,
    random_repeat_rate,
    read_prompts,
    record_prompts_file,
    repeat_rate,
    save_trace,
    synthesize_trace,
)

app = typer.Typer(
    name="offload-moe",
    help="Run Mixture-of-Experts models whose experts do not fit on your GPU (or in RAM).\n\nExample: offload-moe demo",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)
state = {"debug": False}


def _above_zero(value: float) -> float:
    """Range errors are usage errors (exit 2): typer's min/max cannot leave out the 0 itself."""
    if value <= 0:
        raise typer.BadParameter(f"{value} must be above 0")
    return value


FLAG = ""  # the metavar of an on/off option: typer would show "<bool>", as if it took a value

# Options several commands share: the model and how it is loaded, and how text is sampled.
ModelArgument = Annotated[str | None, typer.Argument(help="Model folder; default: the bundled model.")]
Temperature = Annotated[float, typer.Option(min=0.0, help="0 for greedy decoding.")]
TopP = Annotated[float, typer.Option(min=0.0, max=1.0, callback=_above_zero, help="Nucleus sampling when temperature > 0.")]
RepetitionPenalty = Annotated[float, typer.Option(min=0.0, callback=_above_zero, help="1 turns it off; small models loop without it.")]
Device = Annotated[str | None, typer.Option(help="cpu or cuda; default: the profile's, else cpu.")]
CacheExperts = Annotated[int | None, typer.Option(min=MIN_CACHE_EXPERTS, help="Expert slots on the device.")]
CacheMemory = Annotated[str | None, typer.Option(help="Memory for expert slots, e.g. 6GiB.")]
Policy = Annotated[str | None, typer.Option(help="Eviction policy: lru, lfu, fifo, random, forecast, token-forecast.")]
Prefetch = Annotated[str | None, typer.Option(help="Predictor: none, gate, transition, hybrid; default: the profile's, else none.")]
Dtype = Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")]
IoMode = Annotated[str | None, typer.Option(
    "--io", help="How experts are read: auto (mmap on CPU where the memory this process may use holds the experts, "
                 "or 1.5x the slots; else direct), direct, dontneed, buffered, or mmap (CPU: compute from the mapped checkpoint); "
                 "default: the profile's, else auto.")]
HardwareProfile = Annotated[str | None, typer.Option(help="Hardware profile name or TOML path.")]
TrustRemoteCode = Annotated[bool, typer.Option(
    "--trust-remote-code", metavar=FLAG, help="Run Python code from the model folder (the .py files its config.json names in "
                                "auto_map) to build an architecture transformers lacks. That code runs with your "
                                "permissions: use it only for a folder whose code you have read and trust.")]


def _version(value: bool) -> None:
    if value:
        console.print(f"offload-moe {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True, metavar=FLAG, help="Print the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", metavar=FLAG, help="Show full tracebacks on errors.")] = False,
    profile: Annotated[str | None, typer.Option(
        help="Hardware profile (name or TOML path) for every command that loads or sizes a model; "
             "a command's own --profile wins.")] = None,
    threads: Annotated[int | None, typer.Option(
        min=1, help="CPU threads for compute (torch.set_num_threads); default: torch's, one per core. On a "
                    "machine busy with other work, fewer threads than cores can be several times faster.")] = None,
) -> None:
    """Run Mixture-of-Experts models whose experts do not fit on your GPU (or in RAM).

    Example: offload-moe --profile gpu-12gb chat
    """
    state["debug"] = debug
    if profile is not None:
        get_profile(profile)  # a typo fails here, before any work
    state["profile"] = profile
    if threads is not None:
        torch.set_num_threads(threads)


def _profile(option: str | None) -> str | None:
    """A command's --profile, else the one given before the command."""
    return option if option is not None else state.get("profile")


def _settings(profile: str | None, **flags) -> OffloadConfig:
    """What a command loads the model with: the hardware profile (its own --profile, else the one given before
    the command) with the command's flags on top; a flag left out keeps the profile's value."""
    profile = _profile(profile)
    return OffloadConfig.from_profile(profile, **flags) if profile is not None else OffloadConfig(**flags)


@app.command()
def demo(
    device: Annotated[str | None, typer.Option(help="Compute device: cpu or cuda; default: the profile's, else cpu.")] = None,
    tokens: Annotated[int, typer.Option(min=1, help="New tokens per prompt.")] = 40,
    profile: Annotated[str | None, typer.Option(help="Hardware profile name or TOML path (its device is used).")] = None,
) -> None:
    """Complete three Python prompts with the bundled MoE model, 25% of its experts resident, and show the cache statistics.

    Example: offload-moe demo --tokens 64
    """
    profile = _profile(profile)
    result = run_demo(device=device, new_tokens=tokens, console=console, profile=profile)
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
    console.out("Load it yourself, with the demo's settings:", highlight=False)
    console.out(result.load_call(width=console.width), highlight=False)


@app.command()
def plan(
    model: Annotated[str, typer.Argument(help="Model folder (config.json + *.safetensors).")],
    device_memory: Annotated[str | None, typer.Option(help="Memory for the compute device, e.g. 12GiB.")] = None,
    host_memory: Annotated[str | None, typer.Option(help="Host RAM for the warm expert tier, e.g. 32GiB.")] = None,
    io: IoMode = None,
    dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16; default: the checkpoint's.")] = None,
    context: Annotated[int, typer.Option(min=0, help="Tokens of KV cache to reserve.")] = 4096,
    profile: Annotated[str | None, typer.Option(help="Hardware profile name or TOML path (see `offload-moe profiles`).")] = None,
    json_output: Annotated[bool, typer.Option("--json", metavar=FLAG, help="Print the plan as JSON.")] = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Show what goes where for MODEL: device, host RAM and disk, without loading any weights.

    Example: offload-moe plan ./Mixtral-8x7B --device-memory 12GiB --host-memory 32GiB
    """
    profile = _profile(profile)
    p = make_plan(model, device_memory=device_memory, dtype=dtype, context_length=context, profile=profile,
                  host_memory=host_memory, io=io, trust_remote_code=trust_remote_code)
    if json_output:
        print(json.dumps(p.as_dict()))
        if not p.fits:
            raise typer.Exit(1)
        return
    table = Table(title=f"{p.model_type} in {p.device_memory / 2**30:.1f} GiB of device memory ({p.dtype})")
    table.add_column("part")
    table.add_column("where")
    table.add_column("size", justify="right")
    for row in p.rows():
        table.add_row(*row)
    console.print(table)
    console.out(p.io_line, highlight=False)
    for warning in p.warnings:
        err.print(f"[bold yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if not p.fits:
        raise OffloadMoEError("the model does not fit: fewer than 2 expert slots remain after the dense weights")


@app.command()
def generate(
    model: ModelArgument = None,
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to complete.")] = ...,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate.")] = 64,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    repetition_penalty: RepetitionPenalty = 1.1,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    device: Device = None,
    cache_experts: CacheExperts = None,
    cache_memory: CacheMemory = None,
    policy: Policy = None,
    prefetch: Prefetch = None,
    dtype: Dtype = None,
    io: IoMode = None,
    profile: HardwareProfile = None,
    json_output: Annotated[bool, typer.Option("--json", metavar=FLAG, help="Print text, timings and cache statistics as JSON.")] = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Complete one prompt, streaming the text; --json prints text, timings and statistics for scripts.

    Example: offload-moe generate --prompt "def fib(n):" --max-new-tokens 48 --json
    """
    settings = _settings(profile, device=device, cache_experts=cache_experts, cache_memory=cache_memory,
                         policy=policy, prefetch=prefetch, dtype=dtype, io=io)
    shown = []

    def stream(text: str) -> None:
        if not shown:  # the prompt goes out with the first text, so a load that fails prints nothing on stdout
            console.out(prompt, end="", style="bold", highlight=False)
            shown.append(True)
        console.out(text, end="", highlight=False)

    stream = None if json_output else stream
    result = generate_text(model, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           repetition_penalty=repetition_penalty, seed=seed, on_text=stream, config=settings,
                           trust_remote_code=trust_remote_code)
    if json_output:
        print(json.dumps(result.as_dict(), default=str))
        return
    s = result.stats
    packed = f" ({s['expert_format']}, {s['expert_bytes'] / 2**20:.2f} MiB an expert)" if s["expert_format"] != s["dtype"] else ""
    err.print(f"\n{result.new_tokens} tokens in {result.seconds:.2f} s ({result.tokens_per_s:.1f} tokens/s); "
              f"expert cache {s['capacity_experts']} of {s['total_experts']}{packed}: {s['hits']} hits, {s['misses']} misses",
              highlight=False)


@app.command()
def chat(
    model: ModelArgument = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per answer.")] = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    repetition_penalty: RepetitionPenalty = 1.1,
    seed: Annotated[int, typer.Option(help="Sampling seed; /reset re-seeds.")] = 0,
    device: Device = None,
    cache_experts: CacheExperts = None,
    cache_memory: CacheMemory = None,
    policy: Policy = None,
    prefetch: Prefetch = None,
    dtype: Dtype = None,
    io: IoMode = None,
    profile: HardwareProfile = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Chat with MODEL, streaming answers; /reset, /stats, /paste, /quit. Reads lines from stdin when it is not a terminal.

    Uses the tokenizer's chat template, or continues the conversation as plain text without one.
    Ctrl-C stops an answer (it stays in the history); Ctrl-C or Ctrl-D at the prompt leaves.

    Example: offload-moe chat --cache-experts 24 --temperature 0.7
    """
    settings = _settings(profile, device=device, cache_experts=cache_experts, cache_memory=cache_memory,
                         policy=policy, prefetch=prefetch, dtype=dtype, io=io)
    session = ChatSession.load(model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                               repetition_penalty=repetition_penalty, config=settings,
                               trust_remote_code=trust_remote_code)
    interactive = sys.stdin.isatty()
    try:
        if interactive:
            err.print(f"[dim]chatting with {escape(session.model.offload.folder.name)}; /reset, /stats, /paste, /quit[/]", highlight=False)
        run_chat(session, prompt_lines(console) if interactive else sys.stdin, console, interactive=interactive,
                 errors=err)
    finally:
        session.close()


@app.command()
def serve(
    model: ModelArgument = None,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 opens it to other machines.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on; 0 picks a free one.")] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="OFFLOAD_MOE_API_KEY", help="Require 'Authorization: Bearer KEY' "
                                                "on /v1/... (also from $OFFLOAD_MOE_API_KEY).")] = None,
    model_name: Annotated[str | None, typer.Option(help="The model name clients send; default: the folder's name.")] = None,
    max_batch: Annotated[int | None, typer.Option(min=1, help="Requests decoded together; default: 8, fewer if their "
                                                  "KV cache would not fit.")] = None,
    max_queue: Annotated[int, typer.Option(min=0, help="Requests waiting for a place; more get 429.")] = MAX_QUEUE,
    shutdown_timeout: Annotated[float, typer.Option(min=0.0, help="Seconds SIGTERM or Ctrl-C lets requests in flight "
                                                    "finish before cancelling them.")] = SHUTDOWN_TIMEOUT,
    device: Device = None,
    cache_experts: CacheExperts = None,
    cache_memory: CacheMemory = None,
    policy: Policy = None,
    prefetch: Prefetch = None,
    dtype: Dtype = None,
    io: IoMode = None,
    profile: HardwareProfile = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API, decoding concurrent requests in one batch.

    POST /v1/chat/completions and /v1/completions (streamed with "stream": true), GET /v1/models, /health and
    /metrics (Prometheus). Needs the serve extra: pip install "offload_moe\\[serve]".

    Example: offload-moe serve --cache-experts 24 --port 8000
    """
    settings = _settings(profile, device=device, cache_experts=cache_experts, cache_memory=cache_memory,
                         policy=policy, prefetch=prefetch, dtype=dtype, io=io)
    serve_model(model, host=host, port=port, api_key=api_key, model_name=model_name, max_batch=max_batch,
                max_queue=max_queue, shutdown_timeout=shutdown_timeout, config=settings,
                trust_remote_code=trust_remote_code, announce=lambda line: err.print(line, highlight=False, markup=False))


@app.command()
def verify(
    model: Annotated[str, typer.Argument(help="Model folder (config.json + *.safetensors).")],
    manifest_dir: Annotated[str | None, typer.Option(help="Where the checksum manifest lives when the model folder is read-only.")] = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Check every expert's bytes against a SHA-256 manifest; the first run writes the manifest.

    Example: offload-moe verify ./Mixtral-8x7B --manifest-dir ~/.cache/offload-moe
    """
    with progress_bar(True, "hashing experts", None) as advance:
        result = check(model, manifest_dir=manifest_dir, progress=advance, trust_remote_code=trust_remote_code)
    if result.created:
        console.print(f"wrote checksums of {result.experts} experts to {result.manifest}", markup=False)
        return
    if result.ok:
        console.print(f"all {result.experts} experts match {result.manifest}", markup=False)
        return
    for layer, expert, files in result.bad:
        err.print(f"expert {expert} of layer {layer} differs from the manifest ({files})", highlight=False, soft_wrap=True, markup=False)
    raise OffloadMoEError(f"{len(result.bad)} of {result.experts} experts differ from {result.manifest}; "
                          "re-download the files named above")


def _bits(value: int) -> int:
    if value not in (8, 4):
        raise typer.BadParameter(f"{value} is not 8 or 4")
    return value


@app.command()
def quantize(
    model: Annotated[str, typer.Argument(help="Model folder (config.json + bf16, fp16 or float32 *.safetensors).")],
    bits: Annotated[int, typer.Option(callback=_bits, help="8: int8, a scale per output channel; 4: int4, grouped.")] = ...,
    out: Annotated[Path, typer.Option(help="The new folder to write; must not exist or be empty.")] = ...,
    group_size: Annotated[int | None, typer.Option(min=1, help="Input columns per int4 scale and zero (--bits 4 only).")] = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Write a copy of MODEL with its routed experts stored as int8 or int4 (docs/quantization.md); MODEL is only read.

    Example: offload-moe quantize ./Mixtral-8x7B --bits 4 --out ./Mixtral-8x7B-int4
    """
    result = quantize_experts(model, out, bits=bits, group_size=group_size, trust_remote_code=trust_remote_code)
    grouping = f"groups of {result.group_size}" if result.group_size else "a scale per output channel"
    console.print(f"wrote {result.folder}: {result.expert_tensors} expert tensors as int{result.bits} ({grouping}), "
                  f"{result.expert_bytes / 2**20:.1f} MiB, {result.ratio:.2f} of the source's "
                  f"{result.source_expert_bytes / 2**20:.1f} MiB", highlight=False, soft_wrap=True, markup=False)


@app.command()
def profiles(
    profile: Annotated[str | None, typer.Option(help="Show this one profile (a name or a TOML path) in full.")] = None,
) -> None:
    """List the hardware profiles that --profile accepts, or show one in full.

    Example: offload-moe profiles --profile gpu-12gb
    """
    profile = _profile(profile)
    if profile is not None:
        table = Table(title=f"hardware profile {escape(profile)}")
        table.add_column("setting")
        table.add_column("value")
        for key, value in asdict(get_profile(profile)).items():
            table.add_row(key, "-" if value is None else escape(str(value)))
        console.print(table)
        return
    console.out(f"hardware profiles in {profiles_folder()}", highlight=False)
    console.out("(offload-moe profiles --profile NAME shows one in full)", highlight=False)
    for p in list_profiles():
        console.out("", highlight=False)
        for line in _profile_block(p, console.width):
            console.out(line, highlight=False)


def _profile_block(p, width: int) -> list[str]:
    """One profile as a few lines no wider than ``width`` (wrapped between words, never inside a value)."""
    prefetch = p.prefetch or "none"
    if prefetch != "none" and p.prefetch_margin is not None:
        prefetch += f" (margin {p.prefetch_margin})"
    lines = [f"{p.name}: {p.device}, {p.device_memory} device memory, {p.host_memory or 'no'} host tier",
             f"  io {p.io or 'auto'}, policy {p.policy or 'lru'}, prefetch {prefetch}"]
    lines += textwrap.wrap(p.description, width=max(40, width - 1), initial_indent="  suits: ",
                           subsequent_indent="    ", break_long_words=False, break_on_hyphens=False)
    return lines


trace_app = typer.Typer(help="Record, import, synthesise and summarise routing traces.\n\n"
                             "Example: offload-moe trace record --prompts prompts.txt --out trace.safetensors",
                        no_args_is_help=True)
app.add_typer(trace_app, name="trace")


@trace_app.command("record")
def trace_record(
    model: ModelArgument = None,
    prompts: Annotated[Path, typer.Option(help="Text file, one prompt per line; or .jsonl, one JSON string or {\"prompt\": ...} per line.")] = ...,
    out: Annotated[Path, typer.Option(help="The trace file to write (.safetensors).")] = ...,
    max_new_tokens: Annotated[int, typer.Option(min=0, help="Also trace this many greedy decoding steps after each prompt.")] = 0,
    margin: Annotated[int, typer.Option(min=0, help="Store the gate predictor's top-k + MARGIN guesses for the next layer.")] = 2,
    predictions: Annotated[bool, typer.Option(metavar=FLAG, help="Store the gate predictor's guesses (--no-predictions: routing only).")] = True,
    device: Device = None,
    cache_experts: Annotated[int | None, typer.Option(min=MIN_CACHE_EXPERTS, help="Expert slots while recording (routing does not depend on it).")] = None,
    cache_memory: CacheMemory = None,
    dtype: Dtype = None,
    profile: HardwareProfile = None,
    chunk_tokens: Annotated[int, typer.Option(min=1, help="Write the trace in parts of this many tokens (or more: whole prompts) as it is recorded; an interrupted recording keeps them in OUT.parts.")] = RECORD_CHUNK_TOKENS,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Record which experts each token of each prompt is routed to, with router scores and gate predictions.

    Example: offload-moe trace record --prompts prompts.txt --out trace.safetensors --max-new-tokens 32
    """
    settings = _settings(profile, device=device, cache_experts=cache_experts, cache_memory=cache_memory, dtype=dtype)
    texts = read_prompts(prompts)
    folder = parts_folder(out)
    earlier = folder.exists()  # an earlier recording's parts: refused, and not this recording's to report
    try:
        with output_folder(out.parent), progress_bar(True, "recording", len(texts), unit="items") as advance:
            path = record_prompts_file(model, texts, out, source=f"{len(texts)} prompts from {prompts.name}"
                                       + (f", {max_new_tokens} greedy tokens after each" if max_new_tokens else ""),
                                       chunk_tokens=chunk_tokens, predict_margin=margin if predictions else None,
                                       max_new_tokens=max_new_tokens, on_prompt=advance, config=settings,
                                       trust_remote_code=trust_remote_code)
    except (Exception, KeyboardInterrupt):
        if not earlier and (folder / PARTS_INDEX).exists():
            err.print(f"the tokens recorded before this stopped are kept in {folder}: a trace that `offload-moe profile "
                      f"--trace` reads; `offload-moe trace merge {folder} --out FILE` makes it one file",
                      highlight=False, soft_wrap=True, markup=False)
        raise
    _print_trace_summary(path)


@trace_app.command("merge")
def trace_merge(
    folder: Annotated[Path, typer.Argument(help="The parts folder an interrupted recording left (OUT.parts).")],
    out: Annotated[Path, typer.Option(help="The trace file to write (.safetensors).")] = ...,
) -> None:
    """Join the parts an interrupted `trace record` left into one trace file (the folder is left as it is).

    Example: offload-moe trace merge trace.safetensors.parts --out trace.safetensors
    """
    with output_folder(out.parent):
        path = merge_trace_parts(folder, out)
    _print_trace_summary(path)


@trace_app.command("synth")
def trace_synth(
    out: Annotated[Path, typer.Option(help="The trace file to write (.safetensors).")] = ...,
    tokens: Annotated[int, typer.Option(min=1, help="Tokens in the trace.")] = 4096,
    layers: Annotated[int, typer.Option(min=1, help="MoE layers.")] = 32,
    experts: Annotated[int, typer.Option(min=1, help="Experts per layer.")] = 8,
    top_k: Annotated[int, typer.Option(min=1, help="Experts per token and layer.")] = 2,
    skew: Annotated[float, typer.Option(min=0.0, help="Zipf exponent of expert popularity; 0: uniform.")] = 1.0,
    locality: Annotated[float, typer.Option(min=0.0, max=1.0, help="Chance a choice repeats one of the previous token's experts.")] = 0.3,
    sequences: Annotated[int, typer.Option(min=1, help="Independent sequences the tokens are split into.")] = 1,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a synthetic routing trace with controllable popularity skew and temporal locality.

    Example: offload-moe trace synth --out qwen-like.safetensors --layers 48 --experts 128 --top-k 8 --skew 1.2
    """
    trace = synthesize_trace(tokens=tokens, layers=layers, num_experts=experts, top_k=top_k, skew=skew,
                             locality=locality, sequences=sequences, seed=seed)
    _print_trace_summary(save_trace(trace, out), trace)


@trace_app.command("import")
def trace_import(
    responses: Annotated[Path, typer.Argument(help="Saved responses: JSON lines (one API response a line), or .npy/.npz arrays.")],
    engine: Annotated[str, typer.Option("--from", help="The serving engine that returned them: vllm or sglang.")] = ...,
    num_experts: Annotated[int, typer.Option(min=1, help="Routed experts per layer (the model's config: num_experts, n_routed_experts...).")] = ...,
    out: Annotated[Path, typer.Option(help="The trace file to write (.safetensors).")] = ...,
    top_k: Annotated[int | None, typer.Option(min=1, help="Experts per token; needed for SGLang (its payload is flat), checked for vLLM.")] = None,
    num_layers: Annotated[int | None, typer.Option(min=1, help="Layer slots of each token's routing; needed for SGLang, checked for vLLM.")] = None,
    layers: Annotated[str | None, typer.Option(help="The model's layer numbers of the routed layers, e.g. 1-47 (default: 0, 1, ...).")] = None,
    model: Annotated[str | None, typer.Option(help="The model's name in the trace (default: the responses' 'model' field).")] = None,
) -> None:
    """Turn the routed experts vLLM or SGLang returned (--enable-return-routed-experts) into a trace to profile.

    Example: offload-moe trace import responses.jsonl --from vllm --num-experts 128 --out trace.safetensors
    """
    trace = import_routing(responses, engine=engine, num_experts=num_experts, top_k=top_k, num_layers=num_layers,
                           layers=parse_layers(layers) if layers is not None else None, model=model)
    with output_folder(out.parent):
        path = save_trace(trace, out)
    _print_trace_summary(path, trace)


@trace_app.command("show")
def trace_show(trace_file: Annotated[Path, typer.Argument(help="A trace file (.safetensors), or the parts folder of an interrupted recording.")]) -> None:
    """Summarise a trace: its size, metadata, and per-layer expert usage and locality.

    Example: offload-moe trace show trace.safetensors
    """
    source = _print_trace_summary(trace_file)
    for key, value in sorted(source.metadata.items()):
        console.print(f"  {key}: {value}", highlight=False, soft_wrap=True, markup=False)


SUMMARY_TOKENS = 65536  # a longer trace is summarised over its first this many tokens, in bounded memory


def _print_trace_summary(path: Path, trace: Trace | None = None) -> TraceFile:
    """Print the trace at ``path``: its size, and its usage and locality over ``trace`` (the whole trace, held
    already) or its first ``SUMMARY_TOKENS`` tokens."""
    source = TraceFile.open(path)
    stored = [name for name in ("scores", "predicted", "token_ids") if name in source.tensors]
    console.print(f"{path}: {source.num_tokens} tokens x {len(source.layers)} layers x top-{source.top_k} of "
                  f"{source.num_experts} experts" + (f"; also {', '.join(stored)}" if stored else ""), highlight=False,
                  markup=False)
    trace = trace if trace is not None else source.first(SUMMARY_TOKENS).load()
    over = f" (over the first {trace.num_tokens} tokens)" if trace.num_tokens < source.num_tokens else ""
    entropy, repeats = expert_usage_entropy(trace), repeat_rate(trace)
    console.print(f"  usage entropy per layer, bits (uniform {math.log2(trace.num_experts):.2f}): "
                  f"mean {sum(entropy) / len(entropy):.2f}, min {min(entropy):.2f}{over}", highlight=False)
    console.print(f"  first-choice repeat rate of consecutive tokens (random {random_repeat_rate(trace.num_experts, trace.top_k):.3f}): "
                  f"mean {sum(repeats) / len(repeats):.3f}{over}", highlight=False)
    return source


@app.command("profile")
def profile_command(
    model: Annotated[str | None, typer.Argument(help="Model folder to record a trace from (needs --prompts).")] = None,
    trace_file: Annotated[Path | None, typer.Option("--trace", help="Replay this trace instead of recording one.")] = None,
    prompts: Annotated[Path | None, typer.Option(help="Prompts to record with MODEL (see `trace record`).")] = None,
    policies: Annotated[str, typer.Option(help="Comma-separated eviction policies: lru, lfu, fifo, random, forecast, token-forecast.")] = "lru,lfu,fifo,random",
    capacities: Annotated[str, typer.Option(help="Comma-separated capacities: expert slots (32) or shares of all experts (25%).")] = "12.5%,25%,50%",
    predictors: Annotated[str | None, typer.Option(help="Comma-separated predictors: none, transition, gate, hybrid; default: all the trace allows.")] = None,
    margin: Annotated[int, typer.Option(min=0, help="Predictors name top-k + MARGIN experts.")] = 1,
    out: Annotated[Path, typer.Option(help="Folder for results.json, results.csv and the plots.")] = Path("profile-results"),
    max_new_tokens: Annotated[int, typer.Option(min=0, help="With MODEL: also trace this many decoding steps per prompt.")] = 0,
    plots: Annotated[bool, typer.Option(metavar=FLAG, help="Draw PNG plots (needs matplotlib: pip install 'offload_moe\\[plot]').")] = True,
    workers: Annotated[int | None, typer.Option(min=1, help="Processes for the replays; default: one per CPU for large sweeps.")] = None,
    max_tokens: Annotated[int | None, typer.Option(min=1, help="Replay only the trace's first N tokens (a quick look at a long trace).")] = None,
    chunk_tokens: Annotated[int, typer.Option(min=1, help="A --trace longer than this many tokens is read and replayed in pieces of this many, in bounded memory.")] = CHUNK_TOKENS,
    profile: Annotated[str | None, typer.Option(help="Hardware profile: with MODEL, adds the capacity its device memory gives.")] = None,
    ray: Annotated[bool, typer.Option("--ray", metavar=FLAG, help="Run each replay as a task on Ray (pip install 'offload_moe\\[cluster]'): "
                                      "a local Ray of --workers CPUs (default: all), or the cluster at --ray-address.")] = False,
    ray_address: Annotated[str | None, typer.Option(metavar="ADDRESS", help="A running Ray cluster's address (auto, ray://HEAD:10001); implies --ray.")] = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Replay a routing trace through eviction policies x capacities x prefetch predictors, against Belady's optimum.

    Without MODEL or --trace, profiles the bundled model's held-out reference trace.

    Example: offload-moe profile --trace trace.safetensors --policies lru,lfu --capacities 16,32,64 --out results

    On a cluster: offload-moe profile --trace trace.safetensors --ray-address auto
    """
    profile = _profile(profile)
    # without MODEL the file is not read: trace_to_profile says --prompts needs MODEL
    texts = read_prompts(prompts) if prompts is not None and model is not None else None
    with output_folder(out):  # made before any long work, removed again if it fails while empty
        with progress_bar(True, "recording", len(texts), unit="items") if texts is not None else nullcontext() as advance:
            trace = trace_to_profile(model, trace_file=trace_file, prompts=texts, prompts_file=prompts, margin=margin,
                                     source=f"{len(texts)} prompts from {prompts.name}" if texts is not None else "",
                                     max_new_tokens=max_new_tokens, profile=profile, on_prompt=advance,
                                     trust_remote_code=trust_remote_code, chunk_tokens=chunk_tokens)
        if model is not None:
            console.print(f"recorded {save_trace(trace, out / 'trace.safetensors')}", highlight=False, soft_wrap=True,
                          markup=False)
        if max_tokens is not None:
            trace = trace.first(max_tokens)
        chosen = ([p.strip().lower() for p in (predictors or "").split(",") if p.strip()]
                  or default_predictors(trace, margin))
        slots = profile_capacities(capacities, trace, model=model, profile=profile, trust_remote_code=trust_remote_code)
        names = [p.strip() for p in policies.split(",") if p.strip()]
        replays = sweep_size(names, slots, chosen)
        start = time.perf_counter()
        with progress_bar(True, "replaying", replays, unit="items") as advance:
            cluster = ray_address if ray_address is not None else ray
            results = sweep(trace, policies=names, capacities=slots, predictors=chosen, margin=margin,
                            progress=lambda n: advance(n), ray=cluster, chunk_tokens=chunk_tokens,
                            workers=workers or (1 if cluster else default_workers(trace, replays)))
        seconds = time.perf_counter() - start
        console.print(_results_table(results, trace, seconds))
        for name, where in write_results(results, trace, out, seconds=seconds, plots=plots).items():
            console.print(f"{name}: {where}", highlight=False, soft_wrap=True, markup=False)


def _results_table(results, trace, seconds: float) -> Table:
    total = len(trace.layers) * trace.num_experts
    table = Table(title=f"{escape(trace.metadata['model'])}: {trace.num_tokens} tokens x {len(trace.layers)} layers "
                        f"({trace.num_tokens * len(trace.layers)} accesses), {len(results)} replays in {seconds:.1f} s",
                  caption="Belady: the fewest misses any eviction policy reaches without prefetch. "
                          "loads: misses + prefetches, each moving one expert.")
    for col in ("capacity", "policy", "prefetch", "hit rate", "misses", "loads", "misses / Belady"):  # a narrow
        # terminal folds a long policy name (token-forecast) over two lines rather than cutting it short
        table.add_column(col, justify="left" if col in ("policy", "prefetch") else "right",
                         overflow="fold" if col == "policy" else "ellipsis")
    last = None
    for r in sorted(results, key=lambda r: (r.capacity, r.policy != "belady", r.misses)):
        if last is not None and r.capacity != last:
            table.add_section()
        last = r.capacity
        table.add_row(f"{r.capacity} ({r.capacity / total:.1%})", "Belady (optimum)" if r.policy == "belady" else r.policy,
                      r.predictor, f"{r.hit_rate:.3f}", str(r.misses), str(r.loads), f"{r.misses_over_belady:.2f}")
    return table


def main() -> None:
    """Entry point: run the app; any error becomes one line on stderr and exit code 1 (the traceback only
    with --debug). An offload_moe error says what to do; anything else is a gap in our checks, said so."""
    try:
        app()
    except OffloadMoEError as e:
        _fail(str(e))
    except Exception as e:  # noqa: BLE001 - the last line of defence; the tests assert the specific classes
        _fail(f"unexpected {type(e).__name__}: {e}. This is a bug in offload_moe's input checks: please report it "
              "with the output of the same command run with --debug")


def _fail(message: str) -> None:
    if "--debug" in sys.argv:
        raise
    err.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)
    sys.exit(1)
