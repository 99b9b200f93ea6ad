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
goes: the manifest's tokens are the bill. In proxy mode (`filtering.proxy.enabled`) it answers
only `filtering.proxy.seed_pairs` random pairs, the proxy's training data; the kept pairs are
answered later by the kept_responses stage.
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


FILE_COLUMNS = ("instruction", "text", "response")


def inputs(cfg) -> tuple[str, ...]:
    return () if cfg.responses.file else ("pairing", "tasks")


def preflight(cfg) -> None:
    """A responses file must be readable and have its columns before any work starts."""
    if cfg.responses.file:
        from compeffdist_ray.inputs import read_records

        read_records(cfg.responses.file, key="responses.file", required=FILE_COLUMNS)


def config_view(cfg) -> dict:
    if cfg.responses.file:
        from compeffdist_ray.inputs import file_digest

        return {"file": cfg.responses.file, "sha256": file_digest(cfg.responses.file, "responses.file")}
    view = {"seed": cfg.seed, "teacher": teacher_view(cfg.teacher), "responses": asdict(cfg.responses)}
    if cfg.filtering.proxy.enabled:  # only then does the stage answer a subset
        view["proxy_seed_pairs"] = cfg.filtering.proxy.seed_pairs
    return view


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


def seed_pairs(pairs, n: int, seed: int):
    """Proxy mode: the random pairs answered (and scored) to train the proxy on."""
    return pairs.sample(n=min(n, len(pairs)), random_state=seed).sort_index()


def answer_pairs(ctx: StageContext, pairs, tasks):
    """Ask the teacher for every pair; (kept rows, generations, dropped counts, tokens)."""
    from compeffdist_ray.teacher import run_generation

    cfg, rc = ctx.cfg, ctx.cfg.responses
    prompts = build_prompts(pairs, tasks, rc.demonstrations_in_prompt)
    # Pairs of one task share its long instruction: batching them together keeps padding low.
    by_task = prompts.assign(task_id=pairs["task_id"].to_numpy()).sort_values("task_id", kind="stable")
    gens = run_generation(by_task[["key", "messages"]], cfg.teacher, parse_response,
                          max_new_tokens=rc.max_new_tokens, seed=cfg.seed + 5)
    ctx.run.write_table(ctx.stage, "generations", gens)
    kept, dropped_truncated = assemble(pairs, prompts, gens, rc.drop_truncated)
    dropped = merge_counts(generation_drops(gens), {"truncated": dropped_truncated} if dropped_truncated else {})
    if kept.empty:
        raise StageFailed(f"{ctx.stage}: no usable teacher answer (" +
                          ", ".join(f"{k} {v}" for k, v in dropped.items()) + ")")
    return kept, gens, dropped, generation_tokens(gens)


def answer_stats(kept, gens, pairs) -> dict:
    return {
        "pairs": int(len(pairs)),
        "truncated_kept": int(kept["truncated"].sum()),
        "mean_output_tokens": round(float(kept["output_tokens"].mean()), 1),
        "mean_input_tokens": round(float(kept["input_tokens"].mean()), 1),
        "tasks_with_responses": int(kept["task_id"].nunique()),
        "mean_attempts": round(float(gens["attempts"].mean()), 3),
    }


def _digest_id(prefix: str, *parts: str) -> str:
    import hashlib

    return prefix + hashlib.sha1("\0".join(parts).encode("utf-8")).hexdigest()[:12]


def _counts(df, col: str):
    """A token-count column of the file (0 where absent or not a number)."""
    import pandas as pd

    if col not in df.columns:
        return pd.Series(0, index=df.index, dtype="int64")
    return pd.to_numeric(df[col], errors="coerce").fillna(0).astype("int64")


def rows_from_file(path: str):
    """(rows in the responses schema, dropped counts) from a user's answers file."""
    import pandas as pd

    from compeffdist_ray.errors import UserError
    from compeffdist_ray.inputs import read_records, text_id_of

    df = read_records(path, key="responses.file", required=FILE_COLUMNS)
    dropped: dict[str, int] = {}
    usable = pd.Series(True, index=df.index)
    for col in FILE_COLUMNS:
        ok = df[col].map(lambda v: isinstance(v, str) and bool(v.strip()))
        if (~ok & usable).any():
            dropped[f"empty_{col}"] = int((~ok & usable).sum())
        usable &= ok
    df = df[usable].copy()
    if df.empty:
        raise UserError(f"{path} (from responses.file) has no row with a non-empty instruction, text and response")
    for col in FILE_COLUMNS:
        df[col] = df[col].str.strip() if col != "instruction" else df[col]
    if "task_id" in df.columns:
        df["task_id"] = df["task_id"].astype(str)
    else:
        df["task_id"] = [_digest_id("task-", i) for i in df["instruction"]]
    if "pair_id" in df.columns:
        df["pair_id"] = df["pair_id"].astype(str)
        dup = df["pair_id"].duplicated(keep=False)
        if dup.any():
            raise UserError(f"{path} (from responses.file): pair_id {df.loc[dup, 'pair_id'].iloc[0]!r} appears "
                            f"{int((df['pair_id'] == df.loc[dup, 'pair_id'].iloc[0]).sum())} times; pair ids must "
                            f"be unique (or leave the column out)")
    else:
        df["pair_id"] = [_digest_id("pair-", i, t, r) for i, t, r in zip(df["instruction"], df["text"], df["response"])]
        dup = df["pair_id"].duplicated()
        if dup.any():
            dropped["duplicate"] = int(dup.sum())
            df = df[~dup]
    out = pd.DataFrame({
        "pair_id": df["pair_id"], "task_id": df["task_id"],
        "perspective_id": df["perspective_id"].astype(str) if "perspective_id" in df.columns else None,
        "text_id": [text_id_of(t) for t in df["text"]], "text": df["text"], "instruction": df["instruction"],
        "response": df["response"],
        "input_tokens": _counts(df, "input_tokens"), "output_tokens": _counts(df, "output_tokens"),
        "attempts": 0, "truncated": False,
    })
    out["perspective_id"] = out["perspective_id"].astype(object)
    return out.reset_index(drop=True), dropped


def run(ctx: StageContext) -> StageOutput:
    cfg = ctx.cfg
    if cfg.responses.file:
        rows, dropped = rows_from_file(cfg.responses.file)
        ctx.run.write_table(ctx.stage, "responses", rows)
        return StageOutput(rows=len(rows), dropped=dropped,
                           stats={"source": cfg.responses.file, "tasks_with_responses": int(rows["task_id"].nunique())})
    pairs = ctx.run.read_df("pairing", "pairs")
    tasks = ctx.run.read_df("tasks", "tasks")
    stats = {}
    if cfg.filtering.proxy.enabled:
        all_pairs = len(pairs)
        pairs = seed_pairs(pairs, cfg.filtering.proxy.seed_pairs, cfg.seed + 8)
        stats["proxy_seed"] = {"answered": int(len(pairs)), "of_pairs": int(all_pairs)}
    kept, gens, dropped, tokens = answer_pairs(ctx, pairs, tasks)
    ctx.run.write_table(ctx.stage, "responses", kept)
    return StageOutput(rows=len(kept), dropped=dropped, tokens=tokens, stats={**answer_stats(kept, gens, pairs), **stats})
