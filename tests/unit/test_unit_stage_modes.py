"""Which stages a config runs (proxy mode, answers from a file), and the pure parts of the
proxy-mode stages: proxy settings, answer-file rows, teacher tokens saved."""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest

from compeffdist_ray.config import ConfigError, load_config
from compeffdist_ray.errors import UserError
from compeffdist_ray.stages import active_stage_names, load_stage_module


def test_default_order_then_proxy_mode_then_answers_file(tmp_path):
    assert active_stage_names(load_config(None, [])) == (
        "attributes", "perspectives", "tasks", "pairing", "responses", "warmup", "difficulty", "sampling", "finetune", "evaluate")
    proxy = load_config(None, ["filtering.proxy.enabled=true"])
    assert active_stage_names(proxy) == (
        "attributes", "perspectives", "tasks", "pairing", "responses", "warmup", "difficulty", "proxy", "sampling",
        "kept_responses", "finetune", "evaluate")
    assert load_stage_module("sampling").inputs(proxy) == ("proxy",)
    assert load_stage_module("sampling").inputs(load_config(None, [])) == ("difficulty",)
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"instruction": "i", "text": "t", "response": "r"}) + "\n")
    own = load_config(None, [f"responses.file={f}"])
    assert active_stage_names(own) == ("responses", "warmup", "difficulty", "sampling", "finetune", "evaluate")
    assert load_stage_module("responses").inputs(own) == ()
    with pytest.raises(ConfigError, match="filtering.proxy.enabled: proxy mode .* set one or the other"):
        load_config(None, [f"responses.file={f}", "filtering.proxy.enabled=true"])


def test_proxy_mode_changes_the_responses_fingerprint_only_through_its_seed():
    mod = load_stage_module("responses")
    base = mod.config_view(load_config(None, []))
    assert mod.config_view(load_config(None, ["filtering.proxy.seed_pairs=10"])) == base  # off: irrelevant
    on = mod.config_view(load_config(None, ["filtering.proxy.enabled=true"]))
    assert on != base and on["proxy_seed_pairs"] == 64


def test_proxy_config_mirrors_proxy_params():
    from compeffdist_ray.proxy import ProxyParams
    from compeffdist_ray.stages.proxy import _NOT_PARAMS, proxy_params

    cfg = load_config(None, [])
    section = {k: v for k, v in dataclasses.asdict(cfg.filtering.proxy).items() if k not in _NOT_PARAMS}
    defaults = {f.name: f.default for f in dataclasses.fields(ProxyParams) if f.name != "seed"}
    assert section == defaults, "config defaults must equal ProxyParams defaults"
    params = proxy_params(load_config(None, ["filtering.proxy.head=mlp", "seed=9"]), "all-minilm-l6-v2")
    assert params.head == "mlp" and params.seed == 9 and params.backbone == "all-minilm-l6-v2"


def test_seed_pairs_are_a_seeded_subset():
    from compeffdist_ray.stages.responses import seed_pairs

    pairs = pd.DataFrame({"pair_id": [f"p{i}" for i in range(50)]})
    a, b = seed_pairs(pairs, 10, 3), seed_pairs(pairs, 10, 3)
    assert list(a["pair_id"]) == list(b["pair_id"]) and len(a) == 10 and a["pair_id"].is_unique
    assert list(seed_pairs(pairs, 10, 4)["pair_id"]) != list(a["pair_id"])
    assert len(seed_pairs(pairs, 500, 3)) == 50


def test_answers_file_rows(tmp_path):
    from compeffdist_ray.stages.responses import rows_from_file

    f = tmp_path / "a.csv"
    pd.DataFrame({"instruction": ["Rate it.", "Rate it.", "Label it.", "Label it.", "Label it."],
                  "text": ["good", "bad", "good", "good", "  "],
                  "response": ["5", "1", "positive", "positive", "neutral"]}).to_csv(f, index=False)
    rows, dropped = rows_from_file(str(f))
    assert len(rows) == 3 and dropped == {"empty_text": 1, "duplicate": 1}
    assert rows["task_id"].nunique() == 2 and rows["pair_id"].is_unique
    assert set(rows.columns) >= {"pair_id", "task_id", "text_id", "text", "instruction", "response", "truncated"}
    g = tmp_path / "b.jsonl"
    g.write_text("".join(json.dumps({"pair_id": "x", "instruction": "i", "text": t, "response": "r"}) + "\n"
                         for t in ("a", "b")))
    with pytest.raises(UserError, match="pair_id 'x' appears 2 times"):
        rows_from_file(str(g))


def test_tokens_saved_estimate():
    from compeffdist_ray.stages.kept_responses import savings

    seed = pd.DataFrame({"input_tokens": [100] * 10, "output_tokens": [20] * 10})
    new = pd.DataFrame({"input_tokens": [100] * 40, "output_tokens": [20] * 40})
    r = savings(100, seed, new, 45)
    assert r["answered"] == 50 and r["never_answered"] == 50
    assert r["answer_tokens_spent"] == {"input": 5000, "output": 1000}
    assert r["answer_tokens_saved_est"] == 6000 and r["saved_share_est"] == 0.5
    assert savings(10, seed, None, 5)["never_answered"] == 0
