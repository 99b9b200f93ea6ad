"""Stage 6, warmup: the student is fine-tuned briefly on a random subset of the teacher's answers.

Reads `responses/responses.parquet`. Draws `warmup.num_samples` answered pairs at random under
the seed (truncated answers are left out: they would teach the student to stop mid-way) and
trains the student on them with the project's one trainer (`compeffdist_ray.training`: Ray
Train + DeepSpeed, the `train` config section; loss on the response tokens only), so that the
difficulty stage scores with a student that knows the task format (the paper's warm-up).
Writes `warmup/model/` (Hugging Face format), `warmup/history.parquet` (loss and learning
rate per optimizer step) and `warmup/samples.parquet` (the pair ids trained on). Checkpoints
go to `train.storage_path` (default `<run_dir>/_train/warmup-<fingerprint>`): a run killed
mid-training resumes there at the saved step; they are removed once the model is exported.
With `warmup.enabled=false` the stage writes no model and the difficulty stage scores with
`student.model` itself.
Needs: the student; CPU workers (fp32, gloo) or GPUs with `train.use_gpu`.

    compeffdist stage warmup --config configs/local-demo.yaml train.num_workers=2 train.cpus_per_worker=0.5
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict

from compeffdist_ray.stages._common import StageContext, StageFailed, StageOutput

log = logging.getLogger("compeffdist_ray")

NEEDS_RAY = True
VERSION = 1
REQUIRES = ("student",)  # checked before any stage starts


def inputs(cfg) -> tuple[str, ...]:
    return ("responses",)


def config_view(cfg) -> dict:
    from compeffdist_ray.training import train_view

    if not cfg.warmup.enabled:
        return {"enabled": False}
    return {"seed": cfg.seed, "student": cfg.student.model, "warmup": asdict(cfg.warmup), "train": train_view(cfg.train)}


def preflight(cfg) -> None:
    if cfg.warmup.enabled:
        from compeffdist_ray.models import resolve_model
        from compeffdist_ray.stages.difficulty import check_tokenizer
        from compeffdist_ray.training import preflight_resources

        preflight_resources(cfg)
        check_tokenizer(resolve_model(cfg.student.model), cfg.student.prompt_format)


def choose_samples(responses, num_samples: int, seed: int):
    """A random subset of the usable answers (never truncated ones), and how many were usable."""
    usable = responses[~responses["truncated"].astype(bool)] if "truncated" in responses else responses
    n = min(num_samples, len(usable))
    return usable.sample(n=n, random_state=seed).sort_index(), len(usable)


def model_dir(ctx_run, cfg) -> str | None:
    """Where the warmed-up student is (a local path), or None when the warm-up is disabled."""
    if not cfg.warmup.enabled:
        return None
    return ctx_run.local_dir("warmup", "model")


def run(ctx: StageContext) -> StageOutput:
    from compeffdist_ray.models import resolve_model
    from compeffdist_ray.training import remove_run_storage, spec_from_config, train_student

    cfg, wc = ctx.cfg, ctx.cfg.warmup
    if not wc.enabled:
        log.info("warmup: disabled (warmup.enabled=false); difficulty scores with %s", cfg.student.model)
        return StageOutput(rows=0, stats={"enabled": False})
    responses = ctx.run.read_df("responses", "responses")
    samples, usable = choose_samples(responses, wc.num_samples, cfg.seed + 6)
    if samples.empty:
        raise StageFailed("warmup: no untruncated teacher answer to warm up on")
    ctx.run.write_table(ctx.stage, "samples", samples[["pair_id", "task_id"]].reset_index(drop=True))
    spec = spec_from_config(cfg, model_path=resolve_model(cfg.student.model), name=f"warmup-{ctx.fingerprint[:12]}",
                            epochs=wc.epochs, max_steps=wc.max_steps, lr=wc.lr)
    with tempfile.TemporaryDirectory(prefix="compeffdist-warmup-") as tmp:
        result = train_student(samples, spec, tmp)
        ctx.run.upload_dir(tmp, ctx.stage, "model")
    from compeffdist_ray.training import history_frame

    ctx.run.write_table(ctx.stage, "history", history_frame(result.history))
    remove_run_storage(spec)
    losses = [h["loss"] for h in result.history]
    secs = sum(h["time_s"] for h in result.history)
    return StageOutput(
        rows=result.examples,
        dropped={"too_long": result.too_long} if result.too_long else {},
        stats={
            "enabled": True,
            "samples": int(len(samples)),
            "usable_answers": int(usable),
            "steps": result.steps,
            "resumed_from_step": result.resumed_from_step,
            "loss_first": losses[0] if losses else None,
            "loss_last": losses[-1] if losses else None,
            "train_tokens": result.train_tokens,
            "tokens_per_s": round(result.train_tokens / secs, 1) if secs else None,
            "train_wall_time_s": result.wall_time_s,
            "workers": spec.num_workers,
            "zero_stage": spec.zero_stage,
        },
    )
