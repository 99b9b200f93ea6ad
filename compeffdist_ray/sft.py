"""Supervised fine-tuning examples: the pure part of training (no Ray, no DeepSpeed).

A row (instruction, text, response) becomes the student's prompt, formatted with its chat
template exactly as the difficulty scorer sees it (`compeffdist_ray.difficulty.encode_row`),
followed by the response and EOS. Only the response tokens (and EOS) carry loss: the prompt's
labels are -100. Rows longer than `max_length` are dropped and counted, never cut: a response
cut off mid-way would teach the student to stop early, a prompt cut at the front would drop
the instruction.

    >>> ex = encode_example(tokenizer, {"instruction": "...", "text": "...", "response": "positive"}, 2048)
    >>> batch = collate([ex], pad_id=tokenizer.pad_token_id)
"""

from __future__ import annotations

from typing import Mapping, Sequence

IGNORE_INDEX = -100
REQUIRED_COLUMNS = ("instruction", "text", "response")

__all__ = ["IGNORE_INDEX", "REQUIRED_COLUMNS", "KNOWN_FAMILIES", "check_prompt_format", "encode_example",
           "encode_rows", "collate", "pack", "pad_id_of", "training_steps"]

# Families whose base checkpoints commonly ship without a chat template and train well on the
# plain "User: ... / Assistant: ..." layout (config.json's model_type).
KNOWN_FAMILIES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
                            "gemma2", "gemma3", "gemma3_text"})


def check_prompt_format(name: str, has_template: bool, model_type: str | None, setting: str) -> str:
    """The layout the student gets ("chat" or "plain") under ``student.prompt_format``, or a
    UserError naming the model and the fix when the setting and the tokenizer disagree."""
    from compeffdist_ray.errors import UserError

    if setting == "chat" and not has_template:
        raise UserError(f"student {name}: student.prompt_format=chat but its tokenizer has no chat template; "
                        f"add chat_template to tokenizer_config.json or set student.prompt_format=plain")
    if setting == "plain" and has_template:
        raise UserError(f"student {name}: its tokenizer has a chat template, which it was tuned on; "
                        f"student.prompt_format=plain is for models without one: use auto or chat")
    if setting == "auto" and not has_template and model_type not in KNOWN_FAMILIES:
        raise UserError(f"student {name}: no chat template and an unknown family (model_type {model_type!r}); "
                        f"set student.prompt_format=plain to train and score it on 'User:'/'Assistant:' "
                        f"lines, or give its tokenizer a chat_template")
    return "chat" if has_template else "plain"


def pad_id_of(tokenizer) -> int:
    """The id used for padding (labels there are masked, so any id works; EOS when no pad)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        from compeffdist_ray.errors import UserError

        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has neither a pad nor an eos "
                        f"token; set tokenizer.pad_token before training")
    return int(pad)


def encode_example(tokenizer, row: Mapping, max_length: int) -> dict | None:
    """input_ids and labels (prompt masked) for one row, or None when it exceeds max_length."""
    from compeffdist_ray.difficulty import encode_row

    enc = encode_row(tokenizer, row)
    ids = list(enc.prompt_ids) + list(enc.response_ids)
    if len(ids) > max_length:
        return None
    labels = [IGNORE_INDEX] * len(enc.prompt_ids) + list(enc.response_ids)
    return {"input_ids": ids, "labels": labels}


def encode_rows(tokenizer, rows: Sequence[Mapping], max_length: int) -> tuple[list[dict], int]:
    """Encoded examples of the rows that fit, and how many were too long."""
    out, too_long = [], 0
    for row in rows:
        ex = encode_example(tokenizer, row, max_length)
        if ex is None:
            too_long += 1
        else:
            out.append(ex)
    return out, too_long


def pack(examples: Sequence[Mapping], max_length: int) -> list[dict]:
    """Greedy packing in order: consecutive examples share one sequence of at most max_length.

    Each packed sequence keeps `position_ids` restarting at 0 for every example, so that
    models using them see each example from its own start; attention still spans the packed
    neighbours (the usual trade-off of packing without per-example masks).
    """
    packed: list[dict] = []
    cur = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        if cur["input_ids"] and len(cur["input_ids"]) + n > max_length:
            packed.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": []}
        cur["input_ids"] += list(ex["input_ids"])
        cur["labels"] += list(ex["labels"])
        cur["position_ids"] += list(range(n))
    if cur["input_ids"]:
        packed.append(cur)
    return packed


def collate(examples: Sequence[Mapping], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels (-100 on padding)[, position_ids]."""
    import torch

    width = max(len(ex["input_ids"]) for ex in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    with_pos = all("position_ids" in ex for ex in examples)
    positions = torch.zeros((n, width), dtype=torch.long) if with_pos else None
    for i, ex in enumerate(examples):
        k = len(ex["input_ids"])
        input_ids[i, :k] = torch.as_tensor(list(ex["input_ids"]), dtype=torch.long)
        labels[i, :k] = torch.as_tensor(list(ex["labels"]), dtype=torch.long)
        attention[i, :k] = 1
        if positions is not None:
            positions[i, :k] = torch.as_tensor(list(ex["position_ids"]), dtype=torch.long)
    out = {"input_ids": input_ids, "attention_mask": attention, "labels": labels}
    if positions is not None:
        out["position_ids"] = positions
    return out


def training_steps(num_examples: int, *, num_workers: int, micro_batch_size: int,
                   gradient_accumulation_steps: int, max_steps: int | None = None) -> tuple[int, int]:
    """(optimizer steps, micro-batches per worker) for one pass over `num_examples`.

    Every worker runs exactly the same number of micro-batches (a rank doing one more would
    wait forever in the gradient all-reduce): each worker's shard holds num_examples //
    num_workers rows, its last partial micro-batch is dropped, and the micro-batches are
    rounded down to whole optimizer steps.
    """
    per_worker = num_examples // max(1, num_workers)
    micro = per_worker // micro_batch_size
    steps = micro // gradient_accumulation_steps
    if max_steps is not None:
        steps = min(steps, max_steps)
    return steps, steps * gradient_accumulation_steps
