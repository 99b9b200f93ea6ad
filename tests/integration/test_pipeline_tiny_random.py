"""Stages 1-4 on local Ray with tiny random Llama / Qwen3 / Gemma 3 teachers.

Random weights answer random tokens: short random lines pass as attribute names, so the
attributes and perspectives stages complete, and no random answer is a usable task, so the
tasks stage must stop the run cleanly: a StageFailed naming the stage and the drop reasons, no
manifest (the stage is redone next time), every teacher answer kept for inspection.
"""

from __future__ import annotations

import pytest

from conftest import CONFIGS

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("alias", ["tiny-random-llama", "tiny-random-qwen3", "tiny-random-gemma3"])
def test_tiny_random_teacher_runs_until_tasks_then_stops_cleanly(ray_session, alias, tmp_path):
    from compeffdist_ray.artifacts import RunDir
    from compeffdist_ray.config import load_config
    from compeffdist_ray.pipeline import run_pipeline, stage_statuses
    from compeffdist_ray.stages._common import StageFailed

    cfg = load_config(CONFIGS / "tiny-test.yaml", [f"run_dir={tmp_path / 'run'}", f"teacher.model={alias}"])
    with pytest.raises(StageFailed, match=r"^tasks: none of \d+ task answers was a usable task \(unparseable \d+\)"):
        run_pipeline(cfg)
    rd = RunDir(cfg.run_dir)
    states = {s.name: s.state for s in stage_statuses(rd, cfg)}
    assert states == {"attributes": "done", "perspectives": "done", "tasks": "incomplete", "pairing": "waiting",
                      "responses": "waiting", "warmup": "waiting", "difficulty": "waiting", "sampling": "waiting",
                      "finetune": "waiting", "evaluate": "waiting"}
    attrs = rd.read_manifest("attributes")
    gens = rd.read_df("attributes", "generations")
    assert len(gens) == cfg.attributes.num_texts and gens["key"].is_unique
    assert int(gens["ok"].sum()) + sum(attrs.dropped.values()) == cfg.attributes.num_texts
    assert attrs.tokens["input"] == int(gens["input_tokens"].sum()) > 0
    task_gens = rd.read_df("tasks", "generations")
    n_persp = min(rd.read_manifest("perspectives").rows, cfg.tasks.max_perspectives)
    assert len(task_gens) == n_persp * cfg.tasks.tasks_per_perspective
    assert not task_gens["ok"].any() and (task_gens["attempts"] == cfg.teacher.max_attempts).all()
