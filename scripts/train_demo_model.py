"""Train the small MoE model bundled with offload_moe, from a seed, on this machine's CPU.

Corpus: the Python standard library's own source files (code, comments and docstrings)
found under ``sysconfig.get_paths()["stdlib"]``, under the PSF License. A fixed 5% of the
files, chosen by a hash of their path, is held out and never seen by the tokenizer or the
model. Functions with docstrings from the training files are also rendered through the
chat template (user: the signature and summary line; assistant: the function), so that
the chat format means something to the model.

Steps: train a byte-level BPE tokenizer, tokenize, train a Mixtral-architecture model
with the router's load-balancing loss on, save config, bf16 safetensors, tokenizer,
generation config and ``training.json`` (what ran, where, how long) to ``--out``.

    nice -n 10 python scripts/train_demo_model.py --out offload_moe/demo_model --minutes 70

Without ``--steps`` the number of optimizer steps is fixed from the speed of the first
steps so that training fits ``--minutes``; ``training.json`` records it, and passing that
number back with ``--steps`` (same seed, threads and stdlib) repeats the run.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import hashlib
import io
import json
import math
import os
import platform
import random
import sys
import sysconfig
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

EXCLUDE = (
    "site-packages/*",       # third-party packages, not the standard library
    "dist-packages/*",
    "encodings/*",           # generated codec tables
    "_sysconfigdata_*",      # describes the build machine
    "config-3*/*",
)
HELD_OUT_PER_MILLE = 50      # 5% of the files, by hash of their path
SPECIAL_TOKENS = ["<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>"]
BOS, EOS, PAD = SPECIAL_TOKENS[:3]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles are system, user and assistant, not ' + message['role']) }}{% endif %}"
    "<|{{ message['role'] }}|>{{ '\\n' }}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{{ '\\n' }}{% endif %}"
)
LICENCE = "Python Software Foundation License Version 2 (the stdlib's LICENSE.txt)"


@dataclass(frozen=True)
class ModelShape:
    vocab_size: int = 4096
    hidden_size: int = 192
    intermediate_size: int = 192
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: int = 3
    num_local_experts: int = 16
    num_experts_per_tok: int = 2
    max_position_embeddings: int = 1024


# ---------------------------------------------------------------- corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_held_out(relative: str) -> bool:
    """The fixed held-out split: 5% of files by a hash of their path relative to the stdlib folder."""
    digest = hashlib.sha256(relative.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 1000 < HELD_OUT_PER_MILLE


def corpus_files(root: Path | None = None) -> list[str]:
    """Sorted paths, relative to ``root``, of the stdlib ``.py`` files the corpus may use."""
    root = root or stdlib_root()
    found = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root).as_posix()
        if not any(fnmatch.fnmatch(relative, pattern) for pattern in EXCLUDE):
            found.append(relative)
    return sorted(found)


def read_python(path: Path) -> str | None:
    """The file's text if it is UTF-8 and parses as Python of this interpreter, else None."""
    try:
        text = path.read_text(encoding="utf-8")
        ast.parse(text)
    except (UnicodeDecodeError, SyntaxError, ValueError):
        return None
    return text


def load_split(root: Path | None = None, max_files: int | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """(training texts, held-out texts), each {relative path: source}; unreadable files are skipped."""
    root = root or stdlib_root()
    names = corpus_files(root)
    if max_files is not None:
        names = [n for n in names if is_held_out(n)][: max(1, max_files // 20)] + [
            n for n in names if not is_held_out(n)][:max_files]
    train, held_out = {}, {}
    for name in names:
        text = read_python(root / name)
        if text is not None:
            (held_out if is_held_out(name) else train)[name] = text
    return train, held_out


def chat_examples(source: str, max_chars: int = 1500) -> list[list[dict[str, str]]]:
    """Conversations from a module's documented functions: the user asks, the assistant writes the function."""
    lines = io.StringIO(source, newline="").readlines()  # the line breaks ast counts
    conversations = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        code = _segment(lines, node) if doc else ""
        if not code or len(code) > max_chars:
            continue
        summary = doc.strip().split("\n\n")[0].replace("\n", " ")
        ask = f"Write a Python function `{node.name}({ast.unparse(node.args)})`. {summary}"
        conversations.append([{"role": "user", "content": ask},
                              {"role": "assistant", "content": textwrap.dedent(code)}])
    return conversations


def _segment(lines: list[str], node: ast.stmt) -> str:
    """``ast.get_source_segment(source, node, padded=True)`` without splitting the whole source per call."""
    body = lines[node.lineno - 1: node.end_lineno]
    body[-1] = body[-1].encode()[: node.end_col_offset].decode()
    head = body[0].encode()
    pad = "".join(c if c.isspace() else " " for c in head[: node.col_offset].decode())
    body[0] = pad + head[node.col_offset:].decode()
    return "".join(body)


# ---------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers fast tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=SPECIAL_TOKENS[3:], chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=ModelShape.max_position_embeddings,
    )


def encode_documents(tokenizer, documents: list[str]) -> torch.Tensor:
    """One stream of token ids: each document as ``<|bos|> tokens <|eos|>`` (chat documents carry their own)."""
    ids: list[int] = []
    encoded = tokenizer.backend_tokenizer.encode_batch(documents, add_special_tokens=False)
    for doc, enc in zip(documents, encoded):
        if doc.startswith(BOS):  # a rendered conversation: already framed by the chat template
            ids.extend(enc.ids)
        else:
            ids.extend([tokenizer.bos_token_id, *enc.ids, tokenizer.eos_token_id])
    return torch.tensor(ids, dtype=torch.int32)


# ---------------------------------------------------------------- model and training


def build_model(shape: ModelShape, tokenizer, aux_coef: float, seed: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        **asdict(shape), output_router_logits=True, router_aux_loss_coef=aux_coef, router_jitter_noise=0.0,
        tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return MixtralForCausalLM(config)


def blocks(stream: torch.Tensor, length: int, epoch: int, seed: int) -> torch.Tensor:
    """The stream cut into shuffled ``[n, length + 1]`` windows; the offset and order change each epoch."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    offset = int(torch.randint(0, length, (1,), generator=g))
    n = (len(stream) - offset) // (length + 1)
    windows = stream[offset: offset + n * (length + 1)].view(n, length + 1)
    return windows[torch.randperm(n, generator=g)]


def batches(stream: torch.Tensor, length: int, batch_size: int, seed: int):
    """Endless ``(epoch, [batch_size, length + 1])`` batches of int64 token ids."""
    epoch = 0
    while True:
        windows = blocks(stream, length, epoch, seed)
        for i in range(0, len(windows) - batch_size + 1, batch_size):
            yield epoch, windows[i: i + batch_size].long()
        epoch += 1


@dataclass
class Schedule:
    """Warmup, constant, then cosine decay over the last ``decay`` steps (warmup-stable-decay).

    With a time budget the total is unknown at the start: the run stays at the peak rate and
    fixes ``total`` and ``decay`` when the stable part of the budget is spent. The two numbers,
    passed back as ``--steps`` and ``--decay-steps``, give the same schedule step for step.
    """

    peak: float
    warmup: int
    total: int | None = None
    decay: int | None = None
    floor: float = 0.1

    def fix(self, step: int, decay_fraction: float) -> None:
        self.decay = max(1, round(step * decay_fraction / (1 - decay_fraction)))
        self.total = step + self.decay

    def lr(self, step: int) -> float:
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if self.total is None or step < self.total - self.decay:
            return self.peak
        progress = (step - (self.total - self.decay)) / self.decay
        return self.peak * (self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer(model, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


@torch.no_grad()
def held_out_loss(model, stream: torch.Tensor, length: int, max_windows: int = 64) -> float:
    """Mean token cross-entropy (nats) over the first ``max_windows`` windows of the held-out stream."""
    model.eval()
    n = min(max_windows, len(stream) // (length + 1))
    windows = stream[: n * (length + 1)].view(n, length + 1).long()
    total = 0.0
    for w in windows.split(8):
        out = model(input_ids=w[:, :-1], labels=w[:, :-1], output_router_logits=False)
        total += out.loss.item() * len(w)
    model.train()
    return total / n


def train(model, stream: torch.Tensor, args: argparse.Namespace, log) -> dict:
    """Run the optimizer; returns the step counts, loss curve and timing."""
    opt = optimizer(model, args.lr, args.weight_decay)
    coef = model.config.router_aux_loss_coef
    schedule = Schedule(args.lr, args.warmup)
    if args.steps is not None:
        schedule.total = args.steps
        schedule.decay = args.decay_steps or max(1, round(args.steps * args.decay_fraction))
    stable_seconds = args.minutes * 60 * (1 - args.decay_fraction)
    curve, start = [], time.perf_counter()
    model.train()
    for step, (epoch, batch) in enumerate(batches(stream, args.seq_len, args.batch_size, args.seed)):
        if schedule.total is None and time.perf_counter() - start >= stable_seconds:
            schedule.fix(step, args.decay_fraction)
            log(f"decaying the learning rate over the last {schedule.decay} of {schedule.total} steps "
                f"(--steps {schedule.total} --decay-steps {schedule.decay} repeats this run)")
        if schedule.total is not None and step >= schedule.total:
            break
        for group in opt.param_groups:
            group["lr"] = schedule.lr(step)
        out = model(input_ids=batch[:, :-1], labels=batch[:, :-1])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step + 1 == schedule.total:
            ce, aux, seconds = out.loss.item() - coef * out.aux_loss.item(), out.aux_loss.item(), time.perf_counter() - start
            tokens = (step + 1) * args.batch_size * args.seq_len
            log(f"step {step}/{schedule.total or '?'} epoch {epoch} ce {ce:.3f} aux {aux:.3f} "
                f"lr {schedule.lr(step):.2e} {tokens / seconds:.0f} tok/s {seconds / 60:.1f} min")
            curve.append({"step": step, "ce": round(ce, 4), "aux": round(aux, 4), "minutes": round(seconds / 60, 2)})
    return {"steps": schedule.total, "decay_steps": schedule.decay, "epochs": round(
        schedule.total * args.batch_size * (args.seq_len + 1) / len(stream), 2),
        "tokens_seen": schedule.total * args.batch_size * args.seq_len,
        "train_seconds": round(time.perf_counter() - start, 1), "loss_curve": curve}


# ---------------------------------------------------------------- saving


def save(model, tokenizer, out: Path, record: dict) -> None:
    """Write the model in bf16 with its tokenizer, generation config and the training record."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=64,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # The generic class name lets older transformers releases load the tokenizer too.
    config_file = out / "tokenizer_config.json"
    config_file.write_text(json.dumps(json.loads(config_file.read_text()) | {"tokenizer_class": "PreTrainedTokenizerFast"},
                                      indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    for file in out.iterdir():
        file.chmod(0o644)  # save_pretrained writes the weights 0600; installed package data must be world-readable


def check_chat_template(tokenizer) -> None:
    """The saved template renders the format the model was trained on, special tokens as single ids."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    if text != f"{BOS}<|user|>\nhi\n<|assistant|>\n":
        raise RuntimeError(f"chat template renders {text!r}, not the trained format")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if ids[0] != tokenizer.bos_token_id or tokenizer.convert_tokens_to_ids("<|assistant|>") not in ids:
        raise RuntimeError("special tokens of the chat template are not single tokens")


def machine() -> dict:
    import tokenizers
    import transformers

    return {
        "cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder (created)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--minutes", type=float, default=70.0, help="training wall-clock budget, used when --steps is not given")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --minutes; repeats a run exactly)")
    p.add_argument("--decay-steps", type=int, default=None, help="steps of learning-rate decay at the end (with --steps)")
    p.add_argument("--decay-fraction", type=float, default=0.2, help="share of the budget spent decaying the rate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=ModelShape.vocab_size)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--aux-coef", type=float, default=0.01, help="router load-balancing loss coefficient (> 0)")
    p.add_argument("--max-files", type=int, default=None, help="use only this many training files (smoke runs)")
    p.add_argument("--log-every", type=int, default=25)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.aux_coef <= 0:
        sys.exit("--aux-coef must be > 0: the load-balancing loss is what makes the experts specialise")
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    began = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{(time.perf_counter() - began) / 60:6.1f} min] {msg}", flush=True)

    train_texts, held_texts = load_split(max_files=args.max_files)
    conversations = [c for name in train_texts for c in chat_examples(train_texts[name])]
    log(f"corpus: {len(train_texts)} training files ({sum(map(len, train_texts.values())) / 2**20:.1f} MiB), "
        f"{len(held_texts)} held out, {len(conversations)} chat examples")
    tokenizer = train_tokenizer(list(train_texts.values()), args.vocab_size)
    check_chat_template(tokenizer)
    chats = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    stream = encode_documents(tokenizer, list(train_texts.values()) + chats)
    held_stream = encode_documents(tokenizer, list(held_texts.values()))
    log(f"tokenizer: {len(tokenizer)} tokens; training stream {len(stream):,} tokens, held out {len(held_stream):,}")

    shape = ModelShape(vocab_size=len(tokenizer))
    model = build_model(shape, tokenizer, args.aux_coef, args.seed)
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {shape}")
    result = train(model, stream, args, log)
    held = held_out_loss(model, held_stream, args.seq_len)
    log(f"done: {result['steps']} steps in {result['train_seconds'] / 60:.1f} min; held-out ce (first windows) {held:.3f}")
    record = {
        "command": "python scripts/train_demo_model.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if v is not None and k not in ("out", "minutes", "steps", "decay_steps")
        ) + f" --steps {result['steps']} --decay-steps {result['decay_steps']} --out OUT",
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "shape": asdict(shape),
        "corpus": {
            "root": str(stdlib_root()), "include": "**/*.py", "exclude": list(EXCLUDE),
            "filter": "UTF-8 files that parse as Python " + platform.python_version(),
            "licence": LICENCE, "held_out_rule": f"sha256(relative path)[:4] % 1000 < {HELD_OUT_PER_MILLE}",
            "train_files": len(train_texts), "train_bytes": sum(len(t.encode()) for t in train_texts.values()),
            "held_out_files": sorted(held_texts), "chat_examples": len(conversations),
            "train_tokens": len(stream), "held_out_tokens": len(held_stream),
        },
        "training": {k: v for k, v in result.items() if k != "loss_curve"} | {"held_out_ce_first_windows": round(held, 4)},
        "total_seconds": round(time.perf_counter() - began, 1),
        "machine": machine(),
        "loss_curve": result["loss_curve"],
    }
    save(model, tokenizer, args.out, record)
    log(f"saved to {args.out}")


if __name__ == "__main__":
    main()
