"""Stage 5, responses: the teacher answers every (instruction, text) pair.

Reads `pairing/pairs.parquet` and `tasks/tasks.parquet`. The prompt of a pair is its task's
instruction followed by the task's demonstrations (`responses.demonstrations_in_prompt`, all
by default) and then the text: the same `instruction` string is stored with each row, so the
student is later scored and trained under exactly the prompt the teacher answered.
Writes `responses/responses.parquet`: pair_id, task_id, perspective_id, text_id, text,
instruction, response, input_tokens, output_tokens, attempts, truncated; and
`responses/generations.parquet` (every teacher answer). Empty answers (after retries) are
dropped and counted; answers cut off at `responses.max_new_tokens` are flagged `truncated`
(and dropped with `responses.drop_truncated`). This is the stage where most teacher compute
goes: the manifest's tokens are the bill.
Needs: the teacher.

    compeffdist stage responses --config configs/local-demo.yaml
"""

from __future__ import annotations

import json
from dataclasses import asdict

from compeffdist_ray.prompts import answer_messages, instruction_with_demonstrations
from compeffdist_ray.stages._common import (
    StageContext,
    StageFailed,
    StageOutput,
    generation_drops,
    generation_tokens,
    merge_counts,
    teacher_view,
)
from compeffdist_ray.stages.tasks import parse_demo_output as parse_response

NEEDS_RAY = True
VERSION = 1
REQUIRES = ("teacher",)  # checked before any stage starts


def inputs(cfg) -> tuple[str, ...]:
    return ("pairing", "tasks")


def config_view(cfg) -> dict:
    return {"seed": cfg.seed, "teacher": teacher_view(cfg.teacher), "responses": asdict(cfg.responses)}


def build_prompts(pairs, tasks, demonstrations_in_prompt: int | None):
    """Per pair: the full instruction (with demonstrations) and the chat messages for the teacher."""
    import pandas as pd

    full = {
        t.task_id: instruction_with_demonstrations(t.instruction, t.demonstrations, demonstrations_in_prompt)
        for t in tasks.itertuples()
    }
    instructions = [full[t] for t in pairs["task_id"]]
    return pd.DataFrame({
        "key": pairs["pair_id"],
        "instruction": instructions,
        "messages": [json.dumps(answer_messages(i, x), ensure_ascii=False) for i, x in zip(instructions, pairs["text"])],
    })


def assemble(pairs, prompts, gens, drop_truncated: bool):
    """The kept rows and the count of truncated answers dropped."""
    out = pairs.merge(prompts[["key", "instruction"]], left_on="pair_id", right_on="key").drop(columns=["key"])
    out = out.merge(gens, left_on="pair_id", right_on="key").drop(columns=["key"])
    out = out[out["ok"]].copy()
    out["response"] = out["parsed"].map(json.loads)
    out["truncated"] = out["finish_reason"] == "length"
    dropped_truncated = int(out["truncated"].sum()) if drop_truncated else 0
    if drop_truncated:
        out = out[~out["truncated"]]
    columns = ["pair_id", "task_id", "perspective_id", "text_id", "text", "instruction", "response",
               "input_tokens", "output_tokens", "attempts", "truncated"]
    return out[columns].reset_index(drop=True), dropped_truncated


def run(ctx: StageContext) -> StageOutput:
    from compeffdist_ray.teacher import run_generation

    cfg, rc = ctx.cfg, ctx.cfg.responses
    pairs = ctx.run.read_df("pairing", "pairs")
    tasks = ctx.run.read_df("tasks", "tasks")
    prompts = build_prompts(pairs, tasks, rc.demonstrations_in_prompt)
    # Pairs of one task share its long instruction: batching them together keeps padding low.
    by_task = prompts.assign(task_id=pairs["task_id"].to_numpy()).sort_values("task_id", kind="stable")
    gens = run_generation(by_task[["key", "messages"]], cfg.teacher, parse_response,
                          max_new_tokens=rc.max_new_tokens, seed=cfg.seed + 5)
    ctx.run.write_table(ctx.stage, "generations", gens)
    kept, dropped_truncated = assemble(pairs, prompts, gens, rc.drop_truncated)
    dropped = merge_counts(generation_drops(gens), {"truncated": dropped_truncated} if dropped_truncated else {})
    if kept.empty:
        raise StageFailed("responses: no usable teacher answer (" + ", ".join(f"{k} {v}" for k, v in dropped.items()) + ")")
    ctx.run.write_table(ctx.stage, "responses", kept)
    tokens = generation_tokens(gens)
    return StageOutput(
        rows=len(kept),
        dropped=dropped,
        tokens=tokens,
        stats={
            "pairs": int(len(pairs)),
            "truncated_kept": int(kept["truncated"].sum()),
            "mean_output_tokens": round(float(kept["output_tokens"].mean()), 1),
            "mean_input_tokens": round(float(kept["input_tokens"].mean()), 1),
            "tasks_with_responses": int(kept["task_id"].nunique()),
            "mean_attempts": round(float(gens["attempts"].mean()), 3),
        },
    )
