"""Ray job entrypoint: serve the teacher or the proxy difficulty model with Ray Serve on the
cluster this job was submitted to.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        --no-wait -- python jobs/serve_models.py teacher --config configs/llama-70b-to-3b.yaml
    ray job stop <submission id>     # SIGTERM: the app is deleted, the job ends

Takes the same arguments as `compeffdist serve` (`teacher`, `proxy --model RUN_DIR_OR_PATH`,
`config APP`; `python jobs/serve_models.py --help`). The job keeps running while the app serves,
hence `--no-wait`; `ray job logs -f <submission id>` shows where it listens.

Ray's token authentication does not cover the Serve HTTP proxy (port 8000): the app checks its
own bearer token (COMPEFFDIST_SERVE_TOKEN or serve.token_file on the cluster; otherwise one is
generated into the model cache of the node running this driver). `--host 0.0.0.0` makes the app
reachable from other machines: do that only behind a firewall or an authenticating proxy.
"""

import sys

from compeffdist_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
