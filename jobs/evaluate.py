"""Ray job entrypoint: evaluate a model on SentiBench on the cluster this job was submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/evaluate.py --model /mnt/shared/llama-70b-to-3b/finetune/model \
            --data-dir /mnt/shared/sentibench --ray-address auto --num-gpus 1

Takes the same arguments as `compeffdist eval` (`python jobs/evaluate.py --help`). Paths are
read on the cluster: `--model` and `--data-dir` must be reachable from its nodes (a model alias,
a Hugging Face id, a shared file system; jobs/runtime_env.yaml leaves runs/ and model weights
out of the working-directory upload). `--out` is written on the node running this driver (the
head node, unless the submit asks otherwise); `ray job logs` shows the printed table either
way. `--ray-address auto` joins the job's cluster (without it Ray still finds the cluster
through RAY_ADDRESS, which every Ray job driver has).
"""

import sys

from compeffdist_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
