"""The HTTP side of the served models, on Starlette/FastAPI only (no Ray): auth, body limits,
JSON parsing and OpenAI-style error responses, shared by every route of every app.

The order on a request is fixed: the bearer token first (401 before anything of the body is
read), then the declared and the real body size (413), then JSON (400), then the route's own
validation (422 / 400 / 404), then the model. Any failure becomes one JSON error; nothing the
client sent in its headers is ever echoed or logged.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import typing
from collections.abc import Awaitable, Callable
from typing import Any

from compeffdist_ray.serving.auth import bearer_ok
from compeffdist_ray.serving.protocol import ApiError, Limits

log = logging.getLogger("compeffdist_ray.serving")

__all__ = ["error_response", "handle_get", "handle_json", "install_error_handlers", "read_json",
           "require_bearer", "with_guard"]

REALM = 'Bearer realm="compeffdist"'


def error_response(exc: ApiError):
    from starlette.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)


def require_bearer(headers, digest: str) -> None:
    """ApiError 401 (with `WWW-Authenticate: Bearer`) unless the request carries the right token."""
    header = headers.get("authorization")
    if bearer_ok(header, digest):
        return
    if not header:
        raise ApiError(401, "missing bearer token: send the header 'Authorization: Bearer <token>' with the token "
                            "this server was started with", type="authentication_error", code="missing_api_key",
                       headers={"WWW-Authenticate": REALM})
    raise ApiError(401, "invalid bearer token: the 'Authorization: Bearer <token>' header does not carry the token "
                        "this server was started with", type="authentication_error", code="invalid_api_key",
                   headers={"WWW-Authenticate": f'{REALM}, error="invalid_token"'})


def too_large(size: int | str, limit: int) -> ApiError:
    return ApiError(413, f"the request body is {size} bytes; at most {limit} are accepted (serve.limits.max_body_bytes)",
                    code="request_too_large")


def check_declared_length(headers, limit: int) -> None:
    declared = headers.get("content-length")
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise ApiError(400, "the Content-Length header is not a number", code="invalid_content_length") from None
    if size > limit:
        raise too_large(size, limit)


async def read_json(request, max_bytes: int) -> Any:
    """The parsed JSON body, reading at most `max_bytes` (413 beyond, whatever Content-Length said)."""
    check_declared_length(request.headers, max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large(f"more than {max_bytes}", max_bytes)
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        raise ApiError(400, "the request body is empty; send a JSON object", code="invalid_json")
    try:
        return json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                       code="invalid_json") from None
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({type(exc).__name__})", code="invalid_json") from None


def internal_error() -> ApiError:
    return ApiError(500, "internal error while handling the request; the server log has the details",
                    type="server_error", code="internal_error")


async def handle_json(request, *, digest: str, limits: Limits, handler: Callable[[Any], Awaitable[dict]]):
    """A POST route: token, size, JSON, then `handler(body) -> dict`; every failure as a JSON error."""
    from starlette.responses import JSONResponse

    try:
        require_bearer(request.headers, digest)
        body = await read_json(request, limits.max_body_bytes)
        return JSONResponse(await handler(body))
    except ApiError as exc:
        return error_response(exc)
    except Exception:  # noqa: BLE001 - the replica answers 500 and stays up
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(internal_error())


async def handle_get(request, *, digest: str, handler: Callable[[], Awaitable[dict]]):
    from starlette.responses import JSONResponse

    try:
        require_bearer(request.headers, digest)
        return JSONResponse(await handler())
    except ApiError as exc:
        return error_response(exc)


def install_error_handlers(app) -> None:
    """Unknown routes, wrong methods and unexpected errors answer in the OpenAI error shape too."""
    from starlette.exceptions import HTTPException

    async def http_error(request, exc: HTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        message = (f"no route {request.method} {request.url.path}" if exc.status_code == 404 else
                   f"{request.method} is not allowed on {request.url.path}" if exc.status_code == 405 else
                   str(exc.detail))
        return error_response(ApiError(exc.status_code, message, type=kind, code=f"http_{exc.status_code}",
                                       headers=dict(exc.headers or {})))

    async def unexpected(request, exc: Exception):
        log.error("%s %s failed: %s", request.method, request.url.path, type(exc).__name__)
        return error_response(internal_error())

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


# --------------------------------------------------------------------------------------------
# Guarding methods of someone else's FastAPI ingress (Ray's OpenAI ingress on the vLLM path)
# --------------------------------------------------------------------------------------------


def with_guard(func: Callable, *, check_body: Callable[[Any, Any], None] | None = None,
               guard_attr: str = "_compeffdist_guard") -> Callable:
    """Wrap an async ingress method `(self, ...)` so that it checks the bearer token and the declared
    body size first (and `check_body(guard, body)` for a route with a `body` parameter).

    FastAPI reads the wrapper's signature: the method's own parameters plus one more of type
    `Request`, so the route keeps parsing its body as before. `self.<guard_attr>` must have
    `digest` and `limits`.
    """
    from starlette.requests import Request

    sig = inspect.signature(func)
    try:
        hints = typing.get_type_hints(func, include_extras=True)
    except Exception:  # noqa: BLE001 - unresolvable forward references: keep the raw annotations
        hints = {}
    params = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()]
    # FastAPI fills one parameter of type Request per route: reuse the method's own if it has one.
    own = next((p.name for p in params if inspect.isclass(p.annotation) and issubclass(p.annotation, Request)), None)
    extra = own or "_compeffdist_request"
    if own is None:
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
        params.insert(at, inspect.Parameter(extra, inspect.Parameter.KEYWORD_ONLY, annotation=Request))

    @functools.wraps(func)
    async def guarded(self, *args, **kwargs):
        request = kwargs[extra] if own else kwargs.pop(extra)
        guard = getattr(self, guard_attr)
        try:
            require_bearer(request.headers, guard.digest)
            check_declared_length(request.headers, guard.limits.max_body_bytes)
            if check_body is not None:
                body = kwargs.get("body", args[0] if args else None)
                check_body(guard, body)
        except ApiError as exc:
            return error_response(exc)
        return await func(self, *args, **kwargs)

    guarded.__signature__ = sig.replace(parameters=params)
    return guarded
