"""Requests and responses of the served models, and their errors: pure (no Ray, no web framework).

Teacher: the OpenAI chat-completions subset a distillation teacher needs (`messages`,
`max_tokens` / `max_completion_tokens`, `temperature`, `top_p`, `seed`, `n=1`, and the
extension `repetition_penalty`); `stream`, `stop`, `tools`, `logprobs` and `n > 1` are refused
with a 4xx that says so. Proxy: `{"items": [{"instruction": ..., "text": ...}, ...]}` ->
`{"model": ..., "target": ..., "difficulties": [...]}` in the order of the items.

Every error is an :class:`ApiError` whose body is OpenAI's shape:
`{"error": {"message": ..., "type": ..., "code": ...}}`. Messages name the field, the value
received (its type or length, never a header) and the limit.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ApiError",
    "ChatRequest",
    "GenDefaults",
    "Limits",
    "chat_response",
    "difficulty_response",
    "error_body",
    "models_response",
    "validate_chat",
    "validate_difficulty",
]

ROLES = ("system", "user", "assistant")
UNSUPPORTED = {  # request fields this server does not implement: refused when set, never ignored
    "stream": "streaming is not supported: send \"stream\": false or leave it out",
    "stop": "stop sequences are not supported: leave \"stop\" out",
    "tools": "tool calls are not supported: leave \"tools\" out",
    "functions": "function calls are not supported: leave \"functions\" out",
    "logprobs": "logprobs are not supported: leave \"logprobs\" out",
}


class ApiError(Exception):
    """An HTTP error with an OpenAI-style body. `headers` are extra response headers."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return error_body(self.message, self.type, self.code)


def error_body(message: str, type: str, code: str | None) -> dict:
    return {"error": {"message": message, "type": type, "code": code}}


def unprocessable(message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(422, message, code=code)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (the `serve.limits` config section)."""

    max_body_bytes: int = 1_000_000
    max_messages: int = 64
    max_tokens: int = 4096
    max_batch_items: int = 256

    @classmethod
    def from_config(cls, limits) -> "Limits":
        return cls(max_body_bytes=limits.max_body_bytes, max_messages=limits.max_messages,
                   max_tokens=limits.max_tokens, max_batch_items=limits.max_batch_items)


@dataclass(frozen=True)
class GenDefaults:
    """Generation settings a request leaves out: the teacher config's (not OpenAI's) defaults."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 0.95
    repetition_penalty: float = 1.0

    @classmethod
    def from_teacher(cls, teacher, limits: Limits) -> "GenDefaults":
        return cls(max_tokens=min(teacher.max_new_tokens, limits.max_tokens), temperature=teacher.temperature,
                   top_p=teacher.top_p, repetition_penalty=teacher.repetition_penalty)


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple[tuple[str, str], ...]  # (role, content)
    max_tokens: int
    temperature: float
    top_p: float
    repetition_penalty: float
    seed: int | None = None

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one model batch and still get what they asked for.

        Greedy decoding (temperature 0) ignores top_p and seed, and a row of a left-padded batch
        continues the same as alone. A sampled request with a seed runs in a batch of its own (the
        seed sets the generator once per batch); sampled requests without a seed share by settings.
        """
        if self.temperature == 0:
            return ("greedy", self.max_tokens, self.repetition_penalty)
        if self.seed is not None:
            return ("seeded", id(self))
        return ("sampled", self.max_tokens, self.temperature, self.top_p, self.repetition_penalty)


def _type_name(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_model(body: dict, model_id: str) -> None:
    model = body.get("model")
    if model is None:
        return
    if not isinstance(model, str):
        raise unprocessable(f"'model' must be a string, got {_type_name(model)}")
    if model != model_id:
        raise ApiError(404, f"model {model[:100]!r} is not served here; this server has {model_id!r} "
                            "(GET /v1/models lists it)", type="invalid_request_error", code="model_not_found")


def _content(value: Any, i: int) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # OpenAI content parts: text parts only
        texts = []
        for j, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise unprocessable(f"messages[{i}].content[{j}] must be a text part {{\"type\": \"text\", "
                                    f"\"text\": ...}}; other parts (images, audio) are not supported")
            texts.append(part["text"])
        return "".join(texts)
    raise unprocessable(f"messages[{i}].content must be a string, got {_type_name(value)}")


def validate_chat(body: Any, limits: Limits, defaults: GenDefaults, model_id: str) -> ChatRequest:
    """A :class:`ChatRequest` from a parsed JSON body, or ApiError (400 unsupported, 404 model, 422 values)."""
    if not isinstance(body, dict):
        raise unprocessable(f"the request body must be a JSON object, got {_type_name(body)}")
    for key, why in UNSUPPORTED.items():
        if body.get(key) not in (None, False, [], ""):
            raise ApiError(400, why, code=f"unsupported_{key}")
    _check_model(body, model_id)
    n = body.get("n", 1)
    if n is not None and (not _is_int(n) or n != 1):
        raise unprocessable(f"'n' must be 1 (one choice per request), got {n!r}" if _is_int(n)
                            else f"'n' must be the integer 1, got {_type_name(n)}")
    messages = body.get("messages")
    if not isinstance(messages, list):
        got = f", got {_type_name(messages)}" if "messages" in body else ""
        raise unprocessable("'messages' is required: an array of {\"role\", \"content\"} objects" + got)
    if not messages:
        raise unprocessable("'messages' is empty; send at least one message")
    if len(messages) > limits.max_messages:
        raise unprocessable(f"'messages' has {len(messages)} messages; at most {limits.max_messages} are accepted "
                            "(serve.limits.max_messages)", code="too_many_messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise unprocessable(f"messages[{i}] must be an object with 'role' and 'content', got {_type_name(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise unprocessable(f"messages[{i}].role must be one of {', '.join(ROLES)}, got "
                                + (repr(role[:40]) if isinstance(role, str) else _type_name(role)))
        parsed.append((role, _content(m.get("content"), i)))
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = defaults.max_tokens
    elif not _is_int(max_tokens) or max_tokens < 1:
        raise unprocessable("'max_tokens' must be a positive integer, got "
                            + (repr(max_tokens) if _is_int(max_tokens) else _type_name(max_tokens)))
    elif max_tokens > limits.max_tokens:
        raise unprocessable(f"'max_tokens' is {max_tokens}; at most {limits.max_tokens} are accepted "
                            "(serve.limits.max_tokens)", code="max_tokens_too_large")
    temperature = _number(body, "temperature", defaults.temperature, 0.0, 2.0, "in [0, 2]")
    top_p = _number(body, "top_p", defaults.top_p, 0.0, 1.0, "in (0, 1]", open_low=True)
    penalty = _number(body, "repetition_penalty", defaults.repetition_penalty, 0.0, 10.0, "in (0, 10]",
                      open_low=True)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise unprocessable(f"'seed' must be an integer or null, got {_type_name(seed)}")
    return ChatRequest(tuple(parsed), int(max_tokens), float(temperature), float(top_p), float(penalty), seed)


def _number(body: dict, key: str, default: float, low: float, high: float, what: str, *,
            open_low: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not _is_num(value):
        raise unprocessable(f"'{key}' must be a number {what}, got {_type_name(value)}")
    if value > high or value < low or (open_low and value == low):
        raise unprocessable(f"'{key}' must be {what}, got {value!r}")
    return float(value)


def chat_response(model_id: str, text: str, prompt_tokens: int, completion_tokens: int, finish_reason: str,
                  *, created: int | None = None) -> dict:
    """An OpenAI `chat.completion` object with one choice and its token usage."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()) if created is None else created,
        "model": model_id,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def models_response(model_id: str, *, owned_by: str = "compeffdist", created: int = 0) -> dict:
    return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created, "owned_by": owned_by}]}


@dataclass(frozen=True)
class DifficultyRequest:
    instructions: tuple[str, ...]
    texts: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)


def validate_difficulty(body: Any, limits: Limits, model_id: str) -> DifficultyRequest:
    """A :class:`DifficultyRequest` from a parsed JSON body, or ApiError (404 model, 422 values)."""
    if not isinstance(body, dict):
        raise unprocessable(f"the request body must be a JSON object, got {_type_name(body)}")
    _check_model(body, model_id)
    items = body.get("items")
    if not isinstance(items, list):
        raise unprocessable("'items' is required: an array of {\"instruction\", \"text\"} objects"
                            + (f", got {_type_name(items)}" if "items" in body else ""))
    if not items:
        raise unprocessable("'items' is empty; send at least one {\"instruction\", \"text\"} object")
    if len(items) > limits.max_batch_items:
        raise unprocessable(f"'items' has {len(items)} items; at most {limits.max_batch_items} are accepted "
                            "(serve.limits.max_batch_items): split the request", code="too_many_items")
    instructions, texts = [], []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise unprocessable(f"items[{i}] must be an object with 'instruction' and 'text', got {_type_name(item)}")
        for key in ("instruction", "text"):
            if not isinstance(item.get(key), str):
                raise unprocessable(f"items[{i}].{key} must be a string, got {_type_name(item.get(key))}")
        if not item["text"].strip():
            raise unprocessable(f"items[{i}].text is empty")
        instructions.append(item["instruction"])
        texts.append(item["text"])
    return DifficultyRequest(tuple(instructions), tuple(texts))


def difficulty_response(model_id: str, target: str, values) -> dict:
    return {"object": "difficulty.list", "model": model_id, "target": target,
            "difficulties": [float(v) for v in values]}
