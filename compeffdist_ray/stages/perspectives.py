"""Stage 2, perspectives: distinct attributes embedded and clustered by affinity propagation.

Reads `attributes/attribute_counts.parquet`, or the file in `perspectives.attribute_list`
(a JSON list of {"attr"|"attribute", "count"} objects or of strings, or a text file with one
attribute per line). Writes `perspectives/`:
- `perspectives.parquet`: perspective_id, name (the exemplar attribute), attributes, counts,
  total_count, size; ordered by total_count, largest first;
- `assignments.parquet`: attribute, count, perspective_id, is_exemplar.
Needs: CPU (sentence-transformers embeddings; scikit-learn affinity propagation).

    compeffdist stage perspectives perspectives.attribute_list=../shared/compeffdist_ref/clustering/data/attr_list.json
"""

from __future__ import annotations

import hashlib
import logging
import os
import resource
import time
from dataclasses import asdict

from compeffdist_ray.errors import UserError, parse_json
from compeffdist_ray.stages._common import StageContext, StageFailed, StageOutput

log = logging.getLogger("compeffdist_ray")

NEEDS_RAY = False
VERSION = 1
REQUIRES = ("embedding", "attribute_list")  # checked before any stage starts


def inputs(cfg) -> tuple[str, ...]:
    return () if cfg.perspectives.attribute_list else ("attributes",)


def _file_digest(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()[:16]
    except OSError:
        return "unreadable"


def config_view(cfg) -> dict:
    view = {"seed": cfg.seed, "embedding": cfg.embedding.model, "perspectives": asdict(cfg.perspectives)}
    if cfg.perspectives.attribute_list:
        view["attribute_list_sha256"] = _file_digest(cfg.perspectives.attribute_list)
    return view


def read_attribute_list(path: str):
    """A DataFrame of attribute, count from a JSON or text attribute list (counts default to 1)."""
    import pandas as pd

    from compeffdist_ray.stages.attributes import normalize_attribute

    if not os.path.isfile(path):
        raise UserError(f"attribute list not found: {path} (set perspectives.attribute_list to an existing file)")
    with open(path, encoding="utf-8-sig") as f:
        content = f.read()
    if path.lower().endswith(".json"):
        data = parse_json(content, path)
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON list of attributes")
        items = []
        for i, entry in enumerate(data):
            if isinstance(entry, str):
                items.append((entry, 1))
            elif isinstance(entry, dict) and isinstance(entry.get("attr", entry.get("attribute")), str):
                count = entry.get("count", 1)
                items.append((entry.get("attr", entry.get("attribute")), int(count) if isinstance(count, (int, float)) else 1))
            else:
                raise UserError(f"{path}: item {i} is neither a string nor an object with 'attr' (or 'attribute')")
    else:
        items = [(line, 1) for line in content.splitlines() if line.strip()]
    df = pd.DataFrame(items, columns=["raw", "count"])
    df["attribute"] = df["raw"].map(normalize_attribute)
    df = df[df["attribute"] != ""]
    out = df.groupby("attribute", as_index=False)["count"].sum()
    return out.sort_values(["count", "attribute"], ascending=[False, True]).reset_index(drop=True)


def embed(texts: list[str], cfg) -> "object":
    """Sentence embeddings for `texts` (float32 numpy array), with a progress bar."""
    from compeffdist_ray.errors import require
    from compeffdist_ray.models import resolve_model

    st = require("sentence_transformers", package="sentence-transformers", purpose="perspective clustering")
    path = resolve_model(cfg.embedding.model, kind="embedding")
    model = st.SentenceTransformer(path, device=cfg.embedding.device or None)
    return model.encode(texts, batch_size=cfg.embedding.batch_size, show_progress_bar=len(texts) > 256,
                        convert_to_numpy=True)


def build_perspectives(attrs, labels, exemplars):
    """Group attributes by cluster; the exemplar names its perspective; largest first."""
    import pandas as pd

    df = attrs.assign(cluster=labels)
    names = attrs["attribute"].to_numpy()[exemplars]
    rows = []
    for cluster, group in df.groupby("cluster"):
        group = group.sort_values(["count", "attribute"], ascending=[False, True])
        rows.append({
            "cluster": int(cluster),
            "name": str(names[cluster]),
            "attributes": group["attribute"].tolist(),
            "counts": [int(c) for c in group["count"]],
            "total_count": int(group["count"].sum()),
            "size": int(len(group)),
        })
    persp = pd.DataFrame(rows).sort_values(["total_count", "name"], ascending=[False, True]).reset_index(drop=True)
    persp.insert(0, "perspective_id", [f"p{i:04d}" for i in range(len(persp))])
    cluster_to_id = dict(zip(persp["cluster"], persp["perspective_id"]))
    exemplar_set = set(exemplars.tolist())
    assignments = pd.DataFrame({
        "attribute": attrs["attribute"],
        "count": attrs["count"].astype(int),
        "perspective_id": [cluster_to_id[c] for c in labels],
        "is_exemplar": [i in exemplar_set for i in range(len(attrs))],
    })
    return persp.drop(columns=["cluster"]), assignments


def run(ctx: StageContext) -> StageOutput:
    from compeffdist_ray.clustering import cluster_attributes

    cfg, pc = ctx.cfg, ctx.cfg.perspectives
    if pc.attribute_list:
        attrs = read_attribute_list(pc.attribute_list)
        source = pc.attribute_list
    else:
        attrs = ctx.run.read_df("attributes", "attribute_counts")[["attribute", "count"]]
        source = "attributes stage"
    dropped = {}
    rare = attrs["count"] < pc.min_count
    if rare.any():
        dropped["below_min_count"] = int(rare.sum())
        attrs = attrs[~rare].reset_index(drop=True)
    if len(attrs) == 0:
        raise StageFailed(f"perspectives: no attribute to cluster from {source} (min_count {pc.min_count})")
    t0 = time.perf_counter()
    vectors = embed(attrs["attribute"].tolist(), cfg)
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        result = cluster_attributes(
            vectors, attrs["count"].to_numpy(), similarity=pc.similarity,
            preference_percentile=pc.preference_percentile, frequency_weighting=pc.frequency_weighting,
            preference_weight=pc.preference_weight, damping=pc.damping, max_iter=pc.max_iter,
            convergence_iter=pc.convergence_iter, max_points=pc.max_points, seed=cfg.seed,
        )
    except RuntimeError as exc:
        raise StageFailed(f"perspectives: {exc}") from None
    t_cluster = time.perf_counter() - t0
    persp, assignments = build_perspectives(attrs, result.labels, result.exemplars)
    n = len(persp)
    if len(attrs) >= 1000 and n < pc.collapse_warning:
        log.warning("perspectives: only %d clusters for %d attributes: cluster collapse; raise "
                    "perspectives.preference_percentile", n, len(attrs))
    if not result.info.get("converged", True):
        log.warning("perspectives: affinity propagation stopped at max_iter=%d without converging", pc.max_iter)
    ctx.run.write_table(ctx.stage, "perspectives", persp)
    ctx.run.write_table(ctx.stage, "assignments", assignments)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    log.info("perspectives: %d attributes -> %d perspectives (embed %.1fs, cluster %.1fs)",
             len(attrs), n, t_embed, t_cluster)
    return StageOutput(
        rows=n,
        dropped=dropped,
        stats={
            "source": source,
            "attributes": int(len(attrs)),
            "perspectives": n,
            "largest": [[r.name, int(r.size), int(r.total_count)] for r in persp.head(10).itertuples()],
            "embed_s": round(t_embed, 2),
            "cluster_s": round(t_cluster, 2),
            "peak_rss_mb": round(peak_mb, 1),
            **result.info,
        },
    )
