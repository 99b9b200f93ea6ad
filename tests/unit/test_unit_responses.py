"""The responses stage's pure parts: the shared prompt and the assembly of answers."""

from __future__ import annotations

import json

import pandas as pd

from compeffdist_ray.prompts import answer_messages, instruction_with_demonstrations, render_instruction
from compeffdist_ray.stages.responses import assemble, build_prompts

DEMOS = [{"text_id": "a", "text": " Great food. ", "output": "positive\n"},
         {"text_id": "b", "text": "Awful service.", "output": "negative"}]


def test_instruction_with_demonstrations_lists_examples_in_order_and_respects_limit():
    full = instruction_with_demonstrations("Label the text.", DEMOS)
    assert full == ("Label the text.\n\nExamples:\n\nText: Great food.\nAnswer: positive\n\n"
                    "Text: Awful service.\nAnswer: negative")
    assert instruction_with_demonstrations("Label the text.", DEMOS, 1).endswith("Answer: positive")
    assert instruction_with_demonstrations(" Label the text. ", DEMOS, 0) == "Label the text."
    assert instruction_with_demonstrations("Label the text.", []) == "Label the text."


def _frames():
    tasks = pd.DataFrame({"task_id": ["t1", "t2"], "instruction": ["Label it.", "Rate it."],
                          "demonstrations": [DEMOS, DEMOS[:1]]})
    pairs = pd.DataFrame({"pair_id": ["p1", "p2", "p3"], "task_id": ["t1", "t2", "t1"],
                          "perspective_id": ["x", "y", "x"], "text_id": ["u", "v", "w"],
                          "text": ["ok phone", "bad phone", "fine"], "match": ["random"] * 3})
    return pairs, tasks


def test_build_prompts_shares_one_instruction_per_task():
    pairs, tasks = _frames()
    prompts = build_prompts(pairs, tasks, None)
    assert list(prompts["key"]) == ["p1", "p2", "p3"]
    assert prompts["instruction"][0] == prompts["instruction"][2] != prompts["instruction"][1]
    msgs = json.loads(prompts["messages"][1])
    assert msgs == answer_messages(prompts["instruction"][1], "bad phone")
    assert msgs[-1]["content"] == render_instruction(instruction_with_demonstrations("Rate it.", DEMOS[:1]), "bad phone")
    assert build_prompts(pairs, tasks, 0)["instruction"][0] == "Label it."


def test_assemble_drops_failed_rows_and_flags_or_drops_truncated():
    pairs, tasks = _frames()
    prompts = build_prompts(pairs, tasks, None)
    gens = pd.DataFrame({
        "key": ["p3", "p1", "p2"], "raw": ["neutral", "positive", ""], "parsed": [json.dumps("neutral"), json.dumps("positive"), None],
        "ok": [True, True, False], "attempts": [1, 2, 3], "input_tokens": [10, 20, 30], "output_tokens": [1, 5, 0],
        "finish_reason": ["length", "stop", "stop"], "error": [None, None, "empty_answer"],
    })
    kept, dropped = assemble(pairs, prompts, gens, drop_truncated=False)
    assert list(kept["pair_id"]) == ["p1", "p3"] and dropped == 0
    assert list(kept["response"]) == ["positive", "neutral"] and list(kept["truncated"]) == [False, True]
    assert list(kept["attempts"]) == [2, 1] and kept["instruction"][0].startswith("Label it.")
    kept2, dropped2 = assemble(pairs, prompts, gens, drop_truncated=True)
    assert list(kept2["pair_id"]) == ["p1"] and dropped2 == 1
