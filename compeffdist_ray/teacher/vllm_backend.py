"""Teacher generation on GPUs with vLLM through Ray's own `ray.data.llm` processor.

This path cannot run on the CPU machines the project is developed and tested on (vLLM needs a
CUDA GPU and `ray.data.llm` asks for tp*pp GPUs per replica); only the construction of its
config is tested. Install the GPU extra on a GPU cluster: `pip install 'compeffdist-ray[gpu]'`.
"""

from __future__ import annotations

from typing import Any

from compeffdist_ray.config import TeacherConfig
from compeffdist_ray.errors import require
from compeffdist_ray.teacher.base import GenParams

__all__ = ["build_vllm_config", "build_vllm_processor", "vllm_engine_kwargs"]


def vllm_engine_kwargs(cfg: TeacherConfig) -> dict[str, Any]:
    """vLLM engine arguments of the teacher (`teacher.vllm`, `teacher.dtype`): the same for the
    pipeline's Ray Data processor and for the teacher served with Ray Serve LLM."""
    v = cfg.vllm
    engine_kwargs: dict[str, Any] = {
        "tensor_parallel_size": v.tensor_parallel_size,
        "pipeline_parallel_size": v.pipeline_parallel_size,
        "max_model_len": v.max_model_len,
        "gpu_memory_utilization": v.gpu_memory_utilization,
    }
    if cfg.dtype != "auto":
        engine_kwargs["dtype"] = cfg.dtype
    engine_kwargs.update(v.engine_kwargs)
    return engine_kwargs


def build_vllm_config(cfg: TeacherConfig, model_source: str):
    """The `vLLMEngineProcessorConfig` for `cfg` (builds without vLLM installed)."""
    llm = require("ray.data.llm", package="ray[llm]", extra="gpu", purpose="the vllm teacher backend")
    kwargs: dict[str, Any] = dict(
        model_source=model_source,
        engine_kwargs=vllm_engine_kwargs(cfg),
        batch_size=cfg.batch_size,
        concurrency=cfg.concurrency,
        should_continue_on_error=True,  # a bad row is counted and dropped, never fails the stage
    )
    if cfg.chat_template_kwargs:
        kwargs["chat_template_stage"] = {"enabled": True, "chat_template_kwargs": dict(cfg.chat_template_kwargs)}
    if cfg.vllm.accelerator_type:
        kwargs["accelerator_type"] = cfg.vllm.accelerator_type
    return llm.vLLMEngineProcessorConfig(**kwargs)


def _sampling_params(params: GenParams) -> dict[str, Any]:
    out: dict[str, Any] = {
        "max_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "repetition_penalty": params.repetition_penalty,
    }
    if params.temperature > 0:
        out["top_p"] = params.top_p
    if params.seed is not None:
        out["seed"] = params.seed
    return out


def build_vllm_processor(cfg: TeacherConfig, model_source: str, params: GenParams):
    """A processor mapping rows with `key` and `messages` (JSON) to generation columns."""
    import json

    llm = require("ray.data.llm", package="ray[llm]", extra="gpu", purpose="the vllm teacher backend")
    sampling = _sampling_params(params)

    def preprocess(row: dict) -> dict:
        return dict(row, messages=json.loads(row["messages"]), sampling_params=sampling)

    def postprocess(row: dict) -> dict:
        error = row.get("__inference_error__") or None
        n_out = int(row.get("num_generated_tokens") or 0)
        return {
            "key": row["key"],
            "text": (row.get("generated_text") or "").strip(),
            "input_tokens": int(row.get("num_input_tokens") or 0),
            "output_tokens": n_out,
            "finish_reason": "error" if error else ("length" if n_out >= params.max_new_tokens else "stop"),
            "error": error,
        }

    return llm.build_processor(build_vllm_config(cfg, model_source), preprocess=preprocess, postprocess=postprocess)
