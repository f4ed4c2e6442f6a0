"""Multi-turn chat with an offloaded model: what ``offload-moe chat`` runs.

``ChatSession`` keeps the conversation and answers one message at a time, streaming the text.
With a chat template the prompt is the template applied to the whole history; without one the
model is a plain completer and the prompt is the conversation as one document: each message
followed by the text the model continued it with, messages separated by a newline.
``run_chat`` is the read-answer loop with the /commands and Ctrl-C, free of any terminal so
tests can drive it with a list of lines.

The KV cache of the conversation is kept between turns, so each answer runs only the new
tokens through the model, and so loads only the experts they need.

Ctrl-C during an answer sets ``ChatSession.stop``; a stopping criterion ends generation after
the current token, so no forward pass is cut in half. The partial answer stays in the history,
as the user saw it. A second Ctrl-C before the answer ends interrupts generation outright and
ends the session.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.markup import escape

from .errors import ConfigError
from .generation import (
    check_prompt_length,
    kv_cache_kwargs,
    kv_cache_of,
    load_with_tokenizer,
    model_context,
    pad_token_id,
    sampling_options,
    text_streamer,
)

COMMANDS = {"/reset": "forget the conversation", "/stats": "expert cache and speed",
            "/paste": "the lines up to /end are one message", "/quit": "leave"}



@dataclass
class Reply:
    """One answer: its text, how many tokens it took and how long, and whether Ctrl-C cut it short."""

    text: str
    new_tokens: int
    seconds: float
    stopped: bool = False
    forgotten: int = 0  # oldest messages dropped from the history to fit the model's context

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0


class ChatSession:
    """A loaded model, its tokenizer, the conversation so far and the sampling settings.

    Greedy when ``temperature`` is 0, else sampled with ``top_p``; ``seed`` seeds sampling at the
    start and after every ``reset``, so a conversation repeats exactly. ``repetition_penalty``
    (1 = off; 1.1, Ollama's default) keeps greedy decoding of small models from looping.
    """

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, repetition_penalty: float = 1.1, keep_cache: bool = True):
        self.sampling = sampling_options(max_new_tokens, temperature, top_p, repetition_penalty)
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.seed = max_new_tokens, seed
        # The KV cache of the conversation so far and the token ids it holds: the next turn's prompt
        # starts with them, so only the new tokens run through the model (and need its experts).
        self.keep_cache = keep_cache
        self._kv = None
        self._kv_ids: torch.Tensor | None = None  # [n]
        self.reused_tokens = 0  # prompt tokens served from the kept cache, over all turns
        self.history: list[dict[str, str]] = []  # {"role": "user" | "assistant", "content": ...}
        self.stop = threading.Event()
        self.last: Reply | None = None
        self.turns, self.total_tokens, self.total_seconds = 0, 0, 0.0
        self.context = model_context(model.config)
        torch.manual_seed(seed)

    @classmethod
    def load(cls, model_path: str | Path | None = None, *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, repetition_penalty: float = 1.1, progress: bool = True,
             **load_options) -> ChatSession:
        """Load ``model_path`` (default: the bundled model) and its tokenizer with ``offload_moe.load(**load_options)``."""
        model, tokenizer = load_with_tokenizer(model_path, progress=progress, **load_options)
        try:
            return cls(model, tokenizer, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       seed=seed, repetition_penalty=repetition_penalty)
        except BaseException:
            model.offload.close()
            raise

    @property
    def uses_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt(self, messages: list[dict[str, str]]) -> str:
        """The text the model continues: the chat template with an open assistant turn, else the plain document."""
        if self.uses_template:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text = ""
        for m in messages:
            text += ("\n" if text and m["role"] == "user" else "") + m["content"]
        return text

    def send(self, user_text: str, on_text: Callable[[str], None] | None = None) -> Reply:
        """Answer ``user_text`` given the history, handing the text to ``on_text`` piece by piece; both join the history.

        The pieces carry their own newlines, so print them as they are:
        ``session.send(text, on_text=lambda s: print(s, end="", flush=True))``
        (plain ``on_text=print`` would end every piece with a newline of its own).

        Setting ``self.stop`` (Ctrl-C does) ends the answer after the current token: ``Reply.stopped``.
        """
        messages = self.history + [{"role": "user", "content": user_text}]
        ids, forgotten = self._fit(messages)  # [1, S]
        budget = self.max_new_tokens if self.context is None else min(self.max_new_tokens, self.context - ids.shape[1])
        pad = pad_token_id(self.tokenizer)
        streamer = text_streamer(self.tokenizer, on_text) if on_text is not None else None
        past = self._reusable_cache(ids[0])
        start = time.perf_counter()
        try:
            with torch.inference_mode():
                result = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                                             streamer=streamer, pad_token_id=pad, **kv_cache_kwargs(self.model, past),
                                             return_dict_in_generate=True,
                                             stopping_criteria=stop_when_set(self.stop), **self.sampling)
            stopped = self.stop.is_set()
        except BaseException:
            self._kv = self._kv_ids = None  # an interrupted forward may have left the cache half-written
            raise
        finally:
            self.stop.clear()
        seconds = time.perf_counter() - start
        out = result.sequences
        if self.keep_cache:  # it holds every token but the last generated one, which was never fed back
            self._kv, self._kv_ids = kv_cache_of(result), out[0, :-1]
        new = out[0, ids.shape[1]:]
        reply = Reply(self.tokenizer.decode(new, skip_special_tokens=True), int(new.numel()), seconds, stopped, forgotten)
        self.history = messages[forgotten:] + [{"role": "assistant", "content": reply.text}]
        self.last = reply
        self.turns += 1
        self.total_tokens += reply.new_tokens
        self.total_seconds += seconds
        return reply

    def _reusable_cache(self, ids: torch.Tensor):
        """The kept KV cache, cut back to the longest prefix it shares with ``ids`` [S] (None if nothing is shared).

        The new prompt usually starts with the old conversation token for token; where the tokenizer
        splits the model's answer differently, or old turns were dropped, only the shared part is kept.
        """
        kept, self._kv, cached = self._kv, None, self._kv_ids
        if kept is None or cached is None:
            return None
        n = min(len(cached), len(ids) - 1)  # at least one token of the prompt must run
        same = (cached[:n] == ids[:n].to(cached.device)).long()
        shared = int(same.cumprod(0).sum()) if n > 0 else 0
        if shared == 0:
            return None
        if shared < kept.get_seq_length():
            try:  # negative: remove that many (every transformers 5 accepts it)
                kept.crop(shared - kept.get_seq_length())
            except (RuntimeError, ValueError, AttributeError, NotImplementedError):
                return None  # a sliding-window or linear-attention layer cannot go back: read it all again
        self.reused_tokens += shared
        return kept

    def _fit(self, messages: list[dict[str, str]]) -> tuple[torch.Tensor, int]:
        """Token ids of the prompt, dropping the oldest user-assistant pairs until a full answer fits the context;
        the last message alone gets what room is left."""
        for forgotten in range(0, len(messages), 2):
            text = self.prompt(messages[forgotten:])
            # verbose=False: the length is checked here, so transformers' "longer than the maximum" warning is noise
            ids = self.tokenizer(text, add_special_tokens=not self.uses_template, return_tensors="pt",
                                 verbose=False).input_ids
            if self.context is None or ids.shape[1] + self.max_new_tokens <= self.context:
                return ids.to(self.model.offload.device), forgotten
        check_prompt_length(ids.shape[1], self.context)
        return ids.to(self.model.offload.device), forgotten

    def reset(self) -> None:
        """Forget the conversation and re-seed sampling; the cache statistics carry on."""
        self.history = []
        self._kv = self._kv_ids = None
        torch.manual_seed(self.seed)

    def stats(self) -> dict:
        """Expert-cache counters (hits, misses, hit rate, prefetch) and tokens/s of the last answer and of all."""
        s = self.model.offload.stats()
        return {
            "hits": s["hits"], "misses": s["misses"], "hit_rate": s["hit_rate"], "mapped_experts": s["mapped_experts"],
            "capacity_experts": s["capacity_experts"], "total_experts": s["total_experts"],
            "prefetch": s["prefetch"], "prediction_recall": s["prediction_recall"],
            "prefetch_issued": s["prefetch_issued"], "prefetch_used": s["prefetch_used"],
            "turns": self.turns, "new_tokens": self.total_tokens, "reused_prompt_tokens": self.reused_tokens,
            "last_tokens_per_s": self.last.tokens_per_s if self.last else 0.0,
            "tokens_per_s": self.total_tokens / self.total_seconds if self.total_seconds else 0.0,
        }

    def close(self) -> None:
        """Release the model's reader threads, files and buffers."""
        self.model.offload.close()


def stop_when_set(event: threading.Event):
    """transformers stopping criteria that end generation, after the token in progress, once ``event`` is set."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class EventSet(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:  # -> [B]
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([EventSet()])


def run_chat(session: ChatSession, lines: Iterable[str], console: Console, *, interactive: bool = True,
             errors: Console | None = None) -> None:
    """Answer each line of ``lines`` with ``session``, streaming to ``console``, until /quit, the end of the lines or Ctrl-C.

    A message the model cannot read (too long for its context) is reported on ``errors`` (default: stderr)
    and the chat goes on.

    Lines starting with "/" are commands (/reset, /stats, /quit, /paste). After /paste, every line up to a
    line /end is one message, so code with blank lines and docstrings can be pasted. Each answer ends with a
    blank line, so a script reading the output can tell answers apart; ``interactive`` (someone typing at a
    prompt) only adds the newline that leaves the prompt line at the end.
    """
    lines = iter(lines)
    errors = errors or Console(stderr=True)
    while True:
        try:
            line = next(lines).rstrip("\r\n")
            pasted = line.strip() == "/paste"
            if pasted:
                if interactive:
                    console.print("[dim](one message: every line up to a line /end)[/]", highlight=False)
                line = _pasted(lines)
        except (StopIteration, KeyboardInterrupt):  # the end of the input, or Ctrl-C at the prompt
            if interactive:
                console.out("")
            return
        if not pasted and line.strip() == "/quit":
            return
        if not pasted and line.startswith("/"):
            _command(session, line.strip(), console)
        elif line.strip():
            try:
                _answer(session, line, console)
            except ConfigError as e:  # a message too long for the model: say so, keep chatting
                errors.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            except KeyboardInterrupt:  # a second Ctrl-C: generation was interrupted mid-token
                console.print("\n[red]interrupted[/]")
                return


def _pasted(lines: Iterator[str]) -> str:
    """The lines after /paste, up to a line /end (or the end of the input), as one message."""
    parts = []
    for line in lines:
        line = line.rstrip("\r\n")
        if line.strip() == "/end":
            break
        parts.append(line)
    return "\n".join(parts).rstrip()


def _answer(session: ChatSession, line: str, console: Console) -> None:
    with _ctrl_c_sets(session.stop):
        reply = session.send(line, on_text=lambda text: console.out(text, end="", highlight=False))
    if not reply.text.endswith("\n"):
        console.out("")  # end the answer's last line
    if reply.forgotten:
        console.print(f"[dim](dropped the oldest {reply.forgotten} messages to fit the model's context)[/]", highlight=False)
    if reply.stopped:
        console.print("[dim](stopped; the partial answer stays in the history)[/]", highlight=False)
    console.out("")


def _command(session: ChatSession, command: str, console: Console) -> None:
    if command == "/reset":
        session.reset()
        console.print("history cleared")
    elif command == "/stats":
        s = session.stats()
        prefetch = (f"{s['prefetch']}, recall {s['prediction_recall']:.0%} of needed experts named a layer ahead, "
                    f"{s['prefetch_used']} of {s['prefetch_issued']} prefetches used") if s["prefetch"] != "none" else "off"
        console.print(
            f"expert cache: {s['capacity_experts']} of {s['total_experts']} experts, {s['hits']} hits, "
            f"{s['misses']} misses, hit rate {s['hit_rate']:.1%}"
            + (f" ({s['mapped_experts']} computed in place from the mapped checkpoint)" if s["mapped_experts"] else "")
            + "\n"
            f"prefetch: {prefetch}\n"
            f"tokens/s: {s['last_tokens_per_s']:.1f} last answer, {s['tokens_per_s']:.1f} overall "
            f"({s['new_tokens']} tokens in {s['turns']} answer{'' if s['turns'] == 1 else 's'}); "
            f"{s['reused_prompt_tokens']} prompt tokens served from the kept KV cache",
            highlight=False, soft_wrap=True,
        )
    else:
        console.print(f"unknown command {command}; " + ", ".join(f"{c} ({h})" for c, h in COMMANDS.items()), markup=False,
                      highlight=False, soft_wrap=True)


@contextmanager
def _ctrl_c_sets(event: threading.Event) -> Iterator[None]:
    """While inside, the first Ctrl-C sets ``event``; a second raises KeyboardInterrupt as usual."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may take signals
        yield
        return

    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def prompt_lines(console: Console, prompt: str = ">>> ") -> Iterator[str]:
    """Lines typed at ``prompt`` (with line editing where readline exists) until EOF (Ctrl-D)."""
    try:
        import readline  # noqa: F401  (input() gains editing and history)
    except ImportError:
        pass
    while True:
        try:
            yield console.input(prompt)
        except EOFError:
            return
