"""Stage 10 (proxy mode), kept_responses: the teacher answers the pairs sampling kept, and no others.

Reads `sampling/kept.parquet` (pairs kept by their proxy-predicted difficulty),
`responses/responses.parquet` (the seed pairs' answers, reused, never asked again),
`pairing/pairs.parquet` and `tasks/tasks.parquet`. Asks the teacher (same backend, prompts and
retries as the responses stage) for the kept pairs without an answer.
Writes `kept_responses/kept.parquet` (the responses' columns plus proxy_score and label) and
`kept_responses/generations.parquet`. The manifest's tokens are this stage's teacher bill;
its stats add the whole run's teacher tokens on answers (seed + kept) and the tokens saved,
estimated as the pairs never answered times the mean tokens of an answered pair, and the label
balance of the kept answers.
Needs: the teacher.

    compeffdist run filtering.proxy.enabled=true
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from compeffdist_ray.stages._common import StageContext, StageOutput, merge_counts, teacher_view

log = logging.getLogger("compeffdist_ray")

NEEDS_RAY = True
VERSION = 1
REQUIRES = ("teacher",)


def inputs(cfg) -> tuple[str, ...]:
    return ("pairing", "tasks", "responses", "sampling")


def config_view(cfg) -> dict:
    return {"seed": cfg.seed, "teacher": teacher_view(cfg.teacher), "responses": asdict(cfg.responses)}


def savings(n_pairs: int, answered, new_answers, kept_rows: int) -> dict:
    """Teacher tokens spent on answers and those saved (estimated) by answering kept pairs only."""
    frames = [f for f in (answered, new_answers) if f is not None and len(f)]
    spent_in = int(sum(int(f["input_tokens"].sum()) for f in frames))
    spent_out = int(sum(int(f["output_tokens"].sum()) for f in frames))
    n_answered = int(sum(len(f) for f in frames))
    unanswered = max(0, n_pairs - n_answered)
    per_pair = (spent_in + spent_out) / n_answered if n_answered else 0.0
    saved = int(round(unanswered * per_pair))
    full = spent_in + spent_out + saved
    return {
        "pairs": n_pairs, "answered": n_answered, "kept": kept_rows, "never_answered": unanswered,
        "answer_tokens_spent": {"input": spent_in, "output": spent_out},
        "answer_tokens_saved_est": saved,
        "saved_share_est": round(saved / full, 4) if full else 0.0,
    }


def run(ctx: StageContext) -> StageOutput:
    from compeffdist_ray.sampling import label_of
    from compeffdist_ray.stages.responses import answer_pairs, answer_stats
    from compeffdist_ray.stages.sampling import SENTIMENT_LABELS

    kept = ctx.run.read_df("sampling", "kept")
    seed_answers = ctx.run.read_df("responses", "responses")
    pairs = ctx.run.read_df("pairing", "pairs")
    tasks = ctx.run.read_df("tasks", "tasks")
    have = set(seed_answers["pair_id"])
    todo = pairs[pairs["pair_id"].isin(set(kept["pair_id"]) - have)]
    reused = seed_answers[seed_answers["pair_id"].isin(set(kept["pair_id"]))]
    dropped, tokens, stats, new = {}, {"input": 0, "output": 0}, {}, None
    if len(todo):
        new, gens, dropped, tokens = answer_pairs(ctx, todo, tasks)
        stats = answer_stats(new, gens, todo)
    else:
        log.info("kept_responses: every kept pair was answered already (seed pairs)")
    import pandas as pd

    answers = pd.concat([reused, new], ignore_index=True) if new is not None else reused.reset_index(drop=True)
    answers = answers.merge(kept[["pair_id", "proxy_score"]], on="pair_id", how="left")
    answers["label"] = [label_of(r, SENTIMENT_LABELS) for r in answers["response"]]
    answers = answers.sort_values("pair_id").reset_index(drop=True)
    ctx.run.write_table(ctx.stage, "kept", answers)
    labels = answers["label"].dropna().value_counts().to_dict()
    report = savings(len(pairs), seed_answers, new, len(answers))
    log.info("kept_responses: %d kept pairs answered (%d reused from the seed); answer tokens spent %d, saved "
             "about %d (%.0f%%)", len(answers), len(reused), sum(report["answer_tokens_spent"].values()),
             report["answer_tokens_saved_est"], 100 * report["saved_share_est"])
    return StageOutput(
        rows=len(answers),
        dropped=merge_counts(dropped),
        tokens=tokens,
        stats={**stats, "reused_seed_answers": int(len(reused)), "teacher": report,
               "labels": {str(k): int(v) for k, v in labels.items()}, "unlabelled": int(answers["label"].isna().sum())},
    )
