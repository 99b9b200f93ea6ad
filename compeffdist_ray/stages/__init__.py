"""The pipeline's stages, in order: the one list the CLI, the config and the runner share.

Each stage is a module with `inputs(cfg)`, `config_view(cfg)`, `run(ctx)` and `NEEDS_RAY`;
its pure logic lives in functions that take and return rows, and `run` does the I/O and Ray.
Later stages of the recipe (warmup, proxy, finetune, evaluate) are added here as they are built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["StageSpec", "STAGES", "STAGE_NAMES", "get_stage", "load_stage_module"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    summary: str


STAGES: tuple[StageSpec, ...] = (
    StageSpec("attributes", "compeffdist_ray.stages.attributes", "the teacher names sentiment attributes of user texts"),
    StageSpec("perspectives", "compeffdist_ray.stages.perspectives", "attributes embedded and clustered into perspectives"),
    StageSpec("tasks", "compeffdist_ray.stages.tasks", "the teacher invents tasks with demonstrations per perspective"),
    StageSpec("pairing", "compeffdist_ray.stages.pairing", "task instructions paired with user texts"),
    StageSpec("responses", "compeffdist_ray.stages.responses", "the teacher answers every (instruction, text) pair"),
    StageSpec("difficulty", "compeffdist_ray.stages.difficulty", "the student scores how hard each answered pair is"),
    StageSpec("sampling", "compeffdist_ray.stages.sampling", "the hardest samples kept, per instruction"),
)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)


def get_stage(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    from compeffdist_ray.errors import UserError

    raise UserError(f"unknown stage {name!r}; the stages are: {', '.join(STAGE_NAMES)}")


def load_stage_module(name: str):
    return importlib.import_module(get_stage(name).module)
