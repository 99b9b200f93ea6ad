"""`compeffdist eval` with real tiny random models on a few rows of SentiBench (local Ray).

SentiBench is read from ../shared/sentibench (never copied into the project); the tests skip
when it is absent.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED

pytestmark = pytest.mark.integration

DATA = SHARED / "sentibench"
needs_data = pytest.mark.skipif(not (DATA / "sc" / "sst2" / "test.json").is_file(),
                                reason=f"SentiBench data not found at {DATA} (the tests read it from ../shared)")
FAMILIES = ["tiny-random-llama", "tiny-random-qwen3", "tiny-random-gemma3"]


def requests_for(tokenizer, name: str, limit: int, k: int = 2):
    from compeffdist_ray import evaluation as ev

    found, _ = ev.discover_datasets(DATA)
    ds = ev.load_dataset(DATA, name, found[name], limit=limit)
    return ds, ev.build_requests(ds, k=k, seed=42, count_tokens=lambda t: len(tokenizer(t)["input_ids"]),
                                 max_prompt_tokens=1024)


@needs_data
@pytest.mark.parametrize("alias", FAMILIES)
def test_batched_left_padded_scoring_and_generation_match_one_at_a_time(alias):
    from compeffdist_ray import evaluation as ev
    from compeffdist_ray.eval_runner import LMScorer
    from compeffdist_ray.models import resolve_model

    scorer = LMScorer(resolve_model(alias), threads=2)
    tok = scorer.tokenizer
    ds, rows = requests_for(tok, "multifaced/tweeteval", limit=6)  # 4 labels
    assert len({len(tok(r["prompt"])["input_ids"]) for r in rows}) > 1  # the batch really is padded
    cand = ev.label_first_tokens(lambda t: tok(t, add_special_tokens=False)["input_ids"], ds.labels)
    prompts = [r["prompt"] for r in rows]
    batched = scorer.score(prompts, [cand] * len(prompts))
    single = [scorer.score([p], [cand])[0] for p in prompts]
    assert [b["pred"] for b in batched] == [s["pred"] for s in single]
    for b, s in zip(batched, single):
        assert b["logits"] == pytest.approx(s["logits"], abs=1e-4)
        assert b["input_tokens"] == s["input_tokens"]

    _, rows = requests_for(tok, "absa/atsa_rest16", limit=4)
    prompts = [r["prompt"] for r in rows]
    batched = scorer.generate(prompts, max_new_tokens=10)
    single = [scorer.generate([p], max_new_tokens=10)[0] for p in prompts]
    assert batched == single
    assert all(g["finish"] in ("line", "eos", "length") and "\n" not in g["text"] for g in batched)


@needs_data
@pytest.mark.parametrize("alias", FAMILIES)
def test_prompts_after_a_cached_shared_prefix_equal_whole_prompts(alias):
    """Shared demonstrations: the instruction and demonstrations run once (KV cache), each row only its
    own sentence; labels, logits and greedy answers equal those of the whole prompts."""
    from compeffdist_ray import evaluation as ev
    from compeffdist_ray.eval_runner import LMScorer, shared_prefix_lengths
    from compeffdist_ray.models import resolve_model

    scorer = LMScorer(resolve_model(alias), threads=2)
    tok = scorer.tokenizer

    def with_prefix(rows):
        ids = [tok(r["prompt"])["input_ids"] for r in rows]
        for r, n in zip(rows, shared_prefix_lengths(ids, [r["demos"] for r in rows])):
            r["prefix_tokens"] = n
        assert all(r["prefix_tokens"] >= 64 for r in rows)
        return rows

    ds, rows = requests_for(tok, "multifaced/tweeteval", limit=6, k=4)
    cand = ev.label_first_tokens(lambda t: tok(t, add_special_tokens=False)["input_ids"], ds.labels)
    for r in with_prefix(rows):
        r["candidates"] = json.dumps(cand)
    fast = scorer.classify(rows)
    whole = scorer.score([r["prompt"] for r in rows], [cand] * len(rows))
    assert scorer.stats["prefixes_computed"] == 1
    assert [f["pred"] for f in fast] == [w["pred"] for w in whole]
    for f, w in zip(fast, whole):
        assert f["logits"] == pytest.approx(w["logits"], abs=1e-4) and f["input_tokens"] == w["input_tokens"]

    _, rows = requests_for(tok, "absa/atsa_rest16", limit=5, k=4)
    fast = scorer.generate_rows(with_prefix(rows), max_new_tokens=10)
    whole = scorer.generate([r["prompt"] for r in rows], max_new_tokens=10)
    assert [(f["text"], f["finish"]) for f in fast] == [(w["text"], w["finish"]) for w in whole]
    # decoding after a prefix needs full attention in every layer: Gemma 3's sliding windows decode whole
    assert scorer.stats["prefixes_computed"] == (1 if alias == "tiny-random-gemma3" else 2)


@needs_data
def test_label_first_tokens_with_a_real_tokenizer():
    from transformers import AutoTokenizer

    from compeffdist_ray import evaluation as ev
    from compeffdist_ray.errors import UserError
    from compeffdist_ray.models import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("tiny-random-llama"))

    def encode(t):
        return tok(t, add_special_tokens=False)["input_ids"]

    ids = ev.label_first_tokens(encode, ["anger", "joy", "optimism", "sadness"])
    assert len(set(ids)) == 4
    assert ids[2] == encode("Label: optimism")[len(encode("Label:"))] == encode(" optimism")[0]
    # the tiny models' small BPE vocabulary starts " negative" and " neutral" with the same " ne"
    with pytest.raises(UserError, match=r"'negative' and 'neutral' share their first token ' ne' \(id \d+\)"):
        ev.label_first_tokens(encode, ["negative", "neutral", "positive"], decode=tok.decode)


def _metrics(result: dict) -> dict:
    """The per-dataset blocks (metrics, counts, examples) as they read back from the JSON file."""
    return json.loads(json.dumps(result["datasets"]))


@needs_data
def test_eval_cli_and_ray_path_give_identical_metrics(ray_session, tmp_path):
    from compeffdist_ray.eval_runner import EvalConfig, predictions_dir_for, run_eval

    out = tmp_path / "tiny.json"
    args = ["--model", "tiny-random-llama", "--data-dir", str(DATA), "--datasets", "sst2,atsa_rest16",
            "--limit", "6", "--k-shot", "2", "--batch-size", "4", "--max-new-tokens", "12"]
    proc = subprocess.run([sys.executable, "-m", "compeffdist_ray", "eval", *args, "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert list(result["datasets"]) == ["sc/sst2", "absa/atsa_rest16"]
    assert (result["model"], result["k"], result["seed"], result["limit"]) == ("tiny-random-llama", 2, 42, 6)
    clf, absa = result["datasets"]["sc/sst2"], result["datasets"]["absa/atsa_rest16"]
    assert clf["kind"] == "classification" and clf["n"] == 6 and clf["labels"] == ["negative", "positive"]
    assert sum(sum(row.values()) for row in clf["confusion"].values()) == 6
    assert 0.0 <= clf["metrics"]["macro_f1"] <= 1.0 and len(clf["examples"]) == 5
    assert absa["kind"] == "atsa" and absa["n"] == 6 and absa["counts"]["n_gold"] > 0
    assert 0 <= absa["parse_failures"] <= 6 and result["wall_time_s"] > 0 and result["tokens"]["input"] > 0
    assert "| sc/sst2 " in proc.stdout and "| mean " in proc.stdout and f"results: {out}" in proc.stdout

    # the same run again, in this process on the test session's Ray: identical metrics and examples
    cfg = EvalConfig(model="tiny-random-llama", data_dir=str(DATA), datasets=("sst2", "atsa_rest16"),
                     limit=6, k_shot=2, batch_size=4, max_new_tokens=12)
    again = run_eval(cfg)
    assert _metrics(again) == _metrics(result) and again["reused_predictions"] == []

    # the CLI saved each dataset's predictions beside its result: a rerun reuses them ...
    saved = predictions_dir_for(out)
    assert sorted(p.name for p in saved.iterdir()) == ["_index.json", "absa__atsa_rest16.jsonl", "sc__sst2.jsonl"]
    reused = run_eval(cfg, predictions_dir=saved)
    assert reused["reused_predictions"] == ["sc/sst2", "absa/atsa_rest16"] and _metrics(reused) == _metrics(result)
    # ... but not those of a dataset whose entry is gone (a run killed before it was recorded) ...
    index = json.loads((saved / "_index.json").read_text())
    del index["sc/sst2"]
    (saved / "_index.json").write_text(json.dumps(index))
    redone = run_eval(cfg, predictions_dir=saved)
    assert redone["reused_predictions"] == ["absa/atsa_rest16"] and _metrics(redone) == _metrics(result)
    # a different batch size changes nothing either (left padding, per-row positions)
    other = run_eval(EvalConfig(model="tiny-random-llama", data_dir=str(DATA), datasets=("sst2",),
                                limit=6, k_shot=2, batch_size=1))
    assert _metrics(other)["sc/sst2"] == result["datasets"]["sc/sst2"]

    (tmp_path / "again.json").write_text(json.dumps(again))
    cmp = subprocess.run([sys.executable, "-m", "compeffdist_ray", "eval", "--compare", str(out),
                          str(tmp_path / "again.json")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert cmp.returncode == 0, cmp.stderr
    assert "[tiny.json]" in cmp.stdout and "[again.json]" in cmp.stdout and "| mean" in cmp.stdout
