"""Bring-your-own answers: `responses.file` feeds the difficulty and sampling stages directly
(no teacher, stages before responses skipped), with the warm-up turned off (the base student scores)."""

from __future__ import annotations

import json

import pytest

from conftest import CONFIGS

pytestmark = pytest.mark.integration


def test_answers_file_is_scored_and_sampled_without_a_teacher(ray_session, tmp_path):
    from compeffdist_ray.artifacts import RunDir
    from compeffdist_ray.config import load_config
    from compeffdist_ray.pipeline import run_pipeline

    instructions = ["Is the review positive or negative?", "Name the emotion of the text in one word.",
                    "Rate the intensity from 1 to 5."]
    rows = [{"instruction": instructions[i % 3], "text": f"text number {i}, it was {'good' if i % 2 else 'bad'}",
             "response": ["positive", "joy", "4"][i % 3] if i % 2 else ["negative", "anger", "2"][i % 3]}
            for i in range(24)]
    rows.append({"instruction": instructions[0], "text": "   ", "response": "positive"})  # dropped, counted
    path = tmp_path / "answers.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(CONFIGS / "tiny-test.yaml", [f"run_dir={tmp_path / 'run'}", f"responses.file={path}",
                                                   "warmup.enabled=false", "finetune.enabled=false"])
    statuses = run_pipeline(cfg)
    assert [(s.name, s.state) for s in statuses] == [("responses", "done"), ("warmup", "done"),
                                                     ("difficulty", "done"), ("sampling", "done"),
                                                     ("finetune", "done"), ("evaluate", "done")]
    m = {s.name: s.manifest for s in statuses}
    assert m["responses"].rows == 24 and m["responses"].dropped == {"empty_text": 1}
    assert m["responses"].tokens == {"input": 0, "output": 0}
    assert m["warmup"].stats == {"enabled": False} and m["finetune"].stats == {"enabled": False}
    assert m["difficulty"].stats["scorer"] == "tiny-random-llama"
    rd = RunDir(cfg.run_dir)
    scored = rd.read_df("difficulty", "difficulty")
    assert len(scored) == 24 and scored["task_id"].nunique() == 3
    kept = rd.read_df("sampling", "kept")
    assert kept["task_id"].value_counts().to_dict() == {t: 4 for t in scored["task_id"].unique()}
    assert not (tmp_path / "run" / "attributes").exists()
