"""Ray job entrypoint: run the pipeline on the cluster this job was submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/run_pipeline.py --config configs/llama-70b-to-3b.yaml

Takes the same arguments as `compeffdist run`. Inside a Ray job, `ray.address: auto` in the
config (the cluster profiles set it) joins the job's cluster instead of starting a local one;
a local profile needs `ray.address=auto` on the command line (its `ray.num_cpus` is for a local
instance only). Relative paths (`--config configs/...`) are read in the uploaded working
directory; the run directory should be storage every node can reach.
"""

import sys

from compeffdist_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
