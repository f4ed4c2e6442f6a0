"""Held-out perplexity of the bundled demo model with its experts quantized by ``offload_moe.quantize_experts``.

For each setting (bf16 as shipped, int8, int4 at a few group sizes) the experts are quantized into a
temporary folder, dequantized back to float32 into a plain checkpoint, and that checkpoint is scored
by transformers' own model in float32 on the held-out stdlib files, exactly as
``evaluate_demo_model.py`` scores the shipped model (same windows, same loss). The result goes into the
card (``card.json`` "quantization", rendered into ``README.md`` by ``evaluate_demo_model.render_card``).

    python scripts/evaluate_quantized.py                       # bf16, int8, int4 G=64, int4 G=32
    python scripts/evaluate_quantized.py --max-tokens 20000 --no-write
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

import evaluate_demo_model as evaluation  # the sibling script: held-out windows, loss, the card
import train_demo_model as corpus

from offload_moe.quant import dequantize_int4, dequantize_int8
from offload_moe.quantize import quantize_experts

SETTINGS = ("8", "4:64", "4:32")
DATE = "2026-12-01"


def dequantized_checkpoint(source: Path, quantized: Path, out: Path) -> Path:
    """A plain float checkpoint of a quantized folder: each ``T.qweight``/``.scales`` (or ``.scales_and_zeros``) becomes ``T`` in
    float32, every other tensor and file as it is; config without quantization."""
    config = json.loads((quantized / "config.json").read_text())
    settings = config.pop("quantization_config")
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for f in quantized.iterdir():
        if f.name not in ("config.json", "model.safetensors.index.json") and not f.name.endswith(".safetensors"):
            (out / f.name).write_bytes(f.read_bytes())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(quantized.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    plain = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            base = name.removesuffix(".qweight")
            if settings["bits"] == 8:
                w = dequantize_int8(t, tensors[base + ".scales"], torch.float32)
            else:
                w = dequantize_int4(t, tensors[base + ".scales_and_zeros"], torch.float32)
            plain[base] = w.float()
        elif not name.endswith((".scales", ".scales_and_zeros")):
            plain[name] = t
    with safe_open(source / "model.safetensors", "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    # the demo model (Mixtral) stores no expert transposed, so each tensor is back in its source shape
    assert {n: tuple(t.shape) for n, t in plain.items()} == shapes
    save_file({k: v.contiguous() for k, v in plain.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def held_out_loss(folder: Path, windows: list[torch.Tensor]) -> tuple[float, int, float]:
    """(nats per token, tokens scored, seconds) of transformers' own model of ``folder`` in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    start = time.perf_counter()
    total = 0.0
    with torch.no_grad():  # evaluate_demo_model.loss_and_trace's loss, without its routing trace
        for w in windows:
            logits = model(input_ids=w[None]).logits[0, :-1]  # [S-1, V]
            total += F.cross_entropy(logits.float(), w[1:], reduction="sum").item()
    tokens = sum(len(w) - 1 for w in windows)
    return total / tokens, tokens, time.perf_counter() - start


def measure(folder: Path, settings: list[str], max_tokens: int | None, threads: int) -> dict:
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    record = json.loads((folder / "training.json").read_text())
    _, held_texts = corpus.load_split()
    if sorted(held_texts) != record["corpus"]["held_out_files"]:
        sys.exit(f"the held-out files differ from those in {folder / 'training.json'}; evaluate on the Python the "
                 "model was trained with")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    windows = evaluation.held_out_windows(tokenizer, [held_texts[n] for n in sorted(held_texts)],
                                          record["args"]["seq_len"])
    if max_tokens is not None:
        windows = evaluation._first_tokens(windows, max_tokens)
    ce, tokens, seconds = held_out_loss(folder, windows)
    rows = [{"experts": "bf16 (as shipped)", "bits": 16, "group_size": None, "expert_bytes_ratio": 1.0,
             "loss_nats_per_token": round(ce, 4), "perplexity": round(math.exp(ce), 3), "seconds": round(seconds, 1)}]
    base = math.exp(ce)
    print(rows[-1], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for i, setting in enumerate(settings):
            bits, _, group = setting.partition(":")
            q = quantize_experts(folder, Path(tmp) / f"q{i}", bits=int(bits),
                                 group_size=int(group) if group else None, progress=False)
            ce, _, seconds = held_out_loss(dequantized_checkpoint(folder, q.folder, Path(tmp) / f"d{i}"), windows)
            rows.append({"experts": f"int{q.bits}" + (f", group size {q.group_size}" if q.group_size else
                                                     ", per output channel"),
                         "bits": q.bits, "group_size": q.group_size, "expert_bytes_ratio": round(q.ratio, 4),
                         "loss_nats_per_token": round(ce, 4), "perplexity": round(math.exp(ce), 3),
                         "perplexity_vs_bf16": round(math.exp(ce) / base - 1, 5), "seconds": round(seconds, 1)})
            print(rows[-1], flush=True)
    import transformers

    return {
        "tokens_scored": tokens,
        "rows": rows,
        "command": "python scripts/evaluate_quantized.py" + (f" --max-tokens {max_tokens}" if max_tokens else ""),
        "method": "round to nearest (offload_moe.quant), int4 scales and zeros stored in bfloat16",
        "machine": f"a {os.cpu_count()}-core {platform.machine()} CPU VM ({threads} torch thread{'s' * (threads > 1)}, "
                   "no GPU, shared with other work)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "date": DATE,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=evaluation.DEFAULT_MODEL)
    p.add_argument("--settings", default=",".join(SETTINGS), help="bits[:group size], comma-separated")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N held-out tokens")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true", help="print the numbers; leave the card alone")
    args = p.parse_args(argv)
    result = measure(args.model, args.settings.split(","), args.max_tokens, args.threads)
    print(json.dumps(result, indent=1))
    if not args.no_write:
        card_path = args.model / "card.json"
        data = json.loads(card_path.read_text())
        data["quantization"] = result
        card_path.write_text(json.dumps(data, indent=1) + "\n")
        (args.model / "README.md").write_text(evaluation.render_card(data))
        print(f"wrote {card_path} and {args.model / 'README.md'}")


if __name__ == "__main__":
    main()
