"""Training throughput of the shared trainer (Ray Train + DeepSpeed on CPU workers), in one run.

Trains the same student on the same rows four ways — 1 and 2 workers, ZeRO stage 0 and 2 —
and prints training tokens/s (all tokens through the model, prompt included; the first steps
are left out as warm-up), the scaling ratio of 2 workers over 1, and ZeRO-2 over ZeRO-0. Each
worker gets one CPU and one torch thread, so 2 workers use both cores of a 2-core machine.

    python benchmarks/train_throughput.py                       # SmolLM2-135M-Instruct, 16 steps each
    python benchmarks/train_throughput.py --model tiny-random-llama --steps 30
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time


def rows(n: int):
    import pandas as pd

    from compeffdist_ray.inputs import resolve_input_path

    texts = [json.loads(line)["text"] for line in open(resolve_input_path("builtin:sample-corpus"))][:n]
    instruction = ("Classify the sentiment of the text as positive, negative, neutral or mixed. "
                   "Answer with the label only.")
    labels = ["positive", "negative", "neutral", "mixed"]
    return pd.DataFrame({"instruction": [instruction] * len(texts), "text": texts,
                         "response": [labels[i % 4] for i in range(len(texts))]})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=16, help="optimizer steps per configuration")
    ap.add_argument("--skip", type=int, default=3, help="first steps left out of the rate (warm-up)")
    ap.add_argument("--micro-batch-size", type=int, default=4)
    args = ap.parse_args()

    import ray

    from compeffdist_ray.models import resolve_model
    from compeffdist_ray.training import TrainSpec, train_student

    model = resolve_model(args.model)
    # 2 workers x 1 CPU must leave a logical CPU for Ray Data's streaming split (RAY_NOTES: 2 x 1 of 2 deadlocks)
    ray.init(num_cpus=3, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    n_rows = 2 * args.micro_batch_size * args.steps  # enough for 2 workers x steps micro-batches
    data = rows(n_rows)
    results = []
    for workers, zero in ((1, 0), (1, 2), (2, 0), (2, 2)):
        with tempfile.TemporaryDirectory() as tmp:
            spec = TrainSpec(model_path=model, storage_path=os.path.join(tmp, "ckpt"), name=f"w{workers}z{zero}",
                             num_workers=workers, cpus_per_worker=1.0, zero_stage=zero,
                             micro_batch_size=args.micro_batch_size, lr=1e-5, warmup_steps=1,
                             checkpoint_every=10**6, max_steps=args.steps)
            t0 = time.perf_counter()
            res = train_student(data, spec, os.path.join(tmp, "model"))
            wall = time.perf_counter() - t0
        timed = res.history[args.skip:]
        tokens = sum(h["tokens"] for h in timed)
        secs = sum(h["time_s"] for h in timed)
        results.append({"workers": workers, "zero": zero, "steps": res.steps, "tokens_per_s": tokens / secs,
                        "step_s": secs / len(timed), "wall_s": wall, "loss": (res.history[0]["loss"], res.history[-1]["loss"])})
        r = results[-1]
        print(f"  {workers} worker(s), ZeRO-{zero}: {r['tokens_per_s']:8.1f} tokens/s, {r['step_s']:.2f} s/step, "
              f"run {wall:.0f} s, loss {r['loss'][0]:.3f} -> {r['loss'][1]:.3f}", flush=True)
    ray.shutdown()

    by = {(r["workers"], r["zero"]): r for r in results}
    print(f"\nmodel {args.model}, micro-batch {args.micro_batch_size} per worker, {args.steps} steps each "
          f"(rates over steps {args.skip + 1}-{args.steps}); global batch doubles with 2 workers\n")
    print("| workers | ZeRO | tokens/s | s/step | x (1 worker, same ZeRO) | x ZeRO-0 (same workers) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        scale = r["tokens_per_s"] / by[(1, r["zero"])]["tokens_per_s"]
        zero_ratio = r["tokens_per_s"] / by[(r["workers"], 0)]["tokens_per_s"]
        print(f"| {r['workers']} | {r['zero']} | {r['tokens_per_s']:.1f} | {r['step_s']:.2f} | {scale:.2f} | {zero_ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
