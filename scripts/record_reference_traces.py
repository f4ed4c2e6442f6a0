"""Record the bundled model's routing on held-out stdlib text: the reference traces in ``profiles/traces/``.

The tokens are the first ``--window`` tokens of ``--files`` held-out standard-library files
(evenly spaced through the sorted held-out list of ``train_demo_model.py``), which neither the
tokenizer nor the model saw in training. The model runs through ``offload_moe.load`` with 25%
of its experts resident; routing does not depend on the budget. Each file is one sequence. The
trace also keeps what the ``gate`` predictor names for the next layer (top-k + ``--margin``).

    python scripts/record_reference_traces.py
    python scripts/record_reference_traces.py --files 16 --out /tmp/bigger.safetensors
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

import train_demo_model as corpus  # the sibling script: corpus rules and held-out split

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "profiles" / "traces" / "demo-heldout.safetensors"


def held_out_windows(tokenizer, files: int, window: int) -> tuple[list[str], list[torch.Tensor]]:
    """``files`` evenly spaced held-out files with at least ``window`` tokens, and the first ``window`` of each."""
    root = corpus.stdlib_root()
    usable = []
    for name in (n for n in corpus.corpus_files(root) if corpus.is_held_out(n)):
        text = corpus.read_python(root / name)
        if text is not None:
            ids = corpus.encode_documents(tokenizer, [text])
            if len(ids) >= window:
                usable.append((name, ids[:window].long()))
    if len(usable) < files:
        raise SystemExit(f"only {len(usable)} held-out files under {root} have {window} tokens; ask for fewer --files")
    step = len(usable) / files
    chosen = [usable[int(i * step)] for i in range(files)]
    return [name for name, _ in chosen], [ids for _, ids in chosen]


def main(argv: list[str] | None = None) -> None:
    import offload_moe
    from offload_moe.traces import expert_usage_entropy, record_trace, repeat_rate, save_trace
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled model)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--margin", type=int, default=2, help="keep the gate predictor's top-k + margin guesses")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder = args.model or offload_moe.demo_model_path()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    names, windows = held_out_windows(tokenizer, args.files, args.window)
    config = json.loads((folder / "config.json").read_text())
    model = offload_moe.load(folder, cache_experts=config["num_hidden_layers"] * config["num_local_experts"] // 4,
                             dtype="float32", progress=False)
    try:
        source = (f"held-out Python {platform.python_version()} standard-library files, the first {args.window} "
                  f"tokens of each, one sequence per file: {', '.join(names)}")
        trace = record_trace(model, windows, source=source, model_name="offload_moe demo_model",
                             predict_margin=args.margin)
    finally:
        model.offload.close()
    trace.metadata.update(files=json.dumps(names), recorded_by="scripts/record_reference_traces.py")
    path = save_trace(trace, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB): {trace.num_tokens} tokens x {len(trace.layers)} layers "
          f"x top-{trace.top_k} of {trace.num_experts} experts")
    print("usage entropy (bits):", [round(x, 2) for x in expert_usage_entropy(trace)])
    print("first-choice repeat:  ", [round(x, 3) for x in repeat_rate(trace)])


if __name__ == "__main__":
    main()
