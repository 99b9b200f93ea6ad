"""Stages 1-4 on local Ray with a scripted teacher behind real HTTP (the `openai` backend).

The teacher is fake (rule-based answers), everything around it is real: Ray Data actor
pools, HTTP retries, embeddings, affinity propagation, artifacts, fingerprints and resume.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import CONFIGS, ROOT, SHARED, scripted_overrides

pytestmark = pytest.mark.integration
SENTIBENCH = SHARED / "sentibench"


def _cfg(base_url, run_dir, *extra):
    from compeffdist_ray.config import load_config

    return load_config(CONFIGS / "tiny-test.yaml", scripted_overrides(base_url, run_dir) + list(extra))


def test_stages_1_to_4_with_retries_drops_tokens_and_skips(ray_session, scripted_teacher, tmp_path):
    from compeffdist_ray.artifacts import RunDir
    from compeffdist_ray.pipeline import run_pipeline

    teacher, url = scripted_teacher(fail_first=2, garbage_every=5)
    evaluate = [f"evaluate.data_dir={SENTIBENCH}", "evaluate.datasets=[sst2,atsa_rest16]", "evaluate.limit=4",
                "evaluate.k_shot=2", "evaluate.max_new_tokens=8"] if (SENTIBENCH / "sc" / "sst2").is_dir() else []
    cfg = _cfg(url, tmp_path / "run", *evaluate)
    statuses = run_pipeline(cfg)
    assert [s.state for s in statuses] == ["done"] * 10
    rd = RunDir(str(tmp_path / "run"))
    m = {s.name: s.manifest for s in statuses}

    gens = rd.read_df("attributes", "generations")
    assert len(gens) == 12 and gens["key"].is_unique
    assert (gens["attempts"] > 1).any(), "garbage answers must have been re-asked"
    attrs = rd.read_df("attributes", "attributes")
    assert set(attrs["text_id"]) == set(gens.loc[gens["ok"], "key"])
    assert not attrs.duplicated(["text_id", "attribute"]).any()
    counts = rd.read_df("attributes", "attribute_counts")
    assert counts.loc[counts["attribute"] == "overall sentiment", "count"].item() == int(gens["ok"].sum())
    # every text is accounted for: kept or dropped with a reason
    assert int(gens["ok"].sum()) + sum(v for k, v in m["attributes"].dropped.items() if k != "empty_text") == 12

    persp = rd.read_df("perspectives", "perspectives")
    assert m["perspectives"].rows == len(persp) >= 1
    assert sorted(a for lst in persp["attributes"] for a in lst) == sorted(counts["attribute"])

    tasks = rd.read_df("tasks", "tasks")
    assert len(tasks) >= 2 and tasks["task_id"].is_unique
    assert all(1 <= len(d) <= 3 for d in tasks["demonstrations"])
    assert all(d["output"] == "positive" for ds in tasks["demonstrations"] for d in ds)

    pairs = rd.read_df("pairing", "pairs")
    assert len(pairs) == 40 and pairs["pair_id"].is_unique and set(pairs["task_id"]) <= set(tasks["task_id"])
    per_task = pairs["task_id"].value_counts()
    assert per_task.max() - per_task.min() <= 1
    demo_of = {r.task_id: {d["text_id"] for d in r.demonstrations} for r in tasks.itertuples()}
    assert not any(r.text_id in demo_of[r.task_id] for r in pairs.itertuples())

    responses = rd.read_df("responses", "responses")
    answered = int(rd.read_df("responses", "generations")["ok"].sum())
    assert len(responses) == answered == 40 - sum(m["responses"].dropped.values())
    assert responses["pair_id"].is_unique and set(responses["pair_id"]) <= set(pairs["pair_id"])
    assert set(responses["response"]) == {"positive"}
    for r in responses.merge(tasks, on="task_id", suffixes=("", "_task")).itertuples():
        assert r.instruction.startswith(r.instruction_task) and r.instruction.count("\nText: ") == len(r.demonstrations)

    # the warm-up trained the student on a random subset; difficulty scored with that model
    warm = m["warmup"]
    samples = rd.read_df("warmup", "samples")
    assert len(samples) == 16 and set(samples["pair_id"]) <= set(responses["pair_id"])
    history = rd.read_df("warmup", "history")
    assert list(history["step"]) == list(range(1, warm.stats["steps"] + 1)) and warm.stats["steps"] == 4
    assert np.isfinite(history["loss"]).all() and warm.stats["train_tokens"] > 0
    assert (tmp_path / "run" / "warmup" / "model" / "model.safetensors").exists()
    assert not (tmp_path / "run" / "_train" / f"warmup-{warm.fingerprint[:12]}").exists()  # checkpoints removed
    assert m["difficulty"].stats["scorer"] == "warmup/model"

    scored = rd.read_df("difficulty", "difficulty")
    assert sorted(scored["pair_id"]) == sorted(responses["pair_id"])
    for metric in ("rank_score", "rank_score_all", "nll", "ppl", "ifd"):
        assert scored[metric].notna().all() and np.isfinite(scored[metric]).all(), metric
    assert ((scored["rank_score"] >= scored["rank_score_all"] - 1e-12) & (scored["rank_score"] <= 1)).all()
    for metric in ("rank_score", "nll", "ifd"):
        assert (tmp_path / "run" / "difficulty" / f"hist_{metric}.png").read_bytes()[:4] == b"\x89PNG"
    kept = rd.read_df("sampling", "kept")
    from compeffdist_ray.sampling import keep_count

    sizes = scored["task_id"].value_counts()
    assert kept["task_id"].value_counts().to_dict() == {t: keep_count(n, 0.5) for t, n in sizes.items()}
    assert set(kept["pair_id"]) <= set(scored["pair_id"]) and kept["pair_id"].is_unique
    report = m["sampling"].stats["report"]
    assert report["labels"]["before"]["counts"] == {"positive": len(scored)}

    # the base student was fine-tuned on the kept rows and exported with a model card
    ft = m["finetune"].stats
    assert ft["samples"] == len(kept) and ft["steps"] == len(kept) // 4 and ft["source"] == "sampling"
    card = (tmp_path / "run" / "finetune" / "model" / "README.md").read_text()
    assert f"{len(kept):,} (kept of {len(scored)}" in card and "ZeRO-2" in card
    assert len(rd.read_df("finetune", "history")) == ft["steps"]
    assert (tmp_path / "run" / "finetune" / "loss.png").read_bytes()[:4] == b"\x89PNG"

    # SentiBench (a few rows of two datasets, when ../shared has it) for the base and the distilled student
    ev_stats = m["evaluate"].stats
    if evaluate:
        assert list(ev_stats["results"]) == ["base", "distilled"]
        assert ev_stats["models"] == {"base": "tiny-random-llama", "distilled": "finetune/model"}
        for label in ("base", "distilled"):
            result = json.loads((tmp_path / "run" / "evaluate" / f"{label}.json").read_text())
            assert list(result["datasets"]) == ["sc/sst2", "absa/atsa_rest16"] and result["k"] == 2
            assert result["datasets"]["sc/sst2"]["n"] == 4 and ev_stats["results"][label]["sc/sst2"]["n"] == 4
            saved = tmp_path / "run" / "evaluate" / f"{label}.predictions"
            assert sorted(p.name for p in saved.iterdir()) == ["_index.json", "absa__atsa_rest16.jsonl",
                                                               "sc__sst2.jsonl"]
        assert m["evaluate"].rows == 8 and m["evaluate"].tokens == {"input": 0, "output": 0}  # no teacher tokens
        assert "| sc/sst2 " in (tmp_path / "run" / "evaluate" / "comparison.md").read_text()
        assert not any((tmp_path / "run" / "_eval").iterdir())  # the working copies are gone
    else:
        assert ev_stats == {"skipped": "no evaluate.data_dir"}

    # token accounting adds up to what the server billed (failed 500s bill nothing)
    total_in = sum(x.tokens["input"] for x in m.values())
    total_out = sum(x.tokens["output"] for x in m.values())
    assert (total_in, total_out) == (teacher.tokens["input"], teacher.tokens["output"])

    # the run report: one self-contained HTML file, every section there, charts embedded
    from compeffdist_ray.report import write_report

    page = Path(write_report(str(tmp_path / "run"))).read_text(encoding="utf-8")
    for section in ("Stages", "Perspectives", "Examples", "Difficulty", "Sampling", "Training", "Evaluation"):
        assert f"<h2>{section}" in page, section
    # 5 difficulty histograms, perspective sizes, class balance, the loss curves
    assert page.count('src="data:image/png;base64,') == 8
    assert 'src="http' not in page and 'href="http' not in page and "<script" not in page
    assert "10 of 10 stages have output" in page and f"{total_in:,} in, {total_out:,} out" in page
    if evaluate:
        assert "<th>distilled</th>" in page and "first 4 test rows of each dataset" in page

    # a second run skips everything: no request reaches the teacher
    before = teacher.requests
    again = run_pipeline(cfg)
    assert teacher.requests == before
    assert [s.manifest.output_id for s in again] == [x.output_id for x in m.values()]

    # a changed task setting redoes tasks and what follows them (here through sampling), never attributes
    cfg2 = _cfg(url, tmp_path / "run", "tasks.num_demonstrations=2")
    kinds_before = dict(teacher.kinds)
    third_st = run_pipeline(cfg2, until="sampling")
    assert [s.state for s in third_st] == ["done"] * 8 + ["stale"] * 2  # finetune and evaluate: left as they were
    third = {s.name: s.manifest for s in third_st}
    assert teacher.kinds["attributes"] == kinds_before["attributes"]
    assert third["attributes"].output_id == m["attributes"].output_id
    assert third["perspectives"].output_id == m["perspectives"].output_id
    assert third["tasks"].output_id != m["tasks"].output_id
    assert third["pairing"].output_id != m["pairing"].output_id
    assert third["responses"].output_id != m["responses"].output_id
    assert third["sampling"].output_id != m["sampling"].output_id


def test_attribute_matched_pairing(ray_session, scripted_teacher, tmp_path):
    from compeffdist_ray.artifacts import RunDir
    from compeffdist_ray.pipeline import run_pipeline

    _, url = scripted_teacher()
    cfg = _cfg(url, tmp_path / "run", "pairing.method=attribute", "pairing.num_texts=300",
               "attributes.num_texts=30")
    states = {s.name: s.state for s in run_pipeline(cfg, until="pairing")}
    assert states == {"attributes": "done", "perspectives": "done", "tasks": "done", "pairing": "done",
                      "responses": "missing", **dict.fromkeys(["warmup", "difficulty", "sampling", "finetune",
                                                               "evaluate"], "waiting")}
    rd = RunDir(str(tmp_path / "run"))
    pairs = rd.read_df("pairing", "pairs")
    attrs = rd.read_df("attributes", "attributes")
    assign = rd.read_df("perspectives", "assignments")
    persp_of = dict(zip(assign["attribute"], assign["perspective_id"]))
    matched = pairs[pairs["match"] == "attribute"]
    assert len(matched) > 0 and (pairs["match"] == "fallback").any()
    for row in matched.itertuples():  # a matched text went to a task of one of its own perspectives
        own = {persp_of[a] for a in attrs.loc[attrs["text_id"] == row.text_id, "attribute"]}
        assert row.perspective_id in own
    # texts without any known attribute can only be fallbacks
    unknown = set(pairs["text_id"]) - set(attrs["text_id"])
    assert set(pairs.loc[pairs["text_id"].isin(unknown), "match"]) == {"fallback"}


def test_failing_teacher_rows_are_counted_not_lost(ray_session, scripted_teacher, tmp_path):
    from compeffdist_ray.pipeline import run_one_stage
    from compeffdist_ray.stages._common import StageFailed

    _, url = scripted_teacher(fail_first=10**6)  # reachable, but every request fails with a 500
    cfg = _cfg(url, tmp_path / "run", "teacher.openai.max_retries=1")
    with pytest.raises(StageFailed, match=r"teacher_error 12"):
        run_one_stage(cfg, "attributes")
    from compeffdist_ray.artifacts import RunDir

    rd = RunDir(str(tmp_path / "run"))
    assert rd.state("attributes") == "incomplete"  # no manifest: never trusted, redone next time
    gens = rd.read_df("attributes", "generations")
    assert len(gens) == 12 and not gens["ok"].any()


def test_wrong_api_key_fails_fast_with_one_line(scripted_teacher, tmp_path):
    _, url = scripted_teacher(require_key="sekret")
    env = dict(os.environ, MY_KEY="wrong")
    args = [sys.executable, "-m", "compeffdist_ray", "stage", "attributes", "--config", str(CONFIGS / "tiny-test.yaml"),
            *scripted_overrides(url, tmp_path / "run"), "teacher.openai.api_key_env=MY_KEY", "teacher.openai.max_retries=0"]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("compeffdist: error: teacher endpoint") and "401" in last and "MY_KEY" in last
    assert "sekret" not in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "attributes").exists()  # refused before any stage work


def test_unreachable_teacher_fails_before_any_work(tmp_path):
    args = [sys.executable, "-m", "compeffdist_ray", "run", "--config", str(CONFIGS / "tiny-test.yaml"),
            *scripted_overrides("http://127.0.0.1:9/v1", tmp_path / "run")]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("compeffdist: error: teacher endpoint http://127.0.0.1:9/v1")
    assert "unreachable" in proc.stderr and "Traceback" not in proc.stderr


def test_killed_during_tasks_then_rerun_redoes_only_tasks(scripted_teacher, tmp_path):
    teacher, url = scripted_teacher(task_delay_s=1.5)
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "compeffdist_ray", "run", "--config", str(CONFIGS / "tiny-test.yaml"),
            *scripted_overrides(url, run_dir)]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 240
        while teacher.kinds.get("task", 0) < 1:  # the tasks stage has started asking the teacher
            assert proc.poll() is None, "the run ended before the tasks stage started"
            assert time.time() < deadline, "tasks stage never started"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    manifest = lambda stage: json.loads((run_dir / stage / "_manifest.json").read_text())  # noqa: E731
    first_attr, first_persp = manifest("attributes")["output_id"], manifest("perspectives")["output_id"]
    assert not (run_dir / "tasks" / "_manifest.json").exists()
    # A half-written file from the killed run must not be trusted: simulate one.
    (run_dir / "tasks").mkdir(exist_ok=True)
    pd.DataFrame({"task_id": ["half"]}).to_parquet(run_dir / "tasks" / "tasks.parquet")

    attr_requests = teacher.kinds["attributes"]
    teacher.task_delay_s = 0
    rerun = subprocess.run(args + ["--until", "pairing"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "attributes: already done" in rerun.stderr and "perspectives: already done" in rerun.stderr
    assert "tasks: a previous run stopped half-way: redoing" in rerun.stderr
    assert "responses: running" not in rerun.stderr  # --until pairing stops there
    assert f"report: {run_dir / 'report.html'}" in rerun.stdout  # `run` ends with the run report
    assert "4 of 10 stages have output" in (run_dir / "report.html").read_text(encoding="utf-8")
    assert teacher.kinds["attributes"] == attr_requests
    assert manifest("attributes")["output_id"] == first_attr and manifest("perspectives")["output_id"] == first_persp
    tasks = pd.read_parquet(run_dir / "tasks" / "tasks.parquet")
    assert "half" not in set(tasks["task_id"]) and tasks["task_id"].is_unique
    gens = pd.read_parquet(run_dir / "tasks" / "generations.parquet")
    assert gens["key"].is_unique
    pairs = pd.read_parquet(run_dir / "pairing" / "pairs.parquet")
    assert pairs["pair_id"].is_unique and set(pairs["task_id"]) <= set(tasks["task_id"])
    status = subprocess.run([sys.executable, "-m", "compeffdist_ray", "status", str(run_dir)], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert status.returncode == 0
    lines = {ln.split()[0]: ln.split() for ln in status.stdout.splitlines()[2:12]}
    assert [lines[s][1] for s in ("attributes", "perspectives", "tasks", "pairing", "responses", "warmup",
                                  "difficulty")] == ["done"] * 4 + ["missing", "waiting", "waiting"]
