"""Unit tests for the pure core of stage 1 (compeffdist_ray.stages.attributes)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from compeffdist_ray.stages.attributes import explode, normalize_attribute, parse_attributes, sample_texts


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Sarcasm", "sarcasm"),
        ("  Emotion   Intensity ", "emotion intensity"),
        ("EMOTION\tintensity", "emotion intensity"),
        ("customer_review", "customer review"),
        ("Tone: angry", "tone"),
        ("tone = negative", "tone"),
        ("Aspect - food quality", "aspect"),
        ("aspect (service)", "aspect"),
        ("price [value for money] perception", "price perception"),
        ("**Irony**", "irony"),
        ("Price complaints.", "price complaint"),
        ("Emotions", "emotion"),
        ("categories", "category"),
        ("customer stories", "customer story"),
        ("speeches", "speech"),
        ("wishes", "wish"),
        ("boxes", "box"),
        ("classes", "class"),
        ("sarcasm", "sarcasm"),
        ("news", "news"),
        ("fake news", "fake news"),
        ("analysis", "analysis"),
        ("sentiment analysis", "sentiment analysis"),
        ("bias", "bias"),
        ("politics", "politics"),
        ("status", "status"),
        ("anxious", "anxious"),
        ("emotions expressed", "emotions expressed"),  # only the last word is singularised
        ("toys", "toy"),
        ("bus", "bus"),
        ("(x)", ""),
        ("   ", ""),
        ("!!!", ""),
    ],
)
def test_normalize_attribute(raw, expected):
    assert normalize_attribute(raw) == expected


def test_normalize_is_idempotent():
    for raw in ["Emotions", "Customer_Reviews", "aspect (service)", "Tone: angry", "categories", "news"]:
        once = normalize_attribute(raw)
        assert normalize_attribute(once) == once


def test_normalize_folds_variants_together():
    variants = ["Emotion Intensity", "emotion intensities", "  emotion_intensity ", "Emotion intensity: high"]
    assert {normalize_attribute(v) for v in variants} == {"emotion intensity"}


def test_normalize_plural_of_words_ending_in_ze():
    assert normalize_attribute("portion sizes") == normalize_attribute("portion size") == "portion size"


def test_normalize_movies():
    assert normalize_attribute("references to movies") == "references to movie"


def test_normalize_biases():
    assert normalize_attribute("political biases") == normalize_attribute("political bias")


def test_normalize_colon_inside_parentheses():
    assert normalize_attribute("emotion (e.g.: anger)") == "emotion"


# ------------------------------------------------------------------------------------------
# parse_attributes
# ------------------------------------------------------------------------------------------


def test_parse_attributes_bullets():
    assert parse_attributes("- overall sentiment\n- food temperature\n- sarcasm") == [
        "overall sentiment", "food temperature", "sarcasm"]


def test_parse_attributes_dedupes_by_normalised_form_keeping_first_raw():
    text = "- Emotions\n- emotion\n- Emotion: joy\n- sarcasm\n- SARCASM"
    assert parse_attributes(text) == ["Emotions", "sarcasm"]


def test_parse_attributes_max_words():
    text = "- a very long attribute name with many words\n- tone\n- two words"
    assert parse_attributes(text, max_words=2) == ["tone", "two words"]
    assert parse_attributes(text, max_words=8) == ["a very long attribute name with many words", "tone", "two words"]


def test_parse_attributes_max_per_text():
    text = "\n".join(f"- attribute {c}" for c in "abcdefgh")
    assert parse_attributes(text, max_per_text=3) == ["attribute a", "attribute b", "attribute c"]


def test_parse_attributes_echo_words_filtered():
    text = "- Text\n- Answer\n- Attributes\n- none\n- N/A\n- irony"
    assert parse_attributes(text) == ["irony"]


def test_parse_attributes_json_forms():
    assert parse_attributes('{"attributes": ["tone", "irony"]}') == ["tone", "irony"]
    assert parse_attributes('```json\n{"attributes": [{"name": "tone"}, {"attribute": "irony"}]}\n```') == [
        "tone", "irony"]


def test_parse_attributes_over_long_or_letterless_items_dropped():
    text = "- " + "x" * 70 + "\n- 1234\n- tone"
    assert parse_attributes(text) == ["tone"]


@pytest.mark.parametrize("garbage", ["", "   ", "!!!\n???", "- Text\n- Answer", "1.\n2.\n"])
def test_parse_attributes_garbage_gives_none(garbage):
    assert parse_attributes(garbage) is None


# ------------------------------------------------------------------------------------------
# explode
# ------------------------------------------------------------------------------------------


def _gens(rows):
    return pd.DataFrame(
        [{"key": k, "ok": ok, "parsed": None if parsed is None else json.dumps(parsed), "raw": "", "attempts": 1}
         for k, ok, parsed in rows]
    )


def test_explode_counts_texts_per_attribute_and_keeps_variants():
    gens = _gens([
        ("t1", True, ["Sarcasm", "Emotions", "emotion"]),  # emotion twice in one text counts once
        ("t2", True, ["sarcasm", "Price"]),
        ("t3", True, ["Emotion", "SARCASM", "price "]),
        ("t4", False, None),  # failed rows are ignored
        ("t5", True, ["aspect (service)"]),
    ])
    rows, counts = explode(gens)
    assert {(r["text_id"], r["attribute"]) for r in rows} == {
        ("t1", "sarcasm"), ("t1", "emotion"), ("t2", "sarcasm"), ("t2", "price"),
        ("t3", "emotion"), ("t3", "sarcasm"), ("t3", "price"), ("t5", "aspect"),
    }
    assert len(rows) == 8
    by_attr = {c["attribute"]: c for c in counts}
    assert by_attr["sarcasm"]["count"] == 3
    assert by_attr["emotion"]["count"] == 2
    assert by_attr["price"]["count"] == 2
    assert by_attr["aspect"]["count"] == 1
    assert by_attr["sarcasm"]["variants"] == ["Sarcasm", "sarcasm", "SARCASM"]
    assert by_attr["emotion"]["variants"] == ["Emotions", "Emotion"]
    assert by_attr["price"]["variants"] == ["Price", "price"]  # raw names are stripped
    assert [c["attribute"] for c in counts] == ["sarcasm", "emotion", "price", "aspect"]  # count desc, then name


def test_explode_raw_column_keeps_teacher_spelling():
    rows, _ = explode(_gens([("t1", True, ["  Emotions "])]))
    assert rows == [{"text_id": "t1", "attribute": "emotion", "raw": "Emotions"}]


def test_explode_all_failed_gives_nothing():
    rows, counts = explode(_gens([("t1", False, None), ("t2", False, None)]))
    assert rows == [] and counts == []


def test_explode_sorted_by_count_then_name():
    gens = _gens([("a", True, ["b", "c", "a"]), ("b", True, ["c"])])
    _, counts = explode(gens)
    assert [(c["attribute"], c["count"]) for c in counts] == [("c", 2), ("a", 1), ("b", 1)]


# ------------------------------------------------------------------------------------------
# sample_texts
# ------------------------------------------------------------------------------------------


def test_sample_texts_reproducible_and_bounded():
    df = pd.DataFrame({"text_id": [f"t{i}" for i in range(50)], "text": [f"x{i}" for i in range(50)]})
    a, b = sample_texts(df, 10, 1), sample_texts(df, 10, 1)
    assert a.equals(b)
    assert len(a) == 10 and a["text_id"].is_unique
    assert set(a["text_id"]) <= set(df["text_id"])
    assert not a["text_id"].tolist() == sample_texts(df, 10, 2)["text_id"].tolist()
    assert len(sample_texts(df, 500, 1)) == 50
