"""Affinity propagation over attribute embeddings, weighted by frequency, bounded in memory.

Pure numpy / scikit-learn. Affinity propagation keeps three n x n matrices, so at most
`max_points` points are clustered at once: the most frequent attributes; every other attribute
is then assigned to its most similar exemplar, in blocks.

Frequency weighting:
- "preference": each point's self-preference is the base preference plus `weight` times the
  similarity range times its standardised log-count (frequent attributes become exemplars more
  easily). Same n as without weighting: fast.
- "duplicate": the paper's way; each attribute's point is repeated max(1, round(log1p(count)))
  times. Several times more points, so far slower (n^2 memory and time per iteration).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

__all__ = ["ClusterResult", "similarity_matrix", "cluster_attributes", "assign_to_exemplars"]


@dataclass
class ClusterResult:
    labels: np.ndarray  # cluster index per attribute (0..k-1)
    exemplars: np.ndarray  # attribute index of each cluster's exemplar
    info: dict = field(default_factory=dict)


def similarity_matrix(a: np.ndarray, b: np.ndarray | None = None, kind: str = "neg_sq_euclidean") -> np.ndarray:
    """Similarities between rows of a and b: negative squared Euclidean distance, or cosine."""
    b = a if b is None else b
    if kind == "cosine":
        an = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
        bn = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
        return an @ bn.T
    sq_a = np.einsum("ij,ij->i", a, a)[:, None]
    sq_b = np.einsum("ij,ij->i", b, b)[None, :]
    d = sq_a + sq_b - 2.0 * (a @ b.T)
    np.maximum(d, 0.0, out=d)
    return -d


def assign_to_exemplars(x: np.ndarray, exemplar_vecs: np.ndarray, kind: str, block: int = 4096) -> np.ndarray:
    """Index of the most similar exemplar for each row of x, computed block by block."""
    out = np.empty(len(x), dtype=np.int64)
    for start in range(0, len(x), block):
        sims = similarity_matrix(x[start : start + block], exemplar_vecs, kind)
        out[start : start + block] = sims.argmax(axis=1)
    return out


def cluster_attributes(
    embeddings: np.ndarray,
    counts: np.ndarray,
    *,
    similarity: str = "neg_sq_euclidean",
    preference_percentile: float = 0.5,
    frequency_weighting: str = "preference",
    preference_weight: float = 0.05,
    damping: float = 0.9,
    max_iter: int = 1000,
    convergence_iter: int = 50,
    max_points: int = 4000,
    seed: int = 0,
) -> ClusterResult:
    from sklearn.cluster import AffinityPropagation
    from sklearn.exceptions import ConvergenceWarning

    x = np.asarray(embeddings, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.float64)
    n = len(x)
    if n == 0:
        raise ValueError("no attributes to cluster")
    if n == 1:
        return ClusterResult(np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64), {"points": 1, "converged": True})

    order = np.argsort(-counts, kind="stable")
    if frequency_weighting == "duplicate":
        reps_all = np.maximum(1, np.rint(np.log1p(counts)).astype(np.int64))
        # the most frequent attributes first, until the point budget is spent
        cum = np.cumsum(reps_all[order])
        core = order[: max(2, int(np.searchsorted(cum, max_points, side="right")))]
        reps = reps_all[core]
    else:
        core = order[:max_points]
        reps = np.ones(len(core), dtype=np.int64)
    owner = np.repeat(np.arange(len(core)), reps)  # point -> position in `core`
    points = x[core][owner]
    s = similarity_matrix(points, kind=similarity)
    off = s[~np.eye(len(points), dtype=bool)]
    base = float(np.percentile(off, preference_percentile))
    spread = float(off.max() - off.min()) or 1.0
    del off
    if frequency_weighting == "preference":
        logc = np.log1p(counts[core])
        z = (logc - logc.mean()) / (logc.std() or 1.0)
        preference = base + preference_weight * spread * z
    else:
        preference = np.full(len(points), base)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        ap = AffinityPropagation(
            affinity="precomputed",
            damping=damping,
            max_iter=max_iter,
            convergence_iter=convergence_iter,
            preference=preference,
            random_state=seed,
        ).fit(s)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    del s
    centers = np.asarray(ap.cluster_centers_indices_ if ap.cluster_centers_indices_ is not None else [])
    if len(centers) == 0:
        raise RuntimeError(
            "affinity propagation found no cluster (it did not converge); raise perspectives.max_iter "
            "or perspectives.damping"
        )
    # exemplar points -> attribute indices (duplicates of one attribute collapse into one exemplar)
    exemplar_attrs = []
    for c in centers:
        a = int(core[owner[c]])
        if a not in exemplar_attrs:
            exemplar_attrs.append(a)
    exemplar_attrs_arr = np.array(exemplar_attrs, dtype=np.int64)
    # every attribute (clustered or not) goes to its most similar exemplar: consistent for
    # duplicated points and bounded for the attributes left out of the core
    labels = assign_to_exemplars(x, x[exemplar_attrs_arr], similarity)
    labels[exemplar_attrs_arr] = np.arange(len(exemplar_attrs_arr))
    info = {
        "points": int(len(points)),
        "clustered_attributes": int(len(core)),
        "assigned_attributes": int(n - len(core)),
        "preference_base": base,
        "iterations": int(getattr(ap, "n_iter_", 0)),
        "converged": bool(converged),
    }
    return ClusterResult(labels=labels, exemplars=exemplar_attrs_arr, info=info)
