"""The proxy difficulty model (compeffdist_ray.proxy) on the real student, SmolLM2-135M-Instruct
(about a minute on 2 cores), and encoder fine-tuning on all-MiniLM-L6-v2.

Synthetic rows: texts that carry a marker phrase are hard, the others easy. SmolLM2's final
hidden states reach magnitudes in the tens, so batched and one-at-a-time features are compared
with 1e-4 relative + absolute tolerance (float32 reduction order differs between the two).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")

from compeffdist_ray import proxy as proxy_mod  # noqa: E402
from compeffdist_ray.prompts import instruction_with_demonstrations  # noqa: E402
from compeffdist_ray.proxy import ProxyParams, load_proxy, train_proxy  # noqa: E402

MARKER = "Honestly, it is all terribly ambiguous."
TASKS = ("Decide whether the writer's opinion is positive, negative or neutral. Answer with one label.",
         "Rate the emotion intensity of the text from 1 to 5.")


def _rows(n: int, seed: int) -> pd.DataFrame:
    corpus = Path(proxy_mod.__file__).resolve().parent / "data" / "sample_corpus.jsonl"
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    demos = [{"text": texts[-1], "output": "positive"}]
    rows = []
    for k in range(n):
        hard = rng.random() < 0.5
        text = texts[(k * 7 + seed) % (len(texts) - 1)]
        rows.append({"task_id": f"t{k % 2}", "instruction": instruction_with_demonstrations(TASKS[k % 2], demos),
                     "text": f"{text} {MARKER}" if hard else text,
                     "rank_score": (0.75 if hard else 0.2) + rng.gauss(0.0, 0.05)})
    return pd.DataFrame(rows)


def test_smollm2_proxy_learns_predicts_in_batches_and_round_trips(tmp_path):
    rows = _rows(48, seed=0)
    seen = []
    model, metrics = train_proxy(rows, ProxyParams(backbone="smollm2-135m-instruct"),
                                 progress=lambda phase, done, total: seen.append((phase, done, total)))
    assert metrics["kind"] == "decoder" and metrics["pooling"] == "last" and metrics["feature_dim"] == 576
    assert metrics["spearman"] > 0.5 and metrics["mae"] < 0.8 * metrics["mae_baseline"], metrics
    assert ("features", 48, 48) in seen and seen[-1][0] == "head"

    probe = _rows(6, seed=5)
    instructions, texts = list(probe["instruction"]), list(probe["text"])
    batched = model.features(instructions, texts, batch_size=6)
    single = np.stack([model.features([i], [t])[0] for i, t in zip(instructions, texts)])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-4)

    pred = model.predict(instructions, texts)
    hard = probe["text"].str.contains(MARKER).to_numpy()
    assert pred[hard].mean() > pred[~hard].mean()

    loaded = load_proxy(model.save(tmp_path / "proxy"))
    np.testing.assert_allclose(loaded.predict(instructions, texts), pred, atol=1e-6, rtol=0)


def test_minilm_proxy_learns_the_marker():
    model, metrics = train_proxy(_rows(96, seed=3), ProxyParams(backbone="all-minilm-l6-v2"))
    assert metrics["kind"] == "encoder" and metrics["pooling"] == "mean" and metrics["feature_dim"] == 3 * 384
    assert metrics["spearman"] > 0.5 and metrics["mae"] < 0.8 * metrics["mae_baseline"], metrics
    probe = _rows(20, seed=4)
    pred = model.predict_rows(probe)
    hard = probe["text"].str.contains(MARKER).to_numpy()
    assert pred[hard].mean() > pred[~hard].mean() + 0.2


def test_encoder_fine_tuning_trains_and_round_trips(tmp_path):
    rows = _rows(48, seed=1)
    params = ProxyParams(backbone="all-minilm-l6-v2", train_backbone=True, finetune_epochs=1, train_batch_size=16)
    model, metrics = train_proxy(rows, params)
    assert metrics["kind"] == "encoder" and metrics["n_train"] + metrics["n_eval"] == 48
    assert metrics["spearman"] is not None and metrics["spearman"] > 0.3, metrics
    probe = _rows(6, seed=2)
    loaded = load_proxy(model.save(tmp_path / "proxy"))
    np.testing.assert_allclose(loaded.predict_rows(probe), model.predict_rows(probe), atol=1e-6, rtol=0)
