"""Measure the bundled demo model and write its model card (``card.json`` and ``README.md``).

The numbers, all on the held-out stdlib files that training never saw (the split of
``train_demo_model.py``, checked against the list in ``training.json``):

- held-out loss: mean token cross-entropy of transformers' own model (float32), next to a
  unigram baseline (the training files' token frequencies, add-one smoothed, scored on the
  same held-out tokens);
- routing, from a trace recorded with ``offload_moe.traces``: per-layer expert usage entropy
  and the consecutive-token repeat rates of the Mixtral paper's Table 5, with random baselines;
- a greedy sample completion through ``offload_moe.load`` with 25% of the experts resident.

    python scripts/evaluate_demo_model.py                 # offload_moe/demo_model
    python scripts/evaluate_demo_model.py --model /tmp/run --max-tokens 20000 --no-write
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import train_demo_model as corpus  # the sibling script: corpus rules and held-out split

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "offload_moe" / "demo_model"
# Ends inside a line: a bare final newline reads to this tokenizer like the end of an indented block.
SAMPLE_PROMPT = 'def read_lines(path):\n    """Return the lines of the file at *path*, without line endings."""\n    with open(path'
SAMPLE_TOKENS = 48
# Mixtral 8x7B, arXiv 2401.04088 Table 5 (quoted in REFERENCE.md): 8 experts, top-2.
MIXTRAL_TABLE5 = {
    "first_choice": {"layer 0": "14-15%", "layer 15": "24-28%", "layer 31": "20-26%", "random": "12.5%"},
    "first_or_second_choice": {"range over layers": "45-67%", "random": "46%"},
}


def held_out_windows(tokenizer, texts: list[str], length: int) -> list[torch.Tensor]:
    """Each held-out document as ``<|bos|> tokens <|eos|>``, cut into windows of at most ``length`` tokens."""
    stream_parts = [corpus.encode_documents(tokenizer, [text]) for text in texts]
    windows = [part[i: i + length] for part in stream_parts for i in range(0, len(part), length)]
    return [w.long() for w in windows if len(w) >= 2]


def unigram_cross_entropy(train_ids: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of ``targets`` under the add-one smoothed unigram distribution of ``train_ids``."""
    counts = torch.bincount(train_ids.long(), minlength=vocab_size).double() + 1
    log_p = (counts / counts.sum()).log()
    return float(-log_p[targets].mean())


@torch.no_grad()
def loss_and_trace(model, windows: list[torch.Tensor], source: str):
    """Summed cross-entropy, the predicted tokens, and the routing trace of every window (one forward each)."""
    from offload_moe.traces import TraceRecorder

    total, targets = 0.0, []
    with TraceRecorder(model) as recorder:
        for w in windows:
            logits = model(input_ids=w[None], output_router_logits=False).logits[0, :-1]  # [S-1, V]
            total += F.cross_entropy(logits.float(), w[1:], reduction="sum").item()
            targets.append(w[1:])
        trace = recorder.trace(source=source, model_name="offload_moe demo_model", token_ids=torch.cat(windows),
                               sequence_lengths=[len(w) for w in windows])
    return total, torch.cat(targets), trace


def routing_summary(trace) -> dict:
    """Per-layer usage entropy and repeat rates of a trace, with the random baselines for its E and k."""
    from offload_moe.traces import expert_usage_entropy, random_repeat_rate, repeat_rate

    e, k = trace.num_experts, trace.top_k
    entropy = expert_usage_entropy(trace)
    return {
        "tokens": trace.num_tokens,
        "layers": trace.layers,
        "num_experts": e,
        "top_k": k,
        "usage_entropy_bits": [round(x, 3) for x in entropy],
        "usage_entropy_fraction_of_max": [round(x / math.log2(e), 3) for x in entropy],
        "max_entropy_bits": math.log2(e),
        "repeat_first_choice": [round(x, 4) for x in repeat_rate(trace)],
        "repeat_first_or_second_choice": [round(x, 4) for x in repeat_rate(trace, first_choice=False)],
        "random_first_choice": round(random_repeat_rate(e, k), 4),
        "random_first_or_second_choice": round(random_repeat_rate(e, k, first_choice=False), 4),
        "mixtral_table5": MIXTRAL_TABLE5,
    }


def sample_completion(folder: Path, prompt: str, new_tokens: int) -> dict:
    """Greedy completion through offload_moe with 25% of the experts resident (the demo's setting)."""
    import offload_moe
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    capacity = config["num_hidden_layers"] * config["num_local_experts"] // 4
    model = offload_moe.load(folder, cache_experts=capacity, dtype="float32", progress=False)
    try:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    finally:
        model.offload.close()
    new = out[0, ids.shape[1]:]
    return {"prompt": prompt, "completion": tokenizer.decode(new, skip_special_tokens=True),
            "token_ids": new.tolist(), "max_new_tokens": new_tokens, "dtype": "float32", "cache_experts": capacity}


def evaluate(folder: Path, max_tokens: int | None, threads: int) -> dict:
    """Every number of the model card, as one JSON-ready dict."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    record = json.loads((folder / "training.json").read_text())
    train_texts, held_texts = corpus.load_split()
    if sorted(held_texts) != record["corpus"]["held_out_files"]:
        sys.exit(f"the held-out files under {corpus.stdlib_root()} differ from those in {folder / 'training.json'}; "
                 "evaluate on the Python the model was trained with")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    length = record["args"]["seq_len"]
    windows = held_out_windows(tokenizer, [held_texts[n] for n in sorted(held_texts)], length)
    if max_tokens is not None:
        windows = _first_tokens(windows, max_tokens)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    start = time.perf_counter()
    total, targets, trace = loss_and_trace(model, windows, source="held-out stdlib files")
    seconds = time.perf_counter() - start
    train_ids = corpus.encode_documents(tokenizer, list(train_texts.values()))
    ce = total / len(targets)
    held_bytes = sum(len(held_texts[n].encode()) for n in held_texts)
    return {
        "held_out": {
            "files": len(held_texts), "tokens_scored": len(targets), "window": length,
            "loss_nats_per_token": round(ce, 4), "perplexity": round(math.exp(ce), 2),
            "unigram_loss_nats_per_token": round(unigram_cross_entropy(train_ids, targets, len(tokenizer)), 4),
            "bits_per_byte": round(total / math.log(2) / held_bytes, 4) if max_tokens is None else None,
            "seconds": round(seconds, 1),
        },
        "routing": routing_summary(trace),
        "sample": sample_completion(folder, SAMPLE_PROMPT, SAMPLE_TOKENS),
    }


def _first_tokens(windows: list[torch.Tensor], max_tokens: int) -> list[torch.Tensor]:
    kept, count = [], 0
    for w in windows:
        if count >= max_tokens:
            break
        kept.append(w[: max_tokens - count])
        count += len(kept[-1])
    return [w for w in kept if len(w) >= 2]


def card(folder: Path, results: dict) -> dict:
    """card.json: the model's shape and size, how it was trained, and the evaluation."""
    import tokenizers
    import transformers

    record = json.loads((folder / "training.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    weights = folder / "model.safetensors"
    shipped = [p for p in folder.iterdir() if p.name not in ("README.md", "card.json")]
    return {
        "name": "offload_moe demo_model",
        "architecture": "MixtralForCausalLM",
        "config": {k: config[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                          "num_attention_heads", "num_key_value_heads", "num_local_experts",
                                          "num_experts_per_tok", "router_aux_loss_coef", "dtype")},
        "parameters": _parameters(weights),
        "checkpoint_bytes": weights.stat().st_size,
        "folder_bytes_without_card": sum(p.stat().st_size for p in shipped),
        "corpus": {k: v for k, v in record["corpus"].items() if k != "held_out_files"},
        "training": record["training"] | {"command": record["command"], "total_seconds": record["total_seconds"],
                                          "final_ce": record["loss_curve"][-1]["ce"],
                                          "final_aux_loss": record["loss_curve"][-1]["aux"],
                                          "args": {k: v for k, v in record["args"].items() if k != "out"}},
        "machine": record["machine"],
        "evaluation": results,
        "evaluated_with": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "tokenizers": tokenizers.__version__},
    }


def _parameters(weights: Path) -> int:
    from safetensors import safe_open

    with safe_open(weights, "pt") as f:
        return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())


def render_card(data: dict) -> str:
    """The model card (README.md) from card.json's data."""
    c, t, m, corp = data["config"], data["training"], data["machine"], data["corpus"]
    held, routing, sample = (data["evaluation"][k] for k in ("held_out", "routing", "sample"))
    parts = [
        _card_intro(data, c),
        _card_data(corp),
        _card_training(t, m, c),
        "## Evaluation\n",
        _card_loss(held),
        _card_routing(routing, t["final_aux_loss"]),
        _card_quantized(data.get("quantization")),
        "### Sample completion\n\nGreedy, through `offload_moe.load` with 25% of the experts resident "
        f"({sample['max_new_tokens']} new tokens at most). Prompt, then completion:\n\n"
        f"```python\n{sample['prompt']}{sample['completion']}\n```\n",
        _CARD_END,
    ]
    return "\n".join(parts)


def _card_intro(data: dict, c: dict) -> str:
    return f"""# offload_moe demo model

A small Mixture-of-Experts language model for Python source, trained by offload_moe's own
`scripts/train_demo_model.py` and bundled with the package, so that the demo, chat and profiling
work from a fresh install with no download. Its routing is learned, not random, which is what
makes it useful for studying expert caching.

- Architecture: Mixtral (`MixtralForCausalLM`), {c['num_hidden_layers']} layers x {c['num_local_experts']} experts,
  top-{c['num_experts_per_tok']} routing, hidden size {c['hidden_size']}, expert intermediate size {c['intermediate_size']},
  {c['num_attention_heads']} attention heads ({c['num_key_value_heads']} key-value heads), vocabulary {c['vocab_size']}.
- {data['parameters'] / 1e6:.2f} M parameters, stored in {c['dtype']}: `model.safetensors` is
  {data['checkpoint_bytes'] / 1e6:.1f} MB, the folder {data['folder_bytes_without_card'] / 1e6:.1f} MB without this card.
- Tokenizer: byte-level BPE trained on the training files (`tokenizer.json`), with `<|bos|>`, `<|eos|>`,
  `<|pad|>` and a chat template (`<|user|>` / `<|assistant|>` turns, each assistant turn ending in `<|eos|>`).

```python
import offload_moe

model = offload_moe.load(offload_moe.demo_model_path(), cache_experts=24)   # 24 of 96 experts resident
```

`transformers.AutoModelForCausalLM.from_pretrained(offload_moe.demo_model_path())` loads it too.
"""


def _card_data(corp: dict) -> str:
    return f"""## Training data

The Python standard library's own source files, comments and docstrings, as installed with Python
on the training machine (`{corp['root']}`): `{corp['include']}`, excluding
{", ".join(f"`{x}`" for x in corp['exclude'])}; kept: {corp['filter']}.
Licence: {corp['licence']}.

A fixed 5% of the files is held out by a hash of the path ({corp['held_out_rule']}); the tokenizer
and the model never saw them, and `training.json` lists them. Training used {corp['train_files']} files
({corp['train_bytes'] / 2**20:.1f} MiB, {corp['train_tokens']:,} tokens with the chat examples) and
{corp['chat_examples']:,} chat examples made from the training files' documented public functions
(user: "Write a Python function `name(args)`. <docstring summary>"; assistant: the function).
"""


def _card_training(t: dict, m: dict, c: dict) -> str:
    a = t["args"]
    return f"""## Training

{t['steps']:,} AdamW steps of {a['batch_size']} windows x {a['seq_len']} tokens ({t['tokens_seen'] / 1e6:.1f} M tokens,
{t['epochs']} passes over the training stream); learning rate {a['lr']:g}, warmed up over {a['warmup']} steps, constant,
then cosine decay over the last {t['decay_steps']} steps; router load-balancing loss on
(`router_aux_loss_coef` {c['router_aux_loss_coef']}). Final training loss {t['final_ce']} nats per token.
Training took {t['train_seconds'] / 60:.1f} minutes ({t['total_seconds'] / 60:.1f} minutes with tokenizer and data)
on a {m['cores']}-core CPU VM ({m['cpu']}, {m['threads']} threads, no GPU, {m['platform']}), run at `nice -n 10`
beside other work on the same machine; Python {m['python']}, torch {m['torch']}, transformers
{m['transformers']}, tokenizers {m['tokenizers']}. To repeat it exactly (same stdlib, threads and versions):

```bash
{t['command'].replace('--out OUT', '--out offload_moe/demo_model')}
python scripts/evaluate_demo_model.py        # this card
python scripts/record_reference_traces.py    # profiles/traces/
```
"""


def _card_loss(held: dict) -> str:
    bpb = f" ({held['bits_per_byte']} bits per byte)" if held.get("bits_per_byte") is not None else ""
    return f"""### Held-out loss

Mean token cross-entropy over the {held['tokens_scored']:,} held-out tokens ({held['files']} files, windows of
{held['window']} tokens), by transformers' own model in float32:

| model | nats per token | perplexity |
|---|---|---|
| this model | {held['loss_nats_per_token']}{bpb} | {held['perplexity']} |
| unigram baseline (training token frequencies) | {held['unigram_loss_nats_per_token']} | {math.exp(held['unigram_loss_nats_per_token']):.1f} |
"""


def _card_routing(r: dict, aux: float) -> str:
    rows = "\n".join(
        f"| {layer} | {bits:.2f} | {frac:.0%} | {first:.1%} | {either:.1%} |"
        for layer, bits, frac, first, either in zip(
            r["layers"], r["usage_entropy_bits"], r["usage_entropy_fraction_of_max"],
            r["repeat_first_choice"], r["repeat_first_or_second_choice"])
    )
    t5 = r["mixtral_table5"]
    return f"""### Routing

From a routing trace of the same {r['tokens']:,} held-out tokens (`offload_moe.traces`). Usage entropy: how evenly a
layer spreads its top-{r['top_k']} choices over the experts ({r['max_entropy_bits']:.0f} bits = all equally).
Repeat rates: the share of consecutive tokens whose first-choice expert is the same, and whose top-2 sets
share an expert (the two columns of the Mixtral paper's Table 5).

| layer | usage entropy (bits) | of maximum | first-choice repeat | first-or-second repeat |
|---|---|---|---|---|
{rows}
| random router | {r['max_entropy_bits']:.2f} | 100% | {r['random_first_choice']:.1%} | {r['random_first_or_second_choice']:.1%} |

Mixtral 8x7B (8 experts, so a random router repeats its first choice 12.5% of the time and shares an
expert 46%): first choice {t5['first_choice']['layer 0']} at layer 0, {t5['first_choice']['layer 15']} at layer 15,
{t5['first_choice']['layer 31']} at layer 31; first or second choice {t5['first_or_second_choice']['range over layers']}.
Compare each figure with its own random baseline: this model has {r['num_experts']} experts.

Why the deeper layers lean on a few experts: transformers' Mixtral load-balancing loss pools the
router statistics of all layers before balancing, so it evens out each expert number's usage summed
over layers (the loss ended at {aux}; an even spread gives 2.0), not each layer's own usage.
Layer 0, which sees little more than the token itself, spreads almost evenly; later layers route
by context and repeat their choice for runs of tokens, which is what an expert cache can exploit.
"""


def _card_quantized(q: dict | None) -> str:
    """The held-out perplexity with quantized experts (``scripts/evaluate_quantized.py``), if measured."""
    if q is None:
        return ""
    rows = "\n".join(
        f"| {r['experts']} | {r['expert_bytes_ratio']:.2f} | {r['loss_nats_per_token']} | {r['perplexity']:.3f} | "
        + ("-" if "perplexity_vs_bf16" not in r else f"{r['perplexity_vs_bf16']:+.2%}") + " |"
        for r in q["rows"])
    v = q["versions"]
    return f"""### Quantized experts

Held-out perplexity with the routed experts quantized by `offload_moe.quantize_experts`
([docs/quantization.md](../../docs/quantization.md)), dequantized back to float32 and scored as above
({q['tokens_scored']:,} tokens; {q['method']}). Bytes: the experts' bytes over bf16's. The targets, int8
within 0.5% and int4 within 3% of bf16's perplexity, are met by rounding to nearest, so no refined quantizer is used.

| experts | bytes | nats per token | perplexity | vs bf16 |
|---|---|---|---|---|
{rows}

`{q['command']}` on {q['machine']}; Python {v['python']}, torch {v['torch']}, transformers {v['transformers']};
{q['date']}.
"""


_CARD_END = """## Limitations

A 13 M-parameter model trained for about an hour on two CPU cores: it continues Python code in the
style of the standard library, often plausibly and often wrongly, knows only what a 512-token window
shows it, and follows the chat format only for "write a function" requests. It is for demonstrating
and testing offload_moe, not for writing software.

## Licence

Training data: the Python standard library, PSF License Version 2. The weights, tokenizer and this card
ship with offload_moe under the project's licence.
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="folder written by train_demo_model.py")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N held-out tokens (quick checks)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true", help="print the numbers; leave card.json and README.md alone")
    args = p.parse_args(argv)
    data = card(args.model, evaluate(args.model, args.max_tokens, args.threads))
    previous = args.model / "card.json"
    if previous.exists() and "quantization" in json.loads(previous.read_text()):  # evaluate_quantized.py's
        data["quantization"] = json.loads(previous.read_text())["quantization"]
    print(json.dumps(data["evaluation"], indent=1))
    if not args.no_write:
        (args.model / "card.json").write_text(json.dumps(data, indent=1) + "\n")
        (args.model / "README.md").write_text(render_card(data))
        print(f"wrote {args.model / 'card.json'} and {args.model / 'README.md'}")


if __name__ == "__main__":
    main()
