"""Unit tests for compeffdist_ray.stages._common: fingerprint views and drop/token counting."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from compeffdist_ray.artifacts import fingerprint
from compeffdist_ray.config import TeacherConfig
from compeffdist_ray.stages._common import generation_drops, generation_tokens, merge_counts, teacher_view

RESOURCE_KEYS = ["batch_size", "concurrency", "num_cpus", "num_gpus"]


def _keys(tree, prefix=""):
    for k, v in tree.items():
        where = f"{prefix}.{k}" if prefix else k
        yield where
        if isinstance(v, dict):
            yield from _keys(v, where)


def test_teacher_view_leaves_out_resource_keys_at_every_depth():
    view = teacher_view(TeacherConfig())
    keys = set(_keys(view))
    for k in RESOURCE_KEYS:
        assert k not in view
    for k in ("openai.max_concurrency", "openai.timeout_s", "openai.max_retries", "openai.backoff_s",
              "vllm.gpu_memory_utilization", "vllm.accelerator_type"):
        assert k not in keys, k


def test_teacher_view_keeps_what_changes_answers():
    cfg = TeacherConfig(model="m", temperature=0.3)
    view = teacher_view(cfg)
    for k in ("backend", "model", "temperature", "retry_temperature", "top_p", "repetition_penalty",
              "max_attempts", "max_new_tokens", "dtype", "max_prompt_tokens"):
        assert k in view, k
    assert view["model"] == "m" and view["temperature"] == 0.3
    assert view["vllm"]["tensor_parallel_size"] == 1
    assert view["openai"]["base_url"] == cfg.openai.base_url


def test_teacher_fingerprint_ignores_resizing_but_not_answers():
    base = TeacherConfig()
    resized = dataclasses.replace(base, batch_size=64, concurrency=4, num_cpus=8.0, num_gpus=1.0,
                                  openai=dataclasses.replace(base.openai, max_concurrency=32, timeout_s=5.0))
    assert fingerprint(teacher_view(resized)) == fingerprint(teacher_view(base))
    for changed in (dataclasses.replace(base, temperature=0.5), dataclasses.replace(base, model="other"),
                    dataclasses.replace(base, max_attempts=5)):
        assert fingerprint(teacher_view(changed)) != fingerprint(teacher_view(base))


def test_teacher_view_does_not_mutate_config():
    cfg = TeacherConfig()
    teacher_view(cfg)
    assert cfg.batch_size == TeacherConfig().batch_size and cfg.openai.max_concurrency == 8


def test_generation_drops_counts_failed_rows_by_reason_prefix():
    frame = pd.DataFrame({
        "ok": [True, False, False, False, False, True],
        "error": [None, "unparseable", "parser_error: KeyError", "parser_error: ValueError",
                  "teacher_error: timeout: 30s", None],
    })
    assert generation_drops(frame) == {"unparseable": 1, "parser_error": 2, "teacher_error": 1}
    assert generation_drops(frame, prefix="task_") == {
        "task_unparseable": 1, "task_parser_error": 2, "task_teacher_error": 1}


def test_generation_drops_failed_row_with_none_error_in_object_column_is_unknown():
    frame = pd.DataFrame({"ok": [False, False], "error": pd.Series([None, "unparseable"], dtype=object)})
    assert generation_drops(frame) == {"unknown": 1, "unparseable": 1}


def test_generation_drops_failed_row_with_missing_error_is_unknown():
    frame = pd.DataFrame([{"ok": False, "error": None}, {"ok": False, "error": "unparseable"}])
    assert generation_drops(frame) == {"unknown": 1, "unparseable": 1}


def test_generation_drops_all_ok_is_empty():
    assert generation_drops(pd.DataFrame({"ok": [True, True], "error": [None, None]})) == {}


def test_generation_tokens_sums_frames_and_skips_empty():
    a = pd.DataFrame({"input_tokens": [1, 2], "output_tokens": [3, 4]})
    b = pd.DataFrame({"input_tokens": [10], "output_tokens": [20]})
    empty = pd.DataFrame({"input_tokens": [], "output_tokens": []})
    assert generation_tokens(a, b, empty) == {"input": 13, "output": 27}
    assert generation_tokens() == {"input": 0, "output": 0}
    assert all(type(v) is int for v in generation_tokens(a).values())


def test_merge_counts():
    assert merge_counts({"a": 1}, {"a": 2, "b": 1}, {}) == {"a": 3, "b": 1}
    assert merge_counts() == {}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TeacherConfig)])
def test_every_teacher_field_is_either_kept_or_a_resource_key(field):
    view = teacher_view(TeacherConfig())
    assert (field in view) != (field in RESOURCE_KEYS)
