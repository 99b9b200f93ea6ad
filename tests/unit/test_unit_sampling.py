"""Unit tests for compeffdist_ray.sampling, the pure core of stage 9 (difficulty sampling).

Statistical checks draw many independent groups in one call (every group has its own random
stream), so they are Monte-Carlo over thousands of draws yet fast, and deterministic: the
tolerances are about 4 standard deviations of the estimate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest

from compeffdist_ray.config import ConfigError, load_config
from compeffdist_ray.sampling import (
    METHODS,
    curve_function,
    curve_keep_probabilities,
    difficulty_ranks,
    keep_count,
    label_of,
    sample,
    solve_curve_b,
)

FIXED_COUNT = ("rank_weighted", "hardest", "random")
RANDOMISED = ("rank_weighted", "curve", "random")


def _frame(sizes: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """Groups of the given sizes, rows interleaved across groups, distinct random scores."""
    keys = [g for g, n in sizes.items() for _ in range(n)]
    rng = np.random.default_rng(seed)
    keys = [keys[i] for i in rng.permutation(len(keys))]
    return pd.DataFrame(
        {"row_id": np.arange(len(keys)), "task_id": keys, "rank_score": rng.random(len(keys))}
    )


def _replicated(n_groups: int, n: int, seed: int = 0) -> pd.DataFrame:
    """n_groups groups of n rows; each group's scores are 0..n-1 in a random order."""
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.permutation(n) for _ in range(n_groups)]).astype(float)
    return pd.DataFrame({"task_id": np.repeat([f"g{i:05d}" for i in range(n_groups)], n), "rank_score": scores})


def _inclusion_by_rank(df: pd.DataFrame, n: int, **kwargs) -> np.ndarray:
    """Share of groups in which the row of rank rho (index rho - 1, hardest first) was kept."""
    res = sample(df, **kwargs)
    rho = n - res.kept["rank_score"].to_numpy().astype(int)  # score n-1 is rank 1
    return np.bincount(rho - 1, minlength=n) / df["task_id"].nunique()


def _kept_per_group(res) -> dict[str, int]:
    return res.kept.groupby("task_id").size().to_dict()


def _exact_successive_inclusion(weights: np.ndarray, k: int) -> np.ndarray:
    """Inclusion probabilities of drawing k of n items one at a time, each draw proportional to
    the weights of the items left (exact, by dynamic programming over the drawn subsets)."""
    n = len(weights)
    states = {0: 1.0}
    for _ in range(k):
        nxt: dict[int, float] = defaultdict(float)
        for drawn, p in states.items():
            left = [j for j in range(n) if not drawn >> j & 1]
            total = sum(weights[j] for j in left)
            for j in left:
                nxt[drawn | 1 << j] += p * weights[j] / total
        states = nxt
    incl = np.zeros(n)
    for drawn, p in states.items():
        for j in range(n):
            if drawn >> j & 1:
                incl[j] += p
    return incl


# ------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------


def test_keep_count_rounds_half_to_even_and_keeps_at_least_one():
    assert [keep_count(n, 0.5) for n in range(0, 12)] == [0, 1, 1, 2, 2, 2, 3, 4, 4, 4, 5, 6]
    assert keep_count(10, 0.35) == 4  # 0.35 * 10 is 3.4999999999999996 in floating point
    assert keep_count(10, 0.25) == 2
    assert keep_count(3, 0.1) == 1  # rounds to 0, one row is kept anyway
    assert keep_count(7, 1.0) == 7


def test_difficulty_ranks_hardest_first_ties_by_row_order():
    assert difficulty_ranks(np.array([0.2, 0.9, 0.5, 0.9, 0.1])).tolist() == [4, 1, 3, 2, 5]


# ------------------------------------------------------------------------------------------
# Kept counts, hardest, ties
# ------------------------------------------------------------------------------------------

SIZES = {"a": 1, "b": 2, "c": 3, "d": 5, "e": 10, "f": 7}


@pytest.mark.parametrize("method", FIXED_COUNT)
@pytest.mark.parametrize(
    "keep_ratio, expected",
    [
        (0.5, {"a": 1, "b": 1, "c": 2, "d": 2, "e": 5, "f": 4}),
        (0.3, {"a": 1, "b": 1, "c": 1, "d": 2, "e": 3, "f": 2}),
        (1.0, SIZES),
    ],
)
def test_exact_kept_counts_per_group(method, keep_ratio, expected):
    for seed in (0, 1, 2):
        res = sample(_frame(SIZES), method=method, keep_ratio=keep_ratio, seed=seed)
        assert _kept_per_group(res) == expected
        assert res.report["rows_after"] == sum(expected.values())
        assert res.report["groups"]["vanished_groups_count"] == 0


def test_hardest_is_exact_top_k_per_group():
    df = _frame({"a": 9, "b": 4, "c": 13}, seed=3)
    df.loc[df.index[:6], "rank_score"] = 0.5  # some ties
    res = sample(df, method="hardest", keep_ratio=0.4)
    expected = set()
    for _, g in df.groupby("task_id"):
        k = keep_count(len(g), 0.4)
        order = sorted(range(len(g)), key=lambda i: (-g["rank_score"].iloc[i], i))
        expected |= {int(g["row_id"].iloc[i]) for i in order[:k]}
    assert set(res.kept["row_id"]) == expected


def test_hardest_ties_go_to_the_earlier_row():
    df = pd.DataFrame({"task_id": ["a"] * 4 + ["b"] * 4, "rank_score": [0.3] * 8, "row_id": range(8)})
    res = sample(df, method="hardest", keep_ratio=0.5)
    assert res.kept["row_id"].tolist() == [0, 1, 4, 5]


def test_kept_rows_keep_original_order_and_a_fresh_index():
    df = _frame({"a": 20, "b": 15}, seed=4)
    df.index = np.arange(1000, 1000 + len(df))
    res = sample(df, method="rank_weighted", seed=5)
    assert res.kept.index.tolist() == list(range(len(res.kept)))
    assert res.kept["row_id"].is_monotonic_increasing
    assert list(res.kept.columns) == list(df.columns)
    assert res.positions.tolist() == res.kept["row_id"].tolist()  # row_id == position here


# ------------------------------------------------------------------------------------------
# Determinism and per-group streams
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", RANDOMISED)
def test_same_seed_same_rows_other_seed_other_rows(method):
    df = _frame({f"t{i}": 30 for i in range(10)}, seed=6)
    first = sample(df, method=method, seed=11).kept["row_id"].tolist()
    assert sample(df, method=method, seed=11).kept["row_id"].tolist() == first
    assert sample(df, method=method, seed=12).kept["row_id"].tolist() != first


def test_hardest_does_not_depend_on_seed():
    df = _frame({"a": 30, "b": 30}, seed=7)
    assert sample(df, method="hardest", seed=1).kept.equals(sample(df, method="hardest", seed=2).kept)


@pytest.mark.parametrize("method", METHODS)
def test_adding_a_group_or_rows_elsewhere_does_not_change_a_group(method):
    base = _frame({"m": 25, "n": 25}, seed=8)
    # A new group that sorts first, and more rows for group n, interleaved with m's rows.
    extra = pd.DataFrame(
        {"row_id": np.arange(100, 140), "task_id": ["0"] * 20 + ["n"] * 20,
         "rank_score": np.random.default_rng(9).random(40)}
    )
    grown = pd.concat([base.iloc[:20], extra, base.iloc[20:]], ignore_index=True)

    def kept_m(df):
        kept = sample(df, method=method, seed=3).kept
        return kept.loc[kept["task_id"] == "m", "row_id"].tolist()

    assert kept_m(grown) == kept_m(base)
    assert len(kept_m(base)) > 0


# ------------------------------------------------------------------------------------------
# rank_weighted: the distribution
# ------------------------------------------------------------------------------------------


def test_rank_weighted_alpha_zero_is_uniform():
    n, groups = 8, 2000
    freq = _inclusion_by_rank(_replicated(groups, n), n, method="rank_weighted", alpha=0.0, keep_ratio=0.5)
    np.testing.assert_allclose(freq, 0.5, atol=0.04)


def test_rank_weighted_large_alpha_is_hardest():
    df = _replicated(500, 10, seed=1)
    weighted = sample(df, method="rank_weighted", alpha=200.0, keep_ratio=0.4, seed=4)
    assert weighted.kept.equals(sample(df, method="hardest", keep_ratio=0.4).kept)


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_rank_weighted_matches_successive_weighted_sampling(alpha):
    n, k, groups = 8, 4, 3000
    freq = _inclusion_by_rank(_replicated(groups, n, seed=2), n, method="rank_weighted",
                              alpha=alpha, keep_ratio=k / n, seed=7)
    exact = _exact_successive_inclusion(np.arange(1, n + 1, dtype=float) ** -alpha, k)
    np.testing.assert_allclose(freq, exact, atol=0.03)
    assert freq.sum() == pytest.approx(k)
    # Inclusion falls with rank: monotone within the Monte-Carlo noise, and clearly overall.
    assert np.all(np.diff(freq) < 0.02)
    assert freq[0] - freq[-1] > 0.3


# ------------------------------------------------------------------------------------------
# curve
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("a", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 50, 501])
@pytest.mark.parametrize("keep_ratio", [0.1, 0.5, 0.9])
def test_curve_probabilities_average_to_keep_ratio(a, n, keep_ratio):
    p, b, reached = curve_keep_probabilities(n, keep_ratio, a)
    assert reached and b > 0
    assert p.mean() == pytest.approx(keep_ratio, abs=1e-9)
    assert np.all((p >= 0) & (p <= 1))


@pytest.mark.parametrize("a", [0.3, 0.5, 0.7, 1.0])
def test_curve_peaks_at_a(a):
    n = 501
    p, _, _ = curve_keep_probabilities(n, 0.4, a)
    x = (np.arange(n) + 0.5) / n
    peak = int(np.argmax(p))
    assert abs(x[peak] - a) <= 1.0 / n
    assert np.all(np.diff(p[: peak + 1]) >= 0) and np.all(np.diff(p[peak:]) <= 0)
    if a == 1.0:
        assert peak == n - 1 and np.all(np.diff(p) > 0)


def test_curve_function_shape():
    assert curve_function(np.array([0.0, 0.3, 1.0]), 0.3, 2.0).tolist() == [0.0, 1.0, 0.0]
    np.testing.assert_allclose(curve_function(np.array([0.15, 0.65]), 0.3, 2.0), [0.25, 0.25])
    np.testing.assert_allclose(curve_function(np.array([0.25, 1.0]), 1.0, 3.0), [0.25**3, 1.0])


def test_solve_curve_b_known_values():
    x = (np.arange(1000) + 0.5) / 1000
    b, reached = solve_curve_b(x, 0.5, 1.0)  # mean of x^b ~ 1 / (b + 1)
    assert reached and b == pytest.approx(1.0, abs=1e-6)
    b, _ = solve_curve_b(np.array([0.5]), 0.25, 1.0)
    assert b == pytest.approx(2.0, abs=1e-9)
    assert solve_curve_b(x, 1.0, 0.4) == (0.0, True)


@pytest.mark.parametrize("a", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("keep_ratio", [0.2, 0.5])
def test_curve_mean_kept_fraction_is_keep_ratio(a, keep_ratio):
    sizes = {f"g{s:02d}_{r}": s for s in range(1, 31) for r in range(20)}  # 9,300 rows
    df = _frame(sizes, seed=10)
    fractions = []
    for seed in range(3):
        res = sample(df, method="curve", curve_a=a, keep_ratio=keep_ratio, seed=seed)
        fractions.append(res.report["kept_fraction"])
        assert res.report["curve"]["expected_rows_after"] == pytest.approx(keep_ratio * len(df), abs=1e-4)
    assert np.mean(fractions) == pytest.approx(keep_ratio, abs=0.01)
    assert len(set(fractions)) > 1  # the count is random, not fixed


def test_curve_a_one_keeps_the_hardest_most_often():
    n, groups = 10, 2000
    freq = _inclusion_by_rank(_replicated(groups, n, seed=5), n, method="curve", curve_a=1.0, keep_ratio=0.5)
    exact = curve_keep_probabilities(n, 0.5, 1.0)[0][::-1]  # by rank, hardest first
    np.testing.assert_allclose(freq, exact, atol=0.04)
    assert np.argmax(freq) == 0
    assert np.all(np.diff(freq) < 0.02) and freq[0] - freq[-1] > 0.8


def test_curve_with_a_in_the_middle_prefers_the_middle():
    n, groups = 10, 2000
    freq = _inclusion_by_rank(_replicated(groups, n, seed=6), n, method="curve", curve_a=0.5, keep_ratio=0.5)
    middle, ends = freq[3:7].mean(), freq[[0, 1, -2, -1]].mean()
    assert middle > ends + 0.3


def test_curve_tiny_group_that_cannot_reach_the_ratio_is_reported():
    df = pd.DataFrame({"task_id": ["solo", "big", "big", "big", "big"], "rank_score": [0.1, 0.1, 0.2, 0.3, 0.4]})
    res = sample(df, method="curve", curve_a=0.5, keep_ratio=0.2)  # the single row sits at x = 0.5
    assert "solo" in set(res.kept["task_id"])
    assert res.report["curve"]["unreached_groups"] == 1
    assert any("cannot keep as little as" in w for w in res.warnings)


# ------------------------------------------------------------------------------------------
# keep_ratio = 1, grouping
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("group_col", ["task_id", None])
def test_keep_ratio_one_keeps_everything(method, group_col):
    df = _frame({"a": 7, "b": 1, "c": 12}, seed=11)
    res = sample(df, method=method, keep_ratio=1.0, group_col=group_col, curve_a=0.4)
    assert res.kept.equals(df)
    assert res.warnings == []


def test_global_grouping_ranks_across_groups():
    df = pd.DataFrame({
        "task_id": ["hard"] * 6 + ["easy"] * 6,
        "rank_score": [0.9, 0.8, 0.7, 0.95, 0.85, 0.75, 0.1, 0.2, 0.3, 0.15, 0.25, 0.05],
    })
    per_group = sample(df, method="hardest", keep_ratio=0.5)
    assert _kept_per_group(per_group) == {"easy": 3, "hard": 3}
    assert per_group.warnings == []

    glob = sample(df, method="hardest", keep_ratio=0.5, group_col=None)
    assert _kept_per_group(glob) == {"hard": 6}
    assert glob.report["groups"]["groups_before"] == 1 and glob.report["params"]["group_col"] is None
    assert glob.report["score_mean_after"] == pytest.approx(np.mean([0.9, 0.8, 0.7, 0.95, 0.85, 0.75]))


def test_global_grouping_needs_no_group_column():
    df = pd.DataFrame({"rank_score": np.linspace(0, 1, 40)})
    res = sample(df, group_col=None, method="rank_weighted", keep_ratio=0.25)
    assert len(res.kept) == 10


# ------------------------------------------------------------------------------------------
# Report and warnings
# ------------------------------------------------------------------------------------------


def test_report_counts_and_is_json():
    df = _frame({"a": 10, "b": 4, "c": 1}, seed=12)
    res = sample(df, method="random", keep_ratio=0.5, seed=1)
    rep = json.loads(json.dumps(res.report, allow_nan=False))
    assert rep["rows_before"] == 15 and rep["rows_after"] == 8 and rep["kept_fraction"] == 8 / 15
    g = rep["groups"]
    assert g["groups_before"] == g["groups_after"] == 3 and g["vanished_groups"] == []
    assert g["rows_per_group_before"] == {"min": 1, "median": 4.0, "mean": 5.0, "max": 10}
    assert g["rows_per_group_after"] == {"min": 1, "median": 2.0, "mean": 8 / 3, "max": 5}
    assert g["min_one_groups"] == 1  # c: round(0.5) = 0, kept 1
    assert rep["score_mean_before"] == pytest.approx(df["rank_score"].mean())
    assert rep["score_mean_after"] == pytest.approx(res.kept["rank_score"].mean())
    assert rep["labels"] is None and rep["curve"] is None
    assert rep["params"]["method"] == "random"
    assert any("rounds to 0 rows in 1 small group" in w for w in res.warnings)


def test_vanished_groups_are_named_capped_and_warned():
    df = pd.DataFrame({"task_id": [f"t{i:02d}" for i in range(40)], "rank_score": np.linspace(0, 1, 40)})
    res = sample(df, method="curve", keep_ratio=0.1, seed=0)
    kept_groups = set(res.kept["task_id"])
    gone = sorted(set(df["task_id"]) - kept_groups)
    g = res.report["groups"]
    assert len(gone) > 20  # a single row is kept with probability 0.1
    assert g["vanished_groups_count"] == len(gone) and g["vanished_groups"] == gone[:20]
    assert g["groups_after"] == len(kept_groups)
    (warning,) = [w for w in res.warnings if "lost all their rows" in w]
    assert f"{len(gone)} of 40 group(s)" in warning and f"({len(gone) - 20} more)" in warning


def test_label_balance_report_and_vanished_class():
    labels = ["positive", "negative", "neutral", None] * 5
    scores = {"positive": 0.9, "negative": 0.6, "neutral": 0.1, None: 0.5}
    df = pd.DataFrame({
        "task_id": np.repeat(["a", "b", "c", "d", "e"], 4),
        "label": labels,
        "rank_score": [scores[lab] for lab in labels],
    })
    res = sample(df, method="hardest", keep_ratio=0.5, label_col="label")
    lab = res.report["labels"]
    assert lab["before"] == {
        "counts": {"negative": 5, "neutral": 5, "positive": 5},
        "shares": {"negative": 1 / 3, "neutral": 1 / 3, "positive": 1 / 3},
        "unlabelled": 5,
    }
    assert lab["after"] == {"counts": {"negative": 5, "positive": 5},
                            "shares": {"negative": 0.5, "positive": 0.5}, "unlabelled": 0}
    assert lab["vanished_classes"] == ["neutral"]
    assert any("class(es) of 'label' vanished" in w and "'neutral'" in w for w in res.warnings)
    json.dumps(res.report, allow_nan=False)


def test_label_report_without_vanishing_has_no_warning():
    df = _frame({"a": 10, "b": 10}, seed=13)
    df["label"] = ["pos", "neg"] * 10
    res = sample(df, method="random", label_col="label", seed=2)
    assert res.warnings == [] and res.report["labels"]["vanished_classes"] == []
    assert sum(res.report["labels"]["after"]["counts"].values()) == 10


def test_empty_frame_gives_empty_result():
    df = pd.DataFrame({"task_id": pd.Series([], dtype=str), "rank_score": pd.Series([], dtype=float)})
    res = sample(df)
    assert res.kept.empty and res.report["rows_after"] == 0 and res.report["score_mean_after"] is None
    assert any("no rows" in w for w in res.warnings)
    json.dumps(res.report, allow_nan=False)


# ------------------------------------------------------------------------------------------
# label_of
# ------------------------------------------------------------------------------------------

LABELS = ["positive", "negative", "neutral", "very positive"]


@pytest.mark.parametrize(
    "response, expected",
    [
        ("positive", "positive"),
        ("  Positive\n", "positive"),
        ("NEGATIVE.", "negative"),
        ('"neutral"', "neutral"),
        ("**Positive**", "positive"),
        ("Label: positive", "positive"),
        ("sentiment : Negative.", "negative"),
        ("Final answer: Label: neutral", "neutral"),
        ("very   Positive", "very positive"),
        ("Answer: very positive!", "very positive"),
        ("positive, because the customer is happy", None),
        ("The review is positive.", None),
        ("I think the sentiment of this long review is: positive and negative", None),
        ("mixed", None),
        ("", None),
        (None, None),
        (float("nan"), None),
    ],
)
def test_label_of(response, expected):
    assert label_of(response, LABELS) == expected


def test_label_of_returns_the_label_as_spelled_and_rejects_bad_labels():
    assert label_of("pos", ["POS", "NEG"]) == "POS"
    with pytest.raises(ValueError, match="sequence of label strings"):
        label_of("positive", "positive")
    with pytest.raises(ValueError, match="non-empty strings"):
        label_of("positive", ["positive", ""])


# ------------------------------------------------------------------------------------------
# Argument errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "top"}, "method must be one of 'rank_weighted', 'curve', 'hardest', 'random', got 'top'"),
        ({"keep_ratio": 0.0}, "keep_ratio must be a number in (0, 1], got 0.0"),
        ({"keep_ratio": 1.5}, "keep_ratio must be a number in (0, 1]"),
        ({"keep_ratio": float("nan")}, "keep_ratio must be a number in (0, 1]"),
        ({"keep_ratio": "0.5"}, "keep_ratio must be a number in (0, 1]"),
        ({"alpha": -0.1}, "alpha must be a finite number >= 0, got -0.1"),
        ({"alpha": float("inf")}, "alpha must be a finite number >= 0"),
        ({"curve_a": 0.0}, "curve_a must be a number in (0, 1], got 0.0"),
        ({"curve_a": 1.2}, "curve_a must be a number in (0, 1]"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"score_col": "difficulty"},
         "score_col 'difficulty' is not a column of the frame (columns: ['row_id', 'task_id', 'rank_score', 'label'])"),
        ({"group_col": "instruction"}, "group_col 'instruction' is not a column of the frame"),
        ({"label_col": "gold"}, "label_col 'gold' is not a column of the frame"),
    ],
)
def test_argument_errors(kwargs, message):
    df = _frame({"a": 3})
    df["label"] = "pos"
    with pytest.raises(ValueError) as info:
        sample(df, **kwargs)
    assert message in str(info.value)


def test_all_argument_problems_in_one_error():
    with pytest.raises(ValueError) as info:
        sample(_frame({"a": 3}), keep_ratio=2, alpha=-1, curve_a=0, method="x")
    msg = str(info.value)
    assert all(name in msg for name in ("keep_ratio", "alpha", "curve_a", "method"))


def test_nan_and_infinite_scores_are_counted():
    df = _frame({"a": 6})
    df.loc[[1, 4], "rank_score"] = np.nan
    with pytest.raises(ValueError, match=r"score_col 'rank_score' has 2 NaN value\(s\) out of 6 rows"):
        sample(df)
    df.loc[2, "rank_score"] = np.inf
    with pytest.raises(ValueError, match=r"has 2 NaN and 1 infinite value\(s\).*positions \[1, 2, 4\]"):
        sample(df)


def test_non_numeric_scores_and_missing_group_keys():
    df = _frame({"a": 3})
    with pytest.raises(ValueError, match="score_col 'task_id' must be numeric"):
        sample(df, score_col="task_id")
    df.loc[0, "task_id"] = None
    with pytest.raises(ValueError, match="group_col 'task_id' is missing in 1 of 3 rows"):
        sample(df)
    with pytest.raises(TypeError, match="DataFrame"):
        sample(df.to_dict("records"))


# ------------------------------------------------------------------------------------------
# Config and imports
# ------------------------------------------------------------------------------------------


def test_sampling_config_defaults_and_overrides():
    cfg = load_config(None)
    s = cfg.sampling
    assert (s.method, s.curve_a, s.score, s.alpha, s.keep_ratio, s.grouping) == (
        "rank_weighted", 1.0, "rank_score", 0.5, 0.5, "per_instruction")
    s = load_config(None, ["sampling.method=curve", "sampling.curve_a=0.3", "sampling.score=nll",
                           "sampling.alpha=0"]).sampling
    assert (s.method, s.curve_a, s.score, s.alpha) == ("curve", 0.3, "nll", 0.0)
    assert load_config(None, ["sampling.curve_a=1"]).sampling.curve_a == 1.0


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sampling.alpha=-0.5", "sampling.alpha: must be >= 0"),
        ("sampling.curve_a=0", "sampling.curve_a: must be in (0, 1]"),
        ("sampling.curve_a=1.5", "sampling.curve_a: must be in (0, 1]"),
        ("sampling.method=topk", "sampling.method: expected one of 'rank_weighted', 'curve', 'hardest', 'random'"),
        ("sampling.score=''", "sampling.score: must name a difficulty column"),
    ],
)
def test_sampling_config_errors(override, expected):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)


def test_module_imports_neither_ray_nor_torch():
    code = ("import sys, compeffdist_ray.sampling; "
            "bad = [m for m in ('ray', 'torch') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
