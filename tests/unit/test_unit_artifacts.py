"""Unit tests for compeffdist_ray.artifacts: run directories, atomic writes, manifests."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pytest

from compeffdist_ray.artifacts import MANIFEST, Manifest, RunDir, fingerprint
from compeffdist_ray.errors import UserError


@pytest.fixture
def run(tmp_path):
    return RunDir(str(tmp_path / "run"))


def _all_files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_rundir_creates_root(tmp_path):
    RunDir(str(tmp_path / "a" / "b"))
    assert (tmp_path / "a" / "b").is_dir()


def test_rundir_file_uri(tmp_path):
    r = RunDir(f"file://{tmp_path}/u")
    assert r.local and r.root == str(tmp_path / "u")
    r.write_table("s", "t", pd.DataFrame({"a": [1]}))
    assert (tmp_path / "u" / "s" / "t.parquet").is_file()


def test_write_read_table_round_trip(run):
    df = pd.DataFrame({
        "key": ["a", "b", "c"],
        "n": [1, 2, 3],
        "x": [0.5, None, 2.0],
        "tags": [["t1"], [], ["t2", "t3"]],
        "demos": [[{"text_id": "i", "output": "o"}], [], []],
    })
    run.write_table("stage1", "rows", df)
    back = run.read_df("stage1", "rows")
    assert list(back.columns) == list(df.columns)
    assert back["key"].tolist() == ["a", "b", "c"]
    assert back["n"].tolist() == [1, 2, 3]
    assert back["x"].isna().tolist() == [False, True, False]
    assert [list(v) for v in back["tags"]] == [["t1"], [], ["t2", "t3"]]
    assert list(back["demos"][0]) == [{"text_id": "i", "output": "o"}]
    assert run.read_table("stage1", "rows").num_rows == 3


def test_write_table_accepts_arrow_table_and_overwrites(run):
    run.write_table("s", "t", pa.table({"a": [1, 2]}))
    run.write_table("s", "t", pa.table({"a": [9]}))
    assert run.read_df("s", "t")["a"].tolist() == [9]


def test_no_temp_files_left_behind(run, tmp_path):
    run.write_table("s", "t1", pd.DataFrame({"a": [1]}))
    run.write_table("s", "t2", pd.DataFrame({"a": [1]}))
    run.write_bytes("s", "blob.bin", b"xyz")
    run.write_manifest(Manifest(stage="s", fingerprint="f"))
    run.write_json("summary.json", {"a": 1})
    run.write_text("notes.txt", "hi")
    files = _all_files(tmp_path / "run")
    assert files == sorted(["s/t1.parquet", "s/t2.parquet", "s/blob.bin", f"s/{MANIFEST}", "summary.json", "notes.txt"])
    assert not any(".tmp-" in f for f in files)


def test_read_missing_table_is_a_user_error(run):
    with pytest.raises(UserError, match="rerun the stage 'nope'"):
        run.read_table("nope", "x")


def test_manifest_written_and_read_back(run):
    m = Manifest(stage="attributes", fingerprint="abc123", rows=7, dropped={"unparseable": 2},
                 tokens={"input": 100, "output": 50}, wall_time_s=1.5, inputs={"x": "y"},
                 files=["attributes.parquet"], stats={"top": [["tone", 3]]})
    run.write_manifest(m)
    back = run.read_manifest("attributes")
    assert back == m
    with open(run.path("attributes", MANIFEST), encoding="utf-8") as f:
        on_disk = json.load(f)
    assert on_disk["rows"] == 7 and on_disk["fingerprint"] == "abc123"


def test_manifest_from_json_ignores_unknown_keys():
    m = Manifest(stage="s", fingerprint="f")
    data = json.loads(m.to_json())
    data["future_field"] = 1
    assert Manifest.from_json(json.dumps(data)) == m


def test_manifest_output_ids_are_unique():
    assert Manifest(stage="s", fingerprint="f").output_id != Manifest(stage="s", fingerprint="f").output_id


def test_read_manifest_missing_is_none(run):
    assert run.read_manifest("nothing") is None


def test_state_missing_incomplete_complete_and_clear(run, tmp_path):
    assert run.state("s") == "missing"
    run.write_table("s", "t", pd.DataFrame({"a": [1]}))
    assert run.state("s") == "incomplete"  # output without a manifest is never trusted
    run.write_manifest(Manifest(stage="s", fingerprint="f"))
    assert run.state("s") == "complete"
    assert run.state("other") == "missing"
    run.clear_stage("s")
    assert run.state("s") == "missing"
    assert not (tmp_path / "run" / "s").exists()
    run.clear_stage("s")  # clearing twice is harmless
    run.clear_stage("never-there")


def test_clear_stage_leaves_other_stages(run):
    run.write_table("a", "t", pd.DataFrame({"a": [1]}))
    run.write_manifest(Manifest(stage="a", fingerprint="f"))
    run.write_table("b", "t", pd.DataFrame({"a": [1]}))
    run.clear_stage("b")
    assert run.state("a") == "complete" and run.state("b") == "missing"


def test_text_and_json_helpers(run):
    assert run.read_text("missing.txt") is None
    run.write_text("notes.txt", "héllo")
    assert run.read_text("notes.txt") == "héllo"
    run.write_json("s.json", {"k": [1, 2]})
    assert json.loads(run.read_text("s.json")) == {"k": [1, 2]}
    assert run.exists("s.json") and not run.exists("t.json")


def test_fingerprint_stable_across_key_order():
    a = {"seed": 1, "teacher": {"model": "m", "temperature": 0.0}, "list": [1, 2]}
    b = {"list": [1, 2], "teacher": {"temperature": 0.0, "model": "m"}, "seed": 1}
    assert fingerprint(a) == fingerprint(b)
    assert len(fingerprint(a)) == 16
    int(fingerprint(a), 16)  # hex


@pytest.mark.parametrize("other", [
    {"seed": 2, "teacher": {"model": "m", "temperature": 0.0}, "list": [1, 2]},
    {"seed": 1, "teacher": {"model": "m2", "temperature": 0.0}, "list": [1, 2]},
    {"seed": 1, "teacher": {"model": "m", "temperature": 0.0}, "list": [2, 1]},
    {"seed": 1, "teacher": {"model": "m", "temperature": 0.0}},
    {"seed": "1", "teacher": {"model": "m", "temperature": 0.0}, "list": [1, 2]},
])
def test_fingerprint_differs_for_different_payloads(other):
    base = {"seed": 1, "teacher": {"model": "m", "temperature": 0.0}, "list": [1, 2]}
    assert fingerprint(other) != fingerprint(base)


def test_fingerprint_is_deterministic_across_calls():
    assert fingerprint({"a": 1}) == fingerprint({"a": 1}) == fingerprint(dict(a=1))
