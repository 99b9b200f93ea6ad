"""Unit tests for the pure core of stage 3 (compeffdist_ray.stages.tasks)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from compeffdist_ray.prompts import OUTPUT_STYLES
from compeffdist_ray.stages.tasks import (
    MAX_INSTRUCTION_WORDS,
    MIN_INSTRUCTION_WORDS,
    collect_tasks,
    demo_assignments,
    parse_demo_output,
    parse_task,
    select_perspectives,
    task_prompts,
)

INSTR = "Read the text and decide whether the writer's opinion of the service is positive, negative or neutral."


# ------------------------------------------------------------------------------------------
# parse_task
# ------------------------------------------------------------------------------------------


def test_parse_task_key_value_lines():
    text = f"Name: Service sentiment\nDescription: Judge how the writer feels about service.\nInstruction: {INSTR}"
    assert parse_task(text) == {
        "name": "Service sentiment",
        "description": "Judge how the writer feels about service.",
        "instruction": INSTR,
    }


def test_parse_task_markdown_and_multiline_instruction():
    text = (
        "Here is a task.\n**Task Name:** Irony detection.\n**Description:** Spot irony.\n"
        "**Instruction:** Read the text carefully.\nThen answer yes if it is ironic, otherwise no."
    )
    task = parse_task(text)
    assert task["name"] == "Irony detection"  # trailing period removed
    assert task["instruction"] == "Read the text carefully. Then answer yes if it is ironic, otherwise no."


def test_parse_task_json_with_instructions_key():
    text = '```json\n{"title": "Price talk", "desc": "About prices", "instructions": "' + INSTR + '"}\n```'
    assert parse_task(text) == {"name": "Price talk", "description": "About prices", "instruction": INSTR}


@pytest.mark.parametrize(
    "instruction, expected",
    [
        ("Read {text} and label its sentiment as positive or negative.",
         "Read the text and label its sentiment as positive or negative."),
        ("Read <user text> and label its sentiment as positive or negative.",
         "Read the text and label its sentiment as positive or negative."),
        ("Read [TEXT] and label its sentiment as positive or negative.",
         "Read the text and label its sentiment as positive or negative."),
        ("Given {input_text}, label its sentiment as positive or negative.",
         "Given the text, label its sentiment as positive or negative."),
    ],
)
def test_parse_task_placeholders_replaced(instruction, expected):
    task = parse_task(f"Name: X\nInstruction: {instruction}")
    assert task["instruction"] == expected
    assert "{" not in task["instruction"]


def test_parse_task_missing_name_and_description_filled_from_instruction():
    task = parse_task(f"Instruction: {INSTR} Then explain.")
    assert task["name"] == "Read the text and decide whether"
    assert task["description"] == INSTR.rstrip(".")
    assert task["instruction"] == f"{INSTR} Then explain."


def test_parse_task_name_capped_at_12_words():
    long_name = " ".join(f"w{i}" for i in range(20))
    task = parse_task(f"Name: {long_name}\nInstruction: {INSTR}")
    assert task["name"].split() == [f"w{i}" for i in range(12)]


def test_parse_task_too_short_instruction():
    assert parse_task("Name: X\nInstruction: Label it now.") is None  # 3 words
    assert parse_task("Name: X\nInstruction: one two three four") is None
    assert parse_task("Name: X\nInstruction: one two three four five")["instruction"] == "one two three four five"


def test_parse_task_too_long_instruction():
    def instr(n):
        return " ".join(f"w{i}" for i in range(n))

    assert parse_task(f"Name: X\nInstruction: {instr(MAX_INSTRUCTION_WORDS + 1)}") is None
    assert parse_task(f"Name: X\nInstruction: {instr(MAX_INSTRUCTION_WORDS)}")["instruction"] == instr(MAX_INSTRUCTION_WORDS)
    assert parse_task(f"Name: X\nInstruction: {instr(MIN_INSTRUCTION_WORDS - 1)}") is None
    assert parse_task(f"Name: X\nInstruction: {instr(MIN_INSTRUCTION_WORDS)}") is not None


def test_parse_task_degenerate_looping_instruction_rejected():
    looping = "Read the text and label it. " * 8  # 48 words, 6 distinct
    assert parse_task(f"Name: X\nInstruction: {looping}") is None
    varied = " ".join(f"w{i}" for i in range(30))
    assert parse_task(f"Name: X\nInstruction: {varied}") is not None


@pytest.mark.parametrize("text", ["Name: X\nDescription: only a description", "", "garbage without keys",
                                  '{"name": "x", "description": "y"}'])
def test_parse_task_missing_instruction(text):
    assert parse_task(text) is None


# ------------------------------------------------------------------------------------------
# parse_demo_output
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [("  positive \n", "positive"), ("5", "5"), ("Négatif.", "Négatif."),
                                            ("...", None), ("", None), ("  \n ", None), ("- ?", None)])
def test_parse_demo_output(text, expected):
    assert parse_demo_output(text) == expected


# ------------------------------------------------------------------------------------------
# collect_tasks
# ------------------------------------------------------------------------------------------


def _persp():
    return pd.DataFrame({"perspective_id": ["p0", "p1"], "name": ["service quality", "irony"],
                         "attributes": [["service", "waiter"], ["irony"]]})


def _task(instruction, name="n"):
    return json.dumps({"name": name, "description": "d", "instruction": instruction})


def test_collect_tasks_dedupes_within_a_perspective_only():
    gens = pd.DataFrame({
        "key": ["p0:0", "p0:1", "p0:2", "p1:0", "p1:1", "p0:3"],
        "ok": [True, True, True, True, False, True],
        "parsed": [_task("Label the service."), _task("label the SERVICE!!"), _task("Rate the waiter."),
                   _task("Label the service."), None, _task("  Label   the service ")],
    })
    tasks, dropped = collect_tasks(gens, _persp())
    assert dropped == {"duplicate_task": 2}
    assert [t["task_id"] for t in tasks] == ["p0-t00", "p0-t02", "p1-t00"]
    assert [t["perspective"] for t in tasks] == ["service quality", "service quality", "irony"]
    assert [t["perspective_id"] for t in tasks] == ["p0", "p0", "p1"]
    assert tasks[0]["instruction"] == "Label the service."  # the first one is kept
    assert tasks[1]["style"] == OUTPUT_STYLES[2]
    assert tasks[0]["style"] == OUTPUT_STYLES[0]
    assert {"name", "description", "instruction"} <= set(tasks[0])


def test_collect_tasks_style_cycles_and_ids_padded():
    k = len(OUTPUT_STYLES) + 1
    gens = pd.DataFrame({"key": [f"p1:{k}"], "ok": [True], "parsed": [_task("Say it.")]})
    tasks, dropped = collect_tasks(gens, _persp())
    assert dropped == {}
    assert tasks[0]["task_id"] == f"p1-t{k:02d}"
    assert tasks[0]["style"] == OUTPUT_STYLES[k % len(OUTPUT_STYLES)]


def test_collect_tasks_nothing_ok():
    gens = pd.DataFrame({"key": ["p0:0"], "ok": [False], "parsed": [None]})
    assert collect_tasks(gens, _persp()) == ([], {})


# ------------------------------------------------------------------------------------------
# demo_assignments
# ------------------------------------------------------------------------------------------


def test_demo_assignments_distinct_reproducible_and_from_corpus():
    text_ids = np.array([f"t{i}" for i in range(100)])
    tasks = [f"p0-t{i:02d}" for i in range(6)]
    a = demo_assignments(tasks, text_ids, 5, seed=3)
    b = demo_assignments(tasks, text_ids, 5, seed=3)
    assert a == b
    assert list(a) == tasks
    for ids in a.values():
        assert len(ids) == 5 and len(set(ids)) == 5
        assert set(ids) <= set(text_ids)
        assert all(isinstance(t, str) for t in ids)
    assert len({tuple(v) for v in a.values()}) > 1  # tasks do not all get the same texts
    assert demo_assignments(tasks, text_ids, 5, seed=4) != a


def test_demo_assignments_per_task_stream_independent_of_later_tasks():
    text_ids = np.array([f"t{i}" for i in range(50)])
    short = demo_assignments(["a", "b"], text_ids, 4, seed=0)
    longer = demo_assignments(["a", "b", "c"], text_ids, 4, seed=0)
    assert longer["a"] == short["a"] and longer["b"] == short["b"]


def test_demo_assignments_k_capped_by_corpus_size():
    text_ids = np.array(["x", "y", "z"])
    out = demo_assignments(["a", "b"], text_ids, 32, seed=0)
    for ids in out.values():
        assert sorted(ids) == ["x", "y", "z"]


# ------------------------------------------------------------------------------------------
# prompts per perspective
# ------------------------------------------------------------------------------------------


def test_task_prompts_one_per_perspective_and_index():
    df = task_prompts(_persp(), 3)
    assert list(df["key"]) == ["p0:0", "p0:1", "p0:2", "p1:0", "p1:1", "p1:2"]
    msgs = json.loads(df["messages"].iloc[1])
    last = msgs[-1]["content"]
    assert "service quality" in last and "waiter" in last and OUTPUT_STYLES[1] in last


def test_select_perspectives():
    p = _persp()
    assert len(select_perspectives(p, None)) == 2
    assert list(select_perspectives(p, 1)["perspective_id"]) == ["p0"]
