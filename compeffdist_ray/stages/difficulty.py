"""Stage 7, difficulty: the warmed-up student scores every (instruction, text, response) row with one forward pass.

Reads `responses/responses.parquet` and the warmed-up student `warmup/model/` (or
`student.model` itself with `warmup.enabled=false`). Scores on a Ray Data actor pool (one
student load per actor; rows of one task are batched together so that their shared
instruction prefix is computed once, see `compeffdist_ray.difficulty.score_batch`).
Writes `difficulty/difficulty.parquet` (the responses' columns plus rank_score,
rank_score_all, nll, ppl, ifd, n_response_tokens) and one histogram per metric
(`difficulty/hist_<metric>.png`); warns when a metric piles up at its bounds (the paper's
"metric saturation": rank_score at 0 or 1 does not tell samples apart).
Needs: the student; CPU, or GPUs with `difficulty.num_gpus`.

    compeffdist stage difficulty --config configs/local-demo.yaml
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from compeffdist_ray.stages._common import StageContext, StageOutput, without_resources

log = logging.getLogger("compeffdist_ray")

NEEDS_RAY = True
VERSION = 1
REQUIRES = ("student",)  # checked before any stage starts

METRICS = ("rank_score", "rank_score_all", "nll", "ppl", "ifd")
SATURATION_SHARE = 0.5


def inputs(cfg) -> tuple[str, ...]:
    return ("responses", "warmup")


def config_view(cfg) -> dict:
    return {"seed": cfg.seed, "student": cfg.student.model, "difficulty": without_resources(asdict(cfg.difficulty))}


def preflight(cfg) -> None:
    """The student's tokenizer must have what the metrics need, checked before any work starts."""
    from compeffdist_ray.models import resolve_model

    check_tokenizer(resolve_model(cfg.student.model), cfg.student.prompt_format)


def check_tokenizer(model_path: str, prompt_format: str = "auto") -> None:
    """UserError naming the model when its tokenizer cannot serve the student's training and metrics.

    The response is trained on and scored up to and including EOS, so the tokenizer needs an EOS
    token; IFD's unconditioned pass starts from BOS (or EOS); every token id must index the
    model's vocabulary; the prompt layout must agree with ``student.prompt_format``
    (:func:`compeffdist_ray.sft.check_prompt_format`). The warmup and finetune stages run it too.
    """
    import json
    import os

    from transformers import AutoTokenizer

    from compeffdist_ray.errors import UserError

    if not os.path.isdir(model_path):
        return  # a hub id: checked when the actor loads it
    try:
        tok = AutoTokenizer.from_pretrained(model_path)
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        raise UserError(f"student {model_path}: its tokenizer does not load ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}); the difficulty metrics need the model's tokenizer") from None
    if tok.eos_token_id is None:
        raise UserError(f"student {model_path}: its tokenizer has no EOS token, which the difficulty metrics score "
                        f"as the response's last token; set eos_token in tokenizer_config.json")
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            conf = json.load(f)
    except (OSError, ValueError):
        return
    from compeffdist_ray.sft import check_prompt_format

    check_prompt_format(model_path, bool(getattr(tok, "chat_template", None)), conf.get("model_type"), prompt_format)
    conf = conf.get("text_config", conf) if "vocab_size" not in conf else conf
    vocab = conf.get("vocab_size")
    if isinstance(vocab, int) and len(tok) > vocab:
        raise UserError(f"student {model_path}: its tokenizer has {len(tok)} tokens but the model's vocabulary has "
                        f"{vocab}; token ids past {vocab - 1} cannot be ranked; use the tokenizer the model was "
                        f"trained with")


class ScoreUDF:
    """A Ray Data callable class: loads the student once, scores batches of rows."""

    def __init__(self, model: str, dtype: str, top_p: float, prefix_reuse: bool, num_gpus: float, num_cpus: float):
        import torch

        from compeffdist_ray.models import resolve_model
        from compeffdist_ray.teacher.transformers_backend import default_threads, load_causal_lm

        device = "cuda" if num_gpus and torch.cuda.is_available() else "cpu"
        threads = default_threads(num_cpus, 1) if device == "cpu" else None
        self.tokenizer, self.model = load_causal_lm(resolve_model(model), dtype=dtype, device=device, threads=threads)
        self.top_p = top_p
        self.prefix_reuse = prefix_reuse

    def __call__(self, batch):
        import pandas as pd

        from compeffdist_ray.difficulty import METRIC_COLUMNS, score_batch

        rows = [{"instruction": i, "text": t, "response": r, "group": g}
                for i, t, r, g in zip(batch["instruction"], batch["text"], batch["response"], batch["task_id"])]
        scores = score_batch(self.model, self.tokenizer, rows, top_p=self.top_p, prefix_reuse=self.prefix_reuse)
        out = pd.DataFrame(scores, columns=list(METRIC_COLUMNS))
        out.insert(0, "pair_id", list(batch["pair_id"]))
        return out


def saturation(values, low: float, high: float) -> dict:
    """Shares of rows exactly at the metric's bounds."""
    import numpy as np

    v = np.asarray(values, dtype=float)
    return {"at_low": float(np.mean(v <= low)), "at_high": float(np.mean(v >= high))}


def summarize(df) -> tuple[dict, list[str]]:
    """Per-metric summary (mean, std, quantiles) and saturation warnings."""
    stats, warnings = {}, []
    for metric in METRICS:
        col = df[metric].astype(float)
        stats[metric] = {"mean": round(float(col.mean()), 5), "std": round(float(col.std(ddof=0)), 5),
                         **{f"p{q}": round(float(col.quantile(q / 100)), 5) for q in (5, 25, 50, 75, 95)}}
    for metric in ("rank_score", "rank_score_all"):
        sat = saturation(df[metric], 0.0, 1.0)
        stats[metric].update({k: round(v, 4) for k, v in sat.items()})
        for side, share in sat.items():
            if share >= SATURATION_SHARE:
                warnings.append(f"{metric}: {share:.0%} of rows score {'0' if side == 'at_low' else '1'}: the metric "
                                "is saturated and does not tell these samples apart")
    return stats, warnings


def histograms(df, write) -> list[str]:
    """One PNG per metric; `write(name, bytes)` stores it. Returns the file names."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for metric in METRICS:
        fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
        ax.hist(df[metric].astype(float), bins=30, color="#4c72b0")
        ax.set_title(f"{metric} (n = {len(df)})")
        ax.set_xlabel(metric)
        ax.set_ylabel("rows")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        name = f"hist_{metric}.png"
        write(name, buf.getvalue())
        names.append(name)
    return names


def run(ctx: StageContext) -> StageOutput:
    from compeffdist_ray.actor_pool import map_on_actor_pool
    from compeffdist_ray.stages.warmup import model_dir

    cfg, dc = ctx.cfg, ctx.cfg.difficulty
    scorer = model_dir(ctx.run, cfg) or cfg.student.model
    responses = ctx.run.read_df("responses", "responses").sort_values(["task_id", "pair_id"], kind="stable")
    cols = ["pair_id", "task_id", "instruction", "text", "response"]
    # rows of one task stay together, so that a batch shares its instruction's prefix
    scores = map_on_actor_pool(
        responses[cols], ScoreUDF, key="pair_id", what="difficulty",
        constructor_kwargs=dict(model=scorer, dtype=dc.dtype, top_p=dc.top_p, prefix_reuse=dc.prefix_reuse,
                                num_gpus=dc.num_gpus, num_cpus=dc.num_cpus),
        batch_size=dc.batch_size, concurrency=dc.concurrency, num_cpus=dc.num_cpus, num_gpus=dc.num_gpus)
    out = responses.merge(scores, on="pair_id").sort_values("pair_id").reset_index(drop=True)
    ctx.run.write_table(ctx.stage, "difficulty", out)
    stats, warnings = summarize(out)
    for w in warnings:
        log.warning("difficulty: %s", w)
    files = histograms(out, lambda name, data: ctx.run.write_bytes(ctx.stage, name, data))
    return StageOutput(rows=len(out), stats={"metrics": stats, "warnings": warnings, "histograms": files,
                                             "scorer": "warmup/model" if cfg.warmup.enabled else cfg.student.model})
