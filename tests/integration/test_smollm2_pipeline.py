"""Every stage (attributes to finetune) with the real SmolLM2-135M-Instruct teacher on local Ray (a few minutes on 2 cores)."""

from __future__ import annotations

import pytest

from conftest import CONFIGS

pytestmark = pytest.mark.integration


def test_smollm2_stages_attributes_to_finetune(ray_session, tmp_path):
    from compeffdist_ray.artifacts import RunDir
    from compeffdist_ray.config import load_config
    from compeffdist_ray.pipeline import run_pipeline

    cfg = load_config(CONFIGS / "local-demo.yaml", [
        f"run_dir={tmp_path / 'run'}", "attributes.num_texts=10", "tasks.max_perspectives=2",
        "tasks.tasks_per_perspective=2", "tasks.num_demonstrations=2", "pairing.num_texts=20",
        "responses.max_new_tokens=48",
        "warmup.num_samples=8", "finetune.max_steps=2",  # two steps each: the trainer is tested on its own
    ])
    statuses = run_pipeline(cfg)
    assert [s.state for s in statuses] == ["done"] * 10
    rd = RunDir(cfg.run_dir)
    m = {s.name: s.manifest for s in statuses}
    attrs = rd.read_df("attributes", "attribute_counts")
    assert len(attrs) >= 5 and m["attributes"].tokens["output"] > 0
    assert m["perspectives"].rows >= 2
    tasks = rd.read_df("tasks", "tasks")
    assert len(tasks) >= 1
    for t in tasks.itertuples():
        assert len(t.instruction.split()) >= 5 and len(t.demonstrations) >= 1
        assert all(d["output"].strip() for d in t.demonstrations)
    assert m["tasks"].tokens["input"] > 0
    pairs = rd.read_df("pairing", "pairs")
    assert len(pairs) == 20
    responses = rd.read_df("responses", "responses")
    assert len(responses) >= 14 and responses["response"].str.strip().str.len().gt(0).all()
    assert m["responses"].tokens["output"] == int(rd.read_df("responses", "generations")["output_tokens"].sum()) > 0
    warm = m["warmup"].stats
    untruncated = int((~responses["truncated"]).sum())
    assert warm["steps"] >= 1 and warm["loss_last"] > 0 and warm["samples"] == min(8, untruncated)
    scored = rd.read_df("difficulty", "difficulty")
    assert len(scored) == len(responses) and scored["rank_score"].between(0, 1).all()
    assert scored["nll"].gt(0).all() and scored["n_response_tokens"].ge(1).all()
    assert 0 < m["sampling"].rows < len(scored)

    # the distilled student loads with transformers and answers a chat prompt
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = rd.path("finetune", "model")
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "Is this review positive or negative? 'Loved it.'"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    answer = gen[0, ids["input_ids"].shape[1]:]
    assert len(answer) >= 1 and isinstance(tok.decode(answer, skip_special_tokens=True), str)
    assert m["finetune"].stats["loss_last"] > 0 and m["finetune"].stats["steps"] == 2
    assert m["evaluate"].stats == {"skipped": "no evaluate.data_dir"}  # the embedded default has no SentiBench
