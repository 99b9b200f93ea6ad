"""Difficulty scoring (stage 7): the one-row reference against the fast batched scorer.

    python benchmarks/difficulty_scoring.py
    python benchmarks/difficulty_scoring.py --instructions 4 --demos 8 --texts 8 --batch-size 16 --threads 2

Rows in the paper's shape: a few task instructions, each embedding its demonstrations (input
text + expected answer; the paper used 32, here --demos), so every row of one instruction
shares a long prompt prefix; each instruction is paired with --texts user texts and a short
answer. Texts come from the bundled corpus (compeffdist_ray/data/sample_corpus.jsonl), demo
texts and scored texts never overlap. The answers are rule-made (this measures speed, not
quality) and short, as sentiment answers are.

Modes, all in this one run on the same rows, each a ratio against (1):
  (1) reference       score_reference: one row at a time, full logits, a full sort per token
  (2) batched         score_batch, length buckets, full-vocabulary logits at every position,
                      no prefix reuse
  (3) + projection    lm_head only at the positions that predict response tokens
  (4) + prefix reuse  each instruction's shared prefix runs once into a KV cache
Every mode is checked against (1): the largest absolute difference per metric (ppl relative).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPUS = ROOT / "compeffdist_ray" / "data" / "sample_corpus.jsonl"

_POSITIVE = ("love", "great", "impressed", "gorgeous", "perfect", "excellent", "amazing", "lovely",
             "friendly", "best", "fantastic", "happy", "recommend", "wonderful", "delicious", "fast")
_NEGATIVE = ("late", "broken", "crushed", "awful", "terrible", "worst", "rude", "cold", "hate", "disappoint",
             "refund", "slow", "never", "dirty", "waste", "bad", "poor", "angry", "barely")


def _polarity(text: str) -> tuple[str, int]:
    low = text.lower()
    score = sum(w in low for w in _POSITIVE) - sum(w in low for w in _NEGATIVE)
    label = "positive" if score > 0 else "negative" if score < 0 else "neutral"
    return label, max(1, min(5, 3 + score))


def _phrase(text: str) -> str:
    words = text.replace('"', "").split()
    return " ".join(words[:3]).rstrip(".,!?")


# (task description, answer maker): one per instruction, cycling
_TASKS = (
    ("Read the text and decide whether the writer's overall opinion is positive, negative or neutral. "
     "Answer with one label.", lambda t: _polarity(t)[0]),
    ("Rate how strongly the writer feels, from 1 (barely) to 5 (very strongly), and give the score "
     "followed by a two-word reason.", lambda t: f"{_polarity(t)[1]} - {_polarity(t)[0]} tone"),
    ("List the words or phrases of the text that carry the writer's opinion, as a JSON list of strings.",
     lambda t: json.dumps([_phrase(t)])),
    ("In one short sentence, say what the writer feels about the thing they describe.",
     lambda t: f"The writer sounds {_polarity(t)[0]} about it."),
)


def build_rows(n_instructions: int, n_demos: int, n_texts: int) -> list[dict]:
    texts = []
    with open(CORPUS, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if line:
                texts.append(json.loads(line)["text"])
    need = n_instructions * (n_demos + n_texts)
    if need > len(texts):
        sys.exit(f"the corpus has {len(texts)} texts, {need} needed: lower --instructions/--demos/--texts")
    # Interleave so that each instruction gets texts of several domains (the corpus is grouped by domain).
    stride = max(1, len(texts) // need)
    pool = iter(texts[i * stride] for i in range(need))
    rows = []
    for k in range(n_instructions):
        description, answer = _TASKS[k % len(_TASKS)]
        demos = [next(pool) for _ in range(n_demos)]
        shots = "\n\n".join(f"Example {j + 1}:\nText: {d}\nAnswer: {answer(d)}" for j, d in enumerate(demos))
        instruction = f"{description}\n\nHere are some examples.\n\n{shots}\n\nNow the real one."
        for _ in range(n_texts):
            text = next(pool)
            rows.append({"instruction": instruction, "text": text, "response": answer(text)})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, local dir or HF id")
    parser.add_argument("--instructions", type=int, default=4)
    parser.add_argument("--demos", type=int, default=8, help="demonstrations embedded in each instruction")
    parser.add_argument("--texts", type=int, default=8, help="texts paired with each instruction")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--top-p", type=float, default=0.95)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compeffdist_ray.difficulty import METRIC_COLUMNS, encode_row, score_batch, score_reference
    from compeffdist_ray.models import resolve_model

    if args.threads:
        torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = build_rows(args.instructions, args.demos, args.texts)

    enc = [encode_row(tokenizer, r) for r in rows]
    prompt = [len(e.prompt_ids) for e in enc]
    response = [len(e.response_ids) for e in enc]
    print(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"vocab {model.config.vocab_size}; torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"rows: {len(rows)} = {args.instructions} instructions x {args.texts} texts, {args.demos} demos each; "
          f"prompt tokens {min(prompt)}-{max(prompt)} (mean {sum(prompt) / len(prompt):.0f}), "
          f"response tokens {min(response)}-{max(response)} (mean {sum(response) / len(response):.1f})")

    # warm-up: first calls pay one-off costs (allocator, kernels, the lm_head check)
    score_reference(model, tokenizer, rows[:1], top_p=args.top_p)
    score_batch(model, tokenizer, rows[:2], top_p=args.top_p, batch_size=args.batch_size)

    modes = [
        ("(1) reference, one row at a time", None),
        ("(2) batched, full-vocab logits", dict(response_only_projection=False, prefix_reuse=False)),
        ("(3) + response-only projection", dict(response_only_projection=True, prefix_reuse=False)),
        ("(4) + shared-prefix KV reuse", dict(response_only_projection=True, prefix_reuse=True)),
    ]
    results, times, all_stats = {}, {}, {}
    for name, opts in modes:
        stats: dict = {}
        start = time.perf_counter()
        if opts is None:
            results[name] = score_reference(model, tokenizer, rows, top_p=args.top_p)
        else:
            results[name] = score_batch(model, tokenizer, rows, top_p=args.top_p, batch_size=args.batch_size,
                                        stats=stats, **opts)
        times[name] = time.perf_counter() - start
        all_stats[name] = stats
        print(f"  done {name}: {times[name]:.1f} s", flush=True)

    ref_name = modes[0][0]
    ref = results[ref_name]
    print()
    print(f"{'mode':<36} {'time s':>8} {'rows/s':>8} {'x ref':>7}  max |diff| vs (1): "
          + ", ".join(METRIC_COLUMNS[:5]) + " (ppl relative)")
    for name, _ in modes:
        diffs = []
        for key in METRIC_COLUMNS[:5]:
            if key == "ppl":
                diffs.append(max(abs(g[key] - r[key]) / r[key] for g, r in zip(results[name], ref)))
            else:
                diffs.append(max(abs(g[key] - r[key]) for g, r in zip(results[name], ref)))
        counts_ok = all(g["n_response_tokens"] == r["n_response_tokens"] for g, r in zip(results[name], ref))
        print(f"{name:<36} {times[name]:>8.1f} {len(rows) / times[name]:>8.2f} {times[ref_name] / times[name]:>7.2f}  "
              + "  ".join(f"{d:.1e}" for d in diffs) + ("" if counts_ok else "  TOKEN COUNTS DIFFER"))
    for name, _ in modes[1:]:
        s = all_stats[name]
        print(f"  {name}: {s.get('forwards', 0)} forwards, {s.get('padded_tokens', 0)} pad tokens, "
              f"{s.get('projected_positions', 0)} positions through lm_head, "
              f"{s.get('prefix_groups', 0)} cached prefixes ({s.get('prefix_tokens_computed', 0)} tokens run, "
              f"{s.get('prefix_tokens_reused', 0)} reused)")


if __name__ == "__main__":
    main()
