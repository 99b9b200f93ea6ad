"""Difficulty-stage scoring throughput: response tokens/s against the paper's way, and the share
of the machine's fp32 matmul peak that the model forwards reach.

    python benchmarks/scoring_throughput.py
    python benchmarks/scoring_throughput.py --instructions 8 --demos 32 --texts 32 --baseline-rows 16 --repeats 2
    python benchmarks/scoring_throughput.py --ladder   # + score_reference and each speed-up on its own

Rows in the paper's shape, built as the tasks, pairing and responses stages build them: each of
--instructions task instructions carries --demos demonstrations (a corpus text and its short
answer, joined by ``prompts.instruction_with_demonstrations``; the paper used 32), and is paired
with --texts user texts, each with a short response (a label, a score and a reason, a phrase
list or one sentence: 1 to ~20 tokens). Texts come from the bundled corpus
(compeffdist_ray/data/sample_corpus.jsonl); within one instruction the demonstration texts and
the scored texts never overlap. The answers are rule-made: this measures speed, not quality.

What runs, all in one process on the same model (SmolLM2-135M-Instruct by default, float32,
--threads torch threads) and the same rows:

- peak: the best of --peak-repeats fp32 ``torch.mm`` of two --peak-size square matrices,
  2 n^3 FLOPs each, timed before the scorers and after each round; the best of all is used.
- paper's way (baseline): per row one unbatched forward over the whole sequence with logits at
  every position, then per response token a softmax over the vocabulary (float64) and a full
  descending ``torch.sort``; the score is x / n inside the top-p nucleus (n tokens), else 1.0.
  Only rank scores: no nll, no IFD. It runs on --baseline-rows rows spread evenly over the
  instructions (the paper's way is slow) and is compared per response token, which does not
  depend on how many rows were timed. Its rank scores must match ours to 1e-5 (exit 1 if not).
- ladder (same subset, with --ladder): (1) ``score_reference`` (the module's one-row
  ground truth, IFD's second forward included), then ``score_batch`` with (2) full-vocabulary
  logits, padded batches, (3) lm_head at response positions only, (4) + each instruction's
  shared prefix run once into a KV cache, (5) + packed rows (the defaults).
- ours: ``score_batch`` with its defaults (what the difficulty stage runs) on every row: all
  metrics (rank scores, nll, ppl, IFD with its second pass).

The modes take turns instruction by instruction (each scores that instruction's rows, then the
next mode does), so that load from other jobs on the machine falls on all of them alike rather
than on whichever ran during a burst, and the whole schedule runs --repeats times, each
(mode, instruction) keeping its fastest run; "cpu/wall" shows how much of the cores a mode got.

Model FLOPs: 2 x decoder matmul parameters (the embedding lookup is no matmul) x tokens
forwarded, plus 2 x lm_head parameters x positions projected. For the paper's way every
position is projected, so this is exactly 2 x parameters x tokens; for ours it credits only the
lm_head work really done (the summary also prints the plain 2 x all parameters x tokens).
Tokens forwarded are real tokens run through the model: each shared prefix once, the suffixes,
IFD's ``[start] + response`` rows; padding is counted apart and not credited. Attention's own
FLOPs (which grow with the context: every suffix token attends to its ~1,100-token prefix) are
not counted either, as in the usual 2N rule; the table shows them as a share ("attn %").
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORPUS = ROOT / "compeffdist_ray" / "data" / "sample_corpus.jsonl"

_POSITIVE = ("love", "great", "impressed", "gorgeous", "perfect", "excellent", "amazing", "lovely",
             "friendly", "best", "fantastic", "happy", "recommend", "wonderful", "delicious", "fast")
_NEGATIVE = ("late", "broken", "crushed", "awful", "terrible", "worst", "rude", "cold", "hate", "disappoint",
             "refund", "slow", "never", "dirty", "waste", "bad", "poor", "angry", "barely", "delay", "useless")


def _polarity(text: str) -> tuple[str, int]:
    low = text.lower()
    score = sum(w in low for w in _POSITIVE) - sum(w in low for w in _NEGATIVE)
    label = "positive" if score > 0 else "negative" if score < 0 else "neutral"
    return label, max(1, min(5, 3 + score))


def _phrases(text: str) -> list[str]:
    words = [w.strip('".,!?#') for w in text.split()]
    hits = [w for w in words if any(k in w.lower() for k in _POSITIVE + _NEGATIVE)]
    return (hits or [" ".join(words[:2])])[:3]


# One task per instruction, cycling: (instruction as the tasks stage writes it, answer maker).
# The four answer styles are prompts.OUTPUT_STYLES: a label, a score with a reason, a phrase list,
# one sentence.
_TASKS = (
    ("Read the text and decide whether the writer's overall opinion is positive, negative or neutral. "
     "Answer with one label: positive, negative or neutral.", lambda t: _polarity(t)[0]),
    ("Rate how strongly the writer feels, from 1 (barely) to 5 (very strongly). Give the score, a dash "
     "and a reason of two or three words.", lambda t: f"{_polarity(t)[1]} - {_polarity(t)[0]} wording overall"),
    ("List the words of the text that carry the writer's opinion, as a JSON list of strings.",
     lambda t: json.dumps(_phrases(t))),
    ("In one short sentence, say how the writer feels about what they describe.",
     lambda t: f'The writer sounds {_polarity(t)[0]} about it, mostly because of "{_phrases(t)[0]}".'),
    ("Decide whether the writer would recommend what they describe to a friend. Answer yes, no or unsure.",
     lambda t: {"positive": "yes", "negative": "no", "neutral": "unsure"}[_polarity(t)[0]]),
    ("Say whether the text is sarcastic. Answer sarcastic or sincere, then one short reason.",
     lambda t: f"{'sarcastic' if '!' in t or 'fantastic' in t.lower() else 'sincere'}: "
               f"{_polarity(t)[0]} words"),
    ("Name the emotion the writer expresses most: joy, anger, sadness, surprise or none.",
     lambda t: {"positive": "joy", "negative": "anger", "neutral": "none"}[_polarity(t)[0]]),
    ("Give the writer's satisfaction as a number from 1 to 5 and the aspect it is about, in a few words.",
     lambda t: f"{_polarity(t)[1]}, {' '.join(t.split()[:3]).rstrip('.,!?')}"),
)


def build_rows(n_instructions: int, n_demos: int, n_texts: int, seed: int = 0) -> list[dict]:
    """Rows as the responses stage stores them: the full instruction (with its demonstrations)
    repeated on every row of its task, one user text, one short response."""
    from compeffdist_ray.prompts import instruction_with_demonstrations

    texts = [json.loads(line)["text"] for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    if n_demos + n_texts > len(texts):
        sys.exit(f"the corpus has {len(texts)} texts, --demos + --texts = {n_demos + n_texts}: lower them")
    rng = random.Random(seed)
    rows = []
    for k in range(n_instructions):
        task, answer = _TASKS[k % len(_TASKS)]
        picked = rng.sample(texts, n_demos + n_texts)  # spans the corpus's domains
        demos = [{"text": t, "output": answer(t)} for t in picked[:n_demos]]
        instruction = instruction_with_demonstrations(task, demos)
        rows.extend({"instruction": instruction, "text": t, "response": answer(t), "group": k}
                    for t in picked[n_demos:])
    return rows


# --------------------------------------------------------------------------------------------
# the paper's way, written plainly
# --------------------------------------------------------------------------------------------


def paper_rank_scores(model, tokenizer, rows, *, top_p: float, counts: dict) -> list[dict]:
    """Per row: one unbatched forward, logits at every position; per response token a softmax
    over the vocabulary and a full descending sort; the nucleus size n is where the cumulative
    probability reaches top_p; score x / n if the target's position x is inside it, else 1.
    A row's rank_score averages the scores above 1e-6, rank_score_all all of them."""
    import torch

    from compeffdist_ray.difficulty import encode_row

    out = []
    with torch.inference_mode():
        for row in rows:
            enc = encode_row(tokenizer, row)
            ids = torch.tensor([enc.full_ids])
            logits = model(input_ids=ids, use_cache=False).logits[0]
            counts["tokens"] = counts.get("tokens", 0) + ids.shape[1]
            counts["projected"] = counts.get("projected", 0) + ids.shape[1]
            start = len(enc.prompt_ids) - 1
            scores = []
            for t, target in enumerate(enc.response_ids):
                # float64: a float32 cumulative sum drifts by ~3e-5 over the ~1,000 tokens of a flat
                # nucleus, enough to move n by one when the sum passes top_p that closely
                probs = torch.softmax(logits[start + t].double(), dim=-1)
                sorted_probs, order = torch.sort(probs, descending=True, stable=True)  # ties: lower id first
                cumulative = torch.cumsum(sorted_probs, dim=0)
                n = min(int((cumulative < top_p).sum()) + 1, probs.numel())
                x = int((order == target).nonzero()[0, 0])
                scores.append(x / n if x < n else 1.0)
            hard = [s for s in scores if s > 1e-6]
            out.append({"rank_score": sum(hard) / len(hard) if hard else 0.0,
                        "rank_score_all": sum(scores) / len(scores), "n_response_tokens": len(scores)})
    return out


# --------------------------------------------------------------------------------------------
# measuring
# --------------------------------------------------------------------------------------------


@dataclass
class Line:
    """One timed mode: what it ran and what it returned."""

    name: str
    rows: list[dict]
    seconds: float
    cpu_seconds: float
    tokens: int  # real tokens run through the decoder
    projected: int  # positions run through lm_head
    pads: int
    attention_pairs: int  # (query, key) pairs attended, summed over rows
    result: list[dict]

    @property
    def response_tokens(self) -> int:
        return sum(r["n_response_tokens"] for r in self.result)


@dataclass
class Mode:
    """A scorer timed chunk by chunk: ``run(rows, stats)`` returns one result per row.

    A chunk run more than once keeps its fastest time (and that run's CPU time); results and
    stats come from the first run (the scorers are deterministic).
    """

    name: str
    on_subset: bool  # the --baseline-rows subset, or every row
    run: Callable
    stats: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)
    best: dict = field(default_factory=dict)  # chunk -> (seconds, cpu seconds)

    def run_on(self, chunk, idxs: list[int], rows: list[dict]) -> None:
        first = chunk not in self.best
        start, cpu = time.perf_counter(), time.process_time()
        got = self.run([rows[i] for i in idxs], self.stats if first else {})
        took = (time.perf_counter() - start, time.process_time() - cpu)
        if first:
            self.results.update(zip(idxs, got))
        self.best[chunk] = min(self.best.get(chunk, took), took)

    @property
    def seconds(self) -> float:
        return sum(t for t, _ in self.best.values())

    @property
    def cpu_seconds(self) -> float:
        return sum(c for _, c in self.best.values())


def matmul_peak(size: int, repeats: int) -> tuple[float, float]:
    """(best, median) GFLOP/s of an fp32 ``torch.mm`` of two size x size matrices."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    torch.mm(a, b)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * size ** 3 / (time.perf_counter() - start) / 1e9)
    return max(rates), statistics.median(rates)


def cpu_pressure() -> str:
    """Linux PSI: the share of the last 60 s in which some runnable task waited for a CPU."""
    try:
        first = pathlib.Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return "n/a"
    fields = dict(f.split("=") for f in first.split()[1:])
    return f"{float(fields.get('avg60', 'nan')):.0f}%"


def shared_prefixes(encoded, rows, *, min_prefix_tokens: int = 16) -> list[int]:
    """Per row the prefix length score_batch's prefix reuse caches (its documented rule:
    per group, the common prefix of the prompt ids, one short of the shortest prompt)."""
    groups: dict = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.get("group", row["instruction"]), []).append(i)
    out = [0] * len(rows)
    for idxs in groups.values():
        prompts = [encoded[i].prompt_ids for i in idxs]
        shared = 0
        while all(len(p) > shared + 1 and p[shared] == prompts[0][shared] for p in prompts):
            shared += 1
        if len(idxs) >= 2 and shared >= min_prefix_tokens:
            for i in idxs:
                out[i] = shared
    return out


def attention_pairs(encoded, prefix: list[int] | None, *, ifd: bool) -> int:
    """(query, key) pairs attended: causal over each full sequence, or, with cached prefixes,
    each prefix once (causally) and every suffix token over the prefix plus its own row."""
    def causal(n: int) -> int:
        return n * (n + 1) // 2

    total, seen = 0, set()
    for i, e in enumerate(encoded):
        n = len(e.full_ids)
        p = prefix[i] if prefix else 0
        if p and (p, e.prompt_ids[:p]) not in seen:
            seen.add((p, e.prompt_ids[:p]))
            total += causal(p)
        total += causal(n) - causal(p)
        if ifd:
            total += causal(len(e.response_ids) + 1)
    return total


def max_diffs(got: list[dict], want: list[dict], keys: tuple[str, ...]) -> dict:
    return {k: max(abs(g[k] - w[k]) for g, w in zip(got, want)) for k in keys}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, local dir or HF id")
    parser.add_argument("--instructions", type=int, default=8, help="task instructions (prompt groups)")
    parser.add_argument("--demos", type=int, default=32, help="demonstrations in each instruction (paper: 32)")
    parser.add_argument("--texts", type=int, default=32, help="texts paired with each instruction")
    parser.add_argument("--baseline-rows", type=int, default=16,
                        help="rows the paper's way (and the ladder) is timed on, spread over the instructions")
    parser.add_argument("--ladder", action="store_true",
                        help="also time score_reference and the score_batch ladder on the subset (about 3x longer)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds over all modes; each (mode, instruction) keeps its fastest round")
    parser.add_argument("--batch-size", type=int, default=None, help="score_batch batch_size (default: its own)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--peak-size", type=int, default=2048, help="side of the square matrices timed for the peak")
    parser.add_argument("--peak-repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.instructions, args.demos, args.texts, args.baseline_rows, args.threads, args.repeats) < 1:
        sys.exit("--instructions, --demos, --texts, --baseline-rows, --threads and --repeats must be >= 1")

    import torch

    from compeffdist_ray.difficulty import encode_row, score_batch, score_reference
    from compeffdist_ray.models import resolve_model
    from compeffdist_ray.teacher.transformers_backend import load_causal_lm

    tokenizer, model = load_causal_lm(resolve_model(args.model), dtype="float32", device="cpu",
                                      threads=args.threads)
    rows = build_rows(args.instructions, args.demos, args.texts, args.seed)
    step = max(1, len(rows) // args.baseline_rows)
    where = list(range(0, len(rows), step))[:args.baseline_rows]
    subset = [rows[i] for i in where]
    batch_opts = {} if args.batch_size is None else {"batch_size": args.batch_size}

    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
    decoder = n_params - (0 if tied else head) - embed.numel()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    pair_flop = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim  # QK^T and PV, per (query, key)

    def model_gflop(line: Line) -> float:
        return (2 * decoder * line.tokens + 2 * head * min(line.projected, line.tokens)) / 1e9

    encoded = [encode_row(tokenizer, r) for r in rows]
    enc_subset = [encoded[i] for i in where]
    prompt = [len(e.prompt_ids) for e in encoded]
    response = [len(e.response_ids) for e in encoded]
    print(f"model {args.model}: {n_params / 1e6:.1f}M parameters ({decoder / 1e6:.1f}M in the decoder's matmuls, "
          f"{head / 1e6:.1f}M lm_head{', tied to the embedding' if tied else ''}), vocab {cfg.vocab_size}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs")
    print(f"rows: {len(rows)} = {args.instructions} instructions x {args.texts} texts, {args.demos} demonstrations "
          f"per instruction; prompt tokens {min(prompt)}-{max(prompt)} (mean {statistics.mean(prompt):.0f}), "
          f"response tokens incl. EOS {min(response)}-{max(response)} (mean {statistics.mean(response):.1f}, "
          f"{sum(response)} in all)")
    print(f"the paper's way and the ladder run on {len(subset)} of these rows (every {step}th, "
          f"{sum(len(e.response_ids) for e in enc_subset)} response tokens): compared per response token")
    print(f"CPU pressure at start (share of the last 60 s some task waited for a CPU): {cpu_pressure()}")

    peaks = [matmul_peak(args.peak_size, args.peak_repeats)]
    print(f"fp32 matmul peak ({args.peak_size} x {args.peak_size} torch.mm, best of {args.peak_repeats}): "
          f"{peaks[0][0]:.1f} GFLOP/s (median {peaks[0][1]:.1f})", flush=True)

    # warm-up: first calls pay one-off costs (allocator, kernels, score_batch's once-per-model checks)
    paper_rank_scores(model, tokenizer, rows[:1], top_p=args.top_p, counts={})
    score_batch(model, tokenizer, rows[:3], top_p=args.top_p, **batch_opts)
    score_batch(model, tokenizer, rows[:3], top_p=args.top_p, packing=False, **batch_opts)

    # Every mode runs instruction by instruction, the modes taking turns, so that load from other
    # jobs on the machine falls on all of them alike rather than on whichever ran during a burst;
    # with --repeats, each (mode, instruction) keeps its fastest run.
    modes = [Mode("paper's way (baseline)", True, lambda rs, st: paper_rank_scores(
        model, tokenizer, rs, top_p=args.top_p, counts=st))]
    if args.ladder:
        modes.append(Mode("(1) score_reference, row by row", True,
                          lambda rs, st: score_reference(model, tokenizer, rs, top_p=args.top_p)))
        for name, opts in [
                ("(2) score_batch, full-vocab logits", dict(response_only_projection=False, prefix_reuse=False)),
                ("(3) + response-only projection", dict(prefix_reuse=False)),
                ("(4) + shared-prefix reuse", dict()),
                ("(5) + packing (the defaults)", dict(packing=True))]:
            opts = {"packing": False, **opts}
            modes.append(Mode(name, True, lambda rs, st, opts=opts: score_batch(
                model, tokenizer, rs, top_p=args.top_p, stats=st, **batch_opts, **opts)))
    modes.append(Mode(f"ours: score_batch, all {len(rows)} rows", False, lambda rs, st: score_batch(
        model, tokenizer, rs, top_p=args.top_p, stats=st, **batch_opts)))
    in_subset = set(where)
    groups: dict = {}
    for i, row in enumerate(rows):
        groups.setdefault(row["group"], []).append(i)
    for rep in range(args.repeats):
        for g, idxs in enumerate(groups.values()):
            for mode in modes:
                mine = [i for i in idxs if i in in_subset] if mode.on_subset else idxs
                if mine:
                    mode.run_on(g, mine, rows)
            print(f"  round {rep + 1}/{args.repeats}, instruction {g + 1}/{len(groups)} done; best seconds so far: "
                  + ", ".join(f"{m.name.split()[0].rstrip(':')} {m.seconds:.0f}" for m in modes), flush=True)
        peaks.append(matmul_peak(args.peak_size, args.peak_repeats))
        print(f"  fp32 matmul peak after round {rep + 1}: {peaks[-1][0]:.1f} GFLOP/s (median {peaks[-1][1]:.1f})")

    lines: list[Line] = []
    paper = [modes[0].results[i] for i in where]
    counts = modes[0].stats
    lines.append(Line(modes[0].name, subset, modes[0].seconds, modes[0].cpu_seconds, counts["tokens"],
                      counts["projected"], 0, attention_pairs(enc_subset, None, ifd=False), paper))
    reference = None
    if args.ladder:
        reference = [modes[1].results[i] for i in where]
        tokens = sum(len(e.full_ids) + len(e.response_ids) + 1 for e in enc_subset)
        lines.append(Line(modes[1].name, subset, modes[1].seconds, modes[1].cpu_seconds, tokens, tokens, 0,
                          attention_pairs(enc_subset, None, ifd=True), reference))
        prefix_subset = shared_prefixes(enc_subset, subset)
        for k, mode in enumerate(modes[2:-1]):
            st = mode.stats
            lines.append(Line(mode.name, subset, mode.seconds, mode.cpu_seconds, st["tokens_forwarded"],
                              st["projected_positions"], st["padded_tokens"],
                              attention_pairs(enc_subset, prefix_subset if k >= 2 else None, ifd=True),
                              [mode.results[i] for i in where]))
    last = modes[-1]
    stats = last.stats
    ours = [last.results[i] for i in range(len(rows))]
    lines.append(Line(last.name, rows, last.seconds, last.cpu_seconds, stats["tokens_forwarded"],
                      stats["projected_positions"], stats["padded_tokens"],
                      attention_pairs(encoded, shared_prefixes(encoded, rows), ifd=True), ours))

    peak = max(p[0] for p in peaks)
    print(f"peak used below: the best of all {len(peaks)} measurements, {peak:.1f} GFLOP/s")
    print(f"CPU pressure at the end: {cpu_pressure()}")

    # agreement: rank scores against the paper's way on the subset rows
    ours_subset = [ours[i] for i in where]
    base = lines[0]
    base_rate = base.response_tokens / base.seconds
    print()
    print("model GFLOP/s = (2 x decoder matmul parameters x tokens forwarded + 2 x lm_head parameters x positions "
          "projected) / s; cpu/wall: CPU seconds the process got per second (2.0 = both cores)")
    print(f"{'mode':<34} {'rows':>4} {'time s':>7} {'cpu/wall':>8} {'resp tok':>8} {'resp tok/s':>10} "
          f"{'x paper':>7} {'tok fwd':>7} {'pad':>5} {'GFLOP/s':>7} {'% peak':>6} {'attn %':>6}  "
          f"max |diff| vs paper: rank_score, rank_score_all")
    for line in lines:
        got = ours_subset if line.rows is rows else line.result
        diffs = max_diffs(got, paper, ("rank_score", "rank_score_all"))
        rate = model_gflop(line) / line.seconds
        attn = 100 * pair_flop * line.attention_pairs / 1e9 / model_gflop(line)
        print(f"{line.name:<34} {len(line.rows):>4} {line.seconds:>7.1f} {line.cpu_seconds / line.seconds:>8.2f} "
              f"{line.response_tokens:>8} {line.response_tokens / line.seconds:>10.2f} "
              f"{line.response_tokens / line.seconds / base_rate:>7.2f} {line.tokens:>7} {line.pads:>5} "
              f"{rate:>7.1f} {100 * rate / peak:>5.1f}% {attn:>5.0f}%  "
              f"{diffs['rank_score']:.1e}, {diffs['rank_score_all']:.1e}")
    print("attn %: attention's own FLOPs (QK^T and PV, 4 x layers x heads x head_dim per query-key pair), not "
          "counted in GFLOP/s, as a share of the counted FLOPs")
    if reference is not None:
        keys = ("rank_score", "rank_score_all", "nll", "ifd")
        d = max_diffs(ours_subset, reference, keys)
        ppl = max(abs(g["ppl"] - r["ppl"]) / r["ppl"] for g, r in zip(ours_subset, reference))
        print(f"ours vs score_reference on the {len(subset)} subset rows: "
              + ", ".join(f"{k} {v:.1e}" for k, v in d.items()) + f", ppl relative {ppl:.1e}")
    print(f"ours: {stats['forwards']} forwards ({stats.get('packed_forwards', 0)} packed), "
          f"{stats.get('prefix_groups', 0)} shared prefixes ({stats.get('prefix_tokens_computed', 0)} tokens run once, "
          f"{stats.get('prefix_tokens_reused', 0)} not rerun), {stats['tokens_forwarded']} tokens forwarded, "
          f"{stats['padded_tokens']} pad tokens, {stats['projected_positions']} positions through lm_head")
    last = lines[-1]
    ours_rate = last.response_tokens / last.seconds
    gflops = model_gflop(last) / last.seconds
    plain = 2 * n_params * last.tokens / 1e9 / last.seconds
    print(f"SUMMARY: ours {ours_rate:.1f} response tokens/s vs the paper's way {base_rate:.2f}: "
          f"{ours_rate / base_rate:.1f}x (target 10x); model {gflops:.1f} GFLOP/s = {100 * gflops / peak:.0f}% of "
          f"the {peak:.1f} GFLOP/s fp32 matmul peak (target 50%); counting 2 x all {n_params / 1e6:.1f}M "
          f"parameters x tokens instead: {plain:.1f} GFLOP/s = {100 * plain / peak:.0f}%")
    bad = [k for k, v in max_diffs(ours_subset, paper, ("rank_score", "rank_score_all")).items() if v > 1e-5]
    if bad:
        print(f"WARNING: ours and the paper's way differ by more than 1e-5 on {bad}")
        sys.exit(1)


if __name__ == "__main__":
    main()
