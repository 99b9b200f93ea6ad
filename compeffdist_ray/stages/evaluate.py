"""Stage 12, evaluate: SentiBench for the base student, the distilled student and (optionally) the teacher.

Reads `finetune/model/` (the distilled student) and the SentiBench copy at `evaluate.data_dir`
(`<category>/<dataset>/{train,test}.json`; read in place, never copied). Runs the protocol of
`compeffdist eval` (k-shot classification read off the label tokens' next-token logits,
macro-F1; ABSA answers as JSON lists, micro-F1) on a Ray Data actor pool for each model, with
the same demonstrations, prompts and seed (the run's `seed`) for all of them.
Writes `evaluate/<model>.json` (the result file of `compeffdist eval`: per dataset the metrics,
n, confusion counts and example predictions; `compeffdist eval --compare` reads it),
`evaluate/<model>.predictions/` (every test example's output) and `evaluate/comparison.md`
(the models side by side). The models are `base` (student.model), `distilled` and, with
`evaluate.teacher=true`, `teacher` (its model on the transformers backend, its endpoint on
the openai backend). With no `evaluate.data_dir` the stage is skipped and says so.
Per-example predictions are kept in `<run_dir>/_eval/` as each dataset completes, so a run
killed during a long evaluation redoes only the unfinished datasets.
Needs: the models on CPU (or `evaluate.num_gpus`).

    compeffdist stage evaluate evaluate.data_dir=../shared/sentibench evaluate.limit=100
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict

from compeffdist_ray.errors import UserError
from compeffdist_ray.stages._common import StageContext, StageOutput, teacher_view, without_resources

log = logging.getLogger("compeffdist_ray")

NEEDS_RAY = True
VERSION = 1
REQUIRES = ("student",)
WORK_DIR = "_eval"  # per-example predictions while the stage runs (outside the stage folder, which a rerun clears)


def inputs(cfg) -> tuple[str, ...]:
    return ("finetune",) if cfg.finetune.enabled else ()


def _teacher_target(cfg) -> tuple[str | None, str]:
    """(what `compeffdist eval --model` gets for the teacher, or None; why not, when None)."""
    t = cfg.teacher
    if cfg.responses.file:
        return None, "the run's answers come from responses.file, there is no teacher to evaluate"
    if t.backend == "transformers":
        return t.model, ""
    if t.backend == "openai":
        return t.openai.base_url, ""
    return None, (f"teacher.backend={t.backend}: evaluate the served teacher with compeffdist eval --model "
                  f"http://HOST:PORT/v1 (its OpenAI-compatible endpoint)")


def config_view(cfg) -> dict:
    e = cfg.evaluate
    if not e.data_dir:
        return {"data_dir": None, "seed": cfg.seed}
    view = {"seed": cfg.seed, "evaluate": without_resources(asdict(e)), "student": cfg.student.model,
            "distilled": cfg.finetune.enabled}
    if e.teacher:
        view["teacher"] = teacher_view(cfg.teacher)
    return view


def preflight(cfg) -> None:
    """The data directory holds known datasets, and the ones asked for (cheap: no model loaded)."""
    e = cfg.evaluate
    if not e.data_dir:
        return
    from compeffdist_ray import evaluation as ev

    try:
        found, skipped = ev.discover_datasets(e.data_dir)
        ev.select_datasets(found, skipped, e.datasets)
    except UserError as exc:
        raise UserError(f"evaluate.data_dir: {exc}") from None


def _models(ctx: StageContext) -> list[tuple[str, str, dict]]:
    """(label, model for EvalConfig, extra EvalConfig fields) of every model to evaluate, in table order."""
    cfg = ctx.cfg
    models = []
    if cfg.evaluate.teacher:
        target, why = _teacher_target(cfg)
        if target is None:
            log.warning("evaluate: teacher not evaluated: %s", why)
        elif cfg.teacher.backend == "openai":
            models.append(("teacher", target, {"endpoint_model": cfg.teacher.model,
                                               "api_key_env": cfg.teacher.openai.api_key_env}))
        else:
            models.append(("teacher", target, {}))
    if cfg.evaluate.base_student:
        models.append(("base", cfg.student.model, {}))
    if cfg.finetune.enabled:
        manifest = ctx.run.read_manifest("finetune")
        if manifest is not None and manifest.stats.get("enabled", True):
            models.append(("distilled", ctx.run.local_dir("finetune", "model"), {}))
    return models


def run(ctx: StageContext) -> StageOutput:
    import os

    from compeffdist_ray import evaluation as ev
    from compeffdist_ray.eval_runner import EvalConfig, run_eval

    cfg, e = ctx.cfg, ctx.cfg.evaluate
    if not e.data_dir:
        log.info("evaluate: skipped: no evaluate.data_dir; point it at a SentiBench copy to evaluate the students "
                 "(e.g. evaluate.data_dir=../shared/sentibench)")
        return StageOutput(rows=0, stats={"skipped": "no evaluate.data_dir"})
    models = _models(ctx)
    if not models:
        log.info("evaluate: skipped: no model to evaluate (evaluate.base_student, finetune.enabled and "
                 "evaluate.teacher are all off)")
        return StageOutput(rows=0, stats={"skipped": "no model to evaluate"})
    # Predictions survive a killed run in <run>/_eval on a local run dir; elsewhere in a temporary folder.
    work = ctx.run.path(WORK_DIR, ctx.fingerprint[:12]) if ctx.run.local else tempfile.mkdtemp(prefix="compeffdist-eval-")
    results = {}
    for label, model, extra in models:
        log.info("evaluate: %s (%s)", label, model)
        ecfg = EvalConfig(model=model, data_dir=e.data_dir, datasets=tuple(e.datasets) or None, k_shot=e.k_shot,
                          demos=e.demos,
                          seed=cfg.seed, limit=e.limit, batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                          max_prompt_tokens=e.max_prompt_tokens, concurrency=e.concurrency, num_cpus=e.num_cpus,
                          num_gpus=e.num_gpus, **extra)
        result = run_eval(ecfg, predictions_dir=os.path.join(work, label))
        result["label"] = label
        results[label] = result
        ctx.run.write_bytes(ctx.stage, f"{label}.json", json.dumps(result, indent=2, ensure_ascii=False).encode())
        ctx.run.upload_dir(os.path.join(work, label), ctx.stage, f"{label}.predictions")
        log.info("evaluate: %s mean F1 %.1f over %d dataset(s)", label, 100 * (result["mean_f1"] or 0.0),
                 len(result["datasets"]))
    names = list(results)
    table = ev.compare_table([results[n] for n in names], names)
    ctx.run.write_bytes(ctx.stage, "comparison.md", (table + "\n").encode())
    log.info("evaluate: SentiBench F1 x100 (k=%d, seed=%d%s):\n%s", e.k_shot, cfg.seed,
             f", first {e.limit} test rows" if e.limit else "", table)
    shutil.rmtree(work, ignore_errors=True)
    first = next(iter(results.values()))
    return StageOutput(
        rows=sum(b["n"] for b in first["datasets"].values()),
        # the manifest's tokens are the teacher's (what the run spent on it); the students' are in the stats
        tokens=dict(results["teacher"]["tokens"]) if "teacher" in results else {"input": 0, "output": 0},
        stats={
            "data_dir": e.data_dir, "k": e.k_shot, "demos": e.demos, "seed": cfg.seed, "limit": e.limit,
            "models": {label: "finetune/model" if label == "distilled" else model for label, model, _ in models},
            "mean_f1": {n: results[n]["mean_f1"] for n in names},
            "results": {n: {d: {"kind": b["kind"], "n": b["n"], **b["metrics"]} for d, b in results[n]["datasets"].items()}
                        for n in names},
            "skipped_datasets": first["skipped"],
            "wall_time_s": {n: results[n]["wall_time_s"] for n in names},
            "model_tokens": {n: results[n]["tokens"] for n in names},
        },
    )
