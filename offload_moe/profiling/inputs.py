"""What a profiling run replays, chosen as ``offload-moe profile`` chooses it: the trace (recorded, read, or the
bundled reference) and the cache capacities."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import ConfigError
from ..hardware import get_profile, profiles_folder
from ..planning import plan
from ..traces import Trace, TraceFile, load_trace, record_prompts
from .chunked import checked_chunk_tokens


def reference_trace_path() -> Path:
    """The bundled model's held-out routing trace: what ``offload-moe profile`` replays when given no model
    and no trace."""
    return profiles_folder() / "traces" / "demo-heldout.safetensors"


def recording_device(profile: str | None) -> str:
    """Where a profiling run records: the profile's GPU if this machine has one, else the CPU. The profile
    itself only adds a capacity: routing does not depend on budgets, and its host memory is not needed."""
    device = get_profile(profile).device if profile is not None else "cpu"
    return device if device.startswith("cuda") and torch.cuda.is_available() else "cpu"


def trace_to_profile(model: str | Path | None = None, *, trace_file: str | Path | None = None,
                     prompts: Sequence[str] | None = None, prompts_file: str | Path | None = None,
                     source: str = "prompts", margin: int = 1, max_new_tokens: int = 0, profile: str | None = None,
                     on_prompt: Callable[[], None] | None = None, trust_remote_code: bool = False,
                     chunk_tokens: int | None = None) -> Trace | TraceFile:
    """The trace a profiling run replays, chosen as ``offload-moe profile`` chooses it: recorded from
    ``model`` on ``prompts`` (with the gate's top-k + ``margin`` guesses; on ``profile``'s GPU if this machine
    has it), read from ``trace_file``, or, given neither, the bundled model's reference trace.
    ``prompts_file``: the file the prompts come from, when a caller reads it only for a ``model`` (the CLI):
    given without ``model`` it is refused as ``prompts`` is. With ``chunk_tokens``, a ``trace_file`` of more
    tokens than that is returned opened, not read (a ``TraceFile``), for replays that read it in pieces."""
    if model is not None and trace_file is not None:
        raise ConfigError("give MODEL (with --prompts) or --trace FILE, not both")
    if model is None:
        if prompts is not None or prompts_file is not None:
            raise ConfigError("--prompts needs MODEL; to profile the bundled model, pass its folder "
                              "(python -c 'import offload_moe; print(offload_moe.demo_model_path())')")
        path = trace_file if trace_file is not None else reference_trace_path()
        if chunk_tokens is not None:
            source = TraceFile.open(path)
            if source.num_tokens > checked_chunk_tokens(chunk_tokens):
                return source
        return load_trace(path)
    if prompts is None:
        raise ConfigError("profiling MODEL records a trace first: give --prompts FILE (one prompt per line)")
    return record_prompts(model, list(prompts), source=source, predict_margin=margin, max_new_tokens=max_new_tokens,
                          on_prompt=on_prompt, device=recording_device(profile), trust_remote_code=trust_remote_code)


def profile_capacities(text: str, trace: Trace | TraceFile, *, model: str | Path | None = None, profile: str | None = None,
                       trust_remote_code: bool = False) -> list[int]:
    """The capacities to replay: ``text`` as ``parse_capacities`` reads it, plus, for a ``model`` with a
    hardware ``profile``, the expert slots that profile's device memory gives (``plan``)."""
    total = len(trace.layers) * trace.num_experts
    slots = parse_capacities(text, total)
    if model is not None and profile is not None:
        fitted = plan(model, profile=profile, trust_remote_code=trust_remote_code).expert_slots
        slots = sorted(set(slots) | {min(fitted, total)})
    return slots


def parse_capacities(text: str, total_experts: int) -> list[int]:
    """``"8,16,32"`` (expert slots) or ``"12.5%,25%"`` (of all experts), or a mix, as sorted slot counts."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            value = round(float(part[:-1]) / 100 * total_experts) if part.endswith("%") else int(part)
        except ValueError:
            raise ConfigError(f"capacity {part!r} is neither a number of expert slots (e.g. 32) "
                              "nor a share of all experts (e.g. 25%)") from None
        if not 1 <= value <= total_experts:
            raise ConfigError(f"capacity {part!r} is {value} slots; it must be between 1 and the trace's "
                              f"{total_experts} experts")
        out.append(value)
    if not out:
        raise ConfigError("no capacities given; e.g. --capacities 12.5%,25%,50% or --capacities 16,32")
    return sorted(set(out))
