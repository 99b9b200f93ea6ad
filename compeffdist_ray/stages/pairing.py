"""Stage 4, pairing: each sampled user text is paired with one task instruction.

Reads `tasks/tasks.parquet` and the corpus (and, for attribute matching, the attributes of
texts and the perspective of each attribute). Writes `pairing/pairs.parquet`: pair_id,
task_id, perspective_id, text_id, text, match ("random", "attribute" or "fallback").
Needs: CPU only.

- random (default, as in the paper): tasks are dealt out in shuffled rounds, so every task
  gets the same number of texts (+-1): that keeps the classes of the later data balanced.
- attribute: a text whose attributes fall in some perspectives goes to the least-used task of
  those perspectives; texts without known attributes fall back to random, and are counted.

    compeffdist stage pairing pairing.method=attribute
"""

from __future__ import annotations

from dataclasses import asdict

import numpy as np

from compeffdist_ray.stages._common import StageContext, StageFailed, StageOutput

NEEDS_RAY = False
VERSION = 1
REQUIRES = ("corpus",)  # checked before any stage starts


def _deal(task_ids: list[str], n: int, rng: np.random.Generator) -> list[str]:
    """n task ids in shuffled rounds: balanced counts, random order."""
    out: list[str] = []
    while len(out) < n:
        out.extend(rng.permutation(task_ids).tolist())
    return out[:n]


def pair_random(text_ids: list[str], task_ids: list[str], demo_texts: dict[str, set], seed: int) -> list[tuple[str, str, str]]:
    """(text_id, task_id, 'random') for every text; a task never gets one of its own demo texts."""
    rng = np.random.default_rng(seed)
    dealt = _deal(task_ids, len(text_ids), rng)
    # A text dealt to a task it demonstrates swaps tasks with another text: counts stay exact.
    for i, text_id in enumerate(text_ids):
        if text_id in demo_texts.get(dealt[i], ()):
            for j in rng.permutation(len(text_ids)):
                if (dealt[j] != dealt[i] and text_id not in demo_texts.get(dealt[j], ())
                        and text_ids[j] not in demo_texts.get(dealt[i], ())):
                    dealt[i], dealt[j] = dealt[j], dealt[i]
                    break
    out = []
    for text_id, task_id in zip(text_ids, dealt):
        if text_id in demo_texts.get(task_id, ()):
            others = [t for t in task_ids if text_id not in demo_texts.get(t, ())]
            if not others:
                continue
            task_id = others[int(rng.integers(len(others)))]
        out.append((text_id, task_id, "random"))
    return out


def pair_by_attribute(text_ids: list[str], task_ids: list[str], task_perspective: dict[str, str],
                      text_perspectives: dict[str, set], demo_texts: dict[str, set], seed: int):
    """(text_id, task_id, match) with tasks of the text's own perspectives when it has any."""
    rng = np.random.default_rng(seed)
    by_persp: dict[str, list[str]] = {}
    for t in task_ids:
        by_persp.setdefault(task_perspective[t], []).append(t)
    used = {t: 0 for t in task_ids}
    out, fallback = [], []
    for text_id in text_ids:
        candidates = [t for p in sorted(text_perspectives.get(text_id, ())) for t in by_persp.get(p, ())
                      if text_id not in demo_texts.get(t, ())]
        if not candidates:
            fallback.append(text_id)
            continue
        least = min(used[t] for t in candidates)
        best = [t for t in candidates if used[t] == least]
        task_id = best[int(rng.integers(len(best)))]
        used[task_id] += 1
        out.append((text_id, task_id, "attribute"))
    out.extend((a, b, "fallback") for a, b, _ in pair_random(fallback, task_ids, demo_texts, seed + 1))
    return out


def inputs(cfg) -> tuple[str, ...]:
    return ("tasks", "attributes", "perspectives") if cfg.pairing.method == "attribute" else ("tasks",)


def config_view(cfg) -> dict:
    return {"seed": cfg.seed, "input": asdict(cfg.input), "pairing": asdict(cfg.pairing)}


def run(ctx: StageContext) -> StageOutput:
    import pandas as pd

    from compeffdist_ray.inputs import read_corpus
    from compeffdist_ray.stages.attributes import sample_texts

    cfg, pc = ctx.cfg, ctx.cfg.pairing
    tasks = ctx.run.read_df("tasks", "tasks")
    corpus = read_corpus(cfg.input).df
    texts = sample_texts(corpus, pc.num_texts, cfg.seed + 7)
    text_ids = texts["text_id"].tolist()
    task_ids = tasks["task_id"].tolist()
    demo_texts = {}
    if pc.exclude_demo_texts:
        demo_texts = {r.task_id: {d["text_id"] for d in r.demonstrations} for r in tasks.itertuples()}
    if pc.method == "attribute":
        attrs = ctx.run.read_df("attributes", "attributes")
        assign = ctx.run.read_df("perspectives", "assignments")
        persp_of = dict(zip(assign["attribute"], assign["perspective_id"]))
        text_persp: dict[str, set] = {}
        for text_id, attribute in zip(attrs["text_id"], attrs["attribute"]):
            if attribute in persp_of:
                text_persp.setdefault(text_id, set()).add(persp_of[attribute])
        triples = pair_by_attribute(text_ids, task_ids, dict(zip(tasks["task_id"], tasks["perspective_id"])),
                                    text_persp, demo_texts, cfg.seed)
    else:
        triples = pair_random(text_ids, task_ids, demo_texts, cfg.seed)
    if not triples:
        raise StageFailed("pairing: no pair could be made (every text is a demonstration of every task)")
    text_by_id = dict(zip(texts["text_id"], texts["text"]))
    persp_by_task = dict(zip(tasks["task_id"], tasks["perspective_id"]))
    pairs = pd.DataFrame({
        "pair_id": [f"pr{i:07d}" for i in range(len(triples))],
        "task_id": [t for _, t, _ in triples],
        "perspective_id": [persp_by_task[t] for _, t, _ in triples],
        "text_id": [x for x, _, _ in triples],
        "text": [text_by_id[x] for x, _, _ in triples],
        "match": [m for _, _, m in triples],
    })
    ctx.run.write_table(ctx.stage, "pairs", pairs)
    per_task = pairs["task_id"].value_counts()
    dropped = {"text_is_demonstration_of_all_tasks": len(text_ids) - len(triples)} if len(triples) < len(text_ids) else {}
    return StageOutput(
        rows=len(pairs),
        dropped=dropped,
        stats={
            "method": pc.method,
            "texts": len(text_ids),
            "tasks": len(task_ids),
            "pairs_per_task_min": int(per_task.min()),
            "pairs_per_task_max": int(per_task.max()),
            "tasks_without_pairs": int(len(set(task_ids) - set(per_task.index))),
            "match": {k: int(v) for k, v in pairs["match"].value_counts().items()},
        },
    )
