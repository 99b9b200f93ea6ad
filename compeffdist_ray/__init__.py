"""compeffdist-ray: COMPEFFDIST distillation of small sentiment-analysis students, on Ray.

`import compeffdist_ray` is light (no torch, ray or transformers): heavy packages are imported
by the functions that need them. Entry points: the `compeffdist` command (`compeffdist_ray.cli`),
`load_config`, `run_pipeline` and `run_one_stage`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load_config", "run_pipeline", "run_one_stage", "STAGE_NAMES"]


def __getattr__(name: str):
    if name == "load_config":
        from compeffdist_ray.config import load_config

        return load_config
    if name in ("run_pipeline", "run_one_stage"):
        from compeffdist_ray import pipeline

        return getattr(pipeline, name)
    if name == "STAGE_NAMES":
        from compeffdist_ray.stages import STAGE_NAMES

        return STAGE_NAMES
    raise AttributeError(f"module 'compeffdist_ray' has no attribute {name!r}")
