"""Teacher generation through any OpenAI-compatible chat-completions endpoint.

Works with a vLLM server, a Ray Serve deployment or a hosted API. Requests run concurrently
(bounded), failed requests are retried with exponential backoff and jitter, and token counts
come from the response's `usage` (or are left at 0 when the server sends none).
"""

from __future__ import annotations

import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

from compeffdist_ray.errors import UserError
from compeffdist_ray.teacher.base import Generation, GenParams, Messages

__all__ = ["OpenAIBackend"]

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_FATAL_STATUS = {401: "unauthorized: set the API key in the variable {env}",
                 403: "forbidden: the key in {env} is not allowed to use this model",
                 404: "not found: check teacher.openai.base_url (it should end with /v1) and the model name"}


def _top_logprobs(choice: dict) -> list[dict[str, float]] | None:
    """Per generated token, {token: logprob} of its alternatives, from a chat choice's ``logprobs``."""
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice.get("logprobs"), dict) else None
    if not isinstance(content, list) or not content:
        return None
    out = []
    for item in content:
        alts = {}
        for alt in (item.get("top_logprobs") or []) if isinstance(item, dict) else []:
            if isinstance(alt, dict) and isinstance(alt.get("token"), str) and isinstance(alt.get("logprob"), (int, float)):
                alts[alt["token"]] = max(float(alt["logprob"]), alts.get(alt["token"], float("-inf")))
        if isinstance(item, dict) and isinstance(item.get("token"), str) and isinstance(item.get("logprob"), (int, float)):
            alts.setdefault(item["token"], float(item["logprob"]))
        out.append(alts)
    return out


class OpenAIBackend:
    def __init__(self, *, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 120.0, max_retries: int = 4, backoff_s: float = 1.0,
                 max_concurrency: int = 8, api_key: str | None = None):
        import httpx

        self.base_url = base_url.rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key_env = api_key_env
        key = api_key if api_key is not None else os.environ.get(api_key_env, "")  # given, or from the environment
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(headers=headers, timeout=timeout_s,
                                   limits=httpx.Limits(max_connections=max_concurrency))
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.pool = ThreadPoolExecutor(max_workers=max_concurrency)
        self.requests_sent = 0
        self.retries = 0
        self.logprobs_refused = False  # the server answered 4xx to a request with logprobs

    def _one(self, messages: Messages, params: GenParams) -> Generation:
        import httpx

        body = {
            "model": self.model,
            "messages": messages,
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
        }
        if params.temperature > 0:
            body["top_p"] = params.top_p
        if params.seed is not None:
            body["seed"] = params.seed
        if params.top_logprobs and not self.logprobs_refused:
            body["logprobs"] = True
            body["top_logprobs"] = params.top_logprobs
        last_error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                self.retries += 1
                time.sleep(self.backoff_s * (2 ** (attempt - 1)) * (0.5 + random.random()))
            try:
                self.requests_sent += 1
                resp = self.client.post(self.url, json=body)
                if resp.status_code in (400, 422) and "logprobs" in body and "logprobs" in resp.text.lower():
                    # a server that does not do logprobs: ask again without them, and stop asking
                    self.logprobs_refused = True
                    body.pop("logprobs")
                    body.pop("top_logprobs", None)
                    self.requests_sent += 1
                    resp = self.client.post(self.url, json=body)
            except httpx.HTTPError as exc:  # connection refused, timeouts, protocol errors
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            self._raise_if_fatal(resp.status_code)
            if resp.status_code in _RETRY_STATUS:
                last_error = f"HTTP {resp.status_code}"
                continue
            if resp.status_code >= 400:
                return Generation("", 0, 0, "error", f"HTTP {resp.status_code}: {resp.text[:200]}")
            try:
                data = resp.json()
                choice = data["choices"][0]
                text = choice["message"]["content"] or ""
            except (ValueError, KeyError, IndexError, TypeError):
                last_error = "malformed response body"
                continue
            usage = data.get("usage") or {}
            finish = choice.get("finish_reason") or "stop"
            return Generation(
                text=text.strip(),
                input_tokens=int(usage.get("prompt_tokens") or 0),
                output_tokens=int(usage.get("completion_tokens") or 0),
                finish_reason="length" if finish == "length" else "stop",
                top_logprobs=_top_logprobs(choice) if "logprobs" in body else None,
            )
        return Generation("", 0, 0, "error", last_error)

    def probe(self) -> None:
        """One 1-token request: UserError if the endpoint is unreachable or refuses us."""
        import httpx

        body = {"model": self.model, "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
        try:
            resp = self.client.post(self.url, json=body)
        except httpx.HTTPError as exc:
            raise UserError(
                f"teacher endpoint {self.url} is unreachable ({type(exc).__name__}); start the server or fix "
                "teacher.openai.base_url"
            ) from None
        self._raise_if_fatal(resp.status_code)

    def list_models(self) -> list[str]:
        """The model ids of the endpoint's ``GET /models``; UserError if unreachable or refused."""
        import httpx

        url = self.base_url + "/models"
        try:
            resp = self.client.get(url)
        except httpx.HTTPError as exc:
            raise UserError(f"endpoint {url} is unreachable ({type(exc).__name__}); start the server or fix the "
                            f"URL (it should end with /v1)") from None
        self._raise_if_fatal(resp.status_code, url)
        try:
            data = resp.json()["data"]
            return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"endpoint {url} answered {resp.status_code} without an OpenAI model list "
                            f"(is it an OpenAI-compatible server? the URL should end with /v1)") from None

    def _raise_if_fatal(self, status: int, url: str | None = None) -> None:
        """Statuses no retry can fix (bad key, wrong URL or model) stop the run with one line."""
        if status in _FATAL_STATUS:
            raise UserError(f"teacher endpoint {url or self.url} answered {status} "
                            + _FATAL_STATUS[status].format(env=self.api_key_env))

    def generate(self, conversations: list[Messages], params: GenParams) -> list[Generation]:
        return list(self.pool.map(lambda m: self._one(m, params), conversations))

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.client.close()
