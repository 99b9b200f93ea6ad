"""The pure part of compeffdist_ray.serving: tokens, validation, HTTP handling (Starlette, no Ray),
the vLLM (Ray Serve LLM) arguments, Serve config files, proxy model locations, the serve config section."""

# No `from __future__ import annotations`: FastAPI reads the annotations of the routes defined
# inside the tests below, and local names in strings would not resolve.

import json
import os
import shlex
import stat

import pytest

from compeffdist_ray.config import ConfigError, load_config
from compeffdist_ray.errors import UserError
from compeffdist_ray.serving import auth, deploy
from compeffdist_ray.serving.protocol import (
    ApiError,
    ChatRequest,
    GenDefaults,
    Limits,
    chat_response,
    difficulty_response,
    validate_chat,
    validate_difficulty,
)

from conftest import ROOT

TOKEN = "s3cret-token-for-tests-0123456789"
LIMITS = Limits(max_body_bytes=2000, max_messages=3, max_tokens=64, max_batch_items=4)
DEFAULTS = GenDefaults(max_tokens=32, temperature=0.0, top_p=0.95, repetition_penalty=1.1)
MSG = [{"role": "user", "content": "Hello"}]


# ------------------------------------------------------------------------------------------
# tokens
# ------------------------------------------------------------------------------------------


def test_token_from_env_beats_file_and_never_shows_in_repr(tmp_path):
    f = tmp_path / "tok"
    f.write_text("file-token-0123456789abcdef\n")
    t = auth.resolve_token("MY_TOKEN", str(f), environ={"MY_TOKEN": TOKEN})
    assert t.value == TOKEN and "MY_TOKEN" in t.source
    assert TOKEN not in repr(t) and TOKEN not in t.source
    t2 = auth.resolve_token("MY_TOKEN", str(f), environ={})
    assert t2.value == "file-token-0123456789abcdef" and str(f) in t2.source


def test_no_token_is_refused_with_both_ways_to_set_one():
    with pytest.raises(UserError) as err:
        auth.resolve_token("MY_TOKEN", None, environ={"MY_TOKEN": "  "})
    msg = str(err.value)
    assert "MY_TOKEN" in msg and "serve.token_file" in msg and "secrets.token_urlsafe" in msg and "\n" not in msg


@pytest.mark.parametrize("value, fragment", [("short", "at least 16"), ("has a space in it 0123456", "whitespace")])
def test_weak_tokens_are_refused_without_echoing_them(value, fragment):
    with pytest.raises(UserError, match=fragment) as err:
        auth.resolve_token("T", None, environ={"T": value})
    assert value not in str(err.value)


def test_missing_or_empty_token_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        auth.resolve_token("T", str(tmp_path / "nope"), environ={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UserError, match="is empty"):
        auth.resolve_token("T", str(tmp_path / "empty"), environ={})


def test_generated_token_file_is_0600_reused_and_refused_when_readable_by_others(tmp_path):
    path = tmp_path / "serve" / "token"
    first = auth.resolve_token("T", None, environ={}, generated_file=path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and "generated now" in first.source
    assert len(first.value) >= 40 and first.value not in first.source
    again = auth.resolve_token("T", None, environ={}, generated_file=path)
    assert again.value == first.value and "generated earlier" in again.source
    os.chmod(path, 0o644)
    with pytest.raises(UserError, match="readable by others"):
        auth.resolve_token("T", None, environ={}, generated_file=path)


@pytest.mark.parametrize("header, ok", [
    (f"Bearer {TOKEN}", True), (f"bearer {TOKEN}", True), (f"  Bearer   {TOKEN}  ", True),
    (None, False), ("", False), ("Bearer", False), ("Bearer ", False), (f"Basic {TOKEN}", False),
    (f"Bearer {TOKEN}x", False), (f"Bearer {TOKEN[:-1]}", False), (TOKEN, False), ("Bearer \udcff", False),
])
def test_bearer_check(header, ok):
    assert auth.bearer_ok(header, auth.token_digest(TOKEN)) is ok


def test_the_digest_is_not_the_token_and_a_bad_digest_never_matches():
    digest = auth.token_digest(TOKEN)
    assert TOKEN not in digest and len(digest) == 64
    assert not auth.bearer_ok(f"Bearer {TOKEN}", "not-hex")
    assert not auth.bearer_ok(f"Bearer {TOKEN}", "")


# ------------------------------------------------------------------------------------------
# chat and difficulty requests
# ------------------------------------------------------------------------------------------


def test_valid_chat_request_takes_the_teacher_defaults():
    req = validate_chat({"messages": MSG}, LIMITS, DEFAULTS, "m")
    assert req == ChatRequest((("user", "Hello"),), 32, 0.0, 0.95, 1.1, None)
    full = validate_chat({"model": "m", "messages": [{"role": "system", "content": "Be brief."}, *MSG],
                          "max_tokens": 64, "temperature": 0.7, "top_p": 0.5, "seed": 3, "n": 1, "stream": False,
                          "repetition_penalty": 1.0, "user": "ignored"}, LIMITS, DEFAULTS, "m")
    assert (full.max_tokens, full.temperature, full.top_p, full.seed, full.repetition_penalty) == (64, 0.7, 0.5, 3, 1.0)
    assert full.message_dicts()[0] == {"role": "system", "content": "Be brief."}
    parts = validate_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                     {"type": "text", "text": "b"}]}],
                           "max_completion_tokens": 5}, LIMITS, DEFAULTS, "m")
    assert parts.messages == (("user", "ab"),) and parts.max_tokens == 5


@pytest.mark.parametrize("body, status, fragment", [
    ([1, 2], 422, "must be a JSON object"),
    ({}, 422, "'messages' is required"),
    ({"messages": "hi"}, 422, "got a string"),
    ({"messages": []}, 422, "'messages' is empty"),
    ({"messages": MSG * 4}, 422, "has 4 messages; at most 3"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 422, "role must be one of"),
    ({"messages": [{"role": "user", "content": 5}]}, 422, "content must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 422, "text part"),
    ({"messages": ["hi"]}, 422, "messages[0] must be an object"),
    ({"messages": MSG, "max_tokens": 65}, 422, "'max_tokens' is 65; at most 64"),
    ({"messages": MSG, "max_tokens": 0}, 422, "positive integer"),
    ({"messages": MSG, "max_tokens": "10"}, 422, "positive integer, got a string"),
    ({"messages": MSG, "max_tokens": True}, 422, "positive integer"),
    ({"messages": MSG, "temperature": 3}, 422, "'temperature' must be in [0, 2]"),
    ({"messages": MSG, "temperature": "hot"}, 422, "'temperature' must be a number"),
    ({"messages": MSG, "top_p": 0}, 422, "'top_p' must be in (0, 1]"),
    ({"messages": MSG, "seed": 1.5}, 422, "'seed' must be an integer"),
    ({"messages": MSG, "n": 2}, 422, "'n' must be 1"),
    ({"messages": MSG, "stream": True}, 400, "streaming is not supported"),
    ({"messages": MSG, "stop": ["\n"]}, 400, "stop sequences are not supported"),
    ({"messages": MSG, "model": "other"}, 404, "is not served here"),
    ({"messages": MSG, "model": 3}, 422, "'model' must be a string"),
])
def test_invalid_chat_requests(body, status, fragment):
    with pytest.raises(ApiError) as err:
        validate_chat(body, LIMITS, DEFAULTS, "m")
    assert err.value.status == status and fragment in err.value.message, err.value.message
    assert set(err.value.body()["error"]) == {"message", "type", "code"}


def test_batch_keys_merge_only_requests_that_get_the_same_answer_together():
    greedy = [validate_chat({"messages": MSG, "max_tokens": 8, "seed": s, "top_p": p}, LIMITS, DEFAULTS, "m")
              for s, p in ((1, 0.5), (2, 0.9), (None, 1.0))]
    assert len({r.batch_key() for r in greedy}) == 1  # greedy ignores seed and top_p
    other_len = validate_chat({"messages": MSG, "max_tokens": 9}, LIMITS, DEFAULTS, "m")
    assert other_len.batch_key() != greedy[0].batch_key()
    seeded = [validate_chat({"messages": MSG, "temperature": 0.7, "seed": 1}, LIMITS, DEFAULTS, "m") for _ in range(2)]
    assert seeded[0].batch_key() != seeded[1].batch_key()  # each seeded sample alone: reproducible
    unseeded = [validate_chat({"messages": MSG, "temperature": 0.7}, LIMITS, DEFAULTS, "m") for _ in range(2)]
    assert unseeded[0].batch_key() == unseeded[1].batch_key()


def test_response_shapes():
    r = chat_response("m", "hi", 7, 2, "length", created=5)
    assert r["object"] == "chat.completion" and r["model"] == "m" and r["created"] == 5
    assert r["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "length",
                             "logprobs": None}]
    assert r["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    assert difficulty_response("p", "rank_score", [0.25, 1]) == {
        "object": "difficulty.list", "model": "p", "target": "rank_score", "difficulties": [0.25, 1.0]}


def test_difficulty_requests():
    req = validate_difficulty({"items": [{"instruction": "Label it.", "text": "Good."},
                                         {"instruction": "", "text": "Bad.", "extra": 1}]}, LIMITS, "p")
    assert req.instructions == ("Label it.", "") and req.texts == ("Good.", "Bad.") and len(req) == 2
    for body, fragment in [
        ({}, "'items' is required"), ({"items": {}}, "got an object"), ({"items": []}, "'items' is empty"),
        ({"items": [{"instruction": "i", "text": "t"}] * 5}, "has 5 items; at most 4"),
        ({"items": ["t"]}, "items[0] must be an object"), ({"items": [{"text": "t"}]}, "items[0].instruction"),
        ({"items": [{"instruction": "i", "text": 3}]}, "items[0].text must be a string"),
        ({"items": [{"instruction": "i", "text": "  "}]}, "items[0].text is empty"),
    ]:
        with pytest.raises(ApiError) as err:
            validate_difficulty(body, LIMITS, "p")
        assert err.value.status == 422 and fragment in err.value.message, (body, err.value.message)
    with pytest.raises(ApiError) as err:
        validate_difficulty({"model": "q", "items": [{"instruction": "i", "text": "t"}]}, LIMITS, "p")
    assert err.value.status == 404


# ------------------------------------------------------------------------------------------
# HTTP handling, on a plain Starlette app (what the Serve deployments run per route)
# ------------------------------------------------------------------------------------------


@pytest.fixture
def client():
    from fastapi import FastAPI, Request
    from fastapi.testclient import TestClient

    from compeffdist_ray.serving.web import handle_get, handle_json, install_error_handlers

    app = FastAPI()
    install_error_handlers(app)
    digest = auth.token_digest(TOKEN)
    seen = []

    async def echo(body):
        if body.get("boom"):
            raise RuntimeError("handler bug")
        req = validate_chat(body, LIMITS, DEFAULTS, "m")
        seen.append(req)
        return chat_response("m", req.messages[-1][1], 1, 1, "stop")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle_json(request, digest=digest, limits=LIMITS, handler=echo)

    @app.get("/v1/models")
    async def models(request: Request):
        async def listing():
            return {"data": []}
        return await handle_get(request, digest=digest, handler=listing)

    return TestClient(app, raise_server_exceptions=False), seen


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _is_error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "code"}
    if code:
        assert err["code"] == code, err
    return err


def test_http_auth_comes_first_and_is_never_echoed(client):
    c, seen = client
    for headers, code in (({}, "missing_api_key"), ({"Authorization": "Bearer wrong-token-abcdefghijkl"}, "invalid_api_key"),
                          ({"Authorization": f"Basic {TOKEN}"}, "invalid_api_key")):
        r = c.post("/v1/chat/completions", headers=headers, json={"messages": MSG})
        err = _is_error(r, 401, code)
        assert r.headers["www-authenticate"].startswith('Bearer realm="compeffdist"')
        assert TOKEN not in r.text and "wrong-token" not in r.text and err["type"] == "authentication_error"
    # no token and a huge or broken body: still 401, nothing read
    _is_error(c.post("/v1/chat/completions", content=b"x" * 10_000), 401)
    _is_error(c.get("/v1/models"), 401)
    assert c.get("/v1/models", headers=AUTH).json() == {"data": []}
    assert not seen


def test_http_body_limits_json_and_validation(client):
    c, seen = client
    _is_error(c.post("/v1/chat/completions", headers=AUTH, content=b"{nope"), 400, "invalid_json")
    _is_error(c.post("/v1/chat/completions", headers=AUTH, content=b""), 400, "invalid_json")
    _is_error(c.post("/v1/chat/completions", headers=AUTH, content=b"\xff\xfe"), 400, "invalid_json")
    _is_error(c.post("/v1/chat/completions", headers=AUTH, content=b"[" * 100_0), 400, "invalid_json")
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 3000}]}).encode()
    err = _is_error(c.post("/v1/chat/completions", headers=AUTH, content=big), 413, "request_too_large")
    assert "at most 2000" in err["message"]

    def chunks():  # no Content-Length: the real size counts
        for _ in range(10):
            yield b" " * 500
    _is_error(c.post("/v1/chat/completions", headers=AUTH, content=chunks()), 413, "request_too_large")
    _is_error(c.post("/v1/chat/completions", headers={**AUTH, "Content-Length": "abc"}, content=b"{}"), 400)
    _is_error(c.post("/v1/chat/completions", headers=AUTH, json={"messages": []}), 422, "invalid_value")
    _is_error(c.post("/v1/chat/completions", headers=AUTH, json={"messages": MSG, "boom": True}), 500, "internal_error")
    ok = c.post("/v1/chat/completions", headers=AUTH, json={"messages": MSG})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "Hello"
    assert len(seen) == 1


def test_unknown_routes_and_methods_answer_in_the_error_shape(client):
    c, _ = client
    assert "no route GET /nope" in _is_error(c.get("/nope", headers=AUTH), 404)["message"]
    _is_error(c.get("/v1/chat/completions", headers=AUTH), 405)


def test_with_guard_wraps_someone_elses_ingress_methods():
    """The GPU path wraps Ray Serve LLM's ingress methods this way (checked here on a stand-in class)."""
    from types import SimpleNamespace

    from fastapi import FastAPI, Request
    from fastapi.testclient import TestClient
    from pydantic import BaseModel

    from compeffdist_ray.serving.web import with_guard

    class Body(BaseModel):
        messages: list
        max_tokens: int | None = None

    class Ingress:
        async def chat(self, body: Body, request: Request) -> dict:
            return {"n": len(body.messages), "path": request.url.path}

        async def models(self) -> dict:
            return {"data": ["m"]}

    def check(guard, body):
        if body.max_tokens and body.max_tokens > guard.limits.max_tokens:
            raise ApiError(422, "too many tokens")

    class Guarded(Ingress):
        pass

    Guarded.chat = with_guard(Ingress.chat, check_body=check)
    Guarded.models = with_guard(Ingress.models)
    inst = Guarded()
    inst._compeffdist_guard = SimpleNamespace(digest=auth.token_digest(TOKEN), limits=LIMITS)
    app = FastAPI()
    app.post("/v1/chat/completions")(inst.chat)
    app.get("/v1/models")(inst.models)
    c = TestClient(app)
    assert c.post("/v1/chat/completions", json={"messages": [1, 2]}).status_code == 401
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers=AUTH).json() == {"data": ["m"]}
    assert c.post("/v1/chat/completions", headers=AUTH, json={"messages": [1, 2]}).json() == {
        "n": 2, "path": "/v1/chat/completions"}
    assert c.post("/v1/chat/completions", headers=AUTH, json={"messages": [1], "max_tokens": 99}).status_code == 422
    big = {"messages": ["x" * 3000]}
    assert c.post("/v1/chat/completions", headers=AUTH, json=big).status_code == 413


# ------------------------------------------------------------------------------------------
# vLLM (Ray Serve LLM) arguments, Serve config files, builder args, proxy locations
# ------------------------------------------------------------------------------------------


def test_llm_config_kwargs_for_the_cluster_profile():
    cfg = load_config(ROOT / "configs" / "llama-70b-to-3b.yaml", ["serve.num_replicas=2"])
    kw = deploy.llm_config_kwargs(cfg.teacher, cfg.serve, cfg.teacher.model)
    assert kw == {
        "model_loading_config": {"model_id": "meta-llama/Llama-3.1-70B-Instruct",
                                 "model_source": "meta-llama/Llama-3.1-70B-Instruct"},
        "engine_kwargs": {"tensor_parallel_size": 8, "pipeline_parallel_size": 1, "max_model_len": 8192,
                          "gpu_memory_utilization": 0.9, "dtype": "bfloat16"},
        "deployment_config": {"num_replicas": 2, "max_ongoing_requests": 32},
        "accelerator_type": "H100",
    }
    qwen = load_config(ROOT / "configs" / "qwen3-32b-to-4b.yaml",
                       ["teacher.served_model_name=qwen", "teacher.vllm.engine_kwargs={enforce_eager: true}"])
    args = deploy.llm_serving_args(qwen.teacher, qwen.serve, "/models/qwen", auth.token_digest(TOKEN))
    (llm,) = args["llm_configs"]
    assert llm["model_loading_config"] == {"model_id": "qwen", "model_source": "/models/qwen"}
    assert llm["engine_kwargs"]["enforce_eager"] is True and llm["engine_kwargs"]["tensor_parallel_size"] == 2
    ingress = args["ingress_cls_config"]
    assert ingress["ingress_cls"] == "compeffdist_ray.serving.vllm_ingress:TokenOpenAiIngress"
    guard = ingress["ingress_extra_kwargs"]["compeffdist_guard"]
    assert guard["digest"] == auth.token_digest(TOKEN) and TOKEN not in json.dumps(args)
    assert guard["chat_template_kwargs"] == {"enable_thinking": False}
    assert guard["limits"] == {"max_body_bytes": 1_000_000, "max_messages": 64, "max_tokens": 4096,
                               "max_batch_items": 256}


def _header_command(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    return shlex.split(lines[lines.index(next(ln for ln in lines if ln.startswith("# Generated"))) + 1][1:])


@pytest.mark.parametrize("name", ["teacher", "proxy"])
def test_shipped_serve_configs_are_what_the_command_in_their_header_generates(name):
    import yaml

    from compeffdist_ray.cli import build_parser

    path = ROOT / "cluster" / "serve" / f"{name}.yaml"
    argv = _header_command(path)
    assert argv[:4] == ["compeffdist", "serve", "config", name] and f"cluster/serve/{name}.yaml" in argv
    args, extra = build_parser().parse_known_args(argv[1:])  # as cli.main does: overrides may follow options
    args.overrides = list(args.overrides or []) + extra
    cfg = load_config(args.config, args.overrides)
    text = deploy.serve_config_yaml(args.app, cfg, config_path=args.config, overrides=args.overrides,
                                    model=args.model, out=args.out)
    assert text == path.read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    (app,) = data["applications"]
    assert app["import_path"] == f"compeffdist_ray.serving:build_{name}_app"
    assert app["args"]["config"] == "configs/llama-70b-to-3b.yaml"
    assert f"serve run cluster/serve/{name}.yaml" in text and f"serve deploy cluster/serve/{name}.yaml" in text


def test_serve_config_for_the_defaults_and_an_explicit_proxy_model():
    cfg = load_config(None, ["serve.port=8123"])
    data = deploy.serve_config("proxy", cfg, model="runs/proxy")
    assert data["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert data["applications"] == [{"name": "proxy", "route_prefix": "/proxy",
                                     "import_path": "compeffdist_ray.serving:build_proxy_app",
                                     "args": {"model": "runs/proxy"}}]
    assert deploy.serve_config("teacher", cfg)["applications"][0]["args"] == {}
    assert deploy.serve_config("proxy", cfg)["applications"][0]["args"]["model"] == "runs/local-demo/proxy/model"
    with pytest.raises(UserError):
        deploy.serve_config("student", cfg)


def test_builder_args():
    assert deploy.parse_teacher_args({"config": "c.yaml", "overrides": ["a=1"]}) == ("c.yaml", ["a=1"])
    assert deploy.parse_teacher_args(None) == (None, [])
    assert deploy.parse_teacher_args({"overrides": "a=1 b.c=2"}) == (None, ["a=1", "b.c=2"])
    with pytest.raises(UserError, match="unknown application args 'cfg'; known: config, overrides"):
        deploy.parse_teacher_args({"cfg": "x"})
    with pytest.raises(UserError, match="list of 'key.path=value'"):
        deploy.parse_teacher_args({"overrides": [3]})
    assert deploy.parse_proxy_args({"model": "runs/x"}) == ("runs/x", None, [])
    with pytest.raises(UserError, match="'model' is required"):
        deploy.parse_proxy_args({})


def _fake_proxy(d):
    d.mkdir(parents=True)
    for name in ("proxy_config.json", "proxy_head.safetensors", "config.json"):
        (d / name).write_text("{}")
    return d


def test_proxy_model_locations(tmp_path):
    run = tmp_path / "myrun"
    model = _fake_proxy(run / "proxy" / "model")
    assert deploy.resolve_proxy_model(str(run)) == (str(model.resolve()), "myrun-proxy")
    assert deploy.resolve_proxy_model(str(model)) == (str(model.resolve()), "myrun-proxy")
    other = _fake_proxy(tmp_path / "my-proxy")
    assert deploy.resolve_proxy_model(str(other)) == (str(other.resolve()), "my-proxy")
    assert deploy.resolve_proxy_model("s3://b/runs/r1") == ("s3://b/runs/r1", "r1-proxy")
    assert deploy.resolve_proxy_model("s3://b/runs/r1/proxy/model/") == ("s3://b/runs/r1/proxy/model", "r1-proxy")

    with pytest.raises(UserError, match="does not exist"):
        deploy.resolve_proxy_model(str(tmp_path / "nope"))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        deploy.resolve_proxy_model(str(tmp_path / "f.txt"))
    bare = tmp_path / "run-without-proxy"
    bare.mkdir()
    (bare / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(UserError, match="run directory without a trained proxy.*filtering.proxy.enabled=true"):
        deploy.resolve_proxy_model(str(bare))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a proxy model directory"):
        deploy.resolve_proxy_model(str(tmp_path / "empty"))


# ------------------------------------------------------------------------------------------
# the serve config section
# ------------------------------------------------------------------------------------------


def test_serve_section_defaults():
    s = load_config(None).serve
    assert (s.host, s.port, s.token_env, s.token_file) == ("127.0.0.1", 8000, "COMPEFFDIST_SERVE_TOKEN", None)
    assert (s.teacher_route_prefix, s.proxy_route_prefix) == ("/", "/proxy")
    assert load_config(None).teacher.serve.app_name == s.teacher_app_name == "teacher"


def test_serve_section_validation_reports_every_problem():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["serve.port=70000", "serve.teacher_route_prefix=v1", "serve.proxy_route_prefix=/p/",
                           "serve.num_replicas=0", "serve.limits.max_tokens=0", "serve.batch_wait_timeout_s=-1",
                           "serve.proxy_app_name=teacher", "serve.host="])
    msg = str(err.value)
    for fragment in ("8 problems", "serve.port: must be a TCP port", "serve.teacher_route_prefix: a route prefix",
                     "serve.proxy_route_prefix: a route prefix", "serve.num_replicas: must be > 0",
                     "serve.limits.max_tokens: must be > 0", "serve.batch_wait_timeout_s: must be >= 0",
                     "serve.proxy_app_name: must differ", "serve.host: must not be empty"):
        assert fragment in msg, (fragment, msg)
    with pytest.raises(ConfigError, match="teacher.backend: expected one of .*'serve', got 'servee'"):
        load_config(None, ["teacher.backend=servee"])
    assert load_config(None, ["teacher.backend=serve", "teacher.serve.app_name=t2"]).teacher.serve.app_name == "t2"
