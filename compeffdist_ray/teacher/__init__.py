"""Teacher generation with bounded retries for unparseable answers, on a Ray Data actor pool.

Rows in: `key` (str) and `messages` (a JSON list of chat messages). Rows out, one per key:
`raw` (the last answer), `parsed` (JSON of what the parser made of it, or null), `ok`,
`attempts`, `input_tokens` and `output_tokens` (summed over attempts), `finish_reason`,
`error` (why the row failed). A parser is a module-level function `text -> value | None`.

Backends: `transformers`, `openai` and `serve` run inside a stateful actor (one model load, HTTP
client or Serve deployment handle per actor); `vllm` is Ray's own `ray.data.llm` processor (GPU
clusters only).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from compeffdist_ray.config import TeacherConfig
from compeffdist_ray.errors import UserError
from compeffdist_ray.teacher.base import ChatBackend, Generation, GenParams, Messages

log = logging.getLogger("compeffdist_ray")

__all__ = [
    "ChatBackend",
    "Generation",
    "GenParams",
    "Messages",
    "make_backend",
    "generate_and_parse",
    "run_generation",
    "OUTPUT_COLUMNS",
]

Parser = Callable[[str], Any]

OUTPUT_COLUMNS = ["key", "raw", "parsed", "ok", "attempts", "input_tokens", "output_tokens", "finish_reason", "error"]


def gen_params(cfg: TeacherConfig, *, max_new_tokens: int | None = None, seed: int | None = None,
               retry: bool = False) -> GenParams:
    return GenParams(
        max_new_tokens=max_new_tokens or cfg.max_new_tokens,
        temperature=cfg.retry_temperature if retry else cfg.temperature,
        top_p=cfg.top_p,
        repetition_penalty=cfg.repetition_penalty,
        seed=seed,
    )


def make_backend(cfg: TeacherConfig) -> ChatBackend:
    """The in-process backend for `cfg` (transformers, openai, or serve: a handle to a running Serve app)."""
    if cfg.backend == "transformers":
        from compeffdist_ray.models import resolve_model
        from compeffdist_ray.teacher.transformers_backend import TransformersBackend, default_threads

        return TransformersBackend(
            resolve_model(cfg.model),
            dtype=cfg.dtype,
            max_prompt_tokens=cfg.max_prompt_tokens,
            chat_template_kwargs=cfg.chat_template_kwargs,
            threads=None if cfg.num_gpus else default_threads(cfg.num_cpus, cfg.concurrency),
        )
    if cfg.backend == "openai":
        from compeffdist_ray.teacher.openai_backend import OpenAIBackend

        o = cfg.openai
        return OpenAIBackend(
            base_url=o.base_url,
            model=cfg.served_model_name or cfg.model,
            api_key_env=o.api_key_env,
            timeout_s=o.timeout_s,
            max_retries=o.max_retries,
            backoff_s=o.backoff_s,
            max_concurrency=o.max_concurrency,
        )
    if cfg.backend == "serve":
        from compeffdist_ray.teacher.serve_backend import ServeBackend

        return ServeBackend(app_name=cfg.serve.app_name, model=cfg.served_model_name or cfg.model)
    raise ValueError(f"backend {cfg.backend!r} does not run in-process")


def _parse(parser: Parser, text: str) -> tuple[Any, str | None]:
    if not text:
        return None, "empty_answer"
    try:
        value = parser(text)
    except Exception as exc:  # a parser bug must not kill a stage: count the row instead
        return None, f"parser_error: {type(exc).__name__}"
    return (value, None) if value is not None else (None, "unparseable")


def _new_row(key: str) -> dict:
    return dict(key=key, raw="", parsed=None, ok=False, attempts=0, input_tokens=0, output_tokens=0,
                finish_reason="", error=None)


def _record(row: dict, gen: Generation, parser: Parser) -> bool:
    """Add one attempt's generation to `row`; True when its answer parsed."""
    row["attempts"] += 1
    row["input_tokens"] += gen.input_tokens
    row["output_tokens"] += gen.output_tokens
    row["raw"], row["finish_reason"] = gen.text, gen.finish_reason
    if gen.finish_reason == "error":
        row["error"] = f"teacher_error: {gen.error}"
        return False
    value, why = _parse(parser, gen.text)
    if why is not None:
        row["error"] = why
        return False
    row.update(parsed=json.dumps(value, ensure_ascii=False), ok=True, error=None)
    return True


def generate_and_parse(backend: ChatBackend, keys: list[str], conversations: list[Messages], parser: Parser,
                       cfg: TeacherConfig, *, max_new_tokens: int | None = None, seed: int = 0) -> list[dict]:
    """Generate for every conversation; re-ask (sampling) those whose answer does not parse."""
    n = len(conversations)
    rows = [_new_row(k) for k in keys]
    pending = list(range(n))
    for attempt in range(cfg.max_attempts):
        if not pending:
            break
        params = gen_params(cfg, max_new_tokens=max_new_tokens, seed=seed + attempt, retry=attempt > 0)
        gens = backend.generate([conversations[i] for i in pending], params)
        pending = [i for i, gen in zip(pending, gens) if not _record(rows[i], gen, parser)]
    return rows


class TeacherUDF:
    """A Ray Data callable class: one backend per actor, reused for every batch."""

    def __init__(self, teacher: TeacherConfig, parser: Parser, max_new_tokens: int | None, seed: int):
        self.cfg = teacher
        self.parser = parser
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.backend = make_backend(teacher)

    def __call__(self, batch):
        import pandas as pd

        conversations = [json.loads(m) for m in batch["messages"]]
        rows = generate_and_parse(self.backend, list(batch["key"]), conversations, self.parser, self.cfg,
                                  max_new_tokens=self.max_new_tokens, seed=self.seed)
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS)


def _empty_frame():
    import pandas as pd

    return pd.DataFrame(columns=OUTPUT_COLUMNS)


def run_generation(df, cfg: TeacherConfig, parser: Parser, *, max_new_tokens: int | None = None, seed: int = 0):
    """Run the teacher over a DataFrame of `key`, `messages` on Ray Data; return the output frame."""
    import ray

    from compeffdist_ray.actor_pool import in_input_order, map_on_actor_pool

    if len(df) == 0:
        return _empty_frame()
    if df["key"].duplicated().any():
        raise ValueError("run_generation needs unique keys")
    if cfg.backend == "vllm":
        num_blocks = max(1, min(len(df), -(-len(df) // cfg.batch_size)))
        ds = ray.data.from_pandas(df[["key", "messages"]]).repartition(num_blocks)
        return in_input_order(df, _run_vllm(ds, cfg, parser, max_new_tokens=max_new_tokens, seed=seed), "key",
                              "teacher generation")
    return map_on_actor_pool(
        df[["key", "messages"]], TeacherUDF, key="key", what="teacher generation",
        constructor_kwargs=dict(teacher=cfg, parser=parser, max_new_tokens=max_new_tokens, seed=seed),
        batch_size=cfg.batch_size, concurrency=cfg.concurrency, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus)


def _run_vllm(ds, cfg: TeacherConfig, parser: Parser, *, max_new_tokens: int | None, seed: int):
    """vLLM: one processor pass per attempt, re-asking only the rows whose answers failed."""
    import pandas as pd
    import ray

    from compeffdist_ray.models import resolve_model
    from compeffdist_ray.teacher.vllm_backend import build_vllm_processor

    source = resolve_model(cfg.model)
    frame = ds.to_pandas()
    results: dict[str, dict] = {}
    pending = frame
    for attempt in range(cfg.max_attempts):
        if pending.empty:
            break
        params = gen_params(cfg, max_new_tokens=max_new_tokens, seed=seed + attempt, retry=attempt > 0)
        processor = build_vllm_processor(cfg, source, params)
        gens = processor(ray.data.from_pandas(pending)).to_pandas()
        failed = []
        for g in gens.to_dict("records"):
            gen = Generation(g["text"], g["input_tokens"], g["output_tokens"], g["finish_reason"], g["error"])
            if not _record(results.setdefault(g["key"], _new_row(g["key"])), gen, parser):
                failed.append(g["key"])
        pending = frame[frame["key"].isin(failed)]
    return pd.DataFrame(list(results.values()), columns=OUTPUT_COLUMNS)


def check_backend(cfg: TeacherConfig) -> None:
    """Fail fast, before Ray work starts, on a teacher that cannot be reached or loaded."""
    if cfg.backend in ("transformers", "vllm"):
        from compeffdist_ray.models import resolve_model

        resolve_model(cfg.model)
    elif cfg.backend == "openai":
        if not cfg.openai.base_url.startswith(("http://", "https://")):
            raise UserError(f"teacher.openai.base_url {cfg.openai.base_url!r} must start with http:// or https://")
        backend = make_backend(cfg)
        try:
            backend.probe()
        finally:
            backend.close()
    elif cfg.backend == "serve":
        import ray

        # Without a Ray connection yet the app is looked up when the actors start (same error).
        if ray.is_initialized():
            from compeffdist_ray.teacher.serve_backend import get_teacher_handle

            get_teacher_handle(cfg.serve.app_name)
