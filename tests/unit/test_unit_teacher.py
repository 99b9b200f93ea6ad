"""Unit tests for compeffdist_ray.teacher.generate_and_parse with an in-test fake backend."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from compeffdist_ray.config import TeacherConfig
from compeffdist_ray.parsing import parse_string_list
from compeffdist_ray.stages._common import generation_drops, generation_tokens
from compeffdist_ray.teacher import OUTPUT_COLUMNS, generate_and_parse, gen_params
from compeffdist_ray.teacher.base import Generation, GenParams


class FakeBackend:
    """Answers from a script: key -> list of (text, finish_reason) per attempt (last one repeats)."""

    def __init__(self, script: dict[str, list]):
        self.script = script
        self.calls: list[tuple[list[str], GenParams]] = []
        self.asked: dict[str, int] = {}

    def generate(self, conversations, params):
        keys = [conv[-1]["content"] for conv in conversations]
        self.calls.append((keys, params))
        out = []
        for key in keys:
            n = self.asked.get(key, 0)
            self.asked[key] = n + 1
            answers = self.script[key]
            text, finish = answers[min(n, len(answers) - 1)]
            err = "boom" if finish == "error" else None
            out.append(Generation(text=text, input_tokens=10 + n, output_tokens=len(text), finish_reason=finish, error=err))
        return out


def _conv(key):
    return [{"role": "system", "content": "sys"}, {"role": "user", "content": key}]


def bullets(text):
    """A strict parser: only bulleted answers count."""
    return parse_string_list(text) if text.lstrip().startswith("-") else None


def _run(script, cfg=None, parser=bullets, **kw):
    cfg = cfg or TeacherConfig(max_attempts=3, temperature=0.0, retry_temperature=0.7, top_p=0.9,
                               repetition_penalty=1.2, max_new_tokens=99)
    backend = FakeBackend(script)
    keys = list(script)
    rows = generate_and_parse(backend, keys, [_conv(k) for k in keys], parser, cfg, **kw)
    return backend, {r["key"]: r for r in rows}, rows


def test_all_parse_first_time_one_call_with_first_attempt_params():
    backend, rows, ordered = _run({"a": [("- tone\n- irony", "stop")], "b": [('["x"]', "stop")]},
                                  parser=parse_string_list, max_new_tokens=42, seed=5)
    assert [r["key"] for r in ordered] == ["a", "b"]
    assert len(backend.calls) == 1
    keys, params = backend.calls[0]
    assert keys == ["a", "b"]
    assert params == GenParams(max_new_tokens=42, temperature=0.0, top_p=0.9, repetition_penalty=1.2, seed=5)
    assert rows["a"]["ok"] is True and rows["a"]["attempts"] == 1 and rows["a"]["error"] is None
    assert json.loads(rows["a"]["parsed"]) == ["tone", "irony"]
    assert json.loads(rows["b"]["parsed"]) == ["x"]
    assert set(ordered[0]) == set(OUTPUT_COLUMNS)


def test_unparseable_rows_are_re_asked_with_retry_temperature():
    script = {
        "good": [("- tone", "stop")],
        "late": [("", "stop"), ("no bullets", "stop"), ("- sarcasm", "stop")],
        "never": [("", "length")],
    }
    backend, rows, _ = _run(script, seed=10)
    assert [keys for keys, _ in backend.calls] == [["good", "late", "never"], ["late", "never"], ["late", "never"]]
    temps = [p.temperature for _, p in backend.calls]
    assert temps == [0.0, 0.7, 0.7]
    assert [p.seed for _, p in backend.calls] == [10, 11, 12]
    assert all(p.max_new_tokens == 99 for _, p in backend.calls)  # config default when not given
    late = rows["late"]
    assert late["ok"] is True and late["attempts"] == 3 and late["error"] is None
    assert json.loads(late["parsed"]) == ["sarcasm"]
    assert late["raw"] == "- sarcasm"
    assert late["input_tokens"] == 10 + 11 + 12  # summed over attempts
    assert late["output_tokens"] == len("") + len("no bullets") + len("- sarcasm")
    never = rows["never"]
    assert never["ok"] is False and never["attempts"] == 3 and never["parsed"] is None
    assert never["error"] == "empty_answer"
    assert never["finish_reason"] == "length"
    assert rows["good"]["attempts"] == 1 and rows["good"]["input_tokens"] == 10


def test_max_attempts_bounds_the_calls():
    cfg = TeacherConfig(max_attempts=2)
    backend, rows, _ = _run({"bad": [("!!!", "stop")]}, cfg=cfg, parser=lambda t: None)
    assert len(backend.calls) == 2
    assert rows["bad"]["attempts"] == 2
    assert rows["bad"]["error"] == "unparseable"
    assert rows["bad"]["raw"] == "!!!"


def test_single_attempt_never_retries():
    backend, rows, _ = _run({"bad": [("x", "stop")]}, cfg=TeacherConfig(max_attempts=1), parser=lambda t: None)
    assert len(backend.calls) == 1 and rows["bad"]["attempts"] == 1


def test_parser_that_raises_is_counted_as_parser_error():
    def parser(text):
        if text == "explode":
            raise ZeroDivisionError("bad parser")
        return text

    backend, rows, ordered = _run({"x": [("explode", "stop")], "y": [("fine", "stop")]}, parser=parser)
    assert rows["x"]["ok"] is False
    assert rows["x"]["error"].startswith("parser_error")
    assert "ZeroDivisionError" in rows["x"]["error"]
    assert rows["x"]["attempts"] == 3  # retried like any other bad answer
    assert rows["y"]["ok"] is True and json.loads(rows["y"]["parsed"]) == "fine"
    assert generation_drops(pd.DataFrame(ordered)) == {"parser_error": 1}


def test_teacher_errors_counted_and_retried():
    script = {"e": [("", "error")], "recovers": [("", "error"), ("- irony", "stop")], "ok": [("- a", "stop")]}
    backend, rows, ordered = _run(script)
    assert rows["e"]["ok"] is False
    assert rows["e"]["error"] == "teacher_error: boom"
    assert rows["e"]["finish_reason"] == "error"
    assert rows["e"]["attempts"] == 3
    assert rows["recovers"]["ok"] is True and rows["recovers"]["error"] is None
    assert rows["recovers"]["attempts"] == 2
    frame = pd.DataFrame(ordered, columns=OUTPUT_COLUMNS)
    assert generation_drops(frame) == {"teacher_error": 1}
    assert generation_tokens(frame)["input"] == sum(r["input_tokens"] for r in ordered)


def test_error_answer_with_parseable_text_is_still_a_teacher_error():
    _, rows, _ = _run({"k": [('["looks fine"]', "error")]}, cfg=TeacherConfig(max_attempts=1))
    assert rows["k"]["ok"] is False and rows["k"]["error"].startswith("teacher_error")


def test_ok_parsed_is_json_of_non_ascii_values():
    _, rows, _ = _run({"k": [("café", "stop")]}, parser=lambda t: {"v": t, "n": [1, 2]})
    assert rows["k"]["parsed"] == '{"v": "café", "n": [1, 2]}'


def test_falsy_but_not_none_parse_is_ok():
    _, rows, _ = _run({"k": [("zero", "stop")]}, parser=lambda t: 0)
    assert rows["k"]["ok"] is True and rows["k"]["parsed"] == "0"


def test_no_conversations_no_calls():
    backend = FakeBackend({})
    assert generate_and_parse(backend, [], [], parse_string_list, TeacherConfig()) == []
    assert backend.calls == []


def test_gen_params_from_config():
    cfg = TeacherConfig(max_new_tokens=77, temperature=0.1, retry_temperature=0.9, top_p=0.8, repetition_penalty=1.3)
    assert gen_params(cfg) == GenParams(77, 0.1, 0.8, 1.3, None)
    assert gen_params(cfg, max_new_tokens=5, seed=3, retry=True) == GenParams(5, 0.9, 0.8, 1.3, 3)


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_finish_reason_of_last_attempt_recorded(finish):
    _, rows, _ = _run({"k": [("- tone", finish)]})
    assert rows["k"]["finish_reason"] == finish and rows["k"]["ok"] is True
