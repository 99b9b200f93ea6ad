"""The difficulty and sampling stages' pure parts: summaries, saturation, fingerprints."""

from __future__ import annotations

import pandas as pd

from compeffdist_ray.config import Config, load_config
from compeffdist_ray.stages import difficulty as stage


def _frame(rank):
    n = len(rank)
    return pd.DataFrame({"rank_score": rank, "rank_score_all": [r / 2 for r in rank], "nll": [1.0] * n,
                         "ppl": [2.718] * n, "ifd": [0.9] * n})


def test_saturated_rank_scores_warn_and_spread_ones_do_not():
    stats, warnings = stage.summarize(_frame([0.0] * 6 + [0.4, 0.6]))
    assert stats["rank_score"]["at_low"] == 0.75
    assert any("rank_score: 75% of rows score 0" in w for w in warnings)
    stats, warnings = stage.summarize(_frame([0.1, 0.3, 0.5, 0.7, 0.9, 1.0]))
    assert warnings == [] and stats["rank_score"]["p50"] == 0.6


def test_histograms_write_one_png_per_metric():
    written = {}
    names = stage.histograms(_frame([0.1, 0.5, 0.9]), lambda name, data: written.__setitem__(name, data))
    assert names == [f"hist_{m}.png" for m in stage.METRICS]
    assert all(data[:4] == b"\x89PNG" for data in written.values())


def test_resource_settings_do_not_change_the_fingerprint_view():
    base = stage.config_view(Config())
    resized = stage.config_view(load_config(None, ["difficulty.batch_size=4", "difficulty.concurrency=3",
                                                   "difficulty.num_cpus=2"]))
    assert base == resized
    assert stage.config_view(load_config(None, ["difficulty.top_p=0.9"])) != base
    assert stage.config_view(load_config(None, ["student.model=tiny-random-qwen3"])) != base
