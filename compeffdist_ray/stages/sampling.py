"""Stage 9, sampling: keep the samples worth distilling, hardest first, per instruction.

Reads `difficulty/difficulty.parquet` (in proxy mode `proxy/scores.parquet`: every pair, by
its predicted difficulty, before any answer). Samples by `sampling.score` (rank_score by default)
with `sampling.method` (rank_weighted, curve, hardest, random; see `compeffdist_ray.sampling`),
per instruction (`sampling.grouping: per_instruction`) or over all rows (`global`), keeping
`sampling.keep_ratio` of each group, deterministically under the seed. Writes
`sampling/kept.parquet` (the kept rows, with a `label` column where the response is a plain
sentiment label). The manifest reports group coverage and the label balance before and after,
and warns when a group or a class vanishes.
Needs: CPU only.

    compeffdist stage sampling sampling.method=curve sampling.curve_a=0.7
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from compeffdist_ray.stages._common import StageContext, StageOutput

log = logging.getLogger("compeffdist_ray")

NEEDS_RAY = False
VERSION = 1
REQUIRES = ()

# Responses that are exactly one of these count as that class in the balance report.
SENTIMENT_LABELS = ("positive", "negative", "neutral", "mixed")


def inputs(cfg) -> tuple[str, ...]:
    return ("proxy",) if cfg.filtering.proxy.enabled else ("difficulty",)


def config_view(cfg) -> dict:
    return {"seed": cfg.seed, "sampling": asdict(cfg.sampling), "proxy_mode": cfg.filtering.proxy.enabled}


def load_scored(ctx: StageContext):
    """(rows to sample from, score column, label column or None)."""
    from compeffdist_ray.errors import UserError
    from compeffdist_ray.sampling import label_of
    from compeffdist_ray.stages.proxy import SCORE_COLUMN

    if ctx.cfg.filtering.proxy.enabled:
        # Every pair, by its predicted difficulty; answers (and labels) come after sampling.
        return ctx.run.read_df("proxy", "scores"), SCORE_COLUMN, None
    scored = ctx.run.read_df("difficulty", "difficulty")
    if ctx.cfg.sampling.score not in scored.columns:
        metrics = [c for c in scored.columns if c in ("rank_score", "rank_score_all", "nll", "ppl", "ifd")]
        raise UserError(f"sampling.score: the difficulty rows have no column {ctx.cfg.sampling.score!r}; "
                        f"choose one of {', '.join(metrics)}")
    scored["label"] = [label_of(r, SENTIMENT_LABELS) for r in scored["response"]]
    return scored, ctx.cfg.sampling.score, "label"


def run(ctx: StageContext) -> StageOutput:
    from compeffdist_ray.errors import UserError
    from compeffdist_ray.sampling import sample

    sc = ctx.cfg.sampling
    scored, score_col, label_col = load_scored(ctx)
    try:
        result = sample(scored, score_col=score_col, group_col="task_id" if sc.grouping == "per_instruction" else None,
                        method=sc.method, keep_ratio=sc.keep_ratio, alpha=sc.alpha, curve_a=sc.curve_a,
                        seed=ctx.cfg.seed, label_col=label_col)
    except ValueError as exc:
        raise UserError(f"sampling: {exc}") from None
    for w in result.warnings:
        log.warning("sampling: %s", w)
    ctx.run.write_table(ctx.stage, "kept", result.kept)
    return StageOutput(rows=len(result.kept), stats={"report": result.report, "warnings": result.warnings})
