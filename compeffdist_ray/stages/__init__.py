"""The pipeline's stages, in order: the one list the CLI, the config and the runner share.

Each stage is a module with `inputs(cfg)`, `config_view(cfg)`, `run(ctx)` and `NEEDS_RAY`;
its pure logic lives in functions that take and return rows, and `run` does the I/O and Ray.
In proxy mode
(`filtering.proxy.enabled`) the run also goes through the stages marked `proxy_mode_only`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["StageSpec", "STAGES", "STAGE_NAMES", "active_stage_names", "get_stage", "load_stage_module"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    summary: str
    proxy_mode_only: bool = False  # runs only with filtering.proxy.enabled=true


STAGES: tuple[StageSpec, ...] = (
    StageSpec("attributes", "compeffdist_ray.stages.attributes", "the teacher names sentiment attributes of user texts"),
    StageSpec("perspectives", "compeffdist_ray.stages.perspectives", "attributes embedded and clustered into perspectives"),
    StageSpec("tasks", "compeffdist_ray.stages.tasks", "the teacher invents tasks with demonstrations per perspective"),
    StageSpec("pairing", "compeffdist_ray.stages.pairing", "task instructions paired with user texts"),
    StageSpec("responses", "compeffdist_ray.stages.responses", "the teacher answers every (instruction, text) pair; in proxy mode, "
              "only the seed pairs"),
    StageSpec("warmup", "compeffdist_ray.stages.warmup", "the student is fine-tuned briefly on a random subset"),
    StageSpec("difficulty", "compeffdist_ray.stages.difficulty", "the warmed-up student scores how hard each answered pair is"),
    StageSpec("proxy", "compeffdist_ray.stages.proxy", "a proxy predicts difficulty from (instruction, text) for every pair",
              proxy_mode_only=True),
    StageSpec("sampling", "compeffdist_ray.stages.sampling", "the hardest samples kept, per instruction"),
    StageSpec("kept_responses", "compeffdist_ray.stages.kept_responses", "the teacher answers the kept pairs only",
              proxy_mode_only=True),
    StageSpec("finetune", "compeffdist_ray.stages.finetune", "the student is fine-tuned on the kept samples"),
    StageSpec("evaluate", "compeffdist_ray.stages.evaluate", "SentiBench for the base and distilled students"),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def active_stage_names(cfg) -> tuple[str, ...]:
    """The stages a run with this config goes through, in order.

    Proxy mode adds two; answers from a file (`responses.file`) start the run at responses.
    """
    proxy = cfg.filtering.proxy.enabled
    names = [s.name for s in STAGES if proxy or not s.proxy_mode_only]
    if cfg.responses.file:
        names = names[names.index("responses"):]
    return tuple(names)


def get_stage(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    from compeffdist_ray.errors import UserError

    raise UserError(f"unknown stage {name!r}; the stages are: {', '.join(STAGE_NAMES)}")


def load_stage_module(name: str):
    return importlib.import_module(get_stage(name).module)
