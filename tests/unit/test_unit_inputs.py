"""Unit tests for compeffdist_ray.inputs: reading and cleaning user-text corpora."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from importlib import resources

import pandas as pd
import pytest

from compeffdist_ray.config import BUILTIN_CORPUS, InputConfig
from compeffdist_ray.errors import UserError
from compeffdist_ray.inputs import read_corpus, resolve_input_path, text_id_of

DOMAINS = {"products", "restaurants", "movies", "tweets", "politics"}


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _read(path, **kw):
    return read_corpus(InputConfig(path=str(path), **kw))


# ------------------------------------------------------------------------------------------
# formats
# ------------------------------------------------------------------------------------------


def test_jsonl(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": " hello ", "extra": 1}, {"id": "b", "text": "world"}])
    c = _read(p)
    assert list(c.df.columns) == ["text_id", "text"]
    assert c.df.to_dict("records") == [{"text_id": "a", "text": "hello"}, {"text_id": "b", "text": "world"}]
    assert c.read_rows == 2
    assert c.dropped == {}
    assert c.source == str(p)


def test_jsonl_lines_that_are_plain_strings_and_blank_lines(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('"first text"\n\n{"text": "second"}\n   \n', encoding="utf-8")
    c = _read(p)
    assert sorted(c.df["text"]) == ["first text", "second"]
    assert c.read_rows == 2


def test_json_array_of_objects(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps([{"id": 1, "body": "x one"}, {"id": 2, "body": "x two"}]), encoding="utf-8")
    c = _read(p, text_column="body")
    assert c.df.to_dict("records") == [{"text_id": "1", "text": "x one"}, {"text_id": "2", "text": "x two"}]


def test_json_array_of_strings_gets_hash_ids(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(["alpha", "beta", "gamma"]), encoding="utf-8")
    c = _read(p)
    assert list(c.df["text"]) == ["alpha", "beta", "gamma"]
    assert list(c.df["text_id"]) == [text_id_of(t) for t in ["alpha", "beta", "gamma"]]


def test_json_object_of_lists_is_flattened(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"train": ["a1", "a2"], "test": [{"text": "b1"}], "meta": "ignored"}), encoding="utf-8")
    c = _read(p)
    assert sorted(c.df["text"]) == ["a1", "a2", "b1"]
    assert c.read_rows == 3


def test_json_object_without_lists_rejected(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"a": 3}), encoding="utf-8")
    with pytest.raises(UserError, match="lists"):
        _read(p)


def test_broken_json_names_the_file_line_and_column(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('[{"text": "fine"},\n {"text": "cut off"\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"c\.json is not valid JSON: Expecting ',' delimiter at line 3, column 1$"):
        _read(p)
    p.write_text('["a", "b"]\n', encoding="utf-8")
    assert list(_read(p).df["text"]) == ["a", "b"]


def test_broken_attribute_list_names_the_file_and_line(tmp_path):
    from compeffdist_ray.stages.perspectives import read_attribute_list

    p = tmp_path / "attrs.json"
    p.write_text('["price",\n "service" "food"]', encoding="utf-8")
    with pytest.raises(UserError, match=r"attrs\.json is not valid JSON: Expecting ',' delimiter at line 2, column 12"):
        read_attribute_list(str(p))


def test_csv(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text('id,text,other\n10,"Hello, world",x\n11,plain,y\n', encoding="utf-8")
    c = _read(p)
    assert c.df.to_dict("records") == [{"text_id": "10", "text": "Hello, world"}, {"text_id": "11", "text": "plain"}]


def test_parquet(tmp_path):
    p = tmp_path / "c.parquet"
    pd.DataFrame({"uid": ["u1", "u2"], "review": ["good", "bad"]}).to_parquet(p)
    c = _read(p, text_column="review", id_column="uid")
    assert c.df.to_dict("records") == [{"text_id": "u1", "text": "good"}, {"text_id": "u2", "text": "bad"}]


def test_txt_one_text_per_line(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("first line\n\nsecond line\n   \nthird\n", encoding="utf-8")
    c = _read(p)
    assert list(c.df["text"]) == ["first line", "second line", "third"]
    assert c.dropped == {"empty_text": 2}
    assert list(c.df["text_id"]) == [text_id_of(t) for t in c.df["text"]]


def test_gzipped_jsonl(tmp_path):
    p = tmp_path / "c.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"id": "g1", "text": "zipped text"}) + "\n")
        f.write(json.dumps({"id": "g2", "text": "another"}) + "\n")
    c = _read(p)
    assert c.df.to_dict("records") == [{"text_id": "g1", "text": "zipped text"}, {"text_id": "g2", "text": "another"}]


def test_utf8_bom_and_non_ascii(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "café ☕ très bon"}, ensure_ascii=False).encode("utf-8") + b"\n")
    assert list(_read(p).df["text"]) == ["café ☕ très bon"]


def test_explicit_format_overrides_extension(tmp_path):
    p = _jsonl(tmp_path / "c.dat", [{"text": "x"}])
    assert list(_read(p, format="jsonl").df["text"]) == ["x"]


def test_file_uri(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"text": "via uri"}])
    assert list(read_corpus(InputConfig(path=f"file://{p}")).df["text"]) == ["via uri"]


# ------------------------------------------------------------------------------------------
# cleaning and ids
# ------------------------------------------------------------------------------------------


def test_empty_and_whitespace_texts_dropped_and_counted(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [
        {"id": "1", "text": "keep"}, {"id": "2", "text": ""}, {"id": "3", "text": "  \t "},
        {"id": "4", "text": None}, {"id": "5"}, {"id": "6", "text": "also keep"},
    ])
    c = _read(p)
    assert list(c.df["text_id"]) == ["1", "6"]
    assert c.dropped == {"empty_text": 4}
    assert c.read_rows == 6


def test_duplicate_texts_dropped_and_counted_after_stripping(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [
        {"id": "1", "text": "same"}, {"id": "2", "text": "  same "}, {"id": "3", "text": "other"},
        {"id": "4", "text": "same"},
    ])
    c = _read(p)
    assert c.df.to_dict("records") == [{"text_id": "1", "text": "same"}, {"text_id": "3", "text": "other"}]
    assert c.dropped == {"duplicate_text": 2}


def test_duplicate_ids_dropped_and_counted(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [
        {"id": "x", "text": "first"}, {"id": "x", "text": "second"}, {"id": "y", "text": "third"},
    ])
    c = _read(p)
    assert c.df.to_dict("records") == [{"text_id": "x", "text": "first"}, {"text_id": "y", "text": "third"}]
    assert c.dropped == {"duplicate_id": 1}


def test_ids_from_hash_when_id_column_absent(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"text": " hello "}, {"text": "world"}])
    c = _read(p)
    assert list(c.df["text_id"]) == [text_id_of("hello"), text_id_of("world")]
    assert text_id_of("hello") != text_id_of("world")
    assert text_id_of("hello") == text_id_of("hello")
    assert text_id_of("hello").startswith("t") and len(text_id_of("hello")) == 16


def test_ids_from_hash_when_id_column_is_null_config(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"id": "given", "text": "hello"}])
    c = _read(p, id_column=None)
    assert list(c.df["text_id"]) == [text_id_of("hello")]


def test_null_ids_get_hash_ids(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"id": "a", "text": "one"}, {"id": None, "text": "two"}])
    c = _read(p)
    assert list(c.df["text_id"]) == ["a", text_id_of("two")]


def test_integer_ids_keep_their_form_when_one_is_missing(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"id": 1, "text": "one"}, {"text": "two"}, {"id": 3, "text": "three"}])
    c = _read(p)
    assert list(c.df["text_id"]) == ["1", text_id_of("two"), "3"]


def test_csv_empty_id_cells_get_hash_ids_and_lose_no_text(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("id,text\n1,hello\n,world\n,again\n", encoding="utf-8")
    c = _read(p)
    assert c.dropped == {}
    assert list(c.df["text"]) == ["hello", "world", "again"]
    assert list(c.df["text_id"]) == ["1", text_id_of("world"), text_id_of("again")]


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------


def test_missing_text_column_lists_the_columns(tmp_path):
    p = _jsonl(tmp_path / "c.jsonl", [{"id": "1", "body": "x", "stars": 5}])
    with pytest.raises(UserError) as info:
        _read(p)
    msg = str(info.value)
    assert "'text'" in msg
    for col in ("id", "body", "stars"):
        assert col in msg
    assert "input.text_column" in msg


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        _read(tmp_path / "nope.jsonl")


def test_directory(tmp_path):
    with pytest.raises(UserError, match="directory"):
        _read(tmp_path)


def test_unknown_extension(tmp_path):
    p = tmp_path / "c.xml"
    p.write_text("<x/>", encoding="utf-8")
    with pytest.raises(UserError) as info:
        _read(p)
    assert ".xml" in str(info.value) and "input.format" in str(info.value)


def test_invalid_jsonl_names_the_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"text": "ok"}\n{"text": "ok2"}\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 3"):
        _read(p)


def test_invalid_json_names_the_line(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('[\n  {"text": "a"},\n  {"text": "b",,}\n]\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 3"):
        _read(p)


def test_non_utf8_bytes(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_bytes('{"text": "caf'.encode() + b"\xe9" + b'"}\n')
    with pytest.raises(UserError, match="UTF-8"):
        _read(p)


@pytest.mark.parametrize("name", ["c.jsonl", "c.json", "c.csv", "c.txt", "c.parquet"])
def test_empty_file(tmp_path, name):
    p = tmp_path / name
    p.write_bytes(b"")
    with pytest.raises(UserError):
        _read(p)


def test_whitespace_only_file_has_no_usable_text(tmp_path):
    p = tmp_path / "c.txt"
    p.write_text("   \n\t\n  \n", encoding="utf-8")
    with pytest.raises(UserError, match="no usable text"):
        _read(p)


def test_json_array_items_must_be_objects_or_strings(tmp_path):
    p = tmp_path / "c.json"
    p.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UserError):
        _read(p)


# ------------------------------------------------------------------------------------------
# the bundled corpus
# ------------------------------------------------------------------------------------------


def test_builtin_corpus_size_and_domains():
    raw_path = resources.files("compeffdist_ray") / "data" / "sample_corpus.jsonl"
    assert resolve_input_path(BUILTIN_CORPUS) == str(raw_path)
    records = [json.loads(line) for line in raw_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    domains = Counter(r["domain"] for r in records)
    assert set(domains) == DOMAINS
    assert min(domains.values()) >= 20  # every domain is really there
    c = read_corpus(InputConfig())
    assert len(c.df) >= 300
    assert c.df["text_id"].is_unique and c.df["text"].is_unique
    assert (c.df["text"].str.len() > 0).all()
    assert c.source == BUILTIN_CORPUS
