"""A sweep's results on disk: ``results.json``, ``results.csv`` and the PNG plots (matplotlib, optional), one set."""

from __future__ import annotations

import csv
import io
import json
import platform
from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime, UTC
from pathlib import Path

import torch

from .._version import __version__
from ..atomic import atomic_write_all
from ..traces import Trace, TraceFile
from .chunked import CHUNK_TOKENS
from .replays import ReplayResult

HEATMAP_MAX_EXPERTS, HEATMAP_MAX_LAYERS = 1024, 512  # beyond, the image is larger than matplotlib draws


def activation_counts(trace: Trace | TraceFile) -> torch.Tensor:
    """How often each expert was chosen at each layer: [layers, experts] (for the heatmap); a trace file is
    counted a piece at a time."""
    layers, experts = len(trace.layers), trace.num_experts
    if isinstance(trace, TraceFile):
        return sum(activation_counts(piece) for piece in trace.pieces(CHUNK_TOKENS, tensors=()))
    flat = trace.experts.long() + torch.arange(layers).view(1, -1, 1) * experts  # [T, L, k]
    return torch.bincount(flat.reshape(-1), minlength=layers * experts).view(layers, experts)


def write_results(results: Sequence[ReplayResult], trace: Trace | TraceFile, out: str | Path, *, seconds: float | None = None,
                  plots: bool = True) -> dict[str, Path | str]:
    """Write ``results.json`` and ``results.csv`` into ``out``, and the PNG plots when matplotlib is there, as one
    set: if any file cannot be written, none of them changes.

    Returns the paths written by name; ``"plots"`` (matplotlib missing) or ``"heatmap"`` (too many experts
    or layers to draw) holds a message instead.
    """
    out = Path(out)
    total = len(trace.layers) * trace.num_experts
    rows = [{**r.as_dict(), "capacity_share": r.capacity / total} for r in results]
    document = {
        "trace": {**trace.metadata, "tokens": trace.num_tokens, "accesses": trace.num_tokens * len(trace.layers)},
        "results": rows,
        "seconds": seconds,
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "offload_moe": __version__, "torch": torch.__version__},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    columns = [f.name for f in fields(ReplayResult) if f.name not in ("per_layer", "per_layer_flow")] + [
        "hit_rate", "loads", "prefetch_precision", "misses_over_belady", "capacity_share"]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    files = {"json": ("results.json", json.dumps(document, indent=2).encode()),
             "csv": ("results.csv", text.getvalue().encode())}
    notes: dict[str, str] = {}
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            notes["plots"] = "matplotlib is not installed, so no plots were drawn: pip install 'offload_moe[plot]'"
        else:
            files["hit_rate_plot"] = ("hit_rate.png", _png(_hit_rate_figure(results, trace)))
            files["tradeoff_plot"] = ("tradeoff.png", _tradeoff_png(results, trace))
            if trace.num_experts <= HEATMAP_MAX_EXPERTS and len(trace.layers) <= HEATMAP_MAX_LAYERS:
                files["heatmap"] = ("activations.png", _heatmap_png(trace))
            else:
                notes["heatmap"] = (f"not drawn: {len(trace.layers)} layers x {trace.num_experts} experts is more than a "
                                    f"heatmap shows (at most {HEATMAP_MAX_LAYERS} x {HEATMAP_MAX_EXPERTS})")
    # one set: a failure (a full disk) leaves the previous results, never results.json without results.csv
    paths = atomic_write_all({out / name: content for name, content in files.values()})
    return {**dict(zip(files, paths, strict=True)), **notes}


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def _figure(size: tuple[float, float]):
    """A matplotlib figure made without pyplot: no global backend or state is touched."""
    from matplotlib.figure import Figure

    return Figure(figsize=size)


def _hit_rate_figure(results: Sequence[ReplayResult], trace: Trace):
    """Hit rate against capacity: a panel per predictor, a line per policy, Belady's optimum in each as the bound;
    one legend beside the panels, so no entry covers a line."""
    from matplotlib.figure import Figure

    total = len(trace.layers) * trace.num_experts
    predictors = list(dict.fromkeys(r.predictor for r in results if r.policy != "belady")) or ["none"]
    policies = list(dict.fromkeys(r.policy for r in results if r.policy != "belady"))
    columns = min(2, len(predictors))
    rows = -(-len(predictors) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows), layout="constrained")
    grid = figure.subplots(rows, columns, sharex=True, sharey=True, squeeze=False)
    belady = sorted((r.capacity, r.hit_rate) for r in results if r.policy == "belady")
    for ax, predictor in zip(grid.flat, predictors):
        if belady:
            ax.plot([100 * c / total for c, _ in belady], [h for _, h in belady], color="black", linewidth=2,
                    linestyle="--", label="Belady (optimum, no prefetch)")
        for i, policy in enumerate(policies):
            points = sorted((r.capacity, r.hit_rate) for r in results if (r.policy, r.predictor) == (policy, predictor))
            ax.plot([100 * c / total for c, _ in points], [h for _, h in points], color=f"C{i}", marker="o",
                    label=policy)
        ax.set_title("no prefetch" if predictor == "none" else f"prefetch: {predictor}", fontsize=10)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    for ax in grid.flat[len(predictors):]:
        ax.set_visible(False)
    for ax in grid[-1]:
        ax.set_xlabel(f"capacity (% of {total} experts)")
    for ax in grid[:, 0]:
        ax.set_ylabel("hit rate")
    figure.suptitle(f"{trace.metadata['model']}: {trace.num_tokens} tokens x {len(trace.layers)} layers, "
                    f"top-{trace.top_k}")
    handles, labels = grid.flat[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside right center", fontsize=8)
    return figure


def _tradeoff_png(results: Sequence[ReplayResult], trace: Trace) -> bytes:
    """Hit rate against experts moved per token, a panel per capacity: what prefetch buys and what it costs."""
    capacities = sorted({r.capacity for r in results})
    figure = _figure((4 * len(capacities), 4))
    axes = figure.subplots(1, len(capacities), squeeze=False)[0]  # a panel per capacity, one or more
    policies = list(dict.fromkeys(r.policy for r in results if r.policy != "belady"))
    markers = {"none": "o", "transition": "s", "gate": "^", "hybrid": "D"}
    total = len(trace.layers) * trace.num_experts
    for ax, capacity in zip(axes, capacities, strict=True):
        for r in (r for r in results if r.capacity == capacity):
            x = r.loads / max(trace.num_tokens, 1)
            if r.policy == "belady":
                ax.axhline(r.hit_rate, color="black", linestyle="--", linewidth=1)
                ax.plot([x], [r.hit_rate], marker="*", color="black", markersize=12)
                continue
            ax.plot([x], [r.hit_rate], marker=markers.get(r.predictor, "o"), linestyle="none",
                    color=f"C{policies.index(r.policy)}", markersize=7)
        ax.set_title(f"{capacity} slots ({capacity / total:.0%})")
        ax.set_xlabel("experts moved per token")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("hit rate")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=f"C{i}", marker="o", linestyle="none", label=p) for i, p in enumerate(policies)]
    handles += [Line2D([], [], color="grey", marker=m, linestyle="none", label=f"prefetch: {name}")
                for name, m in markers.items() if any(r.predictor == name for r in results)]
    handles.append(Line2D([], [], color="black", marker="*", linestyle="--", label="Belady (no prefetch)"))
    axes[-1].legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))  # beside the panels
    return _png(figure)


def _heatmap_png(trace: Trace) -> bytes:
    """How often each expert was chosen at each layer."""
    from matplotlib.ticker import MaxNLocator

    counts = activation_counts(trace).numpy()
    figure = _figure((max(5, counts.shape[1] / 6), max(3, counts.shape[0] / 4)))
    axes = figure.subplots()
    image = axes.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("expert")
    axes.set_ylabel("layer")
    axes.set_yticks(range(len(trace.layers)), [str(x) for x in trace.layers])
    axes.set_title(f"expert activations ({trace.num_tokens} tokens, top-{trace.top_k})")
    figure.colorbar(image, ax=axes, label="tokens routed")
    return _png(figure)
