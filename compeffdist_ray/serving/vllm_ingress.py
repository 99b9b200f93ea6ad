"""The GPU path's ingress: Ray Serve LLM's OpenAI ingress, with this project's bearer token and limits.

`ray.serve.llm.build_openai_app` accepts an ingress class (`ingress_cls_config.ingress_cls`):
this one subclasses Ray's `OpenAiIngress` and wraps every route Ray defines for it so that the
token is checked first (401 with `WWW-Authenticate: Bearer`), then the declared body size (413),
and, on chat completions, the message count and `max_tokens` (422), with the same error bodies as
the CPU app. The teacher config's chat-template arguments (e.g. Qwen3's `enable_thinking: false`)
and repetition penalty are filled in where a request leaves them out.

Imported only by Ray Serve LLM on a GPU cluster (the module needs `ray[llm]`, i.e. vLLM); this
project's CPU machines cannot import it, so it is kept to the wrapping. Refuses to build (fail
closed) if Ray's ingress has a route that is not wrapped.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from ray.llm._internal.serve.core.ingress import ingress as _ray_ingress  # noqa: F401 - the route list
from ray.serve.llm.ingress import OpenAiIngress

from compeffdist_ray.serving.protocol import Limits, unprocessable
from compeffdist_ray.serving.web import with_guard

__all__ = ["TokenOpenAiIngress"]

_ROUTES = tuple(_ray_ingress.DEFAULT_ENDPOINTS)  # every method Ray's builder turns into a route


def _check_chat(guard, body: Any) -> None:
    messages = getattr(body, "messages", None) or []
    if len(messages) > guard.limits.max_messages:
        raise unprocessable(f"'messages' has {len(messages)} messages; at most {guard.limits.max_messages} are "
                            "accepted (serve.limits.max_messages)", code="too_many_messages")
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(body, name, None)
        if value is not None and value > guard.limits.max_tokens:
            raise unprocessable(f"'{name}' is {value}; at most {guard.limits.max_tokens} are accepted "
                                "(serve.limits.max_tokens)", code="max_tokens_too_large")
    if getattr(body, "chat_template_kwargs", None) is None and guard.chat_template_kwargs:
        body.chat_template_kwargs = dict(guard.chat_template_kwargs)
    if getattr(body, "repetition_penalty", 0) is None:
        body.repetition_penalty = guard.repetition_penalty


def _wrapped_routes() -> dict:
    out = {}
    for name in _ROUTES:
        method = getattr(OpenAiIngress, name, None)
        if method is None:
            raise RuntimeError(f"Ray's OpenAiIngress has no method {name!r} for one of its routes; this ingress "
                               "does not know how to guard it (check the installed ray[llm] version)")
        out[name] = with_guard(method, check_body=_check_chat if name == "chat" else None)
    return out


class TokenOpenAiIngress(OpenAiIngress):
    def __init__(self, llm_deployments, model_cards, *, compeffdist_guard: dict, **kwargs):
        super().__init__(llm_deployments, model_cards, **kwargs)
        self._compeffdist_guard = SimpleNamespace(
            digest=compeffdist_guard["digest"], limits=Limits(**compeffdist_guard["limits"]),
            chat_template_kwargs=compeffdist_guard.get("chat_template_kwargs") or {},
            repetition_penalty=compeffdist_guard.get("repetition_penalty"))


for _name, _method in _wrapped_routes().items():
    setattr(TokenOpenAiIngress, _name, _method)
