"""The Ray Serve side: the teacher and proxy deployments (FastAPI ingress) and the app builders.

Thin by design: request handling is `web.py` + `protocol.py`, the teacher engine is the
pipeline's own `TransformersBackend` (made by `compeffdist_ray.teacher.make_backend`), the proxy
is `compeffdist_ray.proxy.load_proxy`'s model. What lives here is the Serve wiring: one
deployment per app with `num_replicas`, per-replica CPUs/GPUs and `max_ongoing_requests` from
the `serve` config section, and `@serve.batch` merging concurrent requests into model batches.

Each deployment is also callable through a `DeploymentHandle` without HTTP (`generate` on the
teacher, `predict` on the proxy): the pipeline's `serve` teacher backend uses that. Handle calls
skip the bearer token (they need access to the Ray cluster itself, which Ray's own token auth
guards) but not the validation, the limits or the batching.
"""

# No `from __future__ import annotations` here: FastAPI reads the route methods' annotations
# (`request: Request`) after Serve has rewritten them into class-based views, and strings would
# not resolve there.

import asyncio
import dataclasses
import logging
import threading
from typing import Any

from fastapi import FastAPI, Request
from ray import serve

from compeffdist_ray.config import Config, ServeConfig, TeacherConfig, load_config
from compeffdist_ray.errors import UserError, require
from compeffdist_ray.serving.auth import resolve_token
from compeffdist_ray.serving.deploy import (
    llm_serving_args,
    parse_proxy_args,
    parse_teacher_args,
    resolve_proxy_model,
    served_model_id,
)
from compeffdist_ray.serving.protocol import (
    ApiError,
    ChatRequest,
    DifficultyRequest,
    GenDefaults,
    Limits,
    chat_response,
    difficulty_response,
    models_response,
    validate_chat,
    validate_difficulty,
)
from compeffdist_ray.serving.web import handle_get, handle_json, install_error_handlers

log = logging.getLogger("compeffdist_ray.serving")

__all__ = ["ProxyServer", "TeacherServer", "build_proxy_app", "build_teacher_app", "proxy_app", "teacher_app"]

SERVABLE_BACKENDS = ("transformers", "vllm")


def _api(title: str) -> FastAPI:
    app = FastAPI(title=title, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    return app


def _handle_error(exc: ApiError) -> dict:
    """What a handle call gets instead of an HTTP error: the same body, plus the status."""
    return {**exc.body(), "status": exc.status}


class _BatchLog:
    """Sizes of the batches a replica ran (requests per @serve.batch call, rows per model call)."""

    def __init__(self, keep: int = 1000):
        self.keep = keep
        self.lock = threading.Lock()
        self.requests: list[int] = []
        self.model_calls: list[int] = []

    def add(self, kind: str, n: int) -> None:
        with self.lock:
            seq = getattr(self, kind)
            seq.append(n)
            del seq[: max(0, len(seq) - self.keep)]

    def snapshot(self) -> dict:
        with self.lock:
            return {"requests_per_batch": list(self.requests), "rows_per_model_call": list(self.model_calls)}


# --------------------------------------------------------------------------------------------
# Teacher
# --------------------------------------------------------------------------------------------

teacher_api = _api("compeffdist teacher")


@serve.ingress(teacher_api)
class TeacherServer:
    """OpenAI-compatible chat completions from the pipeline's transformers teacher engine."""

    def __init__(self, teacher: TeacherConfig, serve_cfg: ServeConfig, token_digest: str, model_id: str):
        from compeffdist_ray.teacher import make_backend

        engine = dataclasses.replace(teacher, backend="transformers", num_cpus=serve_cfg.num_cpus,
                                     num_gpus=serve_cfg.num_gpus, concurrency=serve_cfg.num_replicas)
        self.backend = make_backend(engine)
        self.model_id = model_id
        self.digest = token_digest
        self.limits = Limits.from_config(serve_cfg.limits)
        self.defaults = GenDefaults.from_teacher(teacher, self.limits)
        self.batches = _BatchLog()
        self._generate_batch.set_max_batch_size(serve_cfg.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(serve_cfg.batch_wait_timeout_s)

    @teacher_api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.model_id}

    @teacher_api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_id}

    @teacher_api.get("/v1/models")
    async def http_models(self, request: Request):
        return await handle_get(request, digest=self.digest, handler=self._models)

    @teacher_api.post("/v1/chat/completions")
    async def http_chat(self, request: Request):
        return await handle_json(request, digest=self.digest, limits=self.limits, handler=self._chat)

    async def _models(self) -> dict:
        return models_response(self.model_id)

    async def _chat(self, body: Any) -> dict:
        req = validate_chat(body, self.limits, self.defaults, self.model_id)
        gen = await self._generate_batch(req)
        if gen.finish_reason == "error":
            raise ApiError(500, f"generation failed ({gen.error}); the server log has the details",
                           type="server_error", code="generation_failed")
        return chat_response(self.model_id, gen.text, gen.input_tokens, gen.output_tokens, gen.finish_reason)

    async def generate(self, body: dict) -> dict:
        """A chat completion through a DeploymentHandle: the same body and answer as over HTTP;
        an invalid request gets the error body with its `status` instead of an exception."""
        try:
            return await self._chat(body)
        except ApiError as exc:
            return _handle_error(exc)

    def stats(self) -> dict:
        return self.batches.snapshot()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _generate_batch(self, requests: list[ChatRequest]):
        self.batches.add("requests", len(requests))
        return await asyncio.to_thread(self._run_batch, requests)

    def _run_batch(self, requests: list[ChatRequest]):
        """One model call per group of requests that may share a batch (`ChatRequest.batch_key`)."""
        from compeffdist_ray.teacher.base import Generation, GenParams

        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.batch_key(), []).append(i)
        out: list[Any] = [None] * len(requests)
        for rows in groups.values():
            first = requests[rows[0]]
            params = GenParams(max_new_tokens=first.max_tokens, temperature=first.temperature, top_p=first.top_p,
                               repetition_penalty=first.repetition_penalty, seed=first.seed)
            try:
                gens = self.backend.generate([requests[i].message_dicts() for i in rows], params)
            except Exception as exc:  # noqa: BLE001 - the requests fail, the replica stays up
                log.exception("teacher generation failed for a batch of %d", len(rows))
                gens = [Generation("", 0, 0, "error", type(exc).__name__) for _ in rows]
            self.batches.add("model_calls", len(rows))
            for i, gen in zip(rows, gens):
                out[i] = gen
        return out


def teacher_app(cfg: Config, *, token_digest: str):
    """The teacher as a Serve application (not yet running): transformers on CPU/GPU, or vLLM."""
    backend = cfg.teacher.backend
    if backend == "vllm":
        return _vllm_teacher_app(cfg, token_digest)
    if backend != "transformers":
        raise UserError(f"teacher.backend={backend} cannot be served: 'compeffdist serve teacher' runs the "
                        "transformers engine (CPU or GPU) or vLLM (GPUs); set teacher.backend=transformers or vllm")
    s = cfg.serve
    deployment = serve.deployment(
        TeacherServer, name="TeacherServer", num_replicas=s.num_replicas, max_ongoing_requests=s.max_ongoing_requests,
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus})
    return deployment.bind(cfg.teacher, cfg.serve, token_digest, served_model_id(cfg.teacher))


def _vllm_teacher_app(cfg: Config, token_digest: str):
    """Ray Serve LLM's own OpenAI app (vLLM engine replicas), behind an ingress that checks the token.

    GPU clusters only; not run in this project's tests (vLLM needs CUDA), only its arguments are.
    """
    from compeffdist_ray.models import resolve_model

    llm = require("ray.serve.llm", package="ray[llm]", extra="gpu", purpose="serving the teacher with vLLM")
    source = resolve_model(cfg.teacher.model)
    return llm.build_openai_app(llm_serving_args(cfg.teacher, cfg.serve, source, token_digest))


def build_teacher_app(args: dict | None = None):
    """Serve application builder (`import_path: compeffdist_ray.serving:build_teacher_app`).

    args: `config` (pipeline config YAML path; default: the embedded defaults), `overrides` (a list
    of `key.path=value`). The bearer token comes from `serve.token_env` or `serve.token_file`.
    """
    config, overrides = parse_teacher_args(args)
    cfg = load_config(config, overrides)
    token = resolve_token(cfg.serve.token_env, cfg.serve.token_file)
    log.info("teacher app: bearer token from %s", token.source)
    return teacher_app(cfg, token_digest=token.digest)


# --------------------------------------------------------------------------------------------
# Proxy difficulty model
# --------------------------------------------------------------------------------------------

proxy_api = _api("compeffdist proxy difficulty model")


def localize_proxy(model: str) -> str:
    """A local directory holding the proxy: `model` itself, or a copy of a URI's proxy in the cache."""
    if "://" not in model:
        return model
    import hashlib
    import shutil
    import uuid

    import pyarrow.fs as pafs

    from compeffdist_ray.models import cache_dir
    from compeffdist_ray.proxy import PROXY_CONFIG, is_proxy_dir

    fs, path = pafs.FileSystem.from_uri(model)
    for candidate in (path, f"{path}/proxy/model"):
        if fs.get_file_info(f"{candidate}/{PROXY_CONFIG}").type == pafs.FileType.File:
            break
    else:
        raise UserError(f"{model} holds no proxy ({PROXY_CONFIG} neither in it nor in its proxy/model); give a "
                        "proxy-mode run directory or its proxy/model")
    dest = cache_dir() / "serve" / f"proxy-{hashlib.sha1(model.encode()).hexdigest()[:12]}"
    if is_proxy_dir(dest):
        return str(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    pafs.copy_files(candidate, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    if is_proxy_dir(dest):  # another replica on this node was quicker
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        tmp.rename(dest)
    return str(dest)


@serve.ingress(proxy_api)
class ProxyServer:
    """Predicted difficulty of (instruction, text) pairs from a trained proxy (compeffdist_ray.proxy)."""

    def __init__(self, model: str, model_id: str, serve_cfg: ServeConfig, token_digest: str):
        from compeffdist_ray.proxy import load_proxy

        device = "cuda" if serve_cfg.num_gpus > 0 else "cpu"
        self.proxy = load_proxy(localize_proxy(model), device=device)
        self.model_id = model_id
        self.digest = token_digest
        self.limits = Limits.from_config(serve_cfg.limits)
        self.batches = _BatchLog()
        self._predict_batch.set_max_batch_size(serve_cfg.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(serve_cfg.batch_wait_timeout_s)

    @proxy_api.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.model_id}

    @proxy_api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "model": self.model_id}

    @proxy_api.get("/v1/models")
    async def http_models(self, request: Request):
        return await handle_get(request, digest=self.digest, handler=self._models)

    @proxy_api.post("/v1/difficulty")
    async def http_difficulty(self, request: Request):
        return await handle_json(request, digest=self.digest, limits=self.limits, handler=self._difficulty)

    async def _models(self) -> dict:
        return models_response(self.model_id)

    async def _difficulty(self, body: Any) -> dict:
        req = validate_difficulty(body, self.limits, self.model_id)
        values = await self._predict_batch(req)
        if isinstance(values, str):
            raise ApiError(500, f"prediction failed ({values}); the server log has the details", type="server_error",
                           code="prediction_failed")
        return difficulty_response(self.model_id, self.proxy.target, values)

    async def predict(self, body: dict) -> dict:
        """Difficulties through a DeploymentHandle (same body and answer as over HTTP)."""
        try:
            return await self._difficulty(body)
        except ApiError as exc:
            return _handle_error(exc)

    def stats(self) -> dict:
        return self.batches.snapshot()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    async def _predict_batch(self, requests: list[DifficultyRequest]):
        self.batches.add("requests", len(requests))
        return await asyncio.to_thread(self._run_batch, requests)

    def _run_batch(self, requests: list[DifficultyRequest]):
        """All items of the batch's requests in one predict call (rows of one instruction share a prefix)."""
        instructions = [i for r in requests for i in r.instructions]
        texts = [t for r in requests for t in r.texts]
        try:
            values = self.proxy.predict(instructions, texts).tolist()
        except Exception as exc:  # noqa: BLE001 - the requests fail, the replica stays up
            log.exception("proxy prediction failed for %d rows", len(texts))
            return [type(exc).__name__] * len(requests)
        self.batches.add("model_calls", len(texts))
        out, start = [], 0
        for r in requests:
            out.append(values[start:start + len(r)])
            start += len(r)
        return out


def proxy_app(model: str, cfg: Config, *, token_digest: str, model_id: str | None = None):
    """The proxy as a Serve application (not yet running); `model` is checked first (UserError)."""
    path, default_id = resolve_proxy_model(model)
    s = cfg.serve
    deployment = serve.deployment(
        ProxyServer, name="ProxyServer", num_replicas=s.num_replicas, max_ongoing_requests=s.max_ongoing_requests,
        ray_actor_options={"num_cpus": s.num_cpus, "num_gpus": s.num_gpus})
    return deployment.bind(path, model_id or default_id, cfg.serve, token_digest)


def build_proxy_app(args: dict | None = None):
    """Serve application builder (`import_path: compeffdist_ray.serving:build_proxy_app`).

    args: `model` (a run directory with proxy/model, or a proxy model directory; local or a
    pyarrow URI), optional `config` and `overrides` for the `serve` section.
    """
    model, config, overrides = parse_proxy_args(args)
    cfg = load_config(config, overrides)
    token = resolve_token(cfg.serve.token_env, cfg.serve.token_file)
    log.info("proxy app: bearer token from %s", token.source)
    return proxy_app(model, cfg, token_digest=token.digest)
