"""OpenAI's HTTP protocol: request parsing and validation, response and chunk builders.

Plain dicts in and out (no pydantic): a request body is checked field by field, and every
problem becomes an `APIError` whose `body()` is OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}`. Builders return the exact objects the
OpenAI API returns (`text_completion`, `chat.completion`, `chat.completion.chunk`), so the
official client parses them.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

# The most stop strings a request may give (OpenAI allows 4; a few more cost nothing here).
MAX_STOP = 16
# OpenAI's default max_tokens for /v1/completions.
DEFAULT_COMPLETION_MAX_TOKENS = 16


class APIError(Exception):
    """An error the client caused (4xx) or met (5xx), in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code = param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


@dataclass
class GenerationRequest:
    """A validated completion or chat request, ready for the engine."""

    kind: str  # "completion" or "chat"
    model: str
    prompt_ids: List[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: List[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    return body


# ---------------------------------------------------------------------------------- fields

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type_name(v) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(v), "a number")


def _number(body: dict, name: str, default: float, lo: float, hi: float,
            lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise bad(f"'{name}' must be a number, got {_type_name(v)}", name, "invalid_type")
    if v < lo or v > hi or (lo_open and v == lo):
        low = f"> {lo}" if lo_open else f">= {lo}"
        raise bad(f"'{name}' must be {low} and <= {hi}, got {v}", name, "invalid_value")
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be a boolean, got {_type_name(v)}", name, "invalid_type")
    return v


def _model(body: dict, served: str) -> str:
    v = body.get("model")
    if v is None:
        raise bad("'model' is required", "model", "missing_required_parameter")
    if not isinstance(v, str):
        raise bad(f"'model' must be a string, got {_type_name(v)}", "model", "invalid_type")
    if v != served:
        raise APIError(404, f"the model '{v}' does not exist; this server serves '{served}'",
                       "invalid_request_error", "model", "model_not_found")
    return v


def _stop(body: dict) -> List[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("'stop' must be a string or an array of strings", "stop", "invalid_type")
    if len(v) > MAX_STOP:
        raise bad(f"'stop' takes at most {MAX_STOP} strings, got {len(v)}", "stop",
                  "invalid_value")
    return [s for s in v if s]


def _max_tokens(body: dict, names, default: Optional[int]) -> Optional[int]:
    for name in names:
        v = body.get(name)
        if v is None:
            continue
        if not _is_int(v):
            raise bad(f"'{name}' must be an integer, got {_type_name(v)}", name, "invalid_type")
        if v < 1:
            raise bad(f"'{name}' must be >= 1, got {v}", name, "invalid_value")
        return v
    return default


def _unsupported(body: dict) -> None:
    """Refuse, with a clear message, options that would otherwise be silently ignored."""
    n = body.get("n")
    if n is not None:
        if not _is_int(n):
            raise bad(f"'n' must be an integer, got {_type_name(n)}", "n", "invalid_type")
        if n != 1:
            raise bad(f"only n=1 is supported, got n={n}", "n", "unsupported_value")
    best_of = body.get("best_of")
    if best_of not in (None, 1):
        raise bad("only best_of=1 is supported", "best_of", "unsupported_value")
    if body.get("echo"):
        raise bad("'echo' is not supported", "echo", "unsupported_parameter")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise bad("'logprobs' is not supported", "logprobs", "unsupported_parameter")
    if body.get("suffix"):
        raise bad("'suffix' is not supported", "suffix", "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        v = body.get(name)
        if v is not None and (not _is_number(v) or v != 0):
            raise bad(f"'{name}' is not supported (only 0)", name, "unsupported_parameter")
    if body.get("logit_bias"):
        raise bad("'logit_bias' is not supported", "logit_bias", "unsupported_parameter")
    if body.get("tools") or body.get("functions"):
        raise bad("tools and function calling are not supported", "tools",
                  "unsupported_parameter")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise bad("only response_format {'type': 'text'} is supported", "response_format",
                  "unsupported_parameter")


def _stream(body: dict) -> tuple:
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not isinstance(opts, dict):
            raise bad("'stream_options' must be an object", "stream_options", "invalid_type")
        if not stream:
            raise bad("'stream_options' is only allowed when 'stream' is true",
                      "stream_options", "invalid_value")
        include_usage = _bool(opts, "include_usage")
    return stream, include_usage


def _check_ids(ids: list, vocab_size: Optional[int], param: str) -> List[int]:
    if not all(_is_int(t) for t in ids):
        raise bad(f"'{param}' must be a string or an array of token ids (integers)", param,
                  "invalid_type")
    if vocab_size is not None and any(t < 0 or t >= vocab_size for t in ids):
        raise bad(f"'{param}' has token ids outside the vocabulary [0, {vocab_size})", param,
                  "invalid_value")
    return list(ids)


def _fit(prompt_len: int, max_tokens: Optional[int], max_model_len: int, param: str,
         pool_tokens: Optional[int]) -> int:
    """The request's max_tokens, checked against the context. The default is what fits the
    context and the KV pool (`pool_tokens`), so a request without max_tokens is never refused
    for asking more than the pool could ever hold."""
    if prompt_len == 0:
        raise bad(f"'{param}' is empty", param, "invalid_value")
    if prompt_len >= max_model_len:
        raise bad(f"this model's maximum context length is {max_model_len} tokens, but the "
                  f"prompt has {prompt_len} tokens", param, "context_length_exceeded")
    if max_tokens is None:
        max_tokens = max_model_len - prompt_len
        if pool_tokens is not None:
            max_tokens = max(1, min(max_tokens, pool_tokens - prompt_len))
    if prompt_len + max_tokens > max_model_len:
        raise bad(f"this model's maximum context length is {max_model_len} tokens, but "
                  f"{prompt_len + max_tokens} were requested ({prompt_len} in the prompt, "
                  f"{max_tokens} in max_tokens); reduce the prompt or max_tokens",
                  "max_tokens", "context_length_exceeded")
    return max_tokens


def _common(body: dict) -> dict:
    stream, include_usage = _stream(body)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise bad(f"'seed' must be an integer, got {_type_name(seed)}", "seed", "invalid_type")
    return dict(temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
                top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                seed=seed, stop=_stop(body), stream=stream, include_usage=include_usage)


# ---------------------------------------------------------------------------------- requests

def parse_completion(body: dict, *, served_model: str, tokenizer, max_model_len: int,
                     vocab_size: Optional[int] = None,
                     pool_tokens: Optional[int] = None) -> GenerationRequest:
    """Validate a /v1/completions body; the prompt is a string or an array of token ids."""
    model = _model(body, served_model)
    _unsupported(body)
    common = _common(body)
    max_tokens = _max_tokens(body, ("max_tokens",), DEFAULT_COMPLETION_MAX_TOKENS)
    prompt = body.get("prompt")
    if prompt is None:
        raise bad("'prompt' is required", "prompt", "missing_required_parameter")
    # OpenAI also takes a batch (an array of prompts); with n=1 only one prompt is served
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad(f"only one prompt per request is supported, got {len(prompt)}", "prompt",
                      "unsupported_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("'prompt' is empty", "prompt", "invalid_value")
        from marlin_mlx.generation import encode_prompt

        ids = encode_prompt(tokenizer, prompt)
    elif isinstance(prompt, list):
        ids = _check_ids(prompt, vocab_size, "prompt")
    else:
        raise bad(f"'prompt' must be a string or an array of token ids, got "
                  f"{_type_name(prompt)}", "prompt", "invalid_type")
    max_tokens = _fit(len(ids), max_tokens, max_model_len, "prompt", pool_tokens)
    return GenerationRequest("completion", model, ids, max_tokens, **common)


_ROLES = {"system", "developer", "user", "assistant"}


def _message_text(content, i: int) -> str:
    """A message's content as text: a string, or an array of {"type": "text"} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content: only text parts are supported",
                          f"messages[{i}].content", "unsupported_value")
            texts.append(part["text"])
        return "".join(texts)
    raise bad(f"messages[{i}].content must be a string or an array of text parts",
              f"messages[{i}].content", "invalid_type")


def render_messages(body: dict, tokenizer) -> List[int]:
    """The conversation rendered with the tokenizer's chat template, assistant turn opened."""
    messages = body.get("messages")
    if messages is None:
        raise bad("'messages' is required", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty array", "messages", "invalid_value")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}] must be an object", f"messages[{i}]", "invalid_type")
        role = m.get("role")
        if role not in _ROLES:
            raise bad(f"messages[{i}].role must be one of system, developer, user, assistant; "
                      f"got {role!r}", f"messages[{i}].role", "invalid_value")
        # templates know "system"; OpenAI's newer "developer" role means the same
        clean.append({"role": "system" if role == "developer" else role,
                      "content": _message_text(m.get("content"), i)})
    from marlin_mlx.generation import has_chat_template

    if not has_chat_template(tokenizer):
        raise bad("this model's tokenizer has no chat template; use /v1/completions",
                  "messages", "unsupported_value")
    try:
        text = tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template may refuse a conversation (e.g. roles out of order)
        raise bad(f"the chat template cannot render these messages: {e}", "messages",
                  "invalid_value") from None
    # the rendered template carries any BOS it wants (as generation.chat_prompt does)
    return list(tokenizer.encode(text, add_special_tokens=False))


def parse_chat(body: dict, *, served_model: str, tokenizer, max_model_len: int,
               vocab_size: Optional[int] = None,
               pool_tokens: Optional[int] = None) -> GenerationRequest:
    """Validate a /v1/chat/completions body."""
    model = _model(body, served_model)
    _unsupported(body)
    common = _common(body)
    max_tokens = _max_tokens(body, ("max_completion_tokens", "max_tokens"), None)
    ids = render_messages(body, tokenizer)
    max_tokens = _fit(len(ids), max_tokens, max_model_len, "messages", pool_tokens)
    return GenerationRequest("chat", model, ids, max_tokens, **common)


# ---------------------------------------------------------------------------------- responses

def new_id(kind: str) -> str:
    return ("cmpl-" if kind == "completion" else "chatcmpl-") + secrets.token_hex(12)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(rid: str, model: str, created: int, text: str, finish_reason: str,
                        prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def chat_response(rid: str, model: str, created: int, text: str, finish_reason: str,
                  prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def completion_chunk(rid: str, model: str, created: int, text: str,
                     finish_reason: Optional[str], with_usage_field: bool = False) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
             "choices": [{"index": 0, "text": text, "logprobs": None,
                          "finish_reason": finish_reason}],
             "system_fingerprint": None}
    if with_usage_field:
        chunk["usage"] = None
    return chunk


def chat_chunk(rid: str, model: str, created: int, delta: dict, finish_reason: Optional[str],
               with_usage_field: bool = False) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "logprobs": None,
                          "finish_reason": finish_reason}],
             "system_fingerprint": None}
    if with_usage_field:  # with include_usage, OpenAI sends "usage": null on every chunk
        chunk["usage"] = None
    return chunk


def usage_chunk(kind: str, rid: str, model: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict:
    """The last chunk of a stream with include_usage: no choices, the usage."""
    obj = "text_completion" if kind == "completion" else "chat.completion.chunk"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens), "system_fingerprint": None}


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "marlin-mlx"}]}


def sse(obj: Any) -> bytes:
    """One server-sent event carrying a JSON object."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def now() -> int:
    return int(time.time())
