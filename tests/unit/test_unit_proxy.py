"""Unit tests for compeffdist_ray.proxy: the proxy difficulty model's pure core.

Backbones are the local tiny random decoders (Llama, Qwen3, Gemma 3), the all-MiniLM-L6-v2
encoder (features only: it costs ~100x a tiny model per token) and a tiny random BERT built
here with MiniLM's tokenizer for the encoder's training and save/load paths. The data set is
synthetic: rows whose text carries a marker phrase are hard (rank_score ~ 0.75), the others
easy (~ 0.2), so difficulty is a learnable function of the text. MiniLM's own training runs
in tests/integration/test_proxy_model.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from compeffdist_ray import proxy as proxy_mod  # noqa: E402
from compeffdist_ray.errors import UserError  # noqa: E402
from compeffdist_ray.prompts import instruction_with_demonstrations  # noqa: E402
from compeffdist_ray.proxy import (  # noqa: E402
    PROXY_CONFIG,
    PROXY_HEAD,
    ProxyParams,
    evaluate_predictions,
    fit_ridge,
    load_proxy,
    split_rows,
    train_proxy,
)

CORPUS = Path(proxy_mod.__file__).resolve().parent / "data" / "sample_corpus.jsonl"
MARKER = "Honestly, it is all terribly ambiguous."
TASKS = {
    "t0": "Decide whether the writer's opinion is positive, negative or neutral. Answer with one label.",
    "t1": "Rate the emotion intensity of the text from 1 to 5 and give a short reason.",
    "t2": "List the words or phrases of the text that express an opinion, as a JSON list.",
}
DECODERS = ["tiny-random-llama", "tiny-random-qwen3", "tiny-random-gemma3"]
ENCODER = "all-minilm-l6-v2"


def _texts() -> list[str]:
    return [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def marker_rows(n: int = 96, seed: int = 0) -> pd.DataFrame:
    """Rows of three tasks (instructions with two demonstrations); marked texts are hard."""
    rng = random.Random(seed)
    texts = _texts()
    demos = [{"text": texts[-1], "output": "positive"}, {"text": texts[-2], "output": "negative"}]
    rows = []
    for k in range(n):
        task = f"t{k % 3}"
        hard = rng.random() < 0.5
        text = texts[k % (len(texts) - 2)]
        rows.append({
            "pair_id": f"p{k}",
            "task_id": task,
            "instruction": instruction_with_demonstrations(TASKS[task], demos),
            "text": f"{text} {MARKER}" if hard else text,
            "response": "positive",
            "rank_score": min(1.0, max(0.0, (0.75 if hard else 0.2) + rng.gauss(0.0, 0.05))),
            "nll": rng.random(),
        })
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return marker_rows()


@pytest.fixture(scope="module")
def decoder_proxy(rows):
    return train_proxy(rows, ProxyParams(backbone="tiny-random-llama"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer, 32-wide random BertModel with MiniLM's tokenizer, saved like any HF encoder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from compeffdist_ray.models import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(ENCODER, kind="embedding"))
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, architectures=["BertModel"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(config)
    out = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return str(out)


@pytest.fixture(scope="module")
def encoder_proxy(rows, tiny_bert):
    return train_proxy(rows, ProxyParams(backbone=tiny_bert))


# ------------------------------------------------------------------------------------------
# parameters, split, metrics, ridge (no model)
# ------------------------------------------------------------------------------------------


def test_params_defaults_and_every_problem_reported_at_once():
    p = ProxyParams()
    assert (p.backbone, p.pooling, p.head, p.train_backbone, p.eval_fraction, p.target, p.split) == (
        None, "auto", "ridge", False, 0.2, "rank_score", "rows")
    with pytest.raises(UserError) as err:
        ProxyParams(pooling="max", eval_fraction=0.9, epochs=0, head="tree", lr=-1)
    msg = str(err.value)
    for fragment in ("pooling must be", "eval_fraction must be in (0, 0.5]", "epochs must be an integer >= 1",
                     "head must be one of", "lr must be a positive number"):
        assert fragment in msg


def test_split_is_deterministic_stratified_and_seeded():
    groups = [f"t{i % 5}" for i in range(100)] + ["solo"]
    a = split_rows(groups, 0.2, seed=3)
    assert np.array_equal(a, split_rows(groups, 0.2, seed=3))
    assert not np.array_equal(a, split_rows(groups, 0.2, seed=4))
    assert 19 <= a.sum() <= 21
    for g in {f"t{i}" for i in range(5)}:  # every task on both sides, about 20% held out
        held = sum(1 for k, m in zip(groups, a) if k == g and m)
        assert 3 <= held <= 5


def test_group_split_holds_out_whole_groups():
    groups = [f"t{i % 6}" for i in range(60)]
    held = split_rows(groups, 0.3, seed=0, by="groups")
    held_groups = {g for g, m in zip(groups, held) if m}
    assert all(m for g, m in zip(groups, held) if g in held_groups)
    assert 1 <= len(held_groups) <= 5 and 10 <= held.sum() <= 30
    with pytest.raises(UserError, match="at least 2 groups"):
        split_rows(["a"] * 10, 0.2, seed=0, by="groups")


def test_metrics_handle_constant_inputs_and_average_within_groups():
    y = np.array([0.1, 0.2, 0.3, 0.9, 0.8, 0.7])
    m = evaluate_predictions(y, np.full(6, 0.5), groups=list("aaabbb"), baseline=0.5)
    assert m["spearman"] is None and m["pearson"] is None and m["spearman_within_groups"] is None
    assert m["mae"] == pytest.approx(m["mae_baseline"]) and m["n_groups_within"] == 0
    pred = np.array([0.1, 0.2, 0.3, 0.1, 0.2, 0.3])  # right order in a, reversed in b
    m = evaluate_predictions(y, pred, groups=list("aaabbb"), baseline=0.5)
    assert m["spearman_within_groups"] == pytest.approx(0.0) and m["n_groups_within"] == 2
    assert math.isfinite(m["spearman"]) and m["mae"] == pytest.approx(np.mean(np.abs(y - pred)))


def test_ridge_matches_closed_form_and_brute_force_leave_one_out():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 50)) + 2.0
    y = x[:, 0] - x[:, 1] + rng.normal(scale=0.3, size=30)
    fit = fit_ridge(x, y)
    xc, yc = x - x.mean(0), y - y.mean()
    coef = np.linalg.solve(xc.T @ xc + fit["alpha"] * np.eye(50), xc.T @ yc)
    np.testing.assert_allclose(fit["coef"], coef, atol=1e-8)
    assert fit["intercept"] == pytest.approx(y.mean() - x.mean(0) @ coef)
    errors = []
    for i in range(30):
        keep = np.arange(30) != i
        xk, yk = x[keep], y[keep]
        xkc = xk - xk.mean(0)
        ck = np.linalg.solve(xkc.T @ xkc + fit["alpha"] * np.eye(50), xkc.T @ (yk - yk.mean()))
        errors.append((yk.mean() + (x[i] - xk.mean(0)) @ ck - y[i]) ** 2)
    assert fit["loo_mse"] == pytest.approx(np.mean(errors), rel=1e-8)


def test_backbone_kind_from_config():
    from transformers import BertConfig, LlamaConfig, T5Config

    assert proxy_mod.backbone_kind(LlamaConfig(architectures=["LlamaForCausalLM"])) == "decoder"
    assert proxy_mod.backbone_kind(LlamaConfig(architectures=["LlamaModel"])) == "decoder"  # a saved proxy
    assert proxy_mod.backbone_kind(BertConfig(architectures=["BertModel"])) == "encoder"
    with pytest.raises(UserError, match="encoder-decoder"):
        proxy_mod.backbone_kind(T5Config())


# ------------------------------------------------------------------------------------------
# inputs and features
# ------------------------------------------------------------------------------------------


def test_decoder_input_is_the_students_prompt_and_truncation_keeps_the_text(decoder_proxy):
    from compeffdist_ray.difficulty import encode_row

    model, _ = decoder_proxy
    tok = model.tokenizer
    row = marker_rows(3).iloc[1].to_dict()
    ids = proxy_mod._decoder_ids(tok, [row["instruction"]], [row["text"]], 10_000, {})
    assert tuple(ids[0]) == encode_row(tok, row).prompt_ids

    long_instruction = "Judge the sentiment. " + " ".join(["Example text and its answer."] * 200)
    stats: dict = {}
    short = proxy_mod._decoder_ids(tok, [long_instruction], [row["text"]], 96, stats)[0]
    assert len(short) <= 96 and stats == {"truncated": 1}
    prompt = tok.decode(short)
    assert prompt.startswith("<|im_start|>user\nJudge the sentiment.")  # instruction start kept
    assert prompt.endswith(f"Text: {row['text'].strip()}<|im_end|>\n<|im_start|>assistant\n")  # text whole


@pytest.mark.parametrize("alias", DECODERS + [ENCODER])
def test_batched_features_equal_one_at_a_time(alias):
    params = ProxyParams(backbone=alias)
    loaded = proxy_mod._load_backbone(proxy_mod.resolve_backbone(alias), "cpu")
    model = proxy_mod._new_model(loaded, params, (0.0, 1.0))
    assert model.pooling == ("mean" if alias == ENCODER else "last")
    df = marker_rows(12, seed=1)
    # lengths differ a lot (marked texts, one long instruction): batches mix widths and pads
    instructions = list(df["instruction"])
    instructions[5] = instructions[5] + " Be careful." * 40
    texts = list(df["text"])
    batched = model.features(instructions, texts, batch_size=5)
    assert batched.shape == (12, model.feature_dim)
    model.clear_cache()  # each instruction is then embedded alone, by the first one-row call that has it
    single = [model.features([i], [t], batch_size=1)[0] for i, t in zip(instructions, texts)]
    np.testing.assert_allclose(batched, np.stack(single), atol=1e-5, rtol=0)
    np.testing.assert_allclose(model.features(instructions, texts, batch_size=32), batched, atol=1e-5, rtol=0)


def test_prefix_reuse_changes_nothing_but_the_work():
    params = ProxyParams(backbone="tiny-random-gemma3")  # 128-token sliding window < the shared prefix
    model = proxy_mod._new_model(proxy_mod._load_backbone(proxy_mod.resolve_backbone(params.backbone), "cpu"),
                                 params, (0.0, 1.0))
    df = marker_rows(9, seed=3)
    plain = model.features(list(df["instruction"]), list(df["text"]), prefix_reuse=False)
    assert "prefix_tokens_reused" not in model.stats
    reused = model.features(list(df["instruction"]), list(df["text"]), batch_size=2)
    assert model.stats["prefix_tokens_reused"] > 3 * 2 * 128  # 3 tasks, 2 of 3 rows each skip the prefix
    np.testing.assert_allclose(reused, plain, atol=1e-5, rtol=0)


def test_mean_pooling_on_a_decoder_also_ignores_padding():
    params = ProxyParams(backbone="tiny-random-qwen3", pooling="mean")
    model = proxy_mod._new_model(proxy_mod._load_backbone(proxy_mod.resolve_backbone(params.backbone), "cpu"),
                                 params, (0.0, 1.0))
    df = marker_rows(6, seed=2)
    batched = model.features(list(df["instruction"]), list(df["text"]), batch_size=6)
    assert model.stats["prefix_tokens_reused"] > 0  # the prefix's states count in the mean
    single = np.stack([model.features([i], [t])[0] for i, t in zip(df["instruction"], df["text"])])
    np.testing.assert_allclose(batched, single, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# training and prediction
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["decoder", "encoder"])
def test_learns_a_text_marker(which, request):
    model, metrics = request.getfixturevalue(f"{which}_proxy")
    assert metrics["kind"] == which and metrics["n_train"] + metrics["n_eval"] == 96
    assert 17 <= metrics["n_eval"] <= 21
    assert metrics["spearman"] > 0.5, metrics
    assert metrics["mae"] < 0.8 * metrics["mae_baseline"], metrics
    assert metrics["spearman_within_groups"] > 0.3 and metrics["n_groups_within"] == 3
    fresh = marker_rows(40, seed=7)  # unseen rows of the same tasks
    pred = model.predict_rows(fresh)
    assert pred.dtype == np.float64 and pred.shape == (40,)
    lo, hi = model.target_range
    assert np.all((pred >= lo) & (pred <= hi))
    hard = fresh["text"].str.contains(MARKER).to_numpy()
    assert pred[hard].mean() > pred[~hard].mean() + 0.2


def test_training_is_deterministic_and_leaves_the_global_rng_alone(rows):
    rows = rows.head(48)
    params = ProxyParams(backbone="tiny-random-llama", head="mlp", hidden_dim=16, epochs=5, seed=11)
    state = torch.get_rng_state()
    a, ma = train_proxy(rows, params)
    assert torch.equal(state, torch.get_rng_state())
    b, mb = train_proxy(rows, params)
    probe = marker_rows(10, seed=5)
    np.testing.assert_array_equal(a.predict_rows(probe), b.predict_rows(probe))
    assert ma["spearman"] == mb["spearman"] and ma["mae"] == mb["mae"]
    c, _ = train_proxy(rows, dataclasses.replace(params, seed=12))
    assert not np.array_equal(a.predict_rows(probe), c.predict_rows(probe))


def test_predict_input_checks(decoder_proxy):
    model, _ = decoder_proxy
    assert model.predict([], []).shape == (0,)
    with pytest.raises(UserError, match="2 instructions but 1 texts"):
        model.predict(["a", "b"], ["x"])
    with pytest.raises(UserError, match="not strings"):
        model.predict(["a"], [None])
    with pytest.raises(UserError, match="lack column"):
        model.predict_rows([{"instruction": "a"}])


# ------------------------------------------------------------------------------------------
# save / load
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["decoder", "encoder"])
def test_save_load_gives_the_same_predictions(which, request, tmp_path):
    from transformers import AutoModel

    model, metrics = request.getfixturevalue(f"{which}_proxy")
    out = model.save(tmp_path / "proxy")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", PROXY_HEAD, PROXY_CONFIG, "tokenizer.json"} <= names
    cfg = json.loads((out / PROXY_CONFIG).read_text())
    assert cfg["kind"] == which and cfg["target"] == "rank_score" and cfg["feature_dim"] == model.feature_dim
    assert cfg["metrics"]["spearman"] == pytest.approx(metrics["spearman"])
    assert cfg["params"]["backbone"] == model.params.backbone and cfg["head"] == "ridge"
    AutoModel.from_pretrained(str(out))  # plain Hugging Face format

    loaded = load_proxy(out)
    probe = marker_rows(16, seed=9)
    np.testing.assert_allclose(loaded.predict_rows(probe), model.predict_rows(probe), atol=1e-6, rtol=0)
    assert (loaded.kind, loaded.pooling, loaded.target_range) == (model.kind, model.pooling, model.target_range)
    model.save(out)  # replacing a proxy directory is allowed


def test_load_and_save_errors_name_the_directory(tmp_path, decoder_proxy):
    with pytest.raises(UserError, match="does not exist"):
        load_proxy(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError) as err:
        load_proxy(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(err.value)
    assert f"missing {PROXY_CONFIG}, {PROXY_HEAD}, config.json" in str(err.value)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a proxy directory"):
        decoder_proxy[0].save(other)
    assert (other / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------
# bad training inputs
# ------------------------------------------------------------------------------------------


def test_missing_target_column_lists_the_columns(rows):
    with pytest.raises(UserError) as err:
        train_proxy(rows.drop(columns=["rank_score"]), ProxyParams(backbone="tiny-random-llama"))
    msg = str(err.value)
    assert "'rank_score'" in msg and "'instruction'" in msg and "'nll'" in msg


def test_too_few_rows_and_non_finite_targets(rows):
    params = ProxyParams(backbone="tiny-random-llama")
    few = rows.head(10).copy()
    few["rank_score"] = few["rank_score"].astype(object)
    few.loc[few.index[:4], "rank_score"] = [np.nan, np.inf, None, "n/a"]
    few.loc[few.index[4], "rank_score"] = -np.inf
    with pytest.raises(UserError, match=r"at least 8 rows .* got 5 \(5 dropped as missing or non-finite\)"):
        train_proxy(few, params)
    some = rows.head(40).copy()
    some.loc[some.index[:3], "rank_score"] = np.nan
    _, metrics = train_proxy(some, params)
    assert metrics["n_dropped_nonfinite"] == 3 and metrics["n_rows"] == 37


def test_backbone_must_be_set_and_inputs_must_be_strings(rows):
    with pytest.raises(UserError, match="no backbone"):
        train_proxy(rows, ProxyParams())
    bad = rows.head(20).copy()
    bad["text"] = bad["text"].astype(object)
    bad.loc[bad.index[3], "text"] = 3.5
    with pytest.raises(UserError, match="not strings"):
        train_proxy(bad, ProxyParams(backbone="tiny-random-llama"))


def test_other_targets_and_finetuning_the_backbone(rows):
    params = ProxyParams(backbone="tiny-random-llama", target="nll", train_backbone=True, finetune_epochs=1,
                         train_batch_size=16, refit=False)
    before = {k: v.clone() for k, v in proxy_mod._load_backbone(
        proxy_mod.resolve_backbone("tiny-random-llama"), "cpu")[1].state_dict().items()}
    model, metrics = train_proxy(rows, params)
    assert metrics["target"] == "nll" and model.target == "nll"
    after = model.backbone.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert model.predict_rows(rows.head(4)).shape == (4,)
