"""Ray Serve apps for the teacher (OpenAI-compatible chat completions) and the proxy difficulty model.

    compeffdist serve teacher --config configs/local-demo.yaml      # http://127.0.0.1:8000/v1
    compeffdist serve proxy --model runs/proxy                      # http://127.0.0.1:8000/proxy/v1/difficulty
    compeffdist serve config teacher --config FILE --out teacher.yaml   # for serve run / serve deploy

Serve config files name the application builders below (`import_path`), with `args`:

* `compeffdist_ray.serving:build_teacher_app`: `config` (pipeline config YAML path), `overrides`
  (list of `key.path=value`). `teacher.backend=transformers` serves the pipeline's own
  transformers engine with request batching; `teacher.backend=vllm` builds Ray Serve LLM's
  OpenAI app (vLLM, GPUs).
* `compeffdist_ray.serving:build_proxy_app`: `model` (a run directory with `proxy/model`, or a
  proxy model directory), optional `config` / `overrides` for the `serve` section.

Every route but `/health` (and `/healthz`) requires `Authorization: Bearer <token>`; the token is
the variable `COMPEFFDIST_SERVE_TOKEN` (`serve.token_env`) or the file `serve.token_file`.

Layout: `auth.py`, `protocol.py`, `web.py` and `deploy.py` are pure (no Ray); `apps.py` holds the
deployments, `launch.py` the CLI's start/stop, `vllm_ingress.py` the GPU path's ingress. Importing
this package imports none of Ray, torch or transformers.
"""

from __future__ import annotations

__all__ = ["build_proxy_app", "build_teacher_app"]


def build_teacher_app(args: dict | None = None):
    """Serve application builder for the teacher; see `compeffdist_ray.serving.apps.build_teacher_app`."""
    from compeffdist_ray.serving.apps import build_teacher_app as build

    return build(args)


def build_proxy_app(args: dict | None = None):
    """Serve application builder for the proxy; see `compeffdist_ray.serving.apps.build_proxy_app`."""
    from compeffdist_ray.serving.apps import build_proxy_app as build

    return build(args)
