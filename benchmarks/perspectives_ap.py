"""Affinity propagation on the paper's attribute list: frequency weighting by duplication (the
paper's way, the baseline) vs by per-point preference (ours), in one run.

Reads ../shared/compeffdist_ref/clustering/data/attr_list.json (1,786 attributes with counts)
and the paper's own clustering of it (180 perspectives) to measure agreement (adjusted Rand
index and NMI of the attribute -> cluster assignment). Each mode runs in a fresh child process
so that its peak RSS is its own. Prints one line per mode and the ratios against the baseline.

    python benchmarks/perspectives_ap.py                 # both modes, paper settings
    python benchmarks/perspectives_ap.py --modes preference --weights 0.02,0.05,0.1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REF = ROOT.parent / "shared" / "compeffdist_ref" / "clustering" / "data"


def _load():
    attrs = json.loads((REF / "attr_list.json").read_text(encoding="utf-8"))
    names = [a["attr"] for a in attrs]
    counts = [int(a["count"]) for a in attrs]
    paper = {}
    for c in json.loads((REF / "clustering" / "affinity_propagation_clusters_p=0.5.json").read_text(encoding="utf-8")):
        for entry in c["attr_names"]:
            paper[re.sub(r"\|\(\d+\)$", "", entry)] = c["cluster_id"]
    return names, counts, paper


def child(mode: str, weight: float, percentile: float, max_points: int) -> dict:
    import numpy as np
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    from compeffdist_ray.clustering import cluster_attributes
    from compeffdist_ray.config import EmbeddingConfig, PerspectivesConfig
    from compeffdist_ray.stages.perspectives import embed

    class _Cfg:  # the slice of the config tree `embed` reads
        embedding = EmbeddingConfig()
        perspectives = PerspectivesConfig()

    names, counts, paper = _load()
    t0 = time.perf_counter()
    vectors = embed(names, _Cfg)
    t_embed = time.perf_counter() - t0
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    res = cluster_attributes(vectors, np.array(counts), similarity="neg_sq_euclidean", preference_percentile=percentile,
                             frequency_weighting=mode, preference_weight=weight, damping=0.9, max_iter=1000,
                             convergence_iter=50, max_points=max_points, seed=0)
    t_cluster = time.perf_counter() - t0
    both = [i for i, n in enumerate(names) if n in paper]
    ours = res.labels[both]
    theirs = [paper[names[i]] for i in both]
    return {
        "mode": mode,
        "weight": weight if mode == "preference" else None,
        "attributes": len(names),
        "points": res.info["points"],
        "clusters": int(len(res.exemplars)),
        "converged": res.info["converged"],
        "iterations": res.info["iterations"],
        "cluster_s": round(t_cluster, 2),
        "embed_s": round(t_embed, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_cluster_mb": round(rss_before, 1),
        "ari_vs_paper": round(float(adjusted_rand_score(theirs, ours)), 3),
        "nmi_vs_paper": round(float(normalized_mutual_info_score(theirs, ours)), 3),
        "largest_clusters": sorted(np.bincount(res.labels).tolist(), reverse=True)[:5],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="duplicate,preference", help="comma list of duplicate, preference, none")
    ap.add_argument("--weights", default="0.05", help="preference weights to try (comma list)")
    ap.add_argument("--percentile", type=float, default=0.5, help="preference percentile (paper: 0.5)")
    ap.add_argument("--max-points", type=int, default=8000, help="bound on clustered points")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "WEIGHT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], float(args.child[1]), args.percentile, args.max_points)))
        return
    if not (REF / "attr_list.json").is_file():
        sys.exit(f"skipped: {REF / 'attr_list.json'} not found (needs ../shared beside the project)")
    runs = []
    for mode in args.modes.split(","):
        for weight in (args.weights.split(",") if mode == "preference" else ["0"]):
            out = subprocess.run([sys.executable, __file__, "--child", mode, weight, "--percentile", str(args.percentile),
                                  "--max-points", str(args.max_points)], capture_output=True, text=True,
                                 env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
            if out.returncode != 0:
                sys.exit(out.stderr[-3000:])
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs.append(result)
            print(json.dumps(result), flush=True)
    base = next((r for r in runs if r["mode"] == "duplicate"), None)
    print(f"\n{'mode':<22}{'points':>8}{'clusters':>10}{'cluster s':>11}{'peak RSS MB':>13}{'ARI':>7}{'NMI':>7}")
    for r in runs:
        label = r["mode"] + (f" w={r['weight']}" if r["weight"] is not None else "")
        print(f"{label:<22}{r['points']:>8}{r['clusters']:>10}{r['cluster_s']:>11}{r['peak_rss_mb']:>13}"
              f"{r['ari_vs_paper']:>7}{r['nmi_vs_paper']:>7}")
    if base:
        for r in runs:
            if r is not base:
                print(f"{r['mode']} w={r['weight']}: {base['cluster_s'] / max(r['cluster_s'], 1e-9):.1f}x faster, "
                      f"{base['peak_rss_mb'] / r['peak_rss_mb']:.2f}x less peak RSS than the paper's duplication")
    print("paper: 180 clusters (UAE-Large-V1 embeddings, duplication weighting)")


if __name__ == "__main__":
    main()
