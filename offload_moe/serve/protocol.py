"""The OpenAI API's shapes: request bodies checked field by field, and the responses and stream chunks built.

Nothing here knows HTTP: ``app.py`` hands a parsed JSON body in and sends what comes out. A field that is
missing, of the wrong type or out of range raises ``BadRequest`` naming it, which the app answers with
400 and OpenAI's error body (``{"error": {"message", "type", "param", "code"}}``). Fields this server
does not implement (``logprobs``, ``tools``, ...) are refused rather than silently ignored when they ask
for something; ones that change nothing (``user``, ``stream_options`` without usage) are accepted.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from .engine import Completion, Params

DEFAULT_MAX_TOKENS = 256
MAX_STOP = 4  # as OpenAI
UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "functions", "tool_choice", "response_format", "logit_bias",
               "best_of", "echo", "suffix")


class BadRequest(Exception):
    """A request the server cannot run: ``param`` is the field at fault (None for the body itself)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


@dataclass
class Request:
    """A checked request: the prompt (text, or token ids from the chat template), how to decode it, and how to answer."""

    prompt: str | list[int]
    params: Params
    stream: bool
    include_usage: bool
    chat: bool


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse_chat(body, model_name: str, tokenizer) -> Request:
    """``POST /v1/chat/completions``: messages through the tokenizer's chat template (plain text without one)."""
    _check_common(body, model_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of {role, content} objects", "messages")
    checked = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise BadRequest(f"messages[{i}] needs a 'role' of system, user, assistant or developer", f"messages[{i}].role")
        checked.append({"role": "system" if m["role"] == "developer" else m["role"],
                        "content": _content(m.get("content"), i)})
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(checked, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False, verbose=False).input_ids  # the template has them
    else:  # a plain completer: the conversation as one document
        prompt = "\n".join(m["content"] for m in checked)
    return _request(body, prompt, chat=True, tokens_field="max_completion_tokens" if "max_completion_tokens" in body
                    else "max_tokens")


def parse_completion(body, model_name: str) -> Request:
    """``POST /v1/completions``: one prompt, a string (or a list holding one string, or token ids)."""
    _check_common(body, model_name)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        prompt = list(prompt)
    elif not isinstance(prompt, str) or not prompt:
        raise BadRequest("'prompt' must be a non-empty string (one prompt per request)", "prompt")
    return _request(body, prompt, chat=False, tokens_field="max_tokens")


def _check_common(body, model_name: str) -> None:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if body.get("model") is None:
        raise BadRequest("'model' is required; GET /v1/models lists the one this server runs", "model")
    if body["model"] != model_name:
        raise BadRequest(f"the model {body['model']!r} does not exist here; this server runs {model_name!r}", "model",
                         status=404, code="model_not_found")
    for name in UNSUPPORTED:
        if body.get(name) not in (None, False, [], {}):
            raise BadRequest(f"'{name}' is not supported by this server", name)


def _content(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def _request(body: dict, prompt, *, chat: bool, tokens_field: str) -> Request:
    max_tokens = _number(body, tokens_field, int, DEFAULT_MAX_TOKENS, low=1)
    temperature = _number(body, "temperature", float, 1.0, low=0.0, high=2.0)
    top_p = _number(body, "top_p", float, 1.0, low=0.0, high=1.0)
    if top_p == 0:
        raise BadRequest("'top_p' must be above 0", "top_p")
    seed = _number(body, "seed", int, None)
    penalty = _number(body, "repetition_penalty", float, 1.0, low=0.0)
    if penalty == 0:
        raise BadRequest("'repetition_penalty' must be above 0", "repetition_penalty")
    n = _number(body, "n", int, 1)
    if n != 1:
        raise BadRequest("'n' must be 1: this server returns one choice per request", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest(f"'stop' must be a non-empty string or a list of up to {MAX_STOP} of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", "stream_options")
    params = Params(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=tuple(stop),
                    repetition_penalty=penalty)
    return Request(prompt, params, stream, bool(options.get("include_usage")), chat)


def _number(body: dict, name: str, kind: type, default, *, low: float | None = None, high: float | None = None):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind is int:
        ok = ok and float(value).is_integer()
    if not ok:
        raise BadRequest(f"'{name}' must be {'an integer' if kind is int else 'a number'}, not {value!r}", name)
    value = kind(value)
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise BadRequest(f"'{name}' must be {bounds}, not {value}", name)
    return value


# ---- responses -----------------------------------------------------------------------------------------

def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response(request_id: str, model_name: str, c: Completion, chat: bool) -> dict:
    """The whole answer of a request that was not streamed."""
    finish = c.finish_reason if c.finish_reason in ("stop", "length") else "stop"
    choice = ({"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": finish,
               "logprobs": None} if chat else
              {"index": 0, "text": c.text, "finish_reason": finish, "logprobs": None})
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model_name, "choices": [choice], "usage": usage(c.prompt_tokens, c.completion_tokens)}


def chunk(request_id: str, model_name: str, chat: bool, *, text: str | None = None, role: bool = False,
          finish: str | None = None, usage_of: tuple[int, int] | None = None) -> dict:
    """One streamed piece: a delta of text (with the role first, in chat), the finish reason, or the usage alone."""
    if usage_of is not None:
        choices = []
    elif chat:
        delta = ({"role": "assistant", "content": ""} if role else {}) | ({"content": text} if text else {})
        choices = [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]
    else:
        choices = [{"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}]
    out = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
           "created": int(time.time()), "model": model_name, "choices": choices}
    if usage_of is not None:
        out["usage"] = usage(*usage_of)
    return out
