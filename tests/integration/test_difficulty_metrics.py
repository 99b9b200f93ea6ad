"""Stage 7 scoring (compeffdist_ray.difficulty): the fast batched scorer against the one-row
reference on tiny random Llama / Qwen3 / Gemma 3 and on SmolLM2, and the metric rules on
hand-made logits.

Tolerances: 1e-5 absolute on every metric, except ``ppl``, compared relatively (1e-5): it is
exp(nll), about V = 1024 for the random models, so 1e-5 absolute on it would ask 1e-8 of nll,
below the float32 noise between a padded batch and a lone forward (~7e-8 measured). SmolLM2
uses 1e-4, its float32 reduction order differing more between batched and single forwards.
"""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")

from compeffdist_ray.difficulty import (  # noqa: E402
    METRIC_COLUMNS,
    encode_row,
    metrics_from_logits,
    rank_scores,
    rank_scores_sorted,
    score_batch,
    score_reference,
    summarize,
    unconditioned_ids,
)
from compeffdist_ray.errors import UserError  # noqa: E402

FAMILIES = ["tiny-random-llama", "tiny-random-qwen3", "tiny-random-gemma3"]

_LABEL = ("Read the text and decide whether the writer's opinion of the product is positive, negative or "
          "neutral. Answer with one label.")
_INTENSITY = "Rate the emotion intensity of the text from 1 to 5 and give a short reason for the score you chose."
_PHRASES = "List the words or phrases of the text that express an opinion about the service, as a JSON list."
_UNIQUE = "Explain in one sentence what the writer feels."

# Several instructions with 2-5 rows each, one instruction used once, an empty response (EOS
# only: a 1-token response), responses of 1 to ~15 tokens. All shorter than Gemma's 128 window.
ROWS = [
    {"instruction": _LABEL, "text": "Battery lasts two full days.", "response": "positive"},
    {"instruction": _INTENSITY, "text": "I am so angry right now!!!", "response": '{"score": 5, "reason": "caps"}'},
    {"instruction": _LABEL, "text": "The screen is gorgeous but the battery barely makes it to dinner time.",
     "response": "neutral, because the praise and the complaint balance out"},
    {"instruction": _PHRASES, "text": "The staff ignored us for twenty minutes.", "response": '["ignored us"]'},
    {"instruction": _INTENSITY, "text": "Meh.", "response": "1"},
    {"instruction": _LABEL, "text": "Arrived late, box crushed.", "response": ""},
    {"instruction": _INTENSITY, "text": "The waiter was lovely and the pasta was great, would come back.",
     "response": "3 - mild joy"},
    {"instruction": _UNIQUE, "text": "Why does this always happen to me?", "response": "Frustration at bad luck."},
    {"instruction": _INTENSITY, "text": "Not bad at all for a budget keyboard.", "response": "2"},
    {"instruction": _PHRASES, "text": "Friendly service, fast food.", "response": '["Friendly service", "fast"]'},
    {"instruction": _INTENSITY, "text": "Quiet typing.", "response": "2, calm"},
]
# Prefixes of the tiny prompts are ~25-35 tokens: allow them all to be cached.
FAST = {"min_prefix_tokens": 4, "batch_size": 4}


def assert_same(ref: list[dict], got: list[dict], atol: float = 1e-5) -> None:
    assert len(ref) == len(got)
    for i, (r, g) in enumerate(zip(ref, got)):
        assert set(g) == set(METRIC_COLUMNS)
        assert g["n_response_tokens"] == r["n_response_tokens"], i
        for key in ("rank_score", "rank_score_all", "nll", "ifd"):
            assert abs(g[key] - r[key]) <= atol, (i, key, r[key], g[key])
        assert math.isclose(g["ppl"], r["ppl"], rel_tol=atol, abs_tol=atol), (i, r["ppl"], g["ppl"])


def load(alias: str, **overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compeffdist_ray.models import resolve_model

    path = resolve_model(alias)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **overrides)
    return model.eval(), AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model, tokenizer = load(request.param)
    return request.param, model, tokenizer, score_reference(model, tokenizer, ROWS)


# ---- the fast path against the reference, per family ---------------------------------------


def test_rows_are_encoded_as_documented(family):
    _, _, tokenizer, ref = family
    for row, r in zip(ROWS, ref):
        enc = encode_row(tokenizer, row)
        assert enc.response_ids[-1] == tokenizer.eos_token_id
        assert enc.response_ids[:-1] == tuple(tokenizer(row["response"], add_special_tokens=False)["input_ids"])
        assert r["n_response_tokens"] == len(enc.response_ids)
        assert unconditioned_ids(tokenizer, enc.response_ids) == (tokenizer.bos_token_id,) + enc.response_ids
    assert ref[5]["n_response_tokens"] == 1  # the empty response: EOS only
    for r in ref:
        assert 0.0 <= r["rank_score_all"] <= r["rank_score"] <= 1.0
        assert r["nll"] > 0 and r["ppl"] == pytest.approx(math.exp(r["nll"])) and r["ifd"] > 0


def test_batched_path_matches_the_reference(family):
    _, model, tokenizer, ref = family
    stats = {}
    assert_same(ref, score_batch(model, tokenizer, ROWS, stats=stats, **FAST))
    # the shared-prefix path really ran: 3 groups of >= 2 rows, the unique instruction went plain
    assert stats["prefix_groups"] == 3
    assert stats["prefix_tokens_reused"] > stats["prefix_tokens_computed"] > 0
    # and only response positions went through lm_head
    assert stats["projected_positions"] == 2 * sum(r["n_response_tokens"] for r in ref)
    # full-attention families run packed (no padding); Gemma 3's sliding layers pad and expand the cache
    packed = family[0] != "tiny-random-gemma3"
    assert stats.get("packed_forwards", 0) == (stats["forwards"] if packed else 0)
    assert (stats["padded_tokens"] == 0) == packed
    # each prefix once, every suffix, every [start] + response row; no pads
    encoded = [encode_row(tokenizer, row) for row in ROWS]
    assert stats["tokens_forwarded"] == (
        sum(len(e.full_ids) for e in encoded) - stats["prefix_tokens_reused"]
        + sum(len(e.response_ids) + 1 for e in encoded))


def test_packed_attention_off_cpu_path_gives_the_same_numbers(family, monkeypatch):
    # Off CPU (or without torch's CPU flash op) the packed attention pads rows and concatenates the prefix.
    import compeffdist_ray.difficulty as difficulty

    _, model, tokenizer, ref = family
    monkeypatch.setattr(difficulty, "_cpu_flash_attention", lambda device: None)
    assert_same(ref, score_batch(model, tokenizer, ROWS, **FAST))


@pytest.mark.parametrize("bucketing", [True, False])
@pytest.mark.parametrize("prefix_reuse", [True, False])
@pytest.mark.parametrize("packing", [True, False])
def test_bucketing_prefix_reuse_and_packing_on_or_off_give_the_same_numbers(family, bucketing, prefix_reuse,
                                                                            packing):
    _, model, tokenizer, ref = family
    assert_same(ref, score_batch(model, tokenizer, ROWS, bucketing=bucketing, prefix_reuse=prefix_reuse,
                                 packing=packing, **FAST))


def test_full_vocabulary_logits_give_the_same_numbers(family):
    _, model, tokenizer, ref = family
    stats = {}
    got = score_batch(model, tokenizer, ROWS, response_only_projection=False, prefix_reuse=False, stats=stats, **FAST)
    assert_same(ref, got)
    assert stats["projected_positions"] > 2 * sum(r["n_response_tokens"] for r in ref)


def test_padding_and_packing_do_not_leak(family):
    _, model, tokenizer, _ = family
    short = [ROWS[4], ROWS[8]]  # same instruction: one cached prefix, one suffix batch
    long_same_group = dict(ROWS[4], text="A very long text about the keyboard, the screen and the battery " * 2,
                           response="4, because the writer lists many annoyances one after another")
    long_other = dict(ROWS[7], text=long_same_group["text"])
    for packing in (False, True):
        for prefix_reuse, extra in ((True, long_same_group), (False, long_other)):
            opts = {"batch_size": 8, "min_prefix_tokens": 4, "prefix_reuse": prefix_reuse, "packing": packing}
            alone_stats, with_stats = {}, {}
            alone = score_batch(model, tokenizer, short, stats=alone_stats, **opts)
            together = score_batch(model, tokenizer, short + [extra], stats=with_stats, **opts)
            assert with_stats["forwards"] == alone_stats["forwards"]  # the long row shared the short rows' batches
            if packing and with_stats.get("packed_forwards"):  # end to end: no pads, rows still apart
                assert with_stats["padded_tokens"] == 0
            else:
                assert with_stats["padded_tokens"] > alone_stats["padded_tokens"] + 20
            assert_same(alone, together[:2], atol=1e-6)


def test_group_key_overrides_the_instruction_and_the_prefix_comes_from_token_ids(family):
    _, model, tokenizer, ref = family
    rows = [dict(row, group="everything") for row in ROWS]  # one group, different instructions
    stats = {}
    assert_same(ref, score_batch(model, tokenizer, rows, min_prefix_tokens=1, stats=stats))
    prompts = [encode_row(tokenizer, row).prompt_ids for row in rows]
    common = 0
    while all(len(p) > common + 1 and p[common] == prompts[0][common] for p in prompts):
        common += 1
    assert stats["prefix_groups"] == 1 and stats["prefix_tokens_computed"] == common  # the chat header only


def test_gemma_sliding_window_long_prefix_and_logit_softcapping():
    # 12 demonstrations make a ~380-token shared prefix, about three times Gemma's 128-token window;
    # the soft cap is set low so that it changes the logits (the random ones are small).
    demos = " ".join(f"Example {k}: Text: the battery died after {k} hours. Answer: negative." for k in range(12))
    instruction = "Label the sentiment as positive, negative or neutral. " + demos
    rows = [{"instruction": instruction, "text": t, "response": r} for t, r in [
        ("Great screen, awful battery, and the speakers crackle when the volume goes above half.", "neutral: mixed"),
        ("Love it.", "positive"), ("Broken on arrival.", "negative, clearly"), ("ok", "")]]
    plain, tokenizer = load("tiny-random-gemma3")
    capped, _ = load("tiny-random-gemma3", final_logit_softcapping=0.05)
    wide, _ = load("tiny-random-gemma3", sliding_window=4096)
    assert min(len(encode_row(tokenizer, r).prompt_ids) for r in rows) > 2 * plain.config.sliding_window
    ref_plain, ref_capped = score_reference(plain, tokenizer, rows), score_reference(capped, tokenizer, rows)
    # both the window and the cap matter here, so agreement below is not by luck
    assert max(abs(a["nll"] - b["nll"]) for a, b in zip(ref_plain, score_reference(wide, tokenizer, rows))) > 1e-3
    assert max(abs(a["nll"] - b["nll"]) for a, b in zip(ref_plain, ref_capped)) > 1e-3
    for model, ref in ((plain, ref_plain), (capped, ref_capped)):
        stats = {}
        assert_same(ref, score_batch(model, tokenizer, rows, batch_size=3, stats=stats))
        assert stats["prefix_tokens_computed"] > 2 * plain.config.sliding_window


def test_smollm2_batched_path_matches_the_reference():
    model, tokenizer = load("smollm2-135m-instruct")
    label = "Classify the sentiment of the following review as positive, negative or neutral. Answer with one word."
    rows = [
        {"instruction": label, "text": "Battery lasts two full days even with heavy use. Really impressed.",
         "response": "positive"},
        {"instruction": label, "text": "Arrived three days late and the box was crushed. The blender works fine.",
         "response": "neutral"},
        {"instruction": label, "text": "The screen is gorgeous but the battery barely makes it to dinner time.",
         "response": "negative"},
        {"instruction": "Name the aspect of the product the writer complains about, in a few words.",
         "text": "The keys feel a little mushy.", "response": "The keys feel mushy."},
    ]
    ref = score_reference(model, tokenizer, rows)
    stats = {}
    assert_same(ref, score_batch(model, tokenizer, rows, stats=stats), atol=1e-4)
    assert stats["prefix_groups"] == 1
    assert ref[0]["nll"] < 5 and ref[0]["ifd"] < 1  # a real model: the instruction helps


# ---- the metric rules on hand-made logits ---------------------------------------------------


def _logits(probs):
    return torch.log(torch.tensor(probs, dtype=torch.float64)).float()


# probabilities by token id; by rank: id1 .5, id4 .3, id3 .15, id0 .04, id2 .01
# cumulative .5 .8 .95 .99 1.0: with top_p = 0.9 the nucleus is {1, 4, 3}, n = 3
_PROBS = [0.04, 0.5, 0.01, 0.15, 0.3]


@pytest.mark.parametrize("ranker", [rank_scores, rank_scores_sorted])
def test_rank_rule_position_over_nucleus_size_else_one(ranker):
    logits = _logits(_PROBS).repeat(5, 1)
    got = ranker(logits, [1, 4, 3, 0, 2], top_p=0.9).tolist()
    assert got == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0], abs=1e-12)
    # a bigger nucleus: top_p = 0.97 -> n = 4, id0 is inside at position 3
    assert ranker(logits[:2], [0, 4], top_p=0.97).tolist() == pytest.approx([3 / 4, 1 / 4], abs=1e-12)
    # top_p = 0.4: the top token alone covers it, n = 1, every other token is outside
    assert ranker(logits[:2], [1, 4], top_p=0.4).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("ranker", [rank_scores, rank_scores_sorted])
def test_ties_are_broken_by_the_lower_token_id(ranker):
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0]]).repeat(4, 1)
    # order 1, 2, 4, 0, 3; each tied token has p ~ .29 (cumulative .29 .57 .86 .96 1): top_p = 0.5
    # gives n = 2, top_p = 0.99 gives n = 5
    got = ranker(logits, [1, 2, 4, 0], top_p=0.5).tolist()
    assert got == [0.0, 0.5, 1.0, 1.0]
    assert ranker(logits, [1, 2, 4, 0], top_p=0.99).tolist() == pytest.approx([0.0, 1 / 5, 2 / 5, 3 / 5])


def test_row_metrics_from_crafted_logits():
    logits = _logits(_PROBS).repeat(4, 1)
    targets = [1, 4, 3, 0]  # scores 0, 1/3, 2/3, 1.0 at top_p = 0.9
    uniform = torch.zeros(4, 5)
    for method in ("sorted", "fast"):
        m = metrics_from_logits(logits, targets, uncond_logits=uniform, top_p=0.9, method=method)
        assert m["n_response_tokens"] == 4
        assert m["rank_score"] == pytest.approx((1 / 3 + 2 / 3 + 1.0) / 3)  # the top-1 token is left out
        assert m["rank_score_all"] == pytest.approx((0 + 1 / 3 + 2 / 3 + 1.0) / 4)
        nll = -(math.log(0.5) + math.log(0.3) + math.log(0.15) + math.log(0.04)) / 4
        assert m["nll"] == pytest.approx(nll, abs=1e-6)
        assert m["ppl"] == pytest.approx(math.exp(nll), rel=1e-6)
        assert m["ifd"] == pytest.approx(nll / math.log(5), abs=1e-6)  # uniform: nll alone = log V
    assert math.isnan(metrics_from_logits(logits, targets, top_p=0.9)["ifd"])  # no unconditioned logits


def test_all_top1_tokens_score_zero_both_ways():
    logits = _logits(_PROBS).repeat(3, 1)
    m = metrics_from_logits(logits, [1, 1, 1], top_p=0.95)
    assert (m["rank_score"], m["rank_score_all"]) == (0.0, 0.0)
    one_hard = summarize([0.0, 0.0, 0.0, 0.6], [1.0] * 4)
    assert one_hard["rank_score"] == pytest.approx(0.6) and one_hard["rank_score_all"] == pytest.approx(0.15)


def test_sort_free_ranking_equals_the_sorting_one_on_random_logits():
    gen = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(40, 300, generator=gen),  # fairly flat
        torch.randn(40, 300, generator=gen) * 8,  # peaked: the top-k prefix suffices
        torch.randint(-3, 3, (40, 300), generator=gen).float(),  # many ties
        torch.randn(40, 5000, generator=gen) * 3,
    ]
    for logits in cases:
        targets = torch.randint(0, logits.shape[1], (logits.shape[0],), generator=gen)
        targets[:10] = logits[:10].argmax(-1)
        for top_p in (0.5, 0.9, 0.95, 1.0):
            fast = rank_scores(logits, targets, top_p=top_p)
            slow = rank_scores_sorted(logits, targets, top_p=top_p)
            assert torch.equal(fast, slow), top_p


def test_bad_input_is_rejected_with_the_columns_named():
    with pytest.raises(UserError, match=r"lacks column\(s\) \['response'\].*expected"):
        score_batch(None, None, [{"instruction": "x", "text": "y"}])
    with pytest.raises(UserError, match="must be strings"):
        score_reference(None, None, [{"instruction": "x", "text": "y", "response": None}])
    with pytest.raises(UserError, match="top_p"):
        rank_scores(torch.zeros(1, 3), [0], top_p=1.5)
    with pytest.raises(UserError, match="list of dicts"):
        score_batch(None, None, {"instruction": "x"})
