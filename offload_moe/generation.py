"""One-shot text generation with an offloaded model: what ``offload-moe generate`` runs."""

from __future__ import annotations

import functools
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .checkpoint import demo_model_path, load_config, resolve_model_path
from .errors import ConfigError, ModelPathError
from .loader import load


@dataclass
class Generation:
    """The text a model wrote for a prompt, how long it took, and the expert-cache statistics."""

    prompt: str
    text: str
    new_tokens: int
    seconds: float
    load_seconds: float
    stats: dict

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s, "threads": torch.get_num_threads()}


def kv_cache_kwargs(model, cache) -> dict:
    """The keyword that hands a KV cache to ``model``'s forward and generate: ``cache`` from transformers
    5.24, ``past_key_values`` before (5.24 still takes the old name, with a warning)."""
    return {_kv_cache_name(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _kv_cache_name(model_type: type) -> str:
    return "cache" if "cache" in inspect.signature(model_type.forward).parameters else "past_key_values"


def kv_cache_of(output):
    """The KV cache a forward or ``generate(return_dict_in_generate=True)`` returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False):
    """The tokenizer of ``folder``; code from the folder (a custom tokenizer class) runs only with ``trust_remote_code``."""
    load_config(folder, trust_remote_code=trust_remote_code)  # a broken config.json is reported as such
    return _tokenizer(folder, trust_remote_code)


def _tokenizer(folder: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer  # transformers takes ~1 s to import: lazy for the CLI's startup

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())  # transformers' message spans lines; an error here is one line
        raise ModelPathError(f"{folder} has no tokenizer transformers can load ({reason}); "
                             "generation needs tokenizer.json or the model's tokenizer files") from None


def load_with_tokenizer(model_path: str | Path | None, *, before_load: Callable[[object, object], None] | None = None,
                        **load_options) -> tuple[torch.nn.Module, object]:
    """``offload_moe.load(model_path, **load_options)`` (default: the bundled model) and its tokenizer.

    The tokenizer comes first: ``before_load(tokenizer, config)`` may check the input against it and the
    model's config, so a prompt that cannot run is refused before any weight is read.
    """
    folder = resolve_model_path(model_path if model_path is not None else demo_model_path())
    trust_remote_code = load_options.get("trust_remote_code", False)
    config = load_config(folder, trust_remote_code=trust_remote_code)  # read once, before the tokenizer
    tokenizer = _tokenizer(folder, trust_remote_code)
    if before_load is not None:
        before_load(tokenizer, config)
    return load(folder, model_config=config, **load_options), tokenizer


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, repetition_penalty: float = 1.0, *,
                   tokens_name: str = "max_new_tokens") -> None:
    """Raise ConfigError for settings no decoding can use (NaN and infinity included); ``tokens_name`` is how
    the caller calls ``max_new_tokens`` in its message."""
    if max_new_tokens < 1:
        raise ConfigError(f"{tokens_name}={max_new_tokens} must be at least 1")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ConfigError(f"temperature={temperature} must be >= 0 (0 is greedy decoding)")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1]; 1 turns nucleus sampling off")
    if not (repetition_penalty > 0 and math.isfinite(repetition_penalty)):
        raise ConfigError(f"repetition_penalty={repetition_penalty} must be > 0; 1 turns it off")


def sampling_options(max_new_tokens: int, temperature: float, top_p: float, repetition_penalty: float = 1.0) -> dict:
    """``generate`` keyword arguments: greedy when ``temperature`` is 0, else sampled with ``top_p``; checked first."""
    check_sampling(max_new_tokens, temperature, top_p, repetition_penalty)
    options = {"do_sample": temperature > 0}
    if temperature > 0:
        options.update(temperature=temperature, top_p=top_p)
    if repetition_penalty != 1.0:
        options["repetition_penalty"] = repetition_penalty
    return options


def model_context(config) -> int | None:
    """The most tokens (prompt and answer) the model reads: ``max_position_embeddings`` of its config."""
    return getattr(config, "max_position_embeddings", None)


def check_prompt_length(tokens: int, context: int) -> None:
    """Refuse a prompt that leaves the model no room for one new token."""
    if tokens >= context:
        raise ConfigError(f"the prompt is {tokens} tokens but the model reads at most {context} "
                          "(max_position_embeddings in its config.json); send a shorter one")


def pad_token_id(tokenizer) -> int | None:
    """The tokenizer's padding id, else its end-of-sequence id (0 is a valid id)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def generate_text(
    model_path: str | Path | None,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.1,
    seed: int = 0,
    on_text: Callable[[str], None] | None = None,
    **load_options,
) -> Generation:
    """Load ``model_path`` (default: the bundled model) with ``load_options``, complete ``prompt``, return it all.

    Greedy when ``temperature`` is 0, else sampled with ``top_p`` from ``seed``; ``repetition_penalty``
    (1 = off) keeps greedy decoding of small models from looping. ``on_text`` receives the new text
    piece by piece as it is generated. A prompt as long as the model's context (``max_position_embeddings``)
    is refused with a ConfigError before the model loads; a shorter one gets at most the rest of the context.
    """
    sampling = sampling_options(max_new_tokens, temperature, top_p, repetition_penalty)

    ids = None

    def fit_prompt(tokenizer, config) -> None:  # a prompt too long is refused before the model loads
        nonlocal ids, max_new_tokens
        ids = tokenizer(prompt, return_tensors="pt", verbose=False).input_ids  # [1, S]; its length is checked here
        context = model_context(config)
        if context is not None:
            check_prompt_length(ids.shape[1], context)
            max_new_tokens = min(max_new_tokens, context - ids.shape[1])

    start = time.perf_counter()
    model, tokenizer = load_with_tokenizer(model_path, before_load=fit_prompt,
                                           **{"progress": on_text is not None, **load_options})
    load_seconds = time.perf_counter() - start
    try:
        ids = ids.to(model.offload.device)
        streamer = text_streamer(tokenizer, on_text) if on_text is not None else None
        torch.manual_seed(seed)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_new_tokens, streamer=streamer,
                                 pad_token_id=pad_token_id(tokenizer), **sampling)
        seconds = time.perf_counter() - start
        new = out[0, ids.shape[1]:]
        text = tokenizer.decode(new, skip_special_tokens=True)
        stats = model.offload.stats()
    finally:
        model.offload.close()
    return Generation(prompt, text, int(new.numel()), seconds, load_seconds, stats)


def text_streamer(tokenizer, on_text: Callable[[str], None]):
    """transformers' TextStreamer, handing the decoded text to ``on_text`` instead of printing it."""
    from transformers import TextStreamer  # lazy for the CLI's startup, as above

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            on_text(text)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
