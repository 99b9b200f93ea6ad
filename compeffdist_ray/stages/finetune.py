"""Stage 11, finetune: the student is fine-tuned on the kept samples, on Ray Train + DeepSpeed.

Reads `sampling/kept.parquet` (in proxy mode `kept_responses/kept.parquet`). Trains
`student.model` (the base student, not the warm-up copy, as in the paper) with the project's
trainer (`compeffdist_ray.training`; the `train` section: workers, ZeRO stage, schedule, ...;
`finetune.epochs`, `finetune.packing`). Loss on the response tokens only, in the student's chat
template.
Writes `finetune/model/` (Hugging Face format: safetensors, config, tokenizer with its chat
template, generation config; loadable by transformers and vLLM, with a model card README.md),
`finetune/history.parquet` (loss and learning rate per optimizer step) and
`finetune/loss.png`. Checkpoints: `train.storage_path` (default `<run_dir>/_train`), resumed
from when a killed run starts again, removed once the model is exported.
Needs: the student; CPU workers (fp32, gloo) or GPUs with `train.use_gpu`.

    compeffdist stage finetune train.num_workers=2 train.cpus_per_worker=0.5 train.zero_stage=2
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict

from compeffdist_ray.stages._common import StageContext, StageFailed, StageOutput

log = logging.getLogger("compeffdist_ray")

NEEDS_RAY = True
VERSION = 1
REQUIRES = ("student",)


def _source(cfg) -> str:
    return "kept_responses" if cfg.filtering.proxy.enabled else "sampling"


def inputs(cfg) -> tuple[str, ...]:
    return (_source(cfg),)


def config_view(cfg) -> dict:
    from compeffdist_ray.training import train_view

    if not cfg.finetune.enabled:
        return {"enabled": False}
    return {"seed": cfg.seed, "student": cfg.student.model, "finetune": asdict(cfg.finetune),
            "train": train_view(cfg.train)}


def preflight(cfg) -> None:
    if cfg.finetune.enabled:
        from compeffdist_ray.models import resolve_model
        from compeffdist_ray.stages.difficulty import check_tokenizer
        from compeffdist_ray.training import preflight_resources

        preflight_resources(cfg)
        check_tokenizer(resolve_model(cfg.student.model), cfg.student.prompt_format)


def _trained_weights(lora) -> str:
    if lora.r <= 0:
        return "all (full fine-tuning)"
    return (f"LoRA adapters (r {lora.r}, alpha {lora.alpha:g}, on {lora.target_modules}), merged into the "
            f"weights of this export")


def model_card(cfg, *, rows: int, result, run_stats: dict) -> str:
    """The exported model's README.md: where it came from and how it was trained."""
    losses = [h["loss"] for h in result.history]
    teacher = cfg.teacher.model if not cfg.responses.file else f"answers from {cfg.responses.file}"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [compeffdist, distillation, sentiment-analysis]",
        "---",
        "",
        f"# {cfg.student.model}, distilled for sentiment analysis",
        "",
        "Fine-tuned with compeffdist-ray (the COMPEFFDIST recipe: Xie et al., EMNLP 2025) on a teacher's",
        "answers to sentiment-analysis tasks, kept by difficulty-prioritised sampling.",
        "",
        "| | |",
        "|---|---|",
        f"| base model (student) | `{cfg.student.model}` |",
        f"| teacher | `{teacher}` |",
        f"| training samples | {rows:,} (kept of {run_stats.get('rows_before', '?')}, keep ratio {cfg.sampling.keep_ratio}) |",
        f"| sampling | {cfg.sampling.method}, {cfg.sampling.grouping}, by {cfg.sampling.score}"
        f"{' (proxy-predicted)' if cfg.filtering.proxy.enabled else ''} |",
        f"| epochs / optimizer steps | {cfg.finetune.epochs} / {result.steps} |",
        f"| learning rate | {cfg.finetune.lr or cfg.train.lr} peak, {cfg.train.lr_schedule}, "
        f"warm-up {cfg.train.warmup_steps} steps (capped at a tenth of the run) |",
        f"| batch | {cfg.train.micro_batch_size} x {cfg.train.gradient_accumulation_steps} accumulation x "
        f"{cfg.train.num_workers} workers |",
        f"| DeepSpeed | ZeRO-{cfg.train.zero_stage}, {'bf16' if cfg.train.use_gpu else 'fp32'} |",
        f"| weights trained | {_trained_weights(cfg.train.lora)} |",
        f"| training loss | {losses[0]:.4f} (first step) -> {losses[-1]:.4f} (last step) |" if losses else "",
        f"| training tokens | {result.train_tokens:,} |",
        "",
        "The loss was computed on the response tokens only, in the model's chat template.",
        "",
    ]
    return "\n".join(line for line in lines if line is not None)


def loss_plot(history) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(history["step"], history["loss"], color="#4c72b0")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (response tokens)")
    ax.set_title("finetune")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def run(ctx: StageContext) -> StageOutput:
    import os

    from compeffdist_ray.models import resolve_model
    from compeffdist_ray.training import history_frame, remove_run_storage, spec_from_config, train_student

    cfg, fc = ctx.cfg, ctx.cfg.finetune
    if not fc.enabled:
        log.info("finetune: disabled (finetune.enabled=false)")
        return StageOutput(rows=0, stats={"enabled": False})
    source = _source(cfg)
    kept = ctx.run.read_df(source, "kept")
    if kept.empty:
        raise StageFailed(f"finetune: {source}/kept.parquet has no rows to train on")
    spec = spec_from_config(cfg, model_path=resolve_model(cfg.student.model), name=f"finetune-{ctx.fingerprint[:12]}",
                            epochs=fc.epochs, max_steps=fc.max_steps, lr=fc.lr)
    spec.packing = fc.packing
    sampling = ctx.run.read_manifest("sampling")
    run_stats = (sampling.stats.get("report") or {}) if sampling else {}
    with tempfile.TemporaryDirectory(prefix="compeffdist-finetune-") as tmp:
        result = train_student(kept, spec, tmp)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(model_card(cfg, rows=len(kept), result=result, run_stats=run_stats))
        ctx.run.upload_dir(tmp, ctx.stage, "model")
    history = history_frame(result.history)
    ctx.run.write_table(ctx.stage, "history", history)
    ctx.run.write_bytes(ctx.stage, "loss.png", loss_plot(history))
    remove_run_storage(spec)
    losses = list(history["loss"])
    secs = float(history["time_s"].sum())
    return StageOutput(
        rows=result.examples,
        dropped={"too_long": result.too_long} if result.too_long else {},
        stats={
            "enabled": True, "source": source, "samples": int(len(kept)), "steps": result.steps,
            "resumed_from_step": result.resumed_from_step,
            "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
            "train_tokens": result.train_tokens, "tokens_per_s": round(result.train_tokens / secs, 1) if secs else None,
            "train_wall_time_s": result.wall_time_s, "workers": spec.num_workers, "zero_stage": spec.zero_stage,
            "packing": spec.packing,
        },
    )
