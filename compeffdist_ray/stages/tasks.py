"""Stage 3, tasks: the teacher invents tasks per perspective and answers real user texts as demonstrations.

Reads `perspectives/perspectives.parquet` and the corpus. Two teacher passes:
1. per perspective, `tasks.tasks_per_perspective` task definitions (name, description,
   instruction), each asked for a different answer style;
2. per task, `tasks.num_demonstrations` real user texts answered by the teacher under the
   task's instruction.
Writes `tasks/tasks.parquet` (task_id, perspective_id, perspective, name, description,
instruction, style, demonstrations [{text_id, text, output}], n_demonstrations) and
`tasks/generations.parquet` (every teacher answer of both passes). Malformed or duplicate
tasks and tasks left without a demonstration are dropped and counted.
Needs: the teacher.

    compeffdist stage tasks --config configs/local-demo.yaml
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict

import numpy as np

from compeffdist_ray.parsing import parse_key_values
from compeffdist_ray.prompts import OUTPUT_STYLES, answer_messages, task_messages
from compeffdist_ray.stages._common import (
    StageContext,
    StageFailed,
    StageOutput,
    generation_drops,
    generation_tokens,
    merge_counts,
    teacher_view,
)

NEEDS_RAY = True
VERSION = 1
REQUIRES = ("corpus", "teacher")  # checked before any stage starts

_TASK_KEYS = {
    "name": ("name", "task name", "task", "title", "task title"),
    "description": ("description", "task description", "desc"),
    "instruction": ("instruction", "task instruction", "instructions", "prompt"),
}
MIN_INSTRUCTION_WORDS, MAX_INSTRUCTION_WORDS = 5, 120
_PLACEHOLDER = re.compile(r"\{[^{}]*\}|<[^<>]*text[^<>]*>|\[[^\[\]]*text[^\[\]]*\]", re.IGNORECASE)


def parse_task(text: str) -> dict | None:
    """{name, description, instruction} from one answer, or None if it is not a usable task."""
    fields = parse_key_values(text, _TASK_KEYS)
    if not fields or "instruction" not in fields:
        return None
    instruction = _PLACEHOLDER.sub("the text", fields["instruction"]).strip()
    words = instruction.lower().split()
    if not MIN_INSTRUCTION_WORDS <= len(words) <= MAX_INSTRUCTION_WORDS:
        return None
    if len(words) >= 20 and len(set(words)) / len(words) < 0.4:  # degenerate, looping output
        return None
    name = fields.get("name") or " ".join(instruction.split()[:6])
    name = " ".join(name.split()[:12]).strip().rstrip(".")
    description = fields.get("description") or instruction.split(". ")[0]
    return {"name": name, "description": description.strip(), "instruction": instruction}


def parse_demo_output(text: str) -> str | None:
    """A demonstration answer: any non-empty answer with a letter or digit in it."""
    text = text.strip()
    return text if re.search(r"\w", text) else None


def select_perspectives(persp, max_perspectives: int | None):
    return persp if max_perspectives is None else persp.head(max_perspectives)


def task_prompts(persp, tasks_per_perspective: int):
    import pandas as pd

    rows = []
    for p in persp.itertuples():
        attrs = list(p.attributes)
        for k in range(tasks_per_perspective):
            rows.append({
                "key": f"{p.perspective_id}:{k}",
                "messages": json.dumps(task_messages(p.name, attrs, k), ensure_ascii=False),
            })
    return pd.DataFrame(rows)


def collect_tasks(gens, persp) -> tuple[list[dict], dict[str, int]]:
    """Parsed, de-duplicated tasks (by perspective and normalised name), with drop counts."""
    names = dict(zip(persp["perspective_id"], persp["name"]))
    tasks, seen, dropped = [], set(), {}
    for key, ok, parsed in zip(gens["key"], gens["ok"], gens["parsed"]):
        if not ok:
            continue
        pid, k = key.split(":")
        task = json.loads(parsed)
        ident = (pid, re.sub(r"\W+", " ", task["instruction"].lower()).strip())
        if ident in seen:
            dropped["duplicate_task"] = dropped.get("duplicate_task", 0) + 1
            continue
        seen.add(ident)
        tasks.append({
            "task_id": f"{pid}-t{int(k):02d}",
            "perspective_id": pid,
            "perspective": names[pid],
            "style": OUTPUT_STYLES[int(k) % len(OUTPUT_STYLES)],
            **task,
        })
    return tasks, dropped


def demo_assignments(task_ids: list[str], text_ids: np.ndarray, n_demos: int, seed: int) -> dict[str, list]:
    """For each task, n_demos distinct corpus texts, drawn reproducibly (per task)."""
    out = {}
    for i, tid in enumerate(task_ids):
        rng = np.random.default_rng([seed, i])
        k = min(n_demos, len(text_ids))
        out[tid] = [str(t) for t in rng.choice(text_ids, size=k, replace=False)]
    return out


def inputs(cfg) -> tuple[str, ...]:
    return ("perspectives",)


def config_view(cfg) -> dict:
    return {"seed": cfg.seed, "input": asdict(cfg.input), "teacher": teacher_view(cfg.teacher),
            "tasks": asdict(cfg.tasks)}


def run(ctx: StageContext) -> StageOutput:
    import pandas as pd

    from compeffdist_ray.inputs import read_corpus
    from compeffdist_ray.teacher import run_generation

    cfg, tc = ctx.cfg, ctx.cfg.tasks
    persp = select_perspectives(ctx.run.read_df("perspectives", "perspectives"), tc.max_perspectives)
    corpus = read_corpus(cfg.input).df
    text_by_id = dict(zip(corpus["text_id"], corpus["text"]))

    task_gens = run_generation(task_prompts(persp, tc.tasks_per_perspective), cfg.teacher, parse_task,
                               max_new_tokens=tc.max_new_tokens, seed=cfg.seed)
    tasks, dup_drops = collect_tasks(task_gens, persp)
    if not tasks:
        ctx.run.write_table(ctx.stage, "generations", task_gens.assign(kind="task"))
        raise StageFailed(
            f"tasks: none of {len(task_gens)} task answers was a usable task ("
            + ", ".join(f"{k} {v}" for k, v in generation_drops(task_gens).items())
            + "); check teacher.model, or raise teacher.max_attempts"
        )
    assigned = demo_assignments([t["task_id"] for t in tasks], corpus["text_id"].to_numpy(),
                                tc.num_demonstrations, cfg.seed)
    instr = {t["task_id"]: t["instruction"] for t in tasks}
    demo_df = pd.DataFrame([
        {"key": f"{tid}|{text_id}", "messages": json.dumps(answer_messages(instr[tid], text_by_id[text_id]), ensure_ascii=False)}
        for tid, text_ids in assigned.items() for text_id in text_ids
    ])
    demo_gens = run_generation(demo_df, cfg.teacher, parse_demo_output, max_new_tokens=tc.demo_max_new_tokens,
                               seed=cfg.seed + 1)
    demos: dict[str, list] = {t["task_id"]: [] for t in tasks}
    for key, ok, parsed, finish in zip(demo_gens["key"], demo_gens["ok"], demo_gens["parsed"], demo_gens["finish_reason"]):
        if ok:
            tid, text_id = key.split("|", 1)
            demos[tid].append({"text_id": text_id, "text": text_by_id[text_id], "output": json.loads(parsed),
                               "truncated": finish == "length"})
    kept, no_demo = [], 0
    for task in tasks:
        if demos[task["task_id"]]:
            kept.append({**task, "demonstrations": demos[task["task_id"]], "n_demonstrations": len(demos[task["task_id"]])})
        else:
            no_demo += 1
    ctx.run.write_table(ctx.stage, "generations",
                        pd.concat([task_gens.assign(kind="task"), demo_gens.assign(kind="demonstration")], ignore_index=True))
    dropped = merge_counts(
        {f"task_{k}": v for k, v in generation_drops(task_gens).items()},
        dup_drops,
        {f"demonstration_{k}": v for k, v in generation_drops(demo_gens).items()},
        {"task_without_demonstrations": no_demo} if no_demo else {},
    )
    if not kept:
        raise StageFailed("tasks: every task lost all its demonstrations (" +
                          ", ".join(f"{k} {v}" for k, v in dropped.items()) + ")")
    ctx.run.write_table(ctx.stage, "tasks", pd.DataFrame(kept))
    return StageOutput(
        rows=len(kept),
        dropped=dropped,
        tokens=generation_tokens(task_gens, demo_gens),
        stats={
            "perspectives_used": int(len(persp)),
            "tasks_asked": int(len(task_gens)),
            "tasks_kept": len(kept),
            "demonstrations": int(sum(t["n_demonstrations"] for t in kept)),
            "truncated_demonstrations": int(sum(d["truncated"] for t in kept for d in t["demonstrations"])),
            "examples": [{"name": t["name"], "instruction": t["instruction"]} for t in kept[:3]],
        },
    )
