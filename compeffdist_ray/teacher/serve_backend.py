"""Teacher generation from a running Ray Serve teacher app, through its DeploymentHandle (no HTTP).

`teacher.backend=serve` with `teacher.serve.app_name` (default `teacher`, what `compeffdist serve
teacher` deploys) on the same Ray cluster as the pipeline. Each Ray Data actor holds a handle
and sends every conversation of its batch at once; the app's `@serve.batch` merges them (and
those of other actors) into model batches. The request body is the OpenAI one the HTTP route
takes, and goes through the same validation and limits; token counts come from its `usage`.
"""

from __future__ import annotations

from compeffdist_ray.errors import UserError
from compeffdist_ray.teacher.base import Generation, GenParams, Messages

__all__ = ["ServeBackend", "get_teacher_handle"]


def get_teacher_handle(app_name: str):
    """The handle of the Serve app `app_name`, or UserError saying how to start it."""
    from ray import serve

    try:
        return serve.get_app_handle(app_name)
    except Exception as exc:  # noqa: BLE001 - RayServeException / no Serve instance: one clear line
        raise UserError(f"no running Ray Serve app named '{app_name}' on this Ray cluster ({type(exc).__name__}); "
                        f"start it with 'compeffdist serve teacher' on the same cluster, or set teacher.serve.app_name"
                        ) from None


class ServeBackend:
    def __init__(self, *, app_name: str, model: str):
        self.app_name = app_name
        self.model = model
        self.handle = get_teacher_handle(app_name)
        self.requests_sent = 0

    def body(self, messages: Messages, params: GenParams) -> dict:
        body = {"model": self.model, "messages": messages, "max_tokens": params.max_new_tokens,
                "temperature": params.temperature, "repetition_penalty": params.repetition_penalty}
        if params.temperature > 0:
            body["top_p"] = params.top_p
        if params.seed is not None:
            body["seed"] = params.seed
        return body

    @staticmethod
    def to_generation(answer) -> Generation:
        if not isinstance(answer, dict):
            return Generation("", 0, 0, "error", f"unexpected answer of type {type(answer).__name__}")
        if "error" in answer:
            err = answer["error"] or {}
            status = answer.get("status")
            if status == 404:  # the app serves another model: no retry can fix that
                raise UserError(f"Serve app answered: {err.get('message')} (set teacher.served_model_name or "
                                "teacher.model to the served model)")
            return Generation("", 0, 0, "error", f"HTTP {status}: {err.get('message')}")
        try:
            choice = answer["choices"][0]
            usage = answer.get("usage") or {}
            return Generation(text=(choice["message"]["content"] or "").strip(),
                              input_tokens=int(usage.get("prompt_tokens") or 0),
                              output_tokens=int(usage.get("completion_tokens") or 0),
                              finish_reason="length" if choice.get("finish_reason") == "length" else "stop")
        except (KeyError, IndexError, TypeError, ValueError):
            return Generation("", 0, 0, "error", "malformed answer from the Serve app")

    def generate(self, conversations: list[Messages], params: GenParams) -> list[Generation]:
        responses = [self.handle.generate.remote(self.body(m, params)) for m in conversations]
        self.requests_sent += len(responses)
        out = []
        for r in responses:
            try:
                out.append(self.to_generation(r.result()))
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - replica died, app deleted: the row is retried or dropped
                out.append(Generation("", 0, 0, "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"))
        return out

    def close(self) -> None:
        pass
