"""The teacher on Ray Serve with a tiny random Llama, over real HTTP on loopback (httpx and the
`openai` client), through its DeploymentHandle, and under the pipeline's responses stage.

One Serve instance for the module (on a free port, never 8000), shut down at the end so later
tests in the session start from a clean Ray. The bearer token is set in the environment at
import, before the session's Ray starts, so that Ray's workers (the pipeline's actors) see it
too, as they do when `compeffdist run` is started from a shell that exported it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading

import pytest

from conftest import CONFIGS, ROOT

pytestmark = pytest.mark.integration

TOKEN_ENV = "COMPEFFDIST_SERVE_TOKEN"
os.environ.setdefault(TOKEN_ENV, "test-" + secrets.token_urlsafe(24))
MODEL = "tiny-random-llama"
OVERRIDES = [
    f"teacher.model={MODEL}", "teacher.max_new_tokens=12", "teacher.max_attempts=1", "teacher.num_cpus=0.5",
    "responses.max_new_tokens=12", "serve.num_cpus=0.5", "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.25",
    "serve.limits.max_body_bytes=20000", "serve.limits.max_messages=4", "serve.limits.max_tokens=32",
]
CHAT = [{"role": "user", "content": "The soup was cold and the waiter rude."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(ray_session):
    """(base URL, config) of the teacher app, running for the whole module."""
    from ray import serve

    from compeffdist_ray.config import load_config
    from compeffdist_ray.serving.auth import resolve_token
    from compeffdist_ray.serving.launch import start_app

    cfg = load_config(CONFIGS / "tiny-test.yaml", [*OVERRIDES, f"serve.port={free_port()}"])
    token = resolve_token(cfg.serve.token_env, cfg.serve.token_file)
    where = start_app("teacher", cfg, token)
    yield where["url"], cfg
    serve.shutdown()


@pytest.fixture
def http():
    import httpx

    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {os.environ[TOKEN_ENV]}"}) as client:
        yield client


def chat(client, url: str, **body):
    return client.post(f"{url}/v1/chat/completions", json={"messages": CHAT, "max_tokens": 8, **body})


def assert_completion(resp, max_tokens: int = 8) -> dict:
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["object"] == "chat.completion" and data["model"] == MODEL and data["id"].startswith("chatcmpl-")
    (choice,) = data["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["finish_reason"] in ("stop", "length")
    u = data["usage"]
    assert u["prompt_tokens"] > 0 and 1 <= u["completion_tokens"] <= max_tokens
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    return data


def test_chat_completion_over_http(served, http):
    """Shape and usage; greedy answers repeat. (Equality with the in-process engine: the responses-stage
    tests below, which compare whole artifacts.)"""
    url, _ = served
    data = assert_completion(chat(http, url, temperature=0))
    again = assert_completion(chat(http, url, temperature=0, model=MODEL))
    assert again["choices"][0]["message"] == data["choices"][0]["message"] and again["usage"] == data["usage"]
    short = assert_completion(chat(http, url, max_tokens=2), max_tokens=2)
    assert short["choices"][0]["finish_reason"] in ("length", "stop")


def test_the_openai_client_talks_to_it(served, http):
    import openai

    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=os.environ[TOKEN_ENV], max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [MODEL]
    resp = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, seed=1)
    assert resp.choices[0].message.content == chat(http, url, temperature=0).json()["choices"][0]["message"]["content"]
    assert resp.usage.prompt_tokens > 0 and resp.choices[0].finish_reason in ("stop", "length")
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="not-the-token-0123456789", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=33)


def test_bad_requests_get_4xx_and_the_replica_keeps_serving(served, http):
    import httpx

    url, _ = served
    endpoint = f"{url}/v1/chat/completions"
    wrong = "Bearer wrong-" + secrets.token_hex(12)
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 30_000}]}).encode()

    def chunked():  # no Content-Length: the bytes actually sent count
        for _ in range(30):
            yield b" " * 1000

    cases = [
        ("no token", lambda: httpx.post(endpoint, json={"messages": CHAT}), 401, "missing_api_key"),
        ("wrong token", lambda: httpx.post(endpoint, json={"messages": CHAT}, headers={"Authorization": wrong}), 401,
         "invalid_api_key"),
        ("models without token", lambda: httpx.get(f"{url}/v1/models"), 401, "missing_api_key"),
        ("malformed JSON", lambda: http.post(endpoint, content=b'{"messages": [')
         , 400, "invalid_json"),
        ("declared too large", lambda: http.post(endpoint, content=big), 413, "request_too_large"),
        ("streamed too large", lambda: http.post(endpoint, content=chunked()), 413, "request_too_large"),
        ("empty messages", lambda: http.post(endpoint, json={"messages": []}), 422, "invalid_value"),
        ("too many messages", lambda: http.post(endpoint, json={"messages": CHAT * 5}), 422, "too_many_messages"),
        ("max_tokens over the limit", lambda: chat(http, url, max_tokens=33), 422, "max_tokens_too_large"),
        ("wrong type", lambda: chat(http, url, temperature="warm"), 422, "invalid_value"),
        ("n=2", lambda: chat(http, url, n=2), 422, "invalid_value"),
        ("stream", lambda: chat(http, url, stream=True), 400, "unsupported_stream"),
        ("other model", lambda: chat(http, url, model="gpt-9"), 404, "model_not_found"),
        ("unknown route", lambda: http.get(f"{url}/v2/whatever"), 404, "http_404"),
    ]
    for name, send, status, code in cases:
        resp = send()
        assert resp.status_code == status, (name, resp.status_code, resp.text)
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "code"} and err["code"] == code, (name, err)
        if status == 401:
            assert resp.headers["www-authenticate"].startswith("Bearer"), name
        assert os.environ[TOKEN_ENV] not in resp.text and "wrong-" not in resp.text, name
        assert_completion(chat(http, url))  # the replica is still up and answering


def test_health_needs_no_token(served):
    import httpx

    url, _ = served
    for path in ("/health", "/healthz"):
        resp = httpx.get(url + path)
        assert resp.status_code == 200 and resp.json() == {"status": "ok", "model": MODEL}


def _stats():
    from ray import serve

    return serve.get_app_handle("teacher").stats.remote().result()


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(served, http):
    url, _ = served
    bodies = [dict(messages=[{"role": "user", "content": f"Review number {i}: {'great' if i % 2 else 'awful'} food."}],
                   max_tokens=8, temperature=0) for i in range(5)]
    bodies.append(dict(bodies[0], max_tokens=5))  # other settings in the same batch
    bodies.append(dict(bodies[1], temperature=0.9, seed=7))  # a seeded sample: reproducible
    alone = [http.post(f"{url}/v1/chat/completions", json=b).json() for b in bodies]
    before = len(_stats()["requests_per_batch"])

    results: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def send(i):
        barrier.wait()
        results[i] = http.post(f"{url}/v1/chat/completions", json=bodies[i]).json()

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = _stats()
    batches = stats["requests_per_batch"][before:]
    assert sum(batches) == len(bodies) and max(batches) > 1, stats  # merged by @serve.batch
    for i, (a, b) in enumerate(zip(alone, results)):
        assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"], i
        assert b["usage"] == a["usage"], i
    assert results[5]["usage"]["completion_tokens"] <= 5


def test_the_deployment_handle_answers_like_http(served, http):
    from ray import serve

    url, _ = served
    handle = serve.get_app_handle("teacher")
    body = {"messages": CHAT, "max_tokens": 8, "temperature": 0}
    via_handle = handle.generate.remote(body).result()
    via_http = http.post(f"{url}/v1/chat/completions", json=body).json()
    assert via_handle["choices"] == via_http["choices"] and via_handle["usage"] == via_http["usage"]
    bad = handle.generate.remote({"messages": []}).result()
    assert bad["status"] == 422 and bad["error"]["code"] == "invalid_value"


def test_neither_the_token_nor_a_presented_one_reaches_the_logs(served):
    import pathlib

    import httpx
    import ray

    url, _ = served
    presented = "Bearer leaked-" + secrets.token_hex(16)
    httpx.post(f"{url}/v1/chat/completions", json={"messages": CHAT}, headers={"Authorization": presented})
    httpx.post(f"{url}/v1/chat/completions", content=b"{broken", headers={"Authorization": presented})
    logs = pathlib.Path(ray._private.worker._global_node.get_logs_dir_path())
    secret = os.environ[TOKEN_ENV]
    checked = 0
    for path in logs.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            text = path.read_bytes()
            assert secret.encode() not in text, path
            assert presented.split()[1].encode() not in text, path
            checked += 1
    assert checked > 0


# ------------------------------------------------------------------------------------------
# the pipeline's responses stage against the served teacher
# ------------------------------------------------------------------------------------------


def _write_inputs(run_dir):
    """A tasks and a pairing artifact (3 tasks x 4 texts), as the earlier stages write them."""
    import pandas as pd

    from compeffdist_ray.artifacts import RunDir

    demos = [{"text_id": "d1", "text": "Great value for money.", "output": "positive"},
             {"text_id": "d2", "text": "It broke after a day.", "output": "negative"}]
    tasks = pd.DataFrame({"task_id": ["t0", "t1", "t2"],
                          "instruction": ["Label the sentiment: positive, negative or neutral.",
                                          "Rate the emotion intensity from 1 to 5.",
                                          "Name the aspect the writer complains about."],
                          "demonstrations": [demos, demos[:1], []]})
    texts = ["The battery died after two hours.", "Lovely staff, slow kitchen.", "Meh. It works, I guess.",
             "Best concert of my life!!!"]
    pairs = pd.DataFrame([{"pair_id": f"p{t}{k}", "task_id": f"t{t}", "perspective_id": f"x{t}", "text_id": f"u{k}",
                           "text": texts[k], "match": "random"} for t in range(3) for k in range(4)])
    rd = RunDir(str(run_dir))
    rd.write_table("tasks", "tasks", tasks)
    rd.write_table("pairing", "pairs", pairs)
    return rd


def _responses(cfg, run_dir):
    from compeffdist_ray.stages import load_stage_module
    from compeffdist_ray.stages._common import StageContext
    from compeffdist_ray.teacher import check_backend

    check_backend(cfg.teacher)  # the pipeline's preflight: probe / find the app
    rd = _write_inputs(run_dir)
    out = load_stage_module("responses").run(StageContext(cfg=cfg, run=rd, stage="responses"))
    cols = ["pair_id", "response", "input_tokens", "output_tokens", "truncated"]
    gens = rd.read_df("responses", "generations").sort_values("key").reset_index(drop=True)
    return out, rd.read_df("responses", "responses")[cols].sort_values("pair_id").reset_index(drop=True), gens


@pytest.fixture(scope="module")
def in_process(served, tmp_path_factory):
    """The responses stage with the in-process transformers backend (the reference)."""
    from compeffdist_ray.config import load_config

    cfg = load_config(CONFIGS / "tiny-test.yaml", OVERRIDES)
    return _responses(cfg, tmp_path_factory.mktemp("in-process"))


def _same(got, want):
    import pandas as pd

    out, responses, gens = got
    ref_out, ref_responses, ref_gens = want
    pd.testing.assert_frame_equal(responses, ref_responses)
    gen_cols = ["key", "raw", "ok", "input_tokens", "output_tokens", "finish_reason"]
    pd.testing.assert_frame_equal(gens[gen_cols], ref_gens[gen_cols])
    assert out.tokens == ref_out.tokens and out.rows == ref_out.rows and out.dropped == ref_out.dropped


def test_responses_stage_over_http_equals_in_process(served, in_process, tmp_path):
    from compeffdist_ray.config import load_config

    url, _ = served
    assert len(in_process[2]) == 12 and in_process[0].tokens["output"] > 0
    cfg = load_config(CONFIGS / "tiny-test.yaml", [*OVERRIDES, "teacher.backend=openai", f"teacher.openai.base_url={url}/v1",
                                                   f"teacher.openai.api_key_env={TOKEN_ENV}", "teacher.openai.max_retries=0"])
    _same(_responses(cfg, tmp_path / "http"), in_process)


def test_responses_stage_through_the_handle_equals_in_process(served, in_process, tmp_path):
    from compeffdist_ray.config import load_config

    cfg = load_config(CONFIGS / "tiny-test.yaml", [*OVERRIDES, "teacher.backend=serve", "teacher.serve.app_name=teacher"])
    before = len(_stats()["requests_per_batch"])
    _same(_responses(cfg, tmp_path / "handle"), in_process)
    assert max(_stats()["requests_per_batch"][before:]) > 1  # the actor's 4 requests of a batch were merged


def test_serve_backend_without_the_app_is_one_clear_error(served):
    from compeffdist_ray.config import load_config
    from compeffdist_ray.errors import UserError
    from compeffdist_ray.teacher import check_backend

    cfg = load_config(CONFIGS / "tiny-test.yaml", ["teacher.backend=serve", "teacher.serve.app_name=nope"])
    with pytest.raises(UserError, match="no running Ray Serve app named 'nope'.*compeffdist serve teacher"):
        check_backend(cfg.teacher)


# ------------------------------------------------------------------------------------------
# builders and Ray's own schemas (no Serve needed)
# ------------------------------------------------------------------------------------------


def test_builders_make_applications_and_refuse_without_a_token(monkeypatch, tmp_path):
    from ray.serve import Application

    from compeffdist_ray.errors import UserError
    from compeffdist_ray.serving import build_proxy_app, build_teacher_app

    app = build_teacher_app({"config": str(CONFIGS / "tiny-test.yaml"), "overrides": [f"teacher.model={MODEL}"]})
    assert isinstance(app, Application)
    with pytest.raises(UserError, match="run directory without a trained proxy|does not exist"):
        build_proxy_app({"model": str(tmp_path / "nope")})
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(UserError, match=f"no serve token.*{TOKEN_ENV}"):
        build_teacher_app({"config": str(CONFIGS / "tiny-test.yaml")})
    with pytest.raises(UserError, match="teacher.backend=openai cannot be served"):
        monkeypatch.setenv(TOKEN_ENV, "x" * 20)
        build_teacher_app({"overrides": ["teacher.backend=openai"]})


def test_generated_configs_validate_against_ray_schemas_and_ray_calls_the_builder():
    import yaml
    from ray.serve import Application
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.schema import ServeDeploySchema

    from compeffdist_ray.config import load_config
    from compeffdist_ray.serving.deploy import llm_config_kwargs, serve_config

    for name in ("teacher", "proxy"):
        schema = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "cluster" / "serve" / f"{name}.yaml").read_text()))
        assert schema.applications[0].import_path == f"compeffdist_ray.serving:build_{name}_app"
    # what `serve run` / `serve deploy` do with a config file's application: import, then call with args
    tiny = serve_config("teacher", load_config(CONFIGS / "tiny-test.yaml"), config_path=str(CONFIGS / "tiny-test.yaml"),
                        overrides=[f"teacher.model={MODEL}"])
    (app,) = ServeDeploySchema.model_validate(tiny).applications
    module, attr = app.import_path.split(":")
    builder = getattr(__import__(module, fromlist=[attr]), attr)
    assert isinstance(call_user_app_builder_with_args_if_necessary(builder, app.args), Application)
    try:  # Ray Serve LLM's config model imports without vLLM (its OpenAI app does not)
        from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    except ImportError as exc:
        pytest.skip(f"Ray Serve LLM's LLMConfig is not importable here: {exc}")
    cfg = load_config(CONFIGS / "llama-70b-to-3b.yaml")
    llm = LLMConfig.model_validate(llm_config_kwargs(cfg.teacher, cfg.serve, cfg.teacher.model))
    assert llm.model_id == "meta-llama/Llama-3.1-70B-Instruct" and llm.engine_kwargs["tensor_parallel_size"] == 8
    assert llm.accelerator_type == "H100" and llm.deployment_config["num_replicas"] == 1


SENTIBENCH = ROOT.parent / "shared" / "sentibench"


@pytest.mark.skipif(not (SENTIBENCH / "sc" / "sst2").is_dir(), reason=f"SentiBench not found at {SENTIBENCH}")
def test_compeffdist_eval_of_the_served_teacher(served, tmp_path):
    """`compeffdist eval --model URL`: the served teacher answers every prompt; it sends no logprobs,
    so labels are read from its answers' text (a random tiny model mostly names no label)."""
    from compeffdist_ray.eval_runner import EvalConfig, predictions_dir_for, run_eval

    url, _ = served
    cfg = EvalConfig(model=f"{url}/v1", data_dir=str(SENTIBENCH), datasets=("sst2", "atsa_rest16"), limit=4,
                     k_shot=1, max_new_tokens=16, batch_size=4, api_key_env=TOKEN_ENV)
    result = run_eval(cfg, predictions_dir=predictions_dir_for(tmp_path / "teacher.json"))
    assert result["model_path"] == f"{url}/v1 ({MODEL})"
    clf, absa = result["datasets"]["sc/sst2"], result["datasets"]["absa/atsa_rest16"]
    assert clf["n"] == absa["n"] == 4
    assert sum(clf["read_from"].values()) == 4 and set(clf["read_from"]) <= {"text", "unparsed"}
    assert clf["parse_failures"] == clf["read_from"].get("unparsed", 0)
    saved = [json.loads(line) for line in (tmp_path / "teacher.predictions" / "absa__atsa_rest16.jsonl").open()]
    assert len(saved) == 4 and all(r["finish"] in ("stop", "length") and r["output_tokens"] >= 1 for r in saved)
    assert result["tokens"]["input"] > 0 and result["tokens"]["output"] > 0
