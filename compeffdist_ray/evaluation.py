"""SentiBench evaluation, the pure core: datasets, prompts, label tokens, answer parsing, metrics, tables.

Reads: a SentiBench-style data directory, ``<category>/<dataset>/{train,test}.json`` (UTF-8 with
a BOM, each file one JSON array). Writes: nothing; ``compeffdist_ray.eval_runner`` runs the model
on a Ray Data actor pool and writes the result JSON, the CLI (``compeffdist eval``) prints the
tables built here. Needs: no torch, transformers or Ray, so every function is unit-tested as is.

Protocol (shared/sentibench/README.md), as implemented here:

* classification (sc/*, multifaced/*): a plain completion prompt (never the chat template, so a
  base model, an instruct model and a distilled student all see the same text): one instruction
  line naming the label set (the sorted labels of the train split), a blank line, k
  demonstrations ``Sentence: ...`` / ``Label: ...`` drawn from the train split with the seed,
  then the test sentence and ``Label:``. The prediction is the label whose first token (after
  a space) gets the highest next-token logit among the labels' first tokens;
* ABSA (atsa, acsa, asqp): the same layout with ``Answer:`` and a one-line JSON list of objects
  whose format the instruction states and the demonstrations use; the model's greedy answer
  is cut at its first newline and parsed tolerantly; micro precision / recall / F1 over
  exact-match (example, tuple) pairs, after lower-casing and collapsing whitespace.

Demonstrations: by default one draw of k per dataset and seed, shared by every test example
and never a sentence of the test split ("shared", as HELM fixes its in-context examples per
trial): every prompt of a dataset then starts with the same long prefix, which a model
computes once (the KV cache here; automatic prefix caching in vLLM), so a full SentiBench run
costs about a tenth of the tokens. "per-example" draws afresh for each test example (never
the test sentence itself), as the SentiBench reference scripts and lm-evaluation-harness do:
one unlucky draw weighs less, but every prompt is computed whole. Seeds matter more with a
shared draw: report the mean over several, as the paper does (3).

Example::

    from compeffdist_ray.evaluation import discover_datasets, load_dataset, build_requests
    found, skipped = discover_datasets("../shared/sentibench")
    ds = load_dataset("../shared/sentibench", "sc/sst2", found["sc/sst2"], limit=5)
    rows = build_requests(ds, k=8, seed=42)
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from compeffdist_ray.errors import UserError, read_json_file
from compeffdist_ray.parsing import extract_json

__all__ = [
    "CLASSIFICATION", "ATSA", "ACSA", "ASQP", "KNOWN_DATASETS",
    "EvalDataset", "read_json_array", "discover_datasets", "select_datasets", "load_dataset",
    "sample_demos", "shared_demos", "DEMO_DRAWS", "classification_prompt", "absa_prompt", "build_requests", "fit_prompt",
    "label_first_tokens", "label_from_logprobs", "label_from_text", "parse_absa_answer", "classification_metrics", "tuple_metrics",
    "score_dataset", "results_table", "compare_table", "compare_names", "headline", "load_result", "run_label",
]

CLASSIFICATION, ATSA, ACSA, ASQP = "classification", "atsa", "acsa", "asqp"

# The datasets this command knows, in the order tables list them.
KNOWN_DATASETS: dict[str, str] = {
    "sc/sst2": CLASSIFICATION,
    "sc/imdb": CLASSIFICATION,
    "sc/yelp2": CLASSIFICATION,
    "sc/twitter": CLASSIFICATION,
    "multifaced/irony18": CLASSIFICATION,
    "multifaced/tweeteval": CLASSIFICATION,
    "absa/atsa_rest16": ATSA,
    "absa/acsa_rest16": ACSA,
    "absa/asqp_rest16": ASQP,
}

# The protocol names sc/* and multifaced/* as k-shot classification datasets with the fields
# `sentence` and `label`: an unknown folder there with exactly those fields is evaluated the
# same way (SentiBench keeps some datasets aside; they must run without a code change). Every
# other unknown folder is skipped and reported.
CLASSIFICATION_CATEGORIES = ("sc", "multifaced")

# What the instruction line calls a dataset's labels.
_LABEL_KIND = {"multifaced/irony18": "irony", "multifaced/tweeteval": "emotion"}

POLARITIES = ("positive", "negative", "neutral", "conflict")  # atsa / acsa, per the protocol
QUAD_SENTIMENTS = ("positive", "negative", "neutral")

# JSON keys of one answer object, per ABSA kind, and the other names accepted when parsing.
ABSA_FIELDS: dict[str, tuple[str, ...]] = {
    ATSA: ("aspect_term", "sentiment"),
    ACSA: ("category", "sentiment"),
    ASQP: ("aspect", "category", "sentiment", "opinion"),
}
_FIELD_ALIASES = {
    "aspect_term": ("aspect_term", "aspect", "term", "target", "aspect term"),
    "aspect": ("aspect", "aspect_term", "term", "target", "aspect term"),
    "category": ("category", "aspect_category", "aspect category"),
    "sentiment": ("sentiment", "polarity", "sentiment_polarity", "label"),
    "opinion": ("opinion", "opinion_term", "opinion term", "opinion_words"),
}

EXAMPLES_KEPT = 5  # example predictions stored per dataset


# --------------------------------------------------------------------------------------------
# datasets
# --------------------------------------------------------------------------------------------


@dataclass
class EvalDataset:
    """One dataset ready to prompt: its test rows (after --limit) and its train split."""

    name: str
    kind: str
    test: list[dict]
    train: list[dict]
    labels: list[str] = field(default_factory=list)  # classification: sorted train labels
    categories: list[str] = field(default_factory=list)  # acsa / asqp: sorted train categories
    n_test_total: int = 0  # before --limit
    test_normed: frozenset = frozenset()  # every test sentence (before --limit), normalised: never a demonstration


def read_json_array(path: str | os.PathLike) -> list:
    """A SentiBench file (UTF-8, BOM allowed) as a list; UserError with the line on bad JSON."""
    value = read_json_file(path, "SentiBench file")
    if not isinstance(value, list):
        raise UserError(f"{path} must hold one JSON array of records, got a JSON {type(value).__name__}")
    return value


def _is_classification_record(rec: Any) -> bool:
    return isinstance(rec, dict) and isinstance(rec.get("sentence"), str) and isinstance(rec.get("label"), str)


def discover_datasets(data_dir: str | os.PathLike) -> tuple[dict[str, str], dict[str, str]]:
    """({name: kind} of the usable datasets in `data_dir`, {name: why skipped}), names in table order.

    A dataset is a folder ``<category>/<dataset>`` holding ``test.json``. Raises UserError when
    the directory is missing or holds no usable dataset (saying what it found and what is known).
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise UserError(f"data directory not found: {data_dir} (expected <category>/<dataset>/test.json inside)")
    found, skipped = {}, {}
    for test in sorted(root.glob("*/*/test.json")):
        name = f"{test.parent.parent.name}/{test.parent.name}"
        kind = KNOWN_DATASETS.get(name)
        if kind is None and test.parent.parent.name in CLASSIFICATION_CATEGORIES:
            records = read_json_array(test)
            if records and all(_is_classification_record(r) for r in records):
                kind = CLASSIFICATION
        if kind is None:
            skipped[name] = f"unknown dataset {name}"
            continue
        if not (test.parent / "train.json").is_file():
            skipped[name] = f"{name} has no train.json (needed for the demonstrations and the label set)"
            continue
        found[name] = kind
    if not found:
        seen = ", ".join(sorted(skipped)) or "no <category>/<dataset>/test.json at all"
        hint = ""
        if list(root.glob("*/test.json")):
            hint = f"; {root} looks like one category folder: give its parent directory"
        raise UserError(f"no known SentiBench dataset in {data_dir}: found {seen}; known: "
                        f"{', '.join(KNOWN_DATASETS)} (and sc/* or multifaced/* folders of sentence/label records){hint}")
    order = {name: i for i, name in enumerate(KNOWN_DATASETS)}
    ordered = sorted(found, key=lambda n: (order.get(n, len(order)), n))
    return {n: found[n] for n in ordered}, skipped


def select_datasets(found: dict[str, str], skipped: dict[str, str], wanted: Sequence[str] | None) -> dict[str, str]:
    """The datasets `wanted` names (full ``sc/sst2`` or bare ``sst2``), in table order; all if None."""
    if not wanted:
        return dict(found)
    chosen, problems = set(), []
    for raw in wanted:
        w = raw.strip().strip("/")
        if not w:
            continue
        matches = [n for n in found if n == w or n.split("/", 1)[1] == w]
        if len(matches) == 1:
            chosen.add(matches[0])
        elif len(matches) > 1:
            problems.append(f"'{w}' is ambiguous ({', '.join(matches)})")
        else:
            why = next((r for n, r in skipped.items() if n == w or n.split("/", 1)[1] == w), None)
            problems.append(f"'{w}' " + (f"was skipped: {why}" if why else "is not in the data directory"))
    if problems:
        raise UserError(f"--datasets: {'; '.join(problems)}; available: {', '.join(found)}")
    return {n: k for n, k in found.items() if n in chosen}


def _check_records(path: Path, records: list, kind: str) -> None:
    need = {CLASSIFICATION: ("sentence", "label"), ATSA: ("sentence", "aspects"), ACSA: ("sentence", "aspects"),
            ASQP: ("sentence", "quards")}[kind]
    for i, rec in enumerate(records):
        missing = [f for f in need if not isinstance(rec, dict) or f not in rec]
        if missing:
            has = ", ".join(rec) if isinstance(rec, dict) else type(rec).__name__
            raise UserError(f"{path}: record {i} has no {', '.join(missing)} (a {kind} dataset needs "
                            f"{', '.join(need)}; the record has: {has})")
        if not isinstance(rec["sentence"], str):
            raise UserError(f"{path}: record {i}: 'sentence' must be a string, got {type(rec['sentence']).__name__}")
        if kind == CLASSIFICATION:
            continue
        items = rec[need[1]]
        item_need = _ITEM_FIELDS[kind]
        if not isinstance(items, list):
            raise UserError(f"{path}: record {i}: '{need[1]}' must be a list, got {type(items).__name__}")
        for j, item in enumerate(items):
            lacking = [f for f in item_need if not isinstance(item, dict) or not isinstance(item.get(f), str)]
            if lacking:
                raise UserError(f"{path}: record {i}, {need[1]}[{j}] has no string {', '.join(lacking)} "
                                f"(a {kind} item needs {', '.join(item_need)})")


_ITEM_FIELDS = {ATSA: ("target", "polarity"), ACSA: ("category", "polarity"),
                ASQP: ("aspect", "category", "sentiment", "opinion")}


def load_dataset(data_dir: str | os.PathLike, name: str, kind: str, *, limit: int | None = None) -> EvalDataset:
    """Read one dataset's train and test splits; `limit` keeps the first N test records.

    SentiBench test files are already shuffled, so the first N rows are a fair, model- and
    seed-independent subset.
    """
    folder = Path(data_dir).expanduser() / name
    test = read_json_array(folder / "test.json")
    train = read_json_array(folder / "train.json")
    _check_records(folder / "test.json", test, kind)
    _check_records(folder / "train.json", train, kind)
    if not train:
        raise UserError(f"{folder / 'train.json'} is empty: the demonstrations and the label set come from it")
    ds = EvalDataset(name=name, kind=kind, test=test[:limit] if limit else test, train=train, n_test_total=len(test),
                     test_normed=frozenset(norm(r["sentence"]) for r in test))
    if kind == CLASSIFICATION:
        ds.labels = sorted({str(r["label"]) for r in train})
    elif kind == ACSA:
        ds.categories = sorted({a["category"] for r in train for a in r["aspects"]})
    elif kind == ASQP:
        ds.categories = sorted({q["category"] for r in train for q in r["quards"]})
    return ds


# --------------------------------------------------------------------------------------------
# gold tuples and normalisation
# --------------------------------------------------------------------------------------------


def norm(text: Any) -> str:
    """Lower case, whitespace collapsed: how answers and gold are compared."""
    return " ".join(str(text).lower().split())


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def gold_objects(record: dict, kind: str) -> list[dict]:
    """The gold answer of an ABSA record as the answer objects (original case, first occurrence order)."""
    if kind == ATSA:  # implicit aspects (target NULL) have no term to extract
        items = [{"aspect_term": a["target"], "sentiment": a["polarity"]} for a in record["aspects"]
                 if a.get("target") not in (None, "", "NULL")]
    elif kind == ACSA:
        items = [{"category": a["category"], "sentiment": a["polarity"]} for a in record["aspects"]]
    elif kind == ASQP:
        items = [{"aspect": q["aspect"], "category": q["category"], "sentiment": q["sentiment"],
                  "opinion": q["opinion"]} for q in record["quards"]]
    else:
        raise ValueError(f"not an ABSA kind: {kind!r}")
    out, seen = [], set()
    for item in items:
        key = tuple(norm(item[f]) for f in ABSA_FIELDS[kind])
        if key not in seen:
            seen.add(key)
            out.append(item)
    return out


def gold_tuples(record: dict, kind: str) -> set[tuple[str, ...]]:
    return {tuple(norm(o[f]) for f in ABSA_FIELDS[kind]) for o in gold_objects(record, kind)}


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------


def sample_demos(train_sentences: Sequence[str], test_sentence: str, k: int, seed: int, key: str) -> list[int]:
    """Indices of k demonstrations for one test example, drawn with `seed` and the example's `key`.

    The draw depends only on (seed, key), not on the order or the batching of the run; train
    rows whose sentence equals the test sentence (after normalisation) are never chosen.
    """
    normed = [norm(s) for s in train_sentences]
    return _draw(normed, Counter(normed), norm(test_sentence), k, seed, key)


def _draw(normed: Sequence[str], counts: Counter, target: str, k: int, seed: int, key: str) -> list[int]:
    if k <= 0:
        return []
    rng = random.Random(f"{seed}|{key}")  # str seeds are hashed with SHA-512: stable across processes
    n = len(normed)
    picks = rng.sample(range(n), min(n, k + counts.get(target, 0)))
    return [i for i in picks if normed[i] != target][:k]


def shared_demos(train_sentences: Sequence[str], excluded: frozenset, k: int, seed: int, key: str) -> list[int]:
    """Indices of the k demonstrations every test example of a dataset shares, drawn with `seed`
    and the dataset's `key`; train rows whose sentence (normalised) is in `excluded` (the test
    split) are never chosen."""
    if k <= 0:
        return []
    pool = [i for i, s in enumerate(train_sentences) if norm(s) not in excluded]
    rng = random.Random(f"{seed}|{key}|shared")
    return rng.sample(pool, min(k, len(pool)))


def label_list(labels: Sequence[str]) -> str:
    return "[" + ", ".join(f"'{label}'" for label in labels) + "]"


def classification_instruction(name: str, labels: Sequence[str]) -> str:
    what = _LABEL_KIND.get(name, "sentiment polarity" if name.startswith("sc/") else "")
    article = "an" if what[:1] in ("a", "e", "i", "o", "u") else "a"
    return f"Given a sentence, assign {article} {what + ' ' if what else ''}label from {label_list(labels)}."


def classification_prompt(instruction: str, demos: Sequence[tuple[str, str]], sentence: str) -> str:
    """The k-shot completion prompt; its last line is ``Label:`` (the label follows after a space)."""
    blocks = [f"Sentence: {_one_line(s)}\nLabel: {label}" for s, label in demos]
    blocks.append(f"Sentence: {_one_line(sentence)}\nLabel:")
    return instruction + "\n\n" + "\n\n".join(blocks)


def absa_instruction(kind: str, categories: Sequence[str] = ()) -> str:
    if kind == ATSA:
        return ('Extract every aspect term of the sentence with its sentiment polarity (positive, negative, neutral '
                'or conflict); answer with a JSON list of {"aspect_term": ..., "sentiment": ...} objects on one line, '
                'or [] if there is none.')
    if kind == ACSA:
        return (f"Find the aspect categories the sentence talks about, from {label_list(categories)}, with their "
                'sentiment polarity (positive, negative, neutral or conflict); answer with a JSON list of '
                '{"category": ..., "sentiment": ...} objects on one line, or [] if there is none.')
    if kind == ASQP:
        return ("Extract the sentiment quads of the sentence: the aspect term (NULL if it is implicit), its category "
                f"from {label_list(categories)}, the sentiment (positive, negative or neutral) and the opinion "
                'words; answer with a JSON list of {"aspect": ..., "category": ..., "sentiment": ..., "opinion": ...} '
                "objects on one line, or [] if there is none.")
    raise ValueError(f"not an ABSA kind: {kind!r}")


def render_answer(objects: Sequence[dict]) -> str:
    return json.dumps(list(objects), ensure_ascii=False)


def absa_prompt(instruction: str, demos: Sequence[tuple[str, Sequence[dict]]], sentence: str) -> str:
    """The k-shot completion prompt for ABSA; its last line is ``Answer:``."""
    blocks = [f"Sentence: {_one_line(s)}\nAnswer: {render_answer(objs)}" for s, objs in demos]
    blocks.append(f"Sentence: {_one_line(sentence)}\nAnswer:")
    return instruction + "\n\n" + "\n\n".join(blocks)


def fit_prompt(build: Callable[[int, str], str], n_demos: int, sentence: str,
               count_tokens: Callable[[str], int] | None, max_tokens: int | None) -> tuple[str, int, bool]:
    """(prompt, demos kept, sentence cut) within `max_tokens`.

    Drops demonstrations from the end first; if even no demonstration fits, cuts the test
    sentence's tail. `build(n, sentence)` renders the prompt with the first n demonstrations.
    """
    prompt = build(n_demos, sentence)
    if count_tokens is None or not max_tokens or count_tokens(prompt) <= max_tokens:
        return prompt, n_demos, False
    lo, hi = 0, n_demos - 1  # largest n with a prompt that fits (prompt length grows with n)
    best = None
    while lo <= hi:
        mid = (lo + hi) // 2
        if count_tokens(build(mid, sentence)) <= max_tokens:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if best is not None:
        return build(best, sentence), best, False
    words = sentence.split()
    while words:
        words = words[: max(0, min(len(words) - 1, int(len(words) * 0.8)))]
        prompt = build(0, " ".join(words))
        if count_tokens(prompt) <= max_tokens:
            return prompt, 0, True
    return build(0, ""), 0, True


DEMO_DRAWS = ("shared", "per-example")


def build_requests(ds: EvalDataset, *, k: int, seed: int, count_tokens: Callable[[str], int] | None = None,
                   max_prompt_tokens: int | None = None, demos: str = "shared") -> list[dict]:
    """One request row per test example: key, dataset, index, mode ('score' or 'generate'),
    prompt, demos (kept), sentence_cut.

    `demos`: "shared", one draw of k demonstrations per dataset and seed, the same for every
    test example (so a model computes the long common prefix once); "per-example", a fresh
    draw for each test example (the SentiBench reference scripts' way). Either way the draw
    depends only on the seed and the dataset (and the example's index), never on --limit.
    """
    if demos not in DEMO_DRAWS:
        raise UserError(f"demonstration draw must be one of {', '.join(DEMO_DRAWS)}, got {demos!r}")
    normed = [norm(r["sentence"]) for r in ds.train]
    counts = Counter(normed)
    test_normed = ds.test_normed or frozenset(norm(r["sentence"]) for r in ds.test)
    common = shared_demos([r["sentence"] for r in ds.train], test_normed, k, seed, ds.name) \
        if demos == "shared" else None
    if ds.kind == CLASSIFICATION:
        instruction = classification_instruction(ds.name, ds.labels)
    else:
        instruction = absa_instruction(ds.kind, ds.categories)
    rows = []
    for i, rec in enumerate(ds.test):
        picks = common if common is not None else _draw(normed, counts, norm(rec["sentence"]), k, seed,
                                                        f"{ds.name}|{i}")
        if ds.kind == CLASSIFICATION:
            demos = [(ds.train[j]["sentence"], str(ds.train[j]["label"])) for j in picks]

            def build(n, sentence, demos=demos):
                return classification_prompt(instruction, demos[:n], sentence)
        else:
            demos = [(ds.train[j]["sentence"], gold_objects(ds.train[j], ds.kind)) for j in picks]

            def build(n, sentence, demos=demos):
                return absa_prompt(instruction, demos[:n], sentence)
        prompt, kept, cut = fit_prompt(build, len(demos), rec["sentence"], count_tokens, max_prompt_tokens)
        rows.append(dict(key=f"{ds.name}|{i}", dataset=ds.name, index=i,
                         mode="score" if ds.kind == CLASSIFICATION else "generate",
                         prompt=prompt, demos=kept, sentence_cut=cut))
    return rows


# --------------------------------------------------------------------------------------------
# label tokens
# --------------------------------------------------------------------------------------------


def label_first_tokens(encode: Callable[[str], list[int]], labels: Sequence[str], *, anchor: str = "Label:",
                       decode: Callable[[list[int]], str] | None = None, model: str = "the model") -> list[int]:
    """The id of each label's first token as it follows ``anchor`` after a space, in `labels` order.

    The label is tokenized in context (``"Label: positive"`` minus ``"Label:"``), so tokenizers
    that mark word starts (SentencePiece ``▁``, byte-level ``Ġ``) give the token the model
    really predicts. Raises UserError when two labels share their first token: the protocol
    could not tell them apart.
    """
    base = list(encode(anchor))
    ids = []
    for label in labels:
        full = list(encode(f"{anchor} {label}"))
        if full[: len(base)] == base and len(full) > len(base):
            ids.append(full[len(base)])
        else:  # the label merged with the anchor: fall back to the label alone
            alone = list(encode(f" {label}"))
            if not alone:
                raise UserError(f"label {label!r} tokenizes to nothing with the tokenizer of {model}")
            ids.append(alone[0])
    by_id: dict[int, list[str]] = {}
    for label, tid in zip(labels, ids):
        by_id.setdefault(tid, []).append(label)
    clashes = [(tid, group) for tid, group in by_id.items() if len(group) > 1]
    if clashes:
        parts = []
        for tid, group in clashes:
            shown = f"{decode([tid])!r} (id {tid})" if decode else f"id {tid}"
            parts.append(f"{' and '.join(repr(g) for g in group)} share their first token {shown}")
        raise UserError(f"label first tokens collide for {model}: {'; '.join(parts)}; the next-token protocol "
                        f"cannot tell these labels apart (rename the labels in the data, or use another model)")
    return ids


def label_from_logprobs(alternatives: dict[str, float] | None, labels: Sequence[str]) -> int | None:
    """The label an endpoint's first answer token points to, from that token's top logprobs.

    A chat model answers the label without a leading space and may split it (``"pos"`` +
    ``"itive"``), so a candidate token counts for every label it begins (case and surrounding
    space ignored); a label scores the best logprob among its tokens. None when no
    alternative begins a label, or when the best score is shared by two labels (a token such
    as ``"ne"`` that begins both ``negative`` and ``neutral`` decides nothing).
    """
    if not alternatives:
        return None
    lowered = [label.lower() for label in labels]
    best: dict[int, float] = {}
    for token, logprob in alternatives.items():
        t = token.strip().lower()
        if not t:
            continue
        for i, label in enumerate(lowered):
            if label.startswith(t) and logprob > best.get(i, float("-inf")):
                best[i] = logprob
    if not best:
        return None
    top = max(best.values())
    winners = [i for i, v in best.items() if v == top]
    return winners[0] if len(winners) == 1 else None


def label_from_text(text: str, labels: Sequence[str]) -> int | None:
    """The label a free-text answer names: the one it starts with, else the only one it mentions.

    Longer labels are tried first, so ``non-irony`` is not read as ``irony``; None when the
    answer names no label or several.
    """
    answer = norm(text).strip(" \"'`*.:")
    order = sorted(range(len(labels)), key=lambda i: -len(labels[i]))
    for i in order:
        label = norm(labels[i])
        if answer == label or (answer.startswith(label) and not answer[len(label):len(label) + 1].isalnum()):
            return i
    spans: list[tuple[int, int, int]] = []
    for i in order:
        for m in re.finditer(rf"(?<![\w-]){re.escape(norm(labels[i]))}(?![\w-])", answer):
            if not any(a <= m.start() < b for a, b, _ in spans):  # inside a longer label already found
                spans.append((m.start(), m.end(), i))
    found = {i for _, _, i in spans}
    return found.pop() if len(found) == 1 else None


# --------------------------------------------------------------------------------------------
# ABSA answers
# --------------------------------------------------------------------------------------------


@dataclass
class ParsedAnswer:
    tuples: list[tuple[str, ...]] | None  # None: nothing parseable in the answer
    invalid_items: int = 0  # objects found but missing a field (e.g. cut off by max_new_tokens)


_EMPTY_LIST = re.compile(r"\[\s*\]")
_LINE_PAIR = re.compile(
    r"""^\s*(?:[-*•>]+|\(?\d{1,3}[.):])?\s*["'`]?(?P<a>[^:=\n]+?)["'`]?\s*(?:[:=]|->|=>|\s-\s|–)\s*["'`]?(?P<b>[A-Za-z]+)["'`]?\s*[.,;]?\s*$"""
)
_PAREN = re.compile(r"\(([^()]*)\)")
_NOT_TERMS = {"", "sentiment", "polarity", "label", "answer", "overall", "overall sentiment", "aspect", "category"}


def _item_tuple(item: Any, kind: str) -> tuple[str, ...] | None:
    fields = ABSA_FIELDS[kind]
    if isinstance(item, dict):
        lowered = {norm(k).replace(" ", "_"): v for k, v in item.items()}
        values = []
        for f in fields:
            value = next((lowered[a.replace(" ", "_")] for a in _FIELD_ALIASES[f] if a.replace(" ", "_") in lowered), None)
            values.append(value)
    elif isinstance(item, (list, tuple)) and len(item) == len(fields):
        values = list(item)
    else:
        return None
    if not all(isinstance(v, str) and norm(v) for v in values):
        return None
    return tuple(norm(v) for v in values)


def _json_items(text: str) -> list | None:
    value = extract_json(text, expect=list)
    if value is None and "[" in text:  # a list cut off inside an object: keep its complete objects
        tail = text[text.index("[") :]
        end = tail.rfind("}")
        if end != -1:
            value = extract_json(tail[: end + 1] + "]", expect=list)
    if value is None:
        obj = extract_json(text, expect=dict)
        if isinstance(obj, dict):
            inner = [v for v in obj.values() if isinstance(v, list)]
            value = inner[0] if len(obj) == 1 and inner else [obj]
    return value


def _fallback_tuples(text: str, kind: str) -> list[tuple[str, ...]]:
    """``term: polarity`` lines (atsa, acsa) or ``(a, c, s, o)`` groups (asqp)."""
    out = []
    if kind == ASQP:
        for group in _PAREN.findall(text):
            parts = [p.strip().strip("'\"") for p in group.split(",")]
            if len(parts) == 4 and all(parts) and norm(parts[2]) in QUAD_SENTIMENTS:
                out.append(tuple(norm(p) for p in parts))
        return out
    for line in re.split(r"[\n;]", text):
        pieces = [line] if _LINE_PAIR.match(line) else line.split(",")
        for piece in pieces:
            m = _LINE_PAIR.match(piece)
            if m and norm(m.group("b")) in POLARITIES and norm(m.group("a")) not in _NOT_TERMS:
                out.append((norm(m.group("a")), norm(m.group("b"))))
    return out


def parse_absa_answer(text: str, kind: str) -> ParsedAnswer:
    """The tuples of a model's ABSA answer (normalised, duplicates removed, first-seen order).

    Accepts JSON in prose or code fences, trailing commas, single quotes, a list cut off by the
    token limit (complete objects kept, the broken one counted in `invalid_items`), other key
    names (``term``, ``polarity``, ...), and without any JSON ``term: polarity`` lines. An
    explicit ``[]`` is a valid empty answer; an answer with nothing usable (no JSON, or only
    broken objects) gives ``tuples=None``.
    """
    text = text or ""
    items = _json_items(text) if text.strip() else None
    tuples, invalid = [], 0
    if items is not None:
        for item in items:
            t = _item_tuple(item, kind)
            if t is None:
                invalid += 1
            else:
                tuples.append(t)
    if not tuples:
        tuples = _fallback_tuples(text, kind)
    explicit_empty = items == [] or (items is None and _EMPTY_LIST.search(text) is not None)
    if not tuples and not explicit_empty:  # nothing usable (also: a list of only broken objects)
        return ParsedAnswer(None, invalid)
    return ParsedAnswer(list(dict.fromkeys(tuples)), invalid)


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0


UNPARSED = "(unparsed)"  # the confusion column of answers that name no label


def classification_metrics(gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-label P/R/F1 and confusion counts.

    Macro-F1 averages over the labels that occur in gold or predictions (as scikit-learn's
    ``f1_score(average="macro")`` does); a label never predicted has F1 0 and counts.
    A prediction of None (an endpoint's answer that names no label) is wrong and is no class
    of its own: it costs its gold label recall. Confusion counts: ``{gold: {predicted: n}}``
    over `labels` (plus any unexpected gold label, and an ``(unparsed)`` column if needed).
    """
    if len(gold) != len(pred):
        raise ValueError("gold and pred differ in length")
    n = len(gold)
    present = sorted(set(gold) | {p for p in pred if p is not None})
    per_label = {}
    for label in present:
        tp = sum(1 for g, p in zip(gold, pred) if g == label and p == label)
        n_pred = sum(1 for p in pred if p == label)
        n_gold = sum(1 for g in gold if g == label)
        prec = tp / n_pred if n_pred else 0.0
        rec = tp / n_gold if n_gold else 0.0
        per_label[label] = {"precision": prec, "recall": rec, "f1": _f1(prec, rec), "support": n_gold}
    rows = list(labels) + [g for g in present if g not in labels]
    confusion = {g: {p: 0 for p in labels} for g in rows}
    for g, p in zip(gold, pred):
        p = UNPARSED if p is None else p
        confusion[g][p] = confusion[g].get(p, 0) + 1
    return {
        "n": n,
        "accuracy": sum(1 for g, p in zip(gold, pred) if g == p) / n if n else 0.0,
        "macro_f1": sum(v["f1"] for v in per_label.values()) / len(per_label) if per_label else 0.0,
        "per_label": per_label,
        "confusion": confusion,
        "unparsed": sum(1 for p in pred if p is None),
    }


def tuple_metrics(gold: Sequence[Iterable[tuple]], pred: Sequence[Iterable[tuple] | None]) -> dict:
    """Micro precision / recall / F1 over (example, tuple) pairs; duplicates within an example
    count once, an unparseable answer (None) predicts nothing."""
    if len(gold) != len(pred):
        raise ValueError("gold and pred differ in length")
    tp = n_pred = n_gold = 0
    for g, p in zip(gold, pred):
        g, p = set(g), set(p or ())
        tp += len(g & p)
        n_pred += len(p)
        n_gold += len(g)
    prec = tp / n_pred if n_pred else 0.0
    rec = tp / n_gold if n_gold else 0.0
    return {"n": len(gold), "precision": prec, "recall": rec, "f1": _f1(prec, rec), "tp": tp,
            "n_pred": n_pred, "n_gold": n_gold}


def _clip(text: str, n: int = 200) -> str:
    text = _one_line(text)
    return text if len(text) <= n else text[: n - 3] + "..."


def score_dataset(ds: EvalDataset, requests: Sequence[dict], outputs: dict[str, dict]) -> dict:
    """One dataset's result block from its requests and the model's outputs (by key).

    Classification outputs carry ``pred`` (a label index); ABSA outputs ``text`` (the answer).
    """
    outs = [outputs[r["key"]] for r in requests]
    block: dict[str, Any] = {
        "kind": ds.kind,
        "n": len(requests),
        "n_test_total": ds.n_test_total,
        "demos_mean": sum(r["demos"] for r in requests) / len(requests) if requests else 0.0,
        "prompts_shortened": sum(1 for r in requests if r["sentence_cut"]),
    }
    if ds.kind == CLASSIFICATION:
        gold = [str(rec["label"]) for rec in ds.test]
        pred = [ds.labels[o["pred"]] if int(o["pred"]) >= 0 else None for o in outs]
        m = classification_metrics(gold, pred, ds.labels)
        block.update(labels=list(ds.labels), metrics={"macro_f1": m["macro_f1"], "accuracy": m["accuracy"]},
                     per_label=m["per_label"], confusion=m["confusion"], parse_failures=m["unparsed"],
                     unseen_gold_labels=sorted(set(gold) - set(ds.labels)))
        how = Counter(o.get("finish") for o in outs)
        if how.keys() - {"score"}:  # an endpoint: how each label was read (logprobs / text / unparsed)
            block["read_from"] = dict(sorted(how.items()))
        block["examples"] = [{"sentence": _clip(rec["sentence"]), "gold": g, "pred": p}
                             for rec, g, p in list(zip(ds.test, gold, pred))[:EXAMPLES_KEPT]]
        return block
    gold = [gold_tuples(rec, ds.kind) for rec in ds.test]
    parsed = [parse_absa_answer(o["text"], ds.kind) for o in outs]
    pred = [p.tuples for p in parsed]
    m = tuple_metrics(gold, pred)
    terms_outside = 0
    if ds.kind == ATSA:  # the protocol's rule: a predicted term must occur in the sentence
        for rec, p in zip(ds.test, pred):
            terms_outside += sum(1 for t in (p or ()) if t[0] not in norm(rec["sentence"]))
    block.update(
        metrics={"f1": m["f1"], "precision": m["precision"], "recall": m["recall"]},
        counts={"tp": m["tp"], "n_pred": m["n_pred"], "n_gold": m["n_gold"]},
        parse_failures=sum(1 for p in pred if p is None),
        invalid_items=sum(p.invalid_items for p in parsed),
        truncated_answers=sum(1 for o in outs if o.get("finish") == "length"),
    )
    if ds.kind == ATSA:
        block["terms_not_in_sentence"] = terms_outside
    block["examples"] = [{"sentence": _clip(rec["sentence"]), "gold": sorted(map(list, g)), "answer": _clip(o["text"], 300),
                          "pred": None if p is None else [list(t) for t in p]}
                         for rec, g, o, p in list(zip(ds.test, gold, outs, pred))[:EXAMPLES_KEPT]]
    return block


def headline(block: dict) -> float:
    """A dataset's headline score: macro-F1 (classification) or micro-F1 (ABSA), in [0, 1]."""
    m = block["metrics"]
    return m["macro_f1"] if block["kind"] == CLASSIFICATION else m["f1"]


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}"


def _markdown(header: list[str], rows: list[list[str]], right_from: int = 1) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) if i < right_from else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    sep = "|" + "|".join(("-" * (w + 2)) if i < right_from else ("-" * (w + 1) + ":")
                         for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


def results_table(result: dict) -> str:
    """One run as Markdown: F1 (x100) per dataset, accuracy or P/R, failures, and a mean row."""
    header = ["dataset", "kind", "n", "F1", "acc", "P", "R", "unparsed"]
    rows, scores = [], []
    for name, block in result["datasets"].items():
        score = headline(block)
        scores.append(score)
        m = block["metrics"]
        if block["kind"] == CLASSIFICATION:
            rows.append([name, block["kind"], str(block["n"]), _pct(score), _pct(m["accuracy"]), "-", "-",
                         str(block["parse_failures"]) if block.get("read_from") else "-"])
        else:
            rows.append([name, block["kind"], str(block["n"]), _pct(score), "-", _pct(m["precision"]),
                         _pct(m["recall"]), str(block["parse_failures"])])
    if scores:
        rows.append(["mean", "", "", _pct(sum(scores) / len(scores)), "", "", "", ""])
    return _markdown(header, rows, right_from=2)


def compare_table(results: Sequence[dict], names: Sequence[str]) -> str:
    """Several runs side by side (headline F1 x100 per dataset) with a mean row per run.

    When the runs do not cover the same datasets, a second mean row covers only the datasets
    every run has, so the columns stay comparable.
    """
    order = {n: i for i, n in enumerate(KNOWN_DATASETS)}
    datasets = sorted({d for r in results for d in r["datasets"]}, key=lambda n: (order.get(n, len(order)), n))
    rows = []
    for d in datasets:
        rows.append([d] + [_pct(headline(r["datasets"][d])) if d in r["datasets"] else "-" for r in results])

    def mean(r, names_):
        vals = [headline(r["datasets"][d]) for d in names_ if d in r["datasets"]]
        return sum(vals) / len(vals) if vals else None

    rows.append(["mean"] + [_pct(mean(r, datasets)) for r in results])
    common = [d for d in datasets if all(d in r["datasets"] for r in results)]
    if len(common) != len(datasets):
        rows.append([f"mean ({len(common)} common)"] + [_pct(mean(r, common)) if common else "-" for r in results])
    return _markdown(["dataset", *names], rows)


def load_result(path: str | os.PathLike) -> dict:
    """A result file written by ``compeffdist eval``; UserError if it is not one."""
    result = read_json_file(path, "result file")
    blocks = result.get("datasets") if isinstance(result, dict) else None
    if not isinstance(blocks, dict) or not all(isinstance(b, dict) and "kind" in b and "metrics" in b
                                               for b in blocks.values()):
        raise UserError(f"{path} is not a result file of 'compeffdist eval' (it needs a 'datasets' object of "
                        f"per-dataset results with kind and metrics)")
    return result


def compare_names(results: Sequence[dict], paths: Sequence[str]) -> list[str]:
    """Column names: model, k and seed; the file name where two runs would read the same."""
    names = [run_label(r) for r in results]
    return [f"{n} [{Path(p).name}]" if names.count(n) > 1 else n for n, p in zip(names, paths)]


def run_label(result: dict) -> str:
    """A short column name for a run: model (or the pipeline's role for it: base, distilled,
    teacher), k and seed."""
    name = result.get("label") or result.get("model", "?")
    return f"{name} (k={result.get('k')}, seed={result.get('seed')})"
