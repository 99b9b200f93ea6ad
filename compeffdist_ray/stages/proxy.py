"""Stage 8 (proxy mode), proxy: predict difficulty from (instruction, text) alone, before the teacher answers.

Reads `difficulty/difficulty.parquet` (the seed pairs, answered and scored by the warmed-up
student), `pairing/pairs.parquet` and `tasks/tasks.parquet` (every pair, with the instruction
the teacher would see). Trains a regression head on a backbone (`filtering.proxy.backbone`;
default the warmed-up student, `warmup/model`) to predict `filtering.proxy.target`
(rank_score) and reports Spearman correlation and MAE on a held-out split
(`compeffdist_ray.proxy.train_proxy`). Then predicts every pair on a Ray Data actor pool (one
proxy load per actor).
Writes `proxy/model/` (the backbone in Hugging Face format, its tokenizer, `proxy_head.safetensors`
and `proxy_config.json`; `compeffdist_ray.proxy.load_proxy` reads it) and `proxy/scores.parquet`
(every pair: pair_id, task_id, perspective_id, text_id, text, instruction, proxy_score, seed,
and the measured score for seed pairs).
Needs: CPU, or GPUs with `filtering.proxy.num_gpus`.

    compeffdist run filtering.proxy.enabled=true
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict

from compeffdist_ray.stages._common import StageContext, StageOutput, without_resources

log = logging.getLogger("compeffdist_ray")

NEEDS_RAY = True
VERSION = 1
REQUIRES = ("student",)

SCORE_COLUMN = "proxy_score"
# ProxyConfig keys that are not ProxyParams (mode, seed set and actor resources)
_NOT_PARAMS = {"enabled", "seed_pairs", "concurrency", "num_cpus", "num_gpus"}


def inputs(cfg) -> tuple[str, ...]:
    return ("pairing", "tasks", "warmup", "difficulty")


def config_view(cfg) -> dict:
    return {"seed": cfg.seed, "student": cfg.student.model,
            "proxy": without_resources({k: v for k, v in asdict(cfg.filtering.proxy).items()
                                        if k not in ("concurrency", "num_cpus", "num_gpus")})}


def preflight(cfg) -> None:
    """A configured backbone must resolve before any work starts."""
    from compeffdist_ray.proxy import resolve_backbone

    if cfg.filtering.proxy.backbone:
        resolve_backbone(cfg.filtering.proxy.backbone)


def proxy_params(cfg, backbone: str):
    """ProxyParams from the config section (the backbone resolved by the caller)."""
    from compeffdist_ray.proxy import ProxyParams

    fields = {k: v for k, v in asdict(cfg.filtering.proxy).items() if k not in _NOT_PARAMS}
    fields["backbone"] = backbone
    return ProxyParams(seed=cfg.seed, **fields)


def _backbone(ctx: StageContext) -> str:
    from compeffdist_ray.stages.warmup import model_dir

    pc = ctx.cfg.filtering.proxy
    if pc.backbone:
        return pc.backbone
    return model_dir(ctx.run, ctx.cfg) or ctx.cfg.student.model


class PredictUDF:
    """A Ray Data callable class: loads the proxy once, predicts batches of pairs."""

    def __init__(self, path: str, num_gpus: float, num_cpus: float, batch_size: int):
        import torch

        from compeffdist_ray.proxy import load_proxy
        from compeffdist_ray.teacher.transformers_backend import default_threads

        device = "cuda" if num_gpus and torch.cuda.is_available() else "cpu"
        if device == "cpu":
            torch.set_num_threads(default_threads(num_cpus, 1))
        self.model = load_proxy(path, device=device)
        self.batch_size = batch_size

    def __call__(self, batch):
        import pandas as pd

        pred = self.model.predict(list(batch["instruction"]), list(batch["text"]), batch_size=self.batch_size)
        return pd.DataFrame({"pair_id": list(batch["pair_id"]), SCORE_COLUMN: pred})


def predict_all(ctx: StageContext, model_path: str, frame):
    """proxy_score for every row of `frame` (pair_id, task_id, instruction, text)."""
    from compeffdist_ray.actor_pool import map_on_actor_pool

    pc = ctx.cfg.filtering.proxy
    ordered = frame.sort_values(["task_id", "pair_id"], kind="stable")[["pair_id", "instruction", "text"]]
    return map_on_actor_pool(
        ordered, PredictUDF, key="pair_id", what="proxy",
        constructor_kwargs=dict(path=model_path, num_gpus=pc.num_gpus, num_cpus=pc.num_cpus, batch_size=pc.batch_size),
        batch_size=pc.batch_size, concurrency=pc.concurrency, num_cpus=pc.num_cpus, num_gpus=pc.num_gpus)


def run(ctx: StageContext) -> StageOutput:
    from compeffdist_ray.proxy import train_proxy
    from compeffdist_ray.stages.responses import build_prompts

    cfg, pc = ctx.cfg, ctx.cfg.filtering.proxy
    scored = ctx.run.read_df("difficulty", "difficulty")
    pairs = ctx.run.read_df("pairing", "pairs")
    tasks = ctx.run.read_df("tasks", "tasks")
    backbone = _backbone(ctx)
    params = proxy_params(cfg, backbone)
    model, metrics = train_proxy(scored, params)
    with tempfile.TemporaryDirectory(prefix="compeffdist-proxy-") as tmp:
        model.save(f"{tmp}/model")
        del model
        ctx.run.upload_dir(f"{tmp}/model", ctx.stage, "model")
    local_model = ctx.run.local_dir(ctx.stage, "model")

    prompts = build_prompts(pairs, tasks, cfg.responses.demonstrations_in_prompt)
    frame = pairs.assign(instruction=prompts["instruction"].to_numpy())
    pred = predict_all(ctx, local_model, frame)
    out = frame.merge(pred, on="pair_id")
    measured = scored.set_index("pair_id")[pc.target]
    out["seed"] = out["pair_id"].isin(measured.index)
    out["measured_score"] = out["pair_id"].map(measured)
    cols = ["pair_id", "task_id", "perspective_id", "text_id", "text", "instruction", SCORE_COLUMN, "seed",
            "measured_score"]
    out = out[[c for c in cols if c in out.columns]].sort_values("pair_id").reset_index(drop=True)
    ctx.run.write_table(ctx.stage, "scores", out)
    log.info("proxy: predicted %d pairs (%d seed pairs measured)", len(out), int(out["seed"].sum()))
    keep = ("spearman", "spearman_within_groups", "mae", "mae_baseline", "n_train", "n_eval", "n_dropped_nonfinite",
            "kind", "pooling", "head", "feature_dim", "train_seconds", "feature_seconds")
    return StageOutput(
        rows=len(out),
        dropped={"nonfinite_target": int(metrics.get("n_dropped_nonfinite", 0))}
        if metrics.get("n_dropped_nonfinite") else {},
        stats={"backbone": backbone if pc.backbone else ("warmup/model" if cfg.warmup.enabled else backbone),
               "target": pc.target, "metrics": {k: metrics.get(k) for k in keep if k in metrics},
               "pairs": int(len(out)), "seed_pairs": int(out["seed"].sum())},
    )
