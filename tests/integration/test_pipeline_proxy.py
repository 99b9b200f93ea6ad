"""Proxy mode end to end on local Ray: seed answers -> warm-up -> difficulty -> proxy -> sampling by
prediction -> the teacher answers the kept pairs only. Scripted teacher over real HTTP, tiny random
Llama student (its warmed-up copy is the proxy's backbone)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CONFIGS, scripted_overrides

pytestmark = pytest.mark.integration


def test_proxy_mode_answers_only_seed_and_kept_pairs(ray_session, scripted_teacher, tmp_path):
    from compeffdist_ray.artifacts import RunDir
    from compeffdist_ray.config import load_config
    from compeffdist_ray.pipeline import run_pipeline
    from compeffdist_ray.proxy import load_proxy
    from compeffdist_ray.sampling import keep_count

    teacher, url = scripted_teacher()
    cfg = load_config(CONFIGS / "tiny-test.yaml", scripted_overrides(url, tmp_path / "run") + [
        "filtering.proxy.enabled=true", "filtering.proxy.seed_pairs=16", "warmup.num_samples=8",
        "sampling.keep_ratio=0.5"])
    statuses = run_pipeline(cfg)
    assert [s.name for s in statuses] == ["attributes", "perspectives", "tasks", "pairing", "responses", "warmup",
                                          "difficulty", "proxy", "sampling", "kept_responses", "finetune",
                                          "evaluate"]
    assert all(s.state == "done" for s in statuses)
    m = {s.name: s.manifest for s in statuses}
    rd = RunDir(cfg.run_dir)

    pairs = rd.read_df("pairing", "pairs")
    seed = rd.read_df("responses", "responses")
    assert len(pairs) == 40 and len(seed) == 16 and m["responses"].stats["proxy_seed"] == {"answered": 16, "of_pairs": 40}
    assert len(rd.read_df("difficulty", "difficulty")) == 16

    scores = rd.read_df("proxy", "scores")
    assert sorted(scores["pair_id"]) == sorted(pairs["pair_id"])
    assert np.isfinite(scores["proxy_score"]).all() and scores["seed"].sum() == 16
    metrics = m["proxy"].stats["metrics"]
    assert metrics["n_train"] + metrics["n_eval"] == 16 and metrics["mae"] >= 0
    # the saved proxy reloads and predicts what the stage wrote
    proxy = load_proxy(rd.path("proxy", "model"))
    few = scores.head(5)
    np.testing.assert_allclose(proxy.predict(list(few["instruction"]), list(few["text"])), few["proxy_score"], atol=1e-5)

    kept = rd.read_df("sampling", "kept")
    sizes = pairs["task_id"].value_counts()
    assert kept["task_id"].value_counts().to_dict() == {t: keep_count(n, 0.5) for t, n in sizes.items()}

    final = rd.read_df("kept_responses", "kept")
    gens = rd.read_df("kept_responses", "generations")
    asked = set(gens["key"])
    assert asked == set(kept["pair_id"]) - set(seed["pair_id"]), "the teacher must answer kept, unanswered pairs only"
    assert set(final["pair_id"]) <= set(kept["pair_id"]) and final["response"].str.len().gt(0).all()
    assert final["proxy_score"].notna().all()
    report = m["kept_responses"].stats["teacher"]
    assert report["answered"] == 16 + len(gens) and report["never_answered"] == 40 - 16 - len(gens)
    assert report["answer_tokens_saved_est"] > 0 and 0 < report["saved_share_est"] < 1
    # every token the server billed is in some stage's manifest: nothing was asked twice
    assert (sum(x.tokens["input"] for x in m.values()), sum(x.tokens["output"] for x in m.values())) == (
        teacher.tokens["input"], teacher.tokens["output"])

    # the same config again: every stage is skipped, the teacher hears nothing
    before = teacher.requests
    run_pipeline(cfg)
    assert teacher.requests == before
