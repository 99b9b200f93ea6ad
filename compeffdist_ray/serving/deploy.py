"""What the served apps are made of, as plain data: pure (no Ray).

* the arguments of the application builders (`compeffdist_ray.serving:build_teacher_app`,
  `compeffdist_ray.serving:build_proxy_app`) as Serve config files pass them;
* the Serve config file `compeffdist serve config teacher|proxy` writes (for `serve run` /
  `serve deploy` / a KubeRay RayService), with its header;
* the kwargs of Ray Serve LLM's `LLMConfig` and `LLMServingArgs` for the vLLM teacher (GPUs),
  built here so that they can be tested where `ray.serve.llm` cannot be imported;
* where a proxy model lies: a proxy model directory, a run directory holding `proxy/model`, or a
  pyarrow filesystem URI of either (copied to a local cache on the replica).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from compeffdist_ray.errors import UserError

__all__ = [
    "PROXY_IMPORT_PATH",
    "TEACHER_IMPORT_PATH",
    "VLLM_INGRESS_CLS",
    "llm_config_kwargs",
    "llm_serving_args",
    "parse_proxy_args",
    "parse_teacher_args",
    "resolve_proxy_model",
    "serve_config",
    "serve_config_yaml",
    "served_model_id",
]

TEACHER_IMPORT_PATH = "compeffdist_ray.serving:build_teacher_app"
PROXY_IMPORT_PATH = "compeffdist_ray.serving:build_proxy_app"
VLLM_INGRESS_CLS = "compeffdist_ray.serving.vllm_ingress:TokenOpenAiIngress"


def served_model_id(teacher) -> str:
    """The model name clients send and `/v1/models` lists: `teacher.served_model_name` or `teacher.model`."""
    return teacher.served_model_name or teacher.model


# --------------------------------------------------------------------------------------------
# builder arguments
# --------------------------------------------------------------------------------------------


def _overrides(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # `serve run module:builder overrides="a=1 b=2"` passes a string
        value = value.split()
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise UserError(f"{where}: 'overrides' must be a list of 'key.path=value' strings, got {value!r}")
    return list(value)


def _check_keys(args: Any, allowed: tuple[str, ...], where: str) -> dict:
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise UserError(f"{where}: the application args must be a mapping, got {type(args).__name__}")
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown application args {', '.join(map(repr, unknown))}; known: "
                        f"{', '.join(allowed)}")
    return args


def parse_teacher_args(args: Any) -> tuple[str | None, list[str]]:
    """(config path or None for the embedded defaults, overrides) from `build_teacher_app`'s args."""
    where = TEACHER_IMPORT_PATH
    args = _check_keys(args, ("config", "overrides"), where)
    config = args.get("config")
    if config is not None and not isinstance(config, str):
        raise UserError(f"{where}: 'config' must be the path of a pipeline config YAML, got {config!r}")
    return config or None, _overrides(args.get("overrides"), where)


def parse_proxy_args(args: Any) -> tuple[str, str | None, list[str]]:
    """(model, config path or None, overrides) from `build_proxy_app`'s args."""
    where = PROXY_IMPORT_PATH
    args = _check_keys(args, ("model", "config", "overrides"), where)
    model = args.get("model")
    if not isinstance(model, str) or not model:
        raise UserError(f"{where}: 'model' is required: a run directory (with proxy/model) or a proxy model "
                        f"directory, got {model!r}")
    config = args.get("config")
    if config is not None and not isinstance(config, str):
        raise UserError(f"{where}: 'config' must be the path of a pipeline config YAML, got {config!r}")
    return model, config or None, _overrides(args.get("overrides"), where)


# --------------------------------------------------------------------------------------------
# proxy model location
# --------------------------------------------------------------------------------------------


def _proxy_model_id(path: str) -> str:
    parts = [p for p in path.rstrip("/").split("/") if p]
    if len(parts) >= 3 and parts[-2:] == ["proxy", "model"]:
        return f"{parts[-3]}-proxy"
    return parts[-1] if parts else "proxy"


def resolve_proxy_model(model: str) -> tuple[str, str]:
    """(the directory holding the proxy, a model id) for a proxy directory or a run directory.

    Local paths are checked here (UserError naming the fix); a URI (`s3://...`) is returned as is
    and checked where it is fetched.
    """
    from compeffdist_ray.proxy import PROXY_CONFIG, is_proxy_dir

    if "://" in model:  # a run directory or a proxy directory in a bucket: told apart when fetched
        uri = model.rstrip("/")
        path = uri.split("://", 1)[1]
        return uri, _proxy_model_id(path) if path.endswith("/proxy/model") else f"{path.rsplit('/', 1)[-1]}-proxy"
    p = pathlib.Path(model).expanduser()
    if not p.exists():
        raise UserError(f"proxy model {p} does not exist; give a run directory (with proxy/model) or a proxy "
                        "model directory")
    if not p.is_dir():
        raise UserError(f"proxy model {p} is a file; give a run directory (with proxy/model) or a proxy model "
                        "directory")
    if is_proxy_dir(p):
        return str(p.resolve()), _proxy_model_id(str(p.resolve()))
    inner = p / "proxy" / "model"
    if is_proxy_dir(inner):
        return str(inner.resolve()), f"{p.resolve().name}-proxy"
    if (p / "config.yaml").is_file() or any((p / s / "_manifest.json").is_file() for s in ("pairing", "responses")):
        raise UserError(f"{p} is a run directory without a trained proxy ({inner} is missing); run the pipeline in "
                        "proxy mode first (filtering.proxy.enabled=true), or give a proxy model directory")
    raise UserError(f"{p} is neither a proxy model directory (no {PROXY_CONFIG} in it) nor a run directory with "
                    "proxy/model; give the run directory of a proxy-mode run, or <run>/proxy/model")


# --------------------------------------------------------------------------------------------
# Ray Serve LLM (vLLM on GPUs)
# --------------------------------------------------------------------------------------------


def llm_config_kwargs(teacher, serve, model_source: str) -> dict:
    """Keyword arguments of `ray.serve.llm.LLMConfig` for the teacher on vLLM.

    The engine settings are the pipeline's vLLM backend's (`teacher.vllm`, `teacher.dtype`); the
    replicas and their request cap are the serve section's.
    """
    from compeffdist_ray.teacher.vllm_backend import vllm_engine_kwargs

    v = teacher.vllm
    engine_kwargs = vllm_engine_kwargs(teacher)
    out: dict[str, Any] = {
        "model_loading_config": {"model_id": served_model_id(teacher), "model_source": model_source},
        "engine_kwargs": engine_kwargs,
        "deployment_config": {"num_replicas": serve.num_replicas, "max_ongoing_requests": serve.max_ongoing_requests},
    }
    if v.accelerator_type:
        out["accelerator_type"] = v.accelerator_type
    return out


def guard_settings(teacher, serve, token_digest: str) -> dict:
    """What the token-checking ingress needs: the token's digest, the limits, the teacher's defaults."""
    return {
        "digest": token_digest,
        "limits": dataclasses.asdict(serve.limits),
        "chat_template_kwargs": dict(teacher.chat_template_kwargs),
        "repetition_penalty": teacher.repetition_penalty,
    }


def llm_serving_args(teacher, serve, model_source: str, token_digest: str) -> dict:
    """The argument of `ray.serve.llm.build_openai_app`: one model, behind an ingress that checks the token."""
    return {
        "llm_configs": [llm_config_kwargs(teacher, serve, model_source)],
        "ingress_cls_config": {
            "ingress_cls": VLLM_INGRESS_CLS,
            "ingress_extra_kwargs": {"compeffdist_guard": guard_settings(teacher, serve, token_digest)},
        },
    }


# --------------------------------------------------------------------------------------------
# Serve config files
# --------------------------------------------------------------------------------------------


def serve_config(kind: str, cfg, *, config_path: str | None = None, overrides: list[str] | None = None,
                 model: str | None = None) -> dict:
    """A Serve config (the schema of `serve deploy`) with one application: the teacher or the proxy."""
    s = cfg.serve
    args: dict[str, Any] = {}
    if kind == "teacher":
        app: dict[str, Any] = {"name": s.teacher_app_name, "route_prefix": s.teacher_route_prefix,
                               "import_path": TEACHER_IMPORT_PATH}
    elif kind == "proxy":
        app = {"name": s.proxy_app_name, "route_prefix": s.proxy_route_prefix, "import_path": PROXY_IMPORT_PATH}
        args["model"] = model or f"{cfg.run_dir.rstrip('/')}/proxy/model"
    else:
        raise UserError(f"unknown app {kind!r}: choose teacher or proxy")
    if config_path:
        args["config"] = config_path
    if overrides:
        args["overrides"] = list(overrides)
    app["args"] = args
    return {"proxy_location": "EveryNode", "http_options": {"host": s.host, "port": s.port}, "applications": [app]}


def _command(kind: str, config_path: str | None, overrides: list[str] | None, model: str | None,
             out: str | None) -> str:
    import shlex

    parts = ["compeffdist", "serve", "config", kind]
    if config_path:
        parts += ["--config", config_path]
    if model:
        parts += ["--model", model]
    parts += list(overrides or [])
    if out:
        parts += ["--out", out]
    return " ".join(shlex.quote(p) for p in parts)


def serve_config_yaml(kind: str, cfg, *, config_path: str | None = None, overrides: list[str] | None = None,
                      model: str | None = None, out: str | None = None) -> str:
    """`serve_config` as YAML, under a header with the command that made it and the commands that run it."""
    import yaml

    data = serve_config(kind, cfg, config_path=config_path, overrides=overrides, model=model)
    s = cfg.serve
    target = out or f"{kind}.yaml"
    prefix = "" if (s.teacher_route_prefix if kind == "teacher" else s.proxy_route_prefix) == "/" else (
        s.teacher_route_prefix if kind == "teacher" else s.proxy_route_prefix)
    what = ("the teacher as an OpenAI-compatible chat-completions app "
            f"(POST {prefix}/v1/chat/completions, GET {prefix}/v1/models, GET {prefix}/health)" if kind == "teacher" else
            f"the proxy difficulty model (POST {prefix}/v1/difficulty, GET {prefix}/v1/models, GET {prefix}/health)")
    source = f"the pipeline config {config_path}" if config_path else "the embedded default config"
    lines = [
        f"# Ray Serve config: {what},",
        f"# built from {source} by {data['applications'][0]['import_path']}.",
        "# Generated; regenerate it instead of editing (a test checks that this file is what the command gives):",
        f"#   {_command(kind, config_path, overrides, model, out)}",
        "#",
        "# Every route but /health needs 'Authorization: Bearer <token>'. The token is read where the app is built",
        f"# and runs: the variable {s.token_env}, else serve.token_file; without one the app refuses to start.",
        "# Paths in args are relative to the working directory of the process that builds the app.",
        *(["# http_options.host 0.0.0.0: the Serve proxy listens on every interface (what a Kubernetes Service",
           "# needs); keep the port on a private network, with TLS in front for anything else."]
          if s.host in ("0.0.0.0", "::") else []),
        "#",
        *(["# teacher.backend=vllm: Ray Serve LLM with vLLM; the machine or cluster needs the GPUs the config asks",
           "# for and pip install 'compeffdist-ray[gpu]'."] if kind == "teacher" and cfg.teacher.backend == "vllm" else []),
        "# On this machine, from the repository root (blocks until Ctrl-C):",
        f"#   export {s.token_env}=$(python3 -c 'import secrets; print(secrets.token_urlsafe(32))')",
        f"#   serve run {target}",
        "# On a running Ray cluster (Serve's REST API on the dashboard port, under Ray's own token auth):",
        f"#   RAY_AUTH_MODE=token serve deploy {target} --address http://HEAD:8265",
    ]
    return "\n".join(lines) + "\n" + yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
