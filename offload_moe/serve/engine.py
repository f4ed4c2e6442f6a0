"""A decode engine that batches requests over one offloaded model: what ``offload-moe serve`` runs.

Continuous batching with a scheduler of our own over the model's KV cache. One thread owns the model
and loops: drop the requests that were cancelled, prefill the newcomers that fit in the batch as one
step of their own (left-padded), merge their KV cache into the running batch's, then run one decode
step for every running request. A request leaves the batch after the step that finished it.

One step is one forward pass over all its requests' tokens, so each MoE layer groups the batch's
tokens by expert (``experts.compute_grouped``) and loads each expert it needs once per step, whatever
the number of requests that need it: that is where batching saves expert loads.

The batch's KV cache is a ``DynamicCache`` of rows padded on the left to a common length, with a
mask [B, L] saying which positions hold tokens; each row's position ids are its own. A step that
fails (an expert read that fails raises ``ExpertLoadError``) fails the requests of that step only;
the engine carries on with the others and with the requests that come next.

transformers' own continuous batching (``model.generate_batch``) runs with offloaded experts and gives
the same greedy tokens, but on the bundled model on a 2-core CPU it took 27.8 s for 9 prompts x 32
tokens where nine sequential ``generate`` calls took 7.1 s, and it applies one generation config to
every request (no per-request sampling, stop strings, cancellation or error per step); see
docs/serving.md.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count

import psutil
import torch
import torch.nn.functional as F

from ..errors import ConfigError, ModelClosedError, OffloadMoEError
from ..generation import (
    check_prompt_length,
    check_sampling,
    kv_cache_kwargs,
    kv_cache_of,
    model_context,
    pad_token_id,
)
from ..planning import kv_bytes_per_token

MAX_BATCH = 8  # the default ceiling; the memory for the batch's KV cache can lower it
MAX_QUEUE = 64
TOKENS_PER_S_WINDOW = 10.0  # seconds over which Engine.stats()["tokens_per_s"] counts


class QueueFullError(OffloadMoEError):
    """The engine's queue holds ``max_queue`` requests already; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class EngineClosedError(OffloadMoEError):
    """The engine is shutting down or shut down: it takes no new requests."""


@dataclass(frozen=True)
class Params:
    """How one request is decoded. Greedy when ``temperature`` is 0; ``seed`` None samples from fresh entropy;
    generation ends at an end-of-sequence token, at any of ``stop`` (not included in the text) or after
    ``max_tokens`` tokens (or the model's context, whichever comes first)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0

    def __post_init__(self):
        check_sampling(self.max_tokens, self.temperature, self.top_p, self.repetition_penalty,
                       tokens_name="max_tokens")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")


@dataclass
class Event:
    """What a job hands its listener: new ``text`` (maybe empty), then once ``finish`` ("stop", "length",
    "cancelled" or "error", with ``error``)."""

    text: str = ""
    finish: str | None = None
    error: BaseException | None = None


@dataclass
class Completion:
    """A finished job: the text, why it ended, token counts and times."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    token_ids: list[int]
    ttft: float | None
    seconds: float
    error: BaseException | None = None


class Job:
    """One request in the engine: its prompt, settings, generated tokens and the events they made.

    Iterate over it for the events as they come (``for event in job``), or call ``result()`` to wait for the
    end. ``cancel()`` takes it out of the batch at the next step.
    """

    def __init__(self, job_id: int, prompt_ids: list[int], params: Params, on_event: Callable[[Event], None] | None):
        self.id = job_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.tokens: list[int] = []
        self.text = ""  # emitted so far
        self.finish: str | None = None
        self.error: BaseException | None = None
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._events: queue.Queue[Event] = queue.Queue()
        self._on_event = on_event

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.created

    def cancel(self) -> None:
        """Leave the batch at the next step (a client that went away); the job ends with finish "cancelled"."""
        self._cancelled.set()

    def emit(self, event: Event) -> None:
        if event.finish is not None:
            self.finish, self.error, self.finished_at = event.finish, event.error, time.perf_counter()
            self._done.set()  # before the listener hears of it, so that result() answers at once
        self._events.put(event)
        if self._on_event is not None:
            self._on_event(event)

    def __iter__(self) -> Iterator[Event]:
        while True:
            event = self._events.get()
            yield event
            if event.finish is not None:
                return

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end (at most ``timeout`` seconds: TimeoutError) and return the completion."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
        return Completion(self.text, self.finish, self.prompt_tokens, len(self.tokens), list(self.tokens), self.ttft,
                          self.finished_at - self.created, self.error)


@dataclass
class _Batch:
    """The running requests: row i of the KV cache and of ``mask`` [B, L] is ``jobs[i]``."""

    jobs: list[Job] = field(default_factory=list)
    cache: object = None
    mask: torch.Tensor | None = None  # [B, L], 1 where a position holds a token, 0 for left padding


class Engine:
    """Batched decoding of many requests over one model (loaded by ``offload_moe.load``) and its tokenizer.

    ``max_batch`` requests decode together (default: 8, fewer if their KV cache at the full context would
    not fit in half the free memory); up to ``max_queue`` more wait for a place, and more than that are refused
    (QueueFullError). ``stats()["decode_rows"] / stats()["decode_steps"]`` is the mean batch. ``submit`` returns a ``Job`` at once;
    ``generate`` submits several prompts and waits for them all. ``shutdown`` finishes the work in flight
    (cancelling what is left at its timeout) and, with ``close_model``, closes the model. A context manager.

        with Engine(model, tokenizer) as engine:
            for c in engine.generate(["def add(a, b):", "import os"], max_tokens=16):
                print(c.text)
    """

    def __init__(self, model, tokenizer, *, max_batch: int | None = None, max_queue: int = MAX_QUEUE,
                 close_model: bool = True):
        if max_batch is not None and max_batch < 1:
            raise ConfigError(f"max_batch={max_batch} must be at least 1")
        if max_queue < 0:
            raise ConfigError(f"max_queue={max_queue} must be >= 0")
        self.model, self.tokenizer = model, tokenizer
        self.context = model_context(model.config)
        self.vocab_size = getattr(model.config, "vocab_size", None)  # token ids must be below it
        self.device = model.offload.device
        self.max_batch = (max_batch or default_max_batch(model)) if _pads_cleanly(model) else 1
        self.max_queue = max_queue
        self.close_model = close_model
        self.pad_id = pad_token_id(tokenizer) or 0
        self.eos_ids = _eos_ids(model, tokenizer)
        self.listeners: list[Callable[[str, Job], None]] = []  # called with ("first_token" | "finished", job)
        self._ids = count(1)
        self._waiting: deque[Job] = deque()
        self._batch = _Batch()
        self._wake = threading.Condition()
        self._accepting = True
        self._deadline: float | None = None  # after it, every job left is cancelled
        self._counters = {"requests": 0, "finished": 0, "cancelled": 0, "failed": 0, "rejected": 0,
                          "prompt_tokens": 0, "completion_tokens": 0, "prefill_steps": 0, "decode_steps": 0, "decode_rows": 0,
                          "failed_steps": 0, "request_seconds": 0.0}
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last steps
        self._thread = threading.Thread(target=self._loop, name="offload-moe-engine", daemon=True)
        self._thread.start()

    # ---- the public surface -------------------------------------------------------------------------

    def submit(self, prompt: str | Sequence[int], params: Params | None = None, *,
               on_event: Callable[[Event], None] | None = None) -> Job:
        """Queue ``prompt`` (text, or token ids) to decode with ``params``; ``on_event`` gets each ``Event`` on
        the engine's thread (keep it short). Raises ConfigError for a prompt the model cannot read,
        QueueFullError when the queue is full, EngineClosedError once shutdown has begun."""
        params = params or Params()
        ids = self.tokenizer(prompt, verbose=False).input_ids if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ConfigError("the prompt is empty: send at least one token")
        if self.context is not None:
            check_prompt_length(len(ids), self.context)
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None) if self.vocab_size else None
        if bad is not None:
            raise ConfigError(f"the prompt holds token id {bad}, outside the model's vocabulary "
                              f"(ids 0 to {self.vocab_size - 1})")
        with self._wake:
            if not self._accepting:
                raise EngineClosedError("the server is shutting down and takes no new requests")
            queued = len(self._waiting) - (self.max_batch - len(self._batch.jobs))  # waiting for a place
            if queued >= self.max_queue:
                self._counters["rejected"] += 1
                raise QueueFullError(f"{self.max_batch} requests are decoding and {max(0, queued)} wait "
                                     f"(max_queue={self.max_queue}); try again later", self._retry_after())
            job = Job(next(self._ids), ids, params, on_event)
            self._counters["requests"] += 1
            self._waiting.append(job)
            self._wake.notify()
        return job

    def generate(self, prompts: Sequence[str | Sequence[int]], *, timeout: float | None = None,
                 **params) -> list[Completion]:
        """Decode ``prompts`` together (as many at a time as ``max_batch`` allows) with ``Params(**params)``."""
        settings = Params(**params)
        jobs = [self.submit(p, settings) for p in prompts]
        return [job.result(timeout) for job in jobs]

    def stats(self) -> dict:
        """Counters since the engine started, the queue and batch now, and tokens/s over the last 10 s."""
        with self._wake:
            now = time.perf_counter()
            while self._recent and self._recent[0][0] < now - TOKENS_PER_S_WINDOW:
                self._recent.popleft()
            recent = sum(n for _, n in self._recent)
            return {**self._counters, "queue_depth": len(self._waiting), "batch_size": len(self._batch.jobs),
                    "max_batch": self.max_batch, "max_queue": self.max_queue,
                    "tokens_per_s": recent / TOKENS_PER_S_WINDOW}

    @property
    def accepting(self) -> bool:
        return self._accepting

    def stop_accepting(self, timeout: float | None = None) -> None:
        """Take no new requests; the ones in flight go on, and are cancelled ``timeout`` seconds from now."""
        with self._wake:
            self._accepting = False
            if timeout is not None:
                deadline = time.perf_counter() + timeout
                self._deadline = deadline if self._deadline is None else min(self._deadline, deadline)
            self._wake.notify()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, finish the ones in flight (cancel what is left after ``timeout`` seconds),
        stop the engine's thread and, with ``close_model``, close the model. A second call does nothing more."""
        self.stop_accepting(timeout)
        self._thread.join()
        if self.close_model:
            self.model.offload.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- the engine's thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._wake:
                while self._accepting and not self._waiting and not self._batch.jobs:
                    self._wake.wait()
                if self._deadline is not None and time.perf_counter() >= self._deadline:
                    self._cancel_all()
                if not self._accepting and not self._waiting and not self._batch.jobs:
                    return
                newcomers = self._admit()
            try:
                self._drop_cancelled()
                if newcomers:
                    self._prefill(newcomers)
                if self._batch.jobs:
                    self._decode()
            except ModelClosedError as e:  # nothing can run any more: fail everything and stop
                with self._wake:
                    self._accepting = False
                    left = list(self._waiting) + self._batch.jobs
                    self._waiting.clear()
                    self._batch = _Batch()
                for job in left:
                    self._end(job, "error", e)
            except Exception as e:  # noqa: BLE001 - a bug outside the forward pass: its requests fail, serving goes on
                jobs = [j for j in newcomers + self._batch.jobs if not j.done]
                self._batch = _Batch()
                self._fail_step(jobs, e)

    def _admit(self) -> list[Job]:
        room = self.max_batch - len(self._batch.jobs)
        newcomers = []
        while self._waiting and len(newcomers) < room:
            job = self._waiting.popleft()
            if job.cancelled:
                self._end(job, "cancelled")
            else:
                newcomers.append(job)
        return newcomers

    def _cancel_all(self) -> None:
        for job in self._waiting:
            job.cancel()
        for job in self._batch.jobs:
            job.cancel()

    def _drop_cancelled(self) -> None:
        keep = [i for i, job in enumerate(self._batch.jobs) if not job.cancelled]
        for job in self._batch.jobs:
            if job.cancelled:
                self._end(job, "cancelled")
        self._keep_rows(keep)

    def _prefill(self, jobs: list[Job]) -> None:
        """One step over the newcomers' prompts, left-padded to the longest; then they join the batch."""
        from transformers import DynamicCache

        length = max(j.prompt_tokens for j in jobs)
        try:
            ids = torch.tensor([[self.pad_id] * (length - j.prompt_tokens) + j.prompt_ids for j in jobs])  # [N, S]
            mask = torch.tensor([[0] * (length - j.prompt_tokens) + [1] * j.prompt_tokens for j in jobs])  # [N, S]
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [N, S]
            cache = DynamicCache(config=self.model.config)
            logits, cache = self._forward(ids, mask, positions, cache)  # [N, V]
        except ModelClosedError:
            raise
        except Exception as e:  # noqa: BLE001 - the step's requests fail, the engine serves on
            self._fail_step(jobs, e)
            return
        self._counters["prefill_steps"] += 1
        self._merge(jobs, cache, mask)
        self._sample(jobs, logits)

    def _decode(self) -> None:
        """One step: each running request's last token in, one new token each out."""
        batch = self._batch
        ids = torch.tensor([[j.tokens[-1]] for j in batch.jobs])  # [B, 1]
        mask = torch.cat([batch.mask, torch.ones(len(batch.jobs), 1, dtype=batch.mask.dtype)], dim=1)  # [B, L+1]
        positions = torch.tensor([[j.prompt_tokens + len(j.tokens) - 1] for j in batch.jobs])  # [B, 1]
        try:
            logits, batch.cache = self._forward(ids, mask, positions, batch.cache)  # [B, V]
        except ModelClosedError:
            raise
        except Exception as e:  # noqa: BLE001 - the step's requests fail (their cache rows are half written)
            jobs, self._batch = batch.jobs, _Batch()
            self._fail_step(jobs, e)
            return
        batch.mask = mask
        self._counters["decode_steps"] += 1
        self._counters["decode_rows"] += len(batch.jobs)
        self._sample(batch.jobs, logits)

    def _forward(self, ids, mask, positions, cache) -> tuple[torch.Tensor, object]:
        device = self.device
        with torch.inference_mode():
            out = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                             position_ids=positions.to(device), use_cache=True, logits_to_keep=1,
                             **kv_cache_kwargs(self.model, cache))
        return out.logits[:, -1].float().cpu(), kv_cache_of(out)

    def _fail_step(self, jobs: list[Job], error: Exception) -> None:
        self._counters["failed_steps"] += 1
        for job in jobs:
            self._end(job, "error", error)

    def _merge(self, jobs: list[Job], cache, mask: torch.Tensor) -> None:
        """Append the newcomers' rows (their cache and mask [N, S]) to the batch, left-padding the shorter side."""
        batch = self._batch
        if not batch.jobs:
            self._batch = _Batch(list(jobs), cache, mask)
            return
        length = max(batch.mask.shape[1], mask.shape[1])
        for old, new in zip(batch.cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, length), _pad_left(new.keys, length)])
            old.values = torch.cat([_pad_left(old.values, length), _pad_left(new.values, length)])
        batch.mask = torch.cat([_pad_left(batch.mask, length, dim=1), _pad_left(mask, length, dim=1)])
        batch.jobs = batch.jobs + list(jobs)

    def _keep_rows(self, keep: list[int]) -> None:
        """Keep only rows ``keep`` of the batch, and drop the leading positions no row uses any more."""
        batch = self._batch
        if len(keep) == len(batch.jobs):
            return
        if not keep:
            self._batch = _Batch()
            return
        index = torch.tensor(keep)
        batch.jobs = [batch.jobs[i] for i in keep]
        batch.mask = batch.mask[index]
        unused = int((batch.mask.sum(0) > 0).int().argmax())  # columns before the first one any row uses
        batch.mask = batch.mask[:, unused:]
        for layer in batch.cache.layers:
            rows = index.to(layer.keys.device)
            layer.keys = layer.keys[rows, :, unused:]
            layer.values = layer.values[rows, :, unused:]

    def _sample(self, jobs: list[Job], logits: torch.Tensor) -> None:
        """Pick each job's next token from its row of ``logits`` [B, V], hand out the new text, end finished jobs."""
        now = time.perf_counter()
        with self._wake:
            self._recent.append((now, len(jobs)))
        for job, row in zip(jobs, logits):
            job.tokens.append(_next_token(job, row))
            self._counters["completion_tokens"] += 1
            if job.first_token_at is None:
                job.first_token_at = now
                self._notify("first_token", job)
            self._advance(job)
        self._keep_rows([i for i, job in enumerate(self._batch.jobs) if not job.done])

    def _advance(self, job: Job) -> None:
        """Hand out the text the new token completes, holding back what could be the start of a stop string."""
        token = job.tokens[-1]
        ended = token in self.eos_ids
        text = self.tokenizer.decode(job.tokens[:-1] if ended else job.tokens, skip_special_tokens=True)
        finish = "stop" if ended else None
        cut = _first_stop(text, job.params.stop, len(job.text))
        if cut is not None:
            text, finish = text[:cut], "stop"
        if finish is None and (len(job.tokens) >= job.params.max_tokens
                               or (self.context is not None and job.prompt_tokens + len(job.tokens) >= self.context)):
            finish = "length"
        if finish is None:  # an unfinished character, or the start of a stop string, waits for the next token
            text = text.rstrip("\ufffd")
            text = text[:len(text) - _stop_prefix(text, job.params.stop)]
        new = text[len(job.text):]
        if new and text.startswith(job.text):
            job.text = text
            job.emit(Event(new))
        if finish is not None:
            self._end(job, finish)

    def _end(self, job: Job, finish: str, error: BaseException | None = None) -> None:
        if job.done:
            return
        key = {"stop": "finished", "length": "finished", "cancelled": "cancelled", "error": "failed"}[finish]
        with self._wake:
            self._counters[key] += 1
            self._counters["prompt_tokens"] += job.prompt_tokens
            self._counters["request_seconds"] += time.perf_counter() - job.created
        job.emit(Event(finish=finish, error=error))
        self._notify("finished", job)

    def _notify(self, what: str, job: Job) -> None:
        for listener in self.listeners:
            listener(what, job)

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free: the mean time a request took, times the queue's share per slot."""
        done = self._counters["finished"] + self._counters["cancelled"] + self._counters["failed"]
        mean = self._counters["request_seconds"] / done if done else 1.0
        return max(1, math.ceil(mean * len(self._waiting) / self.max_batch))


def _next_token(job: Job, logits: torch.Tensor) -> int:
    """The next token from ``logits`` [V]: repetition penalty, then greedy, or sampled with temperature and top-p."""
    p = job.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(job.prompt_ids + job.tokens)
        scores = logits[seen]
        logits = logits.clone()
        logits[seen] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
    if p.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / p.temperature, dim=-1)
    if p.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(0) - sorted_probs >= p.top_p  # the tokens after the nucleus is full
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=job.generator))


def _first_stop(text: str, stops: tuple[str, ...], emitted: int) -> int | None:
    """Where the first stop string starts in ``text`` (searching only what could not have been emitted)."""
    found = [i for s in stops if (i := text.find(s, max(0, emitted - len(s) + 1))) >= 0]
    return min(found) if found else None


def _stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of ``text`` that begins one of ``stops``."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def _pad_left(x: torch.Tensor, length: int, dim: int = -2) -> torch.Tensor:
    missing = length - x.shape[dim]
    if missing == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [missing, 0]
    return F.pad(x, pad)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids.update(value if isinstance(value, (list, tuple)) else [] if value is None else [value])
    return ids


def _pads_cleanly(model) -> bool:
    """Whether every layer of the model's KV cache is a plain full-attention ``DynamicLayer``, whose rows the
    engine can pad, merge and cut; a sliding-window or linear-attention cache decodes one request at a time."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    return bool(cache.layers) and all(type(layer) is DynamicLayer for layer in cache.layers)


def default_max_batch(model, ceiling: int = MAX_BATCH) -> int:
    """``ceiling``, or fewer so that the batch's KV cache at the model's full context fits in half the free
    memory of the compute device (host RAM on CPU)."""
    device = model.offload.device
    context = model_context(model.config) or 4096
    per_request = kv_bytes_per_token(model.config, torch.empty((), dtype=model.dtype).element_size()) * context
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = psutil.virtual_memory().available
    return max(1, min(ceiling, int(free // 2 // max(1, per_request))))
