"""Unit tests for the pure core of stage 4 (compeffdist_ray.stages.pairing)."""

from __future__ import annotations

from collections import Counter

import pytest

from compeffdist_ray.stages.pairing import pair_by_attribute, pair_random

TEXTS = [f"x{i:03d}" for i in range(103)]
TASKS = ["A", "B", "C", "D", "E"]


def _counts(pairs):
    return Counter(task for _, task, _ in pairs)


# ------------------------------------------------------------------------------------------
# pair_random
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_pair_random_every_text_once_and_balanced(seed):
    pairs = pair_random(TEXTS, TASKS, {}, seed)
    assert [t for t, _, _ in pairs] == TEXTS  # every text, once, in order
    assert {m for _, _, m in pairs} == {"random"}
    counts = _counts(pairs)
    assert set(counts) == set(TASKS)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert sum(counts.values()) == len(TEXTS)


def test_pair_random_fewer_texts_than_tasks_uses_distinct_tasks():
    pairs = pair_random(["a", "b", "c"], TASKS, {}, 0)
    assert len({task for _, task, _ in pairs}) == 3


def test_pair_random_deterministic_per_seed_and_seeds_differ():
    assert pair_random(TEXTS, TASKS, {}, 5) == pair_random(TEXTS, TASKS, {}, 5)
    assert pair_random(TEXTS, TASKS, {}, 5) != pair_random(TEXTS, TASKS, {}, 6)


def test_pair_random_never_pairs_a_task_with_its_demo_texts():
    demo = {t: set(TEXTS[i * 7 : i * 7 + 7]) for i, t in enumerate(TASKS)}
    for seed in range(5):
        pairs = pair_random(TEXTS, TASKS, demo, seed)
        assert [t for t, _, _ in pairs] == TEXTS  # nobody dropped: each text has other tasks
        for text, task, _ in pairs:
            assert text not in demo[task]


def test_pair_random_text_that_is_demo_of_every_task_is_dropped():
    demo = {t: {"x000"} for t in TASKS}
    pairs = pair_random(TEXTS[:10], TASKS, demo, 0)
    assert [t for t, _, _ in pairs] == TEXTS[1:10]


def test_pair_random_text_excluded_from_one_task_goes_to_the_other():
    demo = {"A": {"only"}}
    for seed in range(10):
        assert pair_random(["only"], ["A", "B"], demo, seed) == [("only", "B", "random")]


def test_pair_random_stays_balanced_when_demo_texts_are_excluded():
    texts = [f"x{i}" for i in range(10)]
    demo = {"A": set(texts[:4])}  # A may still take 6 texts: a 5/5 split exists
    for seed in range(5):
        counts = _counts(pair_random(texts, ["A", "B"], demo, seed))
        assert max(counts.values()) - min(counts.values()) <= 1, (seed, counts)


# ------------------------------------------------------------------------------------------
# pair_by_attribute
# ------------------------------------------------------------------------------------------

TASK_PERSP = {"a1": "pa", "a2": "pa", "b1": "pb", "c1": "pc"}


def test_pair_by_attribute_texts_go_to_tasks_of_their_perspectives():
    text_persp = {"t1": {"pa"}, "t2": {"pb"}, "t3": {"pa", "pb"}, "t4": {"pc"}}
    pairs = pair_by_attribute(["t1", "t2", "t3", "t4"], list(TASK_PERSP), TASK_PERSP, text_persp, {}, 0)
    by_text = {text: (task, m) for text, task, m in pairs}
    assert by_text["t1"][0] in {"a1", "a2"}
    assert by_text["t2"] == ("b1", "attribute")
    assert TASK_PERSP[by_text["t3"][0]] in {"pa", "pb"}
    assert by_text["t4"] == ("c1", "attribute")
    assert {m for _, _, m in pairs} == {"attribute"}


def test_pair_by_attribute_balances_least_used_tasks():
    texts = [f"t{i}" for i in range(10)]
    text_persp = {t: {"pa"} for t in texts}
    pairs = pair_by_attribute(texts, list(TASK_PERSP), TASK_PERSP, text_persp, {}, 3)
    assert _counts(pairs) == Counter({"a1": 5, "a2": 5})


def test_pair_by_attribute_least_used_across_perspectives():
    # b1 is already used by t0, so t1 and t2 (pa or pb) must go to the unused pa tasks
    text_persp = {"t0": {"pb"}, "t1": {"pa", "pb"}, "t2": {"pa", "pb"}, "t3": {"pa", "pb"}}
    for seed in range(5):
        pairs = pair_by_attribute(["t0", "t1", "t2", "t3"], list(TASK_PERSP), TASK_PERSP, text_persp, {}, seed)
        assert pairs[0] == ("t0", "b1", "attribute")
        assert {pairs[1][1], pairs[2][1]} == {"a1", "a2"}
        assert pairs[3][1] in {"a1", "a2", "b1"}  # all three used once: any of them
        assert "c1" not in _counts(pairs)


def test_pair_by_attribute_fallback_for_texts_without_attributes():
    text_persp = {"t1": {"pa"}, "t3": {"unknown-perspective"}}
    pairs = pair_by_attribute(["t1", "t2", "t3"], list(TASK_PERSP), TASK_PERSP, text_persp, {}, 0)
    by_text = {text: (task, m) for text, task, m in pairs}
    assert set(by_text) == {"t1", "t2", "t3"}
    assert by_text["t1"][1] == "attribute"
    assert by_text["t2"][1] == "fallback" and by_text["t2"][0] in TASK_PERSP
    assert by_text["t3"][1] == "fallback"


def test_pair_by_attribute_demo_texts_excluded_and_fall_back():
    text_persp = {"t1": {"pb"}, "t2": {"pa"}}
    demo = {"b1": {"t1"}, "a1": {"t2"}}
    pairs = pair_by_attribute(["t1", "t2"], list(TASK_PERSP), TASK_PERSP, text_persp, demo, 0)
    by_text = {text: (task, m) for text, task, m in pairs}
    assert by_text["t2"] == ("a2", "attribute")
    assert by_text["t1"][1] == "fallback" and by_text["t1"][0] != "b1"


def test_pair_by_attribute_deterministic():
    texts = [f"t{i}" for i in range(30)]
    text_persp = {t: {"pa", "pb"} for t in texts[::2]}
    args = (texts, list(TASK_PERSP), TASK_PERSP, text_persp, {})
    assert pair_by_attribute(*args, 4) == pair_by_attribute(*args, 4)
    assert sorted(t for t, _, _ in pair_by_attribute(*args, 4)) == sorted(texts)
