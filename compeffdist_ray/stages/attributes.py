"""Stage 1, attributes: the teacher names the sentiment-related attributes of each user text.

Reads: the corpus (`input.*`). Writes `attributes/`:
- `attributes.parquet`: one row per (text_id, attribute), with the raw name the teacher used;
- `attribute_counts.parquet`: attribute, count (texts naming it), variants (raw names);
- `generations.parquet`: every teacher answer, parsed or not, with attempts and tokens.
Needs: the teacher (CPU with transformers, GPUs with vLLM, or an HTTP endpoint).

    compeffdist stage attributes --config configs/local-demo.yaml
"""

from __future__ import annotations

import functools
import json
import re

from compeffdist_ray.parsing import parse_string_list
from compeffdist_ray.prompts import attributes_messages
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

_PAREN = re.compile(r"\s*[\(\[].*?[\)\]]\s*")
_NON_WORD_EDGE = re.compile(r"^[^\w]+|[^\w]+$")
_SPACES = re.compile(r"\s+")
_INVARIANT = {"news", "series", "species", "analysis", "emphasis", "bias", "status", "process", "focus",
              "sarcasm", "irony", "politics", "economics", "ethics", "dynamics", "aesthetics", "logistics",
              "lyrics", "graphics", "physics", "mathematics", "statistics", "always", "various",
              "previous", "serious", "nervous", "anxious", "famous", "delicious", "obvious", "this", "plus",
              "business", "gas", "crisis", "basis", "thesis", "less", "loss", "access", "success"}

_IE_PLURALS = {"movies", "cookies", "calories", "zombies", "rookies", "selfies", "smoothies", "brownies", "goodies",
               "freebies", "hoodies", "lies", "pies", "ties"}


def singular(word: str) -> str:
    """A light English singulariser for attribute names (last word only)."""
    w = word
    if len(w) <= 3 or w in _INVARIANT or w.endswith(("ss", "us", "is", "ous")):
        return w
    if w in _IE_PLURALS:
        return w[:-1]
    if w.endswith("es") and w[:-2] in _INVARIANT:
        return w[:-2]
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith(("sses", "shes", "ches", "xes", "zzes")):
        return w[:-2]
    if w.endswith("s") and not w.endswith("'s"):
        return w[:-1]
    return w


def normalize_attribute(raw: str) -> str:
    """Case, whitespace, punctuation, value suffix ('tone: angry' -> 'tone') and plural folded."""
    s = raw.strip().lower().replace("_", " ")
    s = _PAREN.sub(" ", s)
    s = re.split(r"\s*[:=]\s*|\s+-\s+|\s+—\s+", s, maxsplit=1)[0]
    s = _SPACES.sub(" ", s).strip()
    s = _NON_WORD_EDGE.sub("", s)
    if not s:
        return ""
    words = s.split(" ")
    words[-1] = singular(words[-1])
    return " ".join(words)


def parse_attributes(text: str, *, max_words: int = 6, max_per_text: int = 12) -> list[str] | None:
    """Valid, distinct raw attribute names from one answer, or None when there are none."""
    items = parse_string_list(text, keys=("attributes", "attribute", "name"))
    if not items:
        return None
    out, seen = [], set()
    for item in items:
        item = item.strip()
        norm = normalize_attribute(item)
        if not norm or len(norm) > 60 or len(norm.split()) > max_words or not re.search(r"[a-z]", norm):
            continue
        if norm in {"text", "answer", "example answer", "example text", "attribute", "none", "n/a"}:
            continue
        if norm not in seen:
            seen.add(norm)
            out.append(item)
        if len(out) >= max_per_text:
            break
    return out or None


def explode(generations) -> tuple[list[dict], list[dict]]:
    """(rows, counts): one row per (text_id, attribute), and per-attribute counts with variants."""
    rows = []
    for key, ok, parsed in zip(generations["key"], generations["ok"], generations["parsed"]):
        if not ok:
            continue
        seen = set()
        for raw in json.loads(parsed):
            norm = normalize_attribute(raw)
            if norm and norm not in seen:
                seen.add(norm)
                rows.append({"text_id": key, "attribute": norm, "raw": raw.strip()})
    counts: dict[str, dict] = {}
    for row in rows:
        entry = counts.setdefault(row["attribute"], {"attribute": row["attribute"], "count": 0, "variants": []})
        entry["count"] += 1
        if row["raw"] not in entry["variants"]:
            entry["variants"].append(row["raw"])
    ordered = sorted(counts.values(), key=lambda e: (-e["count"], e["attribute"]))
    return rows, ordered


def inputs(cfg) -> tuple[str, ...]:
    return ()


def config_view(cfg) -> dict:
    from dataclasses import asdict

    return {"seed": cfg.seed, "input": asdict(cfg.input), "teacher": teacher_view(cfg.teacher),
            "attributes": asdict(cfg.attributes)}


def sample_texts(corpus_df, n: int, seed: int):
    """n texts drawn without replacement (all of them when the corpus is smaller)."""
    if n >= len(corpus_df):
        return corpus_df.copy()
    return corpus_df.sample(n=n, random_state=seed).reset_index(drop=True)


def run(ctx: StageContext) -> StageOutput:
    import pandas as pd

    from compeffdist_ray.inputs import read_corpus
    from compeffdist_ray.teacher import run_generation

    cfg = ctx.cfg
    corpus = read_corpus(cfg.input)
    texts = sample_texts(corpus.df, cfg.attributes.num_texts, cfg.seed)
    prompts = pd.DataFrame({
        "key": texts["text_id"],
        "messages": [json.dumps(attributes_messages(t), ensure_ascii=False) for t in texts["text"]],
    })
    parser = functools.partial(parse_attributes, max_words=cfg.attributes.max_words,
                               max_per_text=cfg.attributes.max_per_text)
    gens = run_generation(prompts, cfg.teacher, parser, max_new_tokens=cfg.attributes.max_new_tokens, seed=cfg.seed)
    rows, counts = explode(gens)
    drops = merge_counts(corpus.dropped, generation_drops(gens))
    ctx.run.write_table(ctx.stage, "generations", gens)
    if not rows:
        raise StageFailed(
            f"attributes: no attribute came out of {len(gens)} teacher answers (dropped: "
            f"{', '.join(f'{k} {v}' for k, v in drops.items()) or 'none'}); check teacher.model, "
            "or raise teacher.max_attempts / attributes.max_new_tokens"
        )
    ctx.run.write_table(ctx.stage, "attributes", pd.DataFrame(rows))
    ctx.run.write_table(ctx.stage, "attribute_counts", pd.DataFrame(counts))
    return StageOutput(
        rows=len(rows),
        dropped=drops,
        tokens=generation_tokens(gens),
        stats={
            "corpus_rows": corpus.read_rows,
            "texts": len(texts),
            "texts_with_attributes": int(gens["ok"].sum()),
            "distinct_attributes": len(counts),
            "top_attributes": [[c["attribute"], c["count"]] for c in counts[:15]],
            "mean_attempts": round(float(gens["attempts"].mean()), 3),
            "truncated_answers": int((gens["finish_reason"] == "length").sum()),
        },
    )
