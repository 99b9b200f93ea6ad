"""`compeffdist serve teacher|proxy`: start a Serve app on the local Ray (or `ray.address`), print
where it listens and where its token comes from, block until Ctrl-C (or SIGTERM), stop cleanly.

Everything that can be checked before Ray starts is checked first and ends the command with one
line (exit 2): the token, the model (a teacher alias or path, a proxy directory), the backend,
and whether the port is free.
"""

from __future__ import annotations

import logging
import signal
import socket
import time
from typing import Callable

from compeffdist_ray.config import Config
from compeffdist_ray.errors import UserError
from compeffdist_ray.serving.auth import Token, default_token_file, resolve_token
from compeffdist_ray.serving.deploy import resolve_proxy_model, served_model_id

log = logging.getLogger("compeffdist_ray")

__all__ = ["check_port_free", "serve_forever", "start_app", "url_of"]


def check_port_free(host: str, port: int) -> None:
    """UserError when something already listens on (host, port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except PermissionError:
            raise UserError(f"port {port} on {host} needs privileges to listen on; choose --port above 1023") from None
        except OSError as exc:
            raise UserError(f"port {port} on {host} is in use ({exc.strerror or exc}); stop what listens there or "
                            "choose another with --port") from None


def url_of(host: str, port: int, route_prefix: str) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else (f"[{host}]" if ":" in host and host != "::" else host)
    if host == "::":
        shown = "[::1]"
    return f"http://{shown}:{port}{'' if route_prefix == '/' else route_prefix}"


def _preflight(kind: str, cfg: Config, model: str | None) -> tuple[str, str]:
    """(app name, route prefix) after checking the model and the backend (UserError otherwise)."""
    if kind == "teacher":
        backend = cfg.teacher.backend
        if backend not in ("transformers", "vllm"):
            raise UserError(f"teacher.backend={backend} cannot be served: 'compeffdist serve teacher' runs the "
                            "transformers engine (CPU or GPU) or vLLM (GPUs); set teacher.backend=transformers or vllm")
        from compeffdist_ray.models import resolve_model

        resolve_model(cfg.teacher.model)
        return cfg.serve.teacher_app_name, cfg.serve.teacher_route_prefix
    if not model:
        raise UserError("serve proxy needs --model RUN_DIR_OR_PATH (a proxy-mode run directory or its proxy/model)")
    resolve_proxy_model(model)
    return cfg.serve.proxy_app_name, cfg.serve.proxy_route_prefix


def start_app(kind: str, cfg: Config, token: Token, *, model: str | None = None, host: str | None = None,
              port: int | None = None) -> dict:
    """Start Serve (if needed) on the Ray this process is connected to, or on a new local Ray (then the
    port is checked first), and deploy the app; returns its name, route prefix, URL and whether Ray
    was started here (then stopping shuts Ray down too; otherwise only the app is deleted)."""
    import ray
    from ray import serve

    from compeffdist_ray.pipeline import ensure_ray
    from compeffdist_ray.serving.apps import proxy_app, teacher_app

    host = host or cfg.serve.host
    port = port or cfg.serve.port
    name, prefix = _preflight(kind, cfg, model)
    local = cfg.ray.address is None and not ray.is_initialized()
    if local:
        check_port_free(host, port)
    app = (teacher_app(cfg, token_digest=token.digest) if kind == "teacher"
           else proxy_app(model, cfg, token_digest=token.digest))
    ensure_ray(cfg)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix=prefix, blocking=False)
    return {"name": name, "route_prefix": prefix, "url": url_of(host, port, prefix), "started_ray": local}


def serve_forever(kind: str, cfg: Config, *, model: str | None = None, host: str | None = None,
                  port: int | None = None, out: Callable[[str], None] | None = None) -> int:
    out = out or (lambda line: print(line, flush=True))
    _preflight(kind, cfg, model)  # before a token file is generated for a command that cannot start
    token = resolve_token(cfg.serve.token_env, cfg.serve.token_file, generated_file=default_token_file())
    where = start_app(kind, cfg, token, model=model, host=host, port=port)
    from ray import serve

    url = where["url"]
    if kind == "teacher":
        out(f"teacher '{served_model_id(cfg.teacher)}' ({cfg.teacher.backend}) is served at {url}/v1 "
            f"(OpenAI-compatible: POST {url}/v1/chat/completions; app '{where['name']}')")
    else:
        out(f"proxy difficulty model is served at {url}/v1/difficulty (app '{where['name']}')")
    out(f"health (no token): {url}/health")
    out(f"bearer token: from {token.source}; clients send 'Authorization: Bearer <token>'")
    out("Ctrl-C stops it")

    def _stop(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM (kill, Kubernetes) stops as cleanly as Ctrl-C; SIGINT too when the shell started the
    # command in the background (`&` in a script leaves SIGINT ignored).
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        out(f"stopping app '{where['name']}'")
        if where["started_ray"]:
            serve.shutdown()
            import ray

            ray.shutdown()
        else:
            serve.delete(where["name"])
    out("stopped")
    return 0
