"""Unit tests for compeffdist_ray.parsing: defensive recovery of teacher output."""

from __future__ import annotations

import pytest

from compeffdist_ray.parsing import extract_json, parse_key_values, parse_string_list

FENCE = "```"

# ------------------------------------------------------------------------------------------
# extract_json
# ------------------------------------------------------------------------------------------


def test_extract_json_plain_object_and_list():
    assert extract_json('{"a": 1, "b": [1, 2]}') == {"a": 1, "b": [1, 2]}
    assert extract_json('["x", "y"]') == ["x", "y"]


def test_extract_json_code_fence_with_language_tag():
    text = f"Here you go:\n{FENCE}json\n{{\"attributes\": [\"tone\", \"irony\"]}}\n{FENCE}\nHope it helps!"
    assert extract_json(text) == {"attributes": ["tone", "irony"]}


def test_extract_json_code_fence_without_language_tag():
    text = f"{FENCE}\n[1, 2, 3]\n{FENCE}"
    assert extract_json(text) == [1, 2, 3]


def test_extract_json_prefers_fenced_block_over_prose_braces():
    text = f"Use {{curly}} style. {FENCE}json\n{{\"k\": \"v\"}}\n{FENCE}"
    assert extract_json(text) == {"k": "v"}


def test_extract_json_prose_around_object():
    text = 'Sure! The answer is {"label": "positive", "score": 4} as requested. Thanks.'
    assert extract_json(text) == {"label": "positive", "score": 4}


def test_extract_json_trailing_commas_removed():
    assert extract_json('{"a": [1, 2, ], "b": 3, }') == {"a": [1, 2], "b": 3}
    assert extract_json('["a", "b",]') == ["a", "b"]


def test_extract_json_single_quotes_and_python_literals():
    assert extract_json("{'a': True, 'b': None, 'c': 'x'}") == {"a": True, "b": None, "c": "x"}
    assert extract_json("['tone', 'irony']") == ["tone", "irony"]


def test_extract_json_truncated_object_is_closed():
    assert extract_json('{"attributes": ["tone", "sarc') == {"attributes": ["tone", "sarc"]}


def test_extract_json_truncated_list_is_closed():
    assert extract_json('["a", "b", ') == ["a", "b"]
    assert extract_json('Answer: ["a", "b"') == ["a", "b"]


def test_extract_json_truncated_inside_unclosed_fence():
    text = f'{FENCE}json\n{{"name": "service", "items": [1, 2'
    assert extract_json(text) == {"name": "service", "items": [1, 2]}


def test_extract_json_brackets_inside_strings_do_not_confuse_matching():
    text = 'prefix {"a": "x}y", "b": ["]", "{"]} suffix {not json}'
    assert extract_json(text) == {"a": "x}y", "b": ["]", "{"]}


def test_extract_json_nested_structures():
    text = 'out: {"outer": {"inner": [{"k": [1, {"z": 2}]}]}} end'
    assert extract_json(text) == {"outer": {"inner": [{"k": [1, {"z": 2}]}]}}


@pytest.mark.parametrize("garbage", ["", "no json here at all", "{not: valid: json", "}{", "{}", "[]"])
def test_extract_json_garbage_and_empty_give_none(garbage):
    assert extract_json(garbage) is None


def test_extract_json_none_input():
    assert extract_json(None) is None  # type: ignore[arg-type]


def test_extract_json_expect_filters_type():
    text = 'list ["a"] then object {"k": 1}'
    assert extract_json(text, expect=list) == ["a"]
    assert extract_json(text, expect=dict) == {"k": 1}
    assert extract_json('["only", "a", "list"]', expect=dict) is None


def test_extract_json_scalar_json_is_not_returned_by_default():
    assert extract_json("42") is None
    assert extract_json('"just a string"') is None


def test_extract_json_top_level_list_of_objects_is_returned_whole():
    assert extract_json('[{"name": "tone"}, {"name": "irony"}]') == [{"name": "tone"}, {"name": "irony"}]


# ------------------------------------------------------------------------------------------
# parse_string_list
# ------------------------------------------------------------------------------------------


def test_string_list_json_list():
    assert parse_string_list('["tone", " irony ", ""]') == ["tone", "irony"]


def test_string_list_object_wrapping_list_under_given_key():
    text = '{"attributes": ["tone", "irony"], "note": "x"}'
    assert parse_string_list(text, keys=("attributes",)) == ["tone", "irony"]


def test_string_list_object_wrapping_list_uses_key_order():
    text = '{"other": ["a"], "attributes": ["b"]}'
    assert parse_string_list(text, keys=("attributes", "other")) == ["b"]


def test_string_list_object_without_listed_key_gives_none():
    assert parse_string_list('{"attributes": ["tone"]}', keys=("items",)) is None
    assert parse_string_list('{"attributes": ["tone"]}') is None


def test_string_list_object_own_keys_never_become_items():
    # An object of attribute -> value must not turn into ["tone", "sarcasm"].
    text = '{"tone": "angry", "sarcasm": "high"}'
    assert parse_string_list(text, keys=("attributes", "name")) is None


def test_string_list_list_of_dicts_inside_wrapper_read_via_keys():
    text = '{"attributes": [{"name": "tone", "value": "x"}, {"name": "irony"}, {"other": "skip"}]}'
    assert parse_string_list(text, keys=("attributes", "name")) == ["tone", "irony"]


def test_string_list_fenced_list_of_dicts_read_via_keys_only():
    text = f'{FENCE}json\n[{{"attribute": "tone", "why": "x"}}, {{"foo": "bar"}}, "irony"]\n{FENCE}'
    # the dict without a named key contributes nothing; its own keys ("foo") never appear
    assert parse_string_list(text, keys=("attribute",)) == ["tone", "irony"]


def test_string_list_list_of_dicts_without_keys_gives_none():
    text = f'{FENCE}\n[{{"attribute": "tone"}}]\n{FENCE}'
    assert parse_string_list(text) is None


def test_string_list_unfenced_list_of_dicts_read_via_keys():
    text = '[{"name": "tone"}, {"name": "irony"}]'
    assert parse_string_list(text, keys=("name",)) == ["tone", "irony"]


def test_string_list_bulleted_and_numbered_lines():
    text = "Attributes:\n1. tone\n2) sarcasm\n- irony\n* emotion intensity\n• price\n(3) aspect\n"
    got = parse_string_list(text)
    assert got[1:] == ["tone", "sarcasm", "irony", "emotion intensity", "price", "aspect"]


def test_string_list_strips_quotes_and_markdown_emphasis():
    assert parse_string_list('- "tone"\n- **irony**\n- `sarcasm`') == ["tone", "irony", "sarcasm"]


def test_string_list_single_line_comma_separated():
    assert parse_string_list("tone, sarcasm ,irony") == ["tone", "sarcasm", "irony"]


def test_string_list_commas_on_multiple_lines_not_split():
    assert parse_string_list("- tone, mostly\n- irony") == ["tone, mostly", "irony"]


@pytest.mark.parametrize("empty", ["", "   \n\t\n", "* \n** \n"])
def test_string_list_empty_gives_none(empty):
    assert parse_string_list(empty) is None


def test_string_list_non_string_items_dropped():
    assert parse_string_list('["tone", 3, null, ["x"], "irony"]') == ["tone", "irony"]


# ------------------------------------------------------------------------------------------
# parse_key_values
# ------------------------------------------------------------------------------------------

KEYS = {
    "name": ("name", "task name", "title"),
    "description": ("description", "desc"),
    "instruction": ("instruction", "instructions", "prompt"),
}


def test_key_values_json_with_case_insensitive_aliases():
    text = '{"Task_Name": "Service", "DESC": "About service", "Instructions": "Read it.", "extra": "x"}'
    assert parse_key_values(text, KEYS) == {
        "name": "Service",
        "description": "About service",
        "instruction": "Read it.",
    }


def test_key_values_json_first_alias_occurrence_wins_and_numbers_stringified():
    text = '{"title": 5, "name": "second"}'
    assert parse_key_values(text, KEYS) == {"name": "5"}


def test_key_values_json_non_scalar_values_ignored_falls_back_to_lines():
    assert parse_key_values('{"name": ["a", "b"]}', KEYS) is None


def test_key_values_plain_lines():
    text = "Name: Service sentiment\nDescription: How the service felt.\nInstruction: Read the text and label it."
    assert parse_key_values(text, KEYS) == {
        "name": "Service sentiment",
        "description": "How the service felt.",
        "instruction": "Read the text and label it.",
    }


def test_key_values_markdown_bold_keys():
    text = "**Name:** Service\n**Description**: About it\n- **Instruction:** Read the text."
    assert parse_key_values(text, KEYS) == {
        "name": "Service",
        "description": "About it",
        "instruction": "Read the text.",
    }


def test_key_values_headers_and_underscores_and_case():
    text = "### TASK_NAME: Irony\n> instruction: Decide if ironic."
    assert parse_key_values(text, KEYS) == {"name": "Irony", "instruction": "Decide if ironic."}


def test_key_values_multiline_value_runs_until_next_key():
    text = (
        "Instruction: Read the text\n"
        "and decide whether it is ironic.\n"
        "Answer yes or no.\n"
        "Name: Irony check\n"
        "Description: d"
    )
    assert parse_key_values(text, KEYS) == {
        "instruction": "Read the text and decide whether it is ironic. Answer yes or no.",
        "name": "Irony check",
        "description": "d",
    }


def test_key_values_blank_line_ends_a_multiline_value():
    text = "Instruction: Read the text\nand decide.\n\nHope this helps! Let me know.\nName: X"
    assert parse_key_values(text, KEYS) == {"instruction": "Read the text and decide.", "name": "X"}


def test_key_values_value_on_following_lines():
    text = "Instruction:\nRead the text carefully.\nName: X"
    assert parse_key_values(text, KEYS) == {"instruction": "Read the text carefully.", "name": "X"}


def test_key_values_repeated_key_keeps_first_block():
    text = (
        "Name: First\nInstruction: first instruction\ncontinued here\n"
        "Name: Second\nInstruction: second instruction\nmore of second"
    )
    assert parse_key_values(text, KEYS) == {"name": "First", "instruction": "first instruction continued here"}


def test_key_values_text_before_first_key_ignored():
    text = "Sure, here is a task.\nName: X"
    assert parse_key_values(text, KEYS) == {"name": "X"}


def test_key_values_empty_value_dropped():
    assert parse_key_values("Name:\nDescription: d", {"description": ("description",)}) == {"description": "d"}
    assert parse_key_values("Name:   ", KEYS) is None


@pytest.mark.parametrize("nothing", ["", "no keys here\njust prose", "Label: positive"])
def test_key_values_nothing_found_gives_none(nothing):
    assert parse_key_values(nothing, KEYS) is None


@pytest.mark.parametrize("empty_json", ["[]", "{}", "```json\n[]\n```"])
def test_string_list_empty_json_answer_gives_none(empty_json):
    assert parse_string_list(empty_json) is None
