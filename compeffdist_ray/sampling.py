"""Stage 9 core, difficulty-prioritised sampling: keep the samples the student finds hard.

Pure numpy + pandas (no ray, no torch). The stage wrapper reads the difficulty stage's rows,
calls `sample`, and writes `SampleResult.kept`, `.report` and `.warnings`.

Reads: a DataFrame with a difficulty column (`score_col`, higher = harder, e.g. `rank_score`),
optionally a group column (`task_id`: one group per instruction, the paper's default;
`group_col=None` ranks all rows as one group) and a label column (for the class balance report;
`label_of` turns a teacher response into a label when the response is one).
Writes: the kept rows (same columns, original order, index reset), a JSON-able report (rows and
groups before/after, score means, label balance) and warnings (a group or a class vanished,
keep_ratio rounds some group to 0 rows). Needs: CPU only; 100K rows in ~4K groups take well
under a second.

Methods, inside each group of n rows:
- rank_weighted (the paper; default): rank hardest first (rho = 1, 2, ...), draw k rows without
  replacement, each draw with probability proportional to rho^(-alpha) among the rows left.
  alpha = 0 is uniform; a large alpha tends to `hardest`.
- curve (the paper's public code): the i-th easiest row sits at x = (i + 0.5) / n and is kept,
  independently of the others, with probability F(x) = (x/a)^b for x <= a and
  ((1 - x)/(1 - a))^b for x > a. F peaks (F = 1) at x = a; a = 1 makes F increasing, so the
  hardest rows are kept most often. b is solved per group size so that the mean of F over the
  group's positions equals keep_ratio: the *expected* kept count is keep_ratio * n, the actual
  count is random around it (Poisson-binomial), and a small group may lose every row.
- hardest: the k highest scores.
- random: k rows, uniformly without replacement.
For every method but curve, k = round(keep_ratio * n) (half to even) and at least 1, so no group
vanishes.

Ties: rows with equal scores are ordered by row order, the earlier row counting as the harder
one, in every method.

Reproducibility: each group draws from its own stream, `np.random.default_rng([seed, h])` where h
is a stable hash (blake2b) of `str(group key)`. Adding or removing rows or whole groups
elsewhere never changes a group's draw; the draw does depend on the order of rows inside it.

    >>> import pandas as pd
    >>> df = pd.DataFrame({"task_id": list("aaaabb"), "rank_score": [.1, .9, .5, .3, .2, .8]})
    >>> res = sample(df, method="hardest", keep_ratio=0.5)
    >>> res.kept["rank_score"].tolist(), res.report["rows_after"]
    ([0.9, 0.5, 0.8], 3)
"""

from __future__ import annotations

import hashlib
import math
import re
import string
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "METHODS",
    "SampleResult",
    "sample",
    "label_of",
    "keep_count",
    "difficulty_ranks",
    "group_rng",
    "curve_function",
    "solve_curve_b",
    "curve_keep_probabilities",
]

METHODS = ("rank_weighted", "curve", "hardest", "random")
GLOBAL_GROUP = "<all>"  # the one group's name when group_col is None
MAX_NAMES = 20  # names listed in the report and in warnings, at most
_B_MAX = 1e6  # upper end of the bracket for the curve exponent b


@dataclass
class SampleResult:
    kept: pd.DataFrame  # the kept rows, in their original order, index reset
    report: dict  # JSON-able summary, see `sample`
    warnings: list[str] = field(default_factory=list)
    # positional row numbers (0-based, ascending) of the kept rows in the input frame
    positions: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


def _rounded(n: int, keep_ratio: float) -> int:
    # Python's round: half to even, so exact halves (odd groups at 0.5) go up and down in turn
    # and the total stays near keep_ratio. Rounding to 9 decimals first makes float noise such
    # as 0.35 * 10 = 3.4999999999999996 count as the half it stands for.
    return round(round(keep_ratio * n, 9))


def keep_count(n: int, keep_ratio: float) -> int:
    """Rows kept from a group of n by the fixed-count methods: round(keep_ratio * n), >= 1."""
    if n <= 0:
        return 0
    return min(n, max(1, _rounded(n, keep_ratio)))


def difficulty_ranks(scores: np.ndarray) -> np.ndarray:
    """rho per row, in row order: 1 for the highest score; equal scores ranked by row order."""
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    rho = np.empty(len(scores), dtype=np.int64)
    rho[order] = np.arange(1, len(scores) + 1)
    return rho


def group_rng(seed: int, key: Any) -> np.random.Generator:
    """The group's own random stream: depends on the seed and the group's name only."""
    digest = hashlib.blake2b(str(key).encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng([int(seed), int.from_bytes(digest, "little")])


def curve_function(x: np.ndarray, a: float, b: float) -> np.ndarray:
    """F(x) = (x/a)^b for x <= a, ((1 - x)/(1 - a))^b for x > a; x in [0, 1], a in (0, 1]."""
    x = np.asarray(x, dtype=np.float64)
    base = np.empty_like(x)
    left = x <= a
    base[left] = x[left] / a
    if a < 1.0:
        base[~left] = (1.0 - x[~left]) / (1.0 - a)
    return np.power(base, b)


def solve_curve_b(x: np.ndarray, keep_ratio: float, a: float) -> tuple[float, bool]:
    """The b >= 0 with mean(F(x; a, b)) == keep_ratio, and whether it could be reached.

    Every term of the mean is base^b with base in [0, 1], so the mean falls monotonically from
    1 (b = 0) towards the share of positions sitting exactly at a (where F = 1 for every b).
    Bisection is therefore exact and safe: the bracket [lo, hi] is grown by factors of 4 until
    mean(hi) <= keep_ratio, then halved until the mean is within 1e-12 of the target or the
    bracket cannot shrink in floating point. If even b = 1e6 keeps too much (positions at
    exactly a in a tiny group), that b is returned with reached = False.
    """
    x = np.asarray(x, dtype=np.float64)
    if keep_ratio >= 1.0 or len(x) == 0:
        return 0.0, True

    def mean_f(b: float) -> float:
        return float(curve_function(x, a, b).mean())

    lo, hi = 0.0, 1.0
    while mean_f(hi) > keep_ratio:
        if hi >= _B_MAX:
            return hi, False
        lo, hi = hi, min(hi * 4.0, _B_MAX)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if not lo < mid < hi:
            break
        m = mean_f(mid)
        if abs(m - keep_ratio) <= 1e-12:
            return mid, True
        if m > keep_ratio:
            lo = mid
        else:
            hi = mid
    return hi, True


def curve_keep_probabilities(n: int, keep_ratio: float, a: float) -> tuple[np.ndarray, float, bool]:
    """Keep probability of the i-th easiest of n rows (i = 0 .. n-1), b, and whether reached."""
    x = (np.arange(n, dtype=np.float64) + 0.5) / max(n, 1)
    b, reached = solve_curve_b(x, keep_ratio, a)
    if keep_ratio >= 1.0:
        return np.ones(n), b, reached
    return curve_function(x, a, b), b, reached


def _pick_rank_weighted(n: int, k: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """0-based ranks (hardest first) of k rows drawn without replacement, weight (rank+1)^-alpha.

    Efraimidis-Spirakis (2006): give row j the key u_j^(1/w_j), u ~ U(0, 1), and keep the k
    largest keys; this is exactly successive weighted sampling without replacement. Taking
    -log turns the key into E_j / w_j with E_j ~ Exp(1), kept smallest; in logs,
    log E_j + alpha * log(rho_j), which neither underflows nor overflows for any alpha.
    """
    rho = np.arange(1, n + 1, dtype=np.float64)
    with np.errstate(divide="ignore"):  # E == 0 (probability ~2^-53) gives -inf: drawn first
        log_keys = np.log(rng.standard_exponential(n)) + alpha * np.log(rho)
    return np.argsort(log_keys, kind="stable")[:k]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_args(df, score_col, group_col, method, keep_ratio, alpha, curve_a, seed, label_col) -> None:
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"df must be a pandas DataFrame, got {type(df).__name__}")
    problems: list[str] = []
    if method not in METHODS:
        problems.append(f"method must be one of {', '.join(repr(m) for m in METHODS)}, got {method!r}")
    if not (_is_number(keep_ratio) and 0.0 < keep_ratio <= 1.0):
        problems.append(f"keep_ratio must be a number in (0, 1], got {keep_ratio!r}")
    if not (_is_number(alpha) and math.isfinite(alpha) and alpha >= 0.0):
        problems.append(f"alpha must be a finite number >= 0, got {alpha!r}")
    if not (_is_number(curve_a) and 0.0 < curve_a <= 1.0):
        problems.append(f"curve_a must be a number in (0, 1], got {curve_a!r}")
    if not (isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)) and seed >= 0):
        problems.append(f"seed must be an integer >= 0, got {seed!r}")
    columns = [str(c) for c in df.columns]
    for arg, col in (("score_col", score_col), ("group_col", group_col), ("label_col", label_col)):
        if col is None and arg != "score_col":
            continue
        if col not in df.columns:
            problems.append(f"{arg} {col!r} is not a column of the frame (columns: {columns})")
    if problems:
        raise ValueError("; ".join(problems))


def _scores(df: pd.DataFrame, score_col: str) -> np.ndarray:
    col = df[score_col]
    if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        raise ValueError(
            f"score_col {score_col!r} must be numeric (higher = harder), got dtype {col.dtype}"
        )
    scores = col.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(scores)
    if bad.any():
        n_nan, n_inf = int(np.isnan(scores).sum()), int(np.isinf(scores).sum())
        what = " and ".join(
            part for part in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} infinite" if n_inf else "") if part
        )
        first = np.flatnonzero(bad)[:5].tolist()
        raise ValueError(
            f"score_col {score_col!r} has {what} value(s) out of {len(scores)} rows (first at "
            f"positions {first}); drop or fill those rows before sampling"
        )
    return scores


def _groups(df: pd.DataFrame, group_col: str | None) -> list[tuple[Any, np.ndarray]]:
    """(group key, positional row numbers in ascending order) per group, groups sorted by key."""
    if group_col is None:
        return [(GLOBAL_GROUP, np.arange(len(df)))] if len(df) else []
    missing = int(df[group_col].isna().sum())
    if missing:
        raise ValueError(
            f"group_col {group_col!r} is missing in {missing} of {len(df)} rows; fill it or pass "
            "group_col=None to sample all rows as one group"
        )
    indices = df.groupby(group_col, sort=True, observed=True).indices
    return [(key, np.asarray(pos, dtype=np.int64)) for key, pos in indices.items() if len(pos)]


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _summary(values: np.ndarray) -> dict:
    if len(values) == 0:
        return {"min": None, "median": None, "mean": None, "max": None}
    return {
        "min": int(values.min()),
        "median": float(np.median(values)),
        "mean": float(values.mean()),
        "max": int(values.max()),
    }


def _label_stats(labels: pd.Series) -> dict:
    missing = labels.isna()
    counts = labels[~missing].astype(str).value_counts()
    total = int(counts.sum())
    ordered = sorted(counts.items())
    return {
        "counts": {name: int(c) for name, c in ordered},
        "shares": {name: (int(c) / total) for name, c in ordered},
        "unlabelled": int(missing.sum()),
    }


def _names(items: list[str]) -> str:
    shown = ", ".join(repr(s) for s in items[:MAX_NAMES])
    return shown + (f", ... ({len(items) - MAX_NAMES} more)" if len(items) > MAX_NAMES else "")


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def sample(
    df: pd.DataFrame,
    *,
    score_col: str = "rank_score",
    group_col: str | None = "task_id",
    method: str = "rank_weighted",
    keep_ratio: float = 0.5,
    alpha: float = 0.5,
    curve_a: float = 1.0,
    seed: int = 0,
    label_col: str | None = None,
) -> SampleResult:
    """Keep about keep_ratio of each group's rows, preferring the harder ones (see module doc).

    The report holds: `params`; `rows_before`, `rows_after`, `kept_fraction`; `groups` (groups
    before/after, rows per group before/after as min/median/mean/max, the vanished groups'
    names (at most 20) and count, `min_one_groups`: groups where round(keep_ratio * n) was 0
    and 1 row was kept); `score_mean_before` / `score_mean_after`; `labels` (None without
    label_col; else counts and shares of each class before and after, unlabelled rows, and the
    classes that vanished); `curve` (None unless method='curve': the solved b range, the
    expected kept rows, groups whose target could not be reached).

    Raises ValueError for a bad argument or column (all problems at once), non-numeric or
    non-finite scores, or missing group keys.
    """
    _check_args(df, score_col, group_col, method, keep_ratio, alpha, curve_a, seed, label_col)
    keep_ratio, alpha, curve_a, seed = float(keep_ratio), float(alpha), float(curve_a), int(seed)
    scores = _scores(df, score_col)
    groups = _groups(df, group_col)

    keep = np.zeros(len(df), dtype=bool)
    min_one_groups = 0
    curve_cache: dict[int, tuple[np.ndarray, float, bool]] = {}
    curve_unreached = 0
    expected_after = 0.0
    for key, pos in groups:
        n = len(pos)
        rng = group_rng(seed, key)
        hardest_first = pos[np.argsort(-scores[pos], kind="stable")]
        if method == "curve":
            if n not in curve_cache:
                probs, b, reached = curve_keep_probabilities(n, keep_ratio, curve_a)
                curve_cache[n] = (probs[::-1].copy(), b, reached)  # indexed by rank, hardest first
            p_by_rank, _, reached = curve_cache[n]
            curve_unreached += not reached
            expected_after += float(p_by_rank.sum())
            chosen = np.flatnonzero(rng.random(n) < p_by_rank)
        else:
            k = keep_count(n, keep_ratio)
            min_one_groups += _rounded(n, keep_ratio) == 0
            if method == "hardest":
                chosen = np.arange(k)
            elif method == "random":
                chosen = rng.choice(n, size=k, replace=False)
            else:
                chosen = _pick_rank_weighted(n, k, alpha, rng)
        keep[hardest_first[chosen]] = True

    positions = np.flatnonzero(keep)
    kept = df.iloc[positions].reset_index(drop=True)

    before = np.array([len(pos) for _, pos in groups], dtype=np.int64)
    after = np.array([int(keep[pos].sum()) for _, pos in groups], dtype=np.int64)
    vanished = [str(key) for (key, _), c in zip(groups, after) if c == 0]
    report: dict[str, Any] = {
        "params": {
            "method": method, "keep_ratio": keep_ratio, "alpha": alpha, "curve_a": curve_a,
            "seed": seed, "score_col": str(score_col),
            "group_col": None if group_col is None else str(group_col),
            "label_col": None if label_col is None else str(label_col),
        },
        "rows_before": int(len(df)),
        "rows_after": int(len(positions)),
        "kept_fraction": (len(positions) / len(df)) if len(df) else None,
        "groups": {
            "groups_before": len(groups),
            "groups_after": len(groups) - len(vanished),
            "rows_per_group_before": _summary(before),
            "rows_per_group_after": _summary(after),
            "vanished_groups_count": len(vanished),
            "vanished_groups": vanished[:MAX_NAMES],
            "min_one_groups": int(min_one_groups),
        },
        "score_mean_before": float(scores.mean()) if len(scores) else None,
        "score_mean_after": float(scores[keep].mean()) if len(positions) else None,
        "labels": None,
        "curve": None,
    }

    warnings: list[str] = []
    if len(df) == 0:
        warnings.append("the input has no rows: nothing to sample")
    if vanished:
        where = f"in {group_col!r}" if group_col is not None else "(global grouping)"
        why = (
            " (method 'curve' keeps each row independently: a group keeps keep_ratio * n rows "
            "only on average)" if method == "curve" else ""
        )
        warnings.append(
            f"{len(vanished)} of {len(groups)} group(s) {where} lost all their rows{why}: {_names(vanished)}"
        )
    if min_one_groups:
        warnings.append(
            f"keep_ratio={keep_ratio} rounds to 0 rows in {min_one_groups} small group(s) (at most "
            f"{1 / (2 * keep_ratio):g} rows); 1 row was kept in each, so they keep more than keep_ratio"
        )
    if method == "curve":
        bs = [b for _, b, _ in curve_cache.values()]
        report["curve"] = {
            "b_min": float(min(bs)) if bs else None,
            "b_max": float(max(bs)) if bs else None,
            "expected_rows_after": expected_after,
            "unreached_groups": int(curve_unreached),
        }
        if curve_unreached:
            warnings.append(
                f"method 'curve' with curve_a={curve_a} cannot keep as little as keep_ratio={keep_ratio} "
                f"in {curve_unreached} small group(s): a row sits exactly at position curve_a and is "
                "always kept"
            )
    if label_col is not None:
        lab_before = _label_stats(df[label_col])
        lab_after = _label_stats(df[label_col].iloc[positions])
        gone = sorted(set(lab_before["counts"]) - set(lab_after["counts"]))
        report["labels"] = {
            "column": str(label_col),
            "before": lab_before,
            "after": lab_after,
            "vanished_classes": gone,
        }
        if gone:
            warnings.append(
                f"{len(gone)} class(es) of {label_col!r} vanished (present before sampling, none "
                f"kept): {_names(gone)}"
            )
    return SampleResult(kept=kept, report=report, warnings=warnings, positions=positions)


# --------------------------------------------------------------------------------------------
# Labels from responses
# --------------------------------------------------------------------------------------------

# Stripped from both ends before comparing: ASCII punctuation, whitespace, typographic quotes,
# ellipsis, bullets and dashes.
_EDGE = string.punctuation + string.whitespace + "\u201c\u201d\u2018\u2019\u00ab\u00bb\u201e\u2026\u00b7\u2022\u2013\u2014"
_PREFIX = re.compile(r"[^\W\d_][\w\- ]*")  # "Label", "Sentiment", "Final answer", "sarcasm-label"
_MAX_PREFIX_WORDS = 4


def _strict(text: str) -> str:
    return " ".join(text.split()).casefold()


def _loose(text: str) -> str:
    return _strict(text.strip(_EDGE))


def _match(text: str, strict: dict[str, str], loose: dict[str, set[str]], depth: int) -> str | None:
    key = _strict(text)
    if key in strict:
        return strict[key]
    key = _loose(text)
    hits = loose.get(key) if key else None
    if hits and len(hits) == 1:
        return next(iter(hits))
    if depth < 3 and ":" in text:
        head, tail = text.split(":", 1)
        head = _loose(head)
        if head and _PREFIX.fullmatch(head) and len(head.split()) <= _MAX_PREFIX_WORDS:
            return _match(tail, strict, loose, depth + 1)
    return None


def label_of(response: Any, labels: Sequence[str]) -> str | None:
    """The label (as spelled in `labels`) that `response` is, or None if it is not just a label.

    Matching is case-insensitive and ignores surrounding whitespace and punctuation (quotes,
    a final period, markdown asterisks) and a short "Label:" / "Sentiment:" / "Answer:" style
    prefix of up to four words. A response that says more than a label ("positive, because ...")
    is not a label. Non-string responses (None, NaN) give None.

        >>> label_of("  **Positive**. ", ["positive", "negative"])
        'positive'
        >>> label_of("Sentiment: NEGATIVE", ["positive", "negative"])
        'negative'
        >>> label_of("positive, I think", ["positive", "negative"]) is None
        True
    """
    if isinstance(labels, str):
        raise ValueError(f"labels must be a sequence of label strings, not one string: {labels!r}")
    strict: dict[str, str] = {}
    loose: dict[str, set[str]] = {}
    for lab in labels:
        if not isinstance(lab, str) or not lab.strip():
            raise ValueError(f"labels must be non-empty strings, got {lab!r} in {list(labels)!r}")
        strict.setdefault(_strict(lab), lab)
        loose.setdefault(_loose(lab), set()).add(lab)
    if not isinstance(response, str):
        return None
    return _match(response, strict, loose, 0)
