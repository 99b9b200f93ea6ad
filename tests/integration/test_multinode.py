"""Two Ray nodes on this machine (ray.cluster_utils.Cluster): training workers forced onto different
nodes (STRICT_SPREAD), a worker failure injected after the first checkpoint, and Ray Train restarting
the group from the checkpoint both ranks wrote (ZeRO-2: each rank saved its own optimizer shard)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent('''
    import json, os, sys
    import pandas as pd
    import ray
    from ray.cluster_utils import Cluster

    from compeffdist_ray.models import resolve_model
    from compeffdist_ray.training import TrainSpec, train_student

    tmp = sys.argv[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]

        n = 48
        rows = pd.DataFrame({"instruction": ["Say whether the review is positive or negative."] * n,
                             "text": [f"review {i}: it was {'great' if i % 2 else 'awful'}" for i in range(n)],
                             "response": ["positive" if i % 2 else "negative" for i in range(n)]})
        spec = TrainSpec(model_path=resolve_model("tiny-random-llama"), storage_path=os.path.join(tmp, "storage"),
                         name="spread", num_workers=2, cpus_per_worker=0.5, placement_strategy="STRICT_SPREAD",
                         zero_stage=2, micro_batch_size=4, lr=1e-3, warmup_steps=1, checkpoint_every=2,
                         keep_checkpoints=5, max_failures=1, epochs=1)
        result = train_student(rows, spec, os.path.join(tmp, "model"))
        ckpts = sorted(d for d in os.listdir(os.path.join(tmp, "storage", "spread")) if d.startswith("checkpoint_"))
        files = {d: sorted(os.listdir(os.path.join(tmp, "storage", "spread", d, "ds")))
                 for d in ckpts if os.path.isdir(os.path.join(tmp, "storage", "spread", d, "ds"))}
        print("RESULT " + json.dumps({"nodes": len(nodes), "steps": result.steps,
                                      "resumed_from_step": result.resumed_from_step,
                                      "history_steps": [h["step"] for h in result.history], "ds_files": files,
                                      "worker_nodes": result.worker_nodes,
                                      "node_ids": sorted({n["NodeID"] for n in nodes})}))
    finally:
        ray.shutdown()
        cluster.shutdown()
''')


def test_strict_spread_over_two_nodes_restores_the_checkpoint_of_both_ranks(tmp_path):
    env = dict(os.environ, COMPEFFDIST_FAIL_AT_STEP="3", COMPEFFDIST_FAIL_MARKER=str(tmp_path / "failed-once"),
               RAY_DEDUP_LOGS="0")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    out = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert out["nodes"] == 2
    # the failure was injected once, at step 3, after the step-2 checkpoint: the group restarted from it
    assert (tmp_path / "failed-once").read_text() == "3"
    assert out["resumed_from_step"] == 2 and out["steps"] == 6
    assert out["history_steps"] == [1, 2, 3, 4, 5, 6]
    # every DeepSpeed checkpoint holds the optimizer shards of both ranks (one per node)
    assert out["ds_files"], "no DeepSpeed checkpoint was kept"
    for files in out["ds_files"].values():
        shards = [f for f in files if f.startswith("zero_pp_rank_") and f.endswith("optim_states.pt")]
        assert len(shards) == 2 and "mp_rank_00_model_states.pt" in files, files
    # the two ranks ran on the two different nodes
    assert len(out["worker_nodes"]) == 2 and sorted(set(out["worker_nodes"])) == out["node_ids"]
