"""The proxy difficulty model on Ray Serve: a small proxy trained on the spot (tiny random Llama
backbone, ridge head) with compeffdist_ray.proxy's own functions, served from a run directory,
over real HTTP on loopback and through its DeploymentHandle. One Serve instance for the module."""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import threading

import numpy as np
import pytest

from conftest import CONFIGS

pytestmark = pytest.mark.integration

TOKEN = "proxy-test-" + secrets.token_urlsafe(24)
TASKS = ("Decide whether the writer's opinion is positive, negative or neutral. Answer with one label.",
         "Rate the emotion intensity of the text from 1 to 5.")
TEXTS = ["The battery died after two hours.", "Lovely staff, slow kitchen.", "Meh. It works, I guess.",
         "Best concert of my life!!!", "The plot made no sense at all.", "Fast delivery, good price.",
         "I waited forty minutes for a cold pizza.", "Solid build, terrible manual."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def items(n: int, offset: int = 0) -> list[dict]:
    return [{"instruction": TASKS[(k + offset) % 2], "text": TEXTS[(k * 3 + offset) % len(TEXTS)]} for k in range(n)]


@pytest.fixture(scope="module")
def proxy_run(tmp_path_factory):
    """A run directory whose proxy/model holds a proxy trained like the proxy stage trains one."""
    import pandas as pd

    from compeffdist_ray.proxy import ProxyParams, train_proxy

    rng = random.Random(0)
    rows = pd.DataFrame([{"task_id": f"t{k % 2}", "instruction": TASKS[k % 2], "text": f"{TEXTS[k % len(TEXTS)]} #{k}",
                          "rank_score": rng.uniform(0.05, 0.6)} for k in range(24)])
    model, _ = train_proxy(rows, ProxyParams(backbone="tiny-random-llama", max_length=128))
    run = tmp_path_factory.mktemp("proxy-run")
    model.save(run / "proxy" / "model")
    (run / "config.yaml").write_text("seed: 0\n")
    return run


@pytest.fixture(scope="module")
def served(ray_session, proxy_run):
    from ray import serve

    from compeffdist_ray.config import load_config
    from compeffdist_ray.serving.auth import Token
    from compeffdist_ray.serving.launch import start_app

    cfg = load_config(CONFIGS / "tiny-test.yaml", [
        "serve.num_cpus=0.5", f"serve.port={free_port()}", "serve.max_batch_size=8", "serve.batch_wait_timeout_s=0.25",
        "serve.limits.max_batch_items=6", "serve.limits.max_body_bytes=20000"])
    where = start_app("proxy", cfg, Token(TOKEN, "test"), model=str(proxy_run))
    assert where["url"].endswith("/proxy")
    yield where["url"]
    serve.shutdown()


@pytest.fixture
def http():
    import httpx

    with httpx.Client(timeout=120, headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def predict(http, url, body):
    return http.post(f"{url}/v1/difficulty", json=body)


def test_difficulties_in_order_equal_the_loaded_proxy(served, http, proxy_run):
    from compeffdist_ray.proxy import load_proxy

    batch = items(5)
    resp = predict(http, served, {"items": batch})
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["object"] == "difficulty.list" and data["model"] == f"{proxy_run.name}-proxy"
    assert data["target"] == "rank_score" and len(data["difficulties"]) == 5
    local = load_proxy(proxy_run / "proxy" / "model").predict([b["instruction"] for b in batch], [b["text"] for b in batch])
    np.testing.assert_allclose(data["difficulties"], local, rtol=1e-5, atol=1e-6)
    # order: the same items reversed give the same values reversed
    rev = predict(http, served, {"items": batch[::-1]}).json()["difficulties"]
    np.testing.assert_allclose(rev, data["difficulties"][::-1], rtol=1e-5, atol=1e-6)
    assert http.get(f"{served}/v1/models").json()["data"][0]["id"] == f"{proxy_run.name}-proxy"


def test_bad_requests_get_4xx_and_the_replica_keeps_serving(served, http):
    import httpx

    endpoint = f"{served}/v1/difficulty"
    ok = {"items": items(2)}
    cases = [
        ("no token", lambda: httpx.post(endpoint, json=ok), 401),
        ("wrong token", lambda: httpx.post(endpoint, json=ok, headers={"Authorization": "Bearer nope-0123456789abcdef"}), 401),
        ("malformed JSON", lambda: http.post(endpoint, content=b"{items: }"), 400),
        ("too large", lambda: http.post(endpoint, content=json.dumps({"items": [{"instruction": "i", "text": "x" * 30_000}]})), 413),
        ("too many items", lambda: predict(http, served, {"items": items(7)}), 422),
        ("wrong types", lambda: predict(http, served, {"items": [{"instruction": 1, "text": "t"}]}), 422),
        ("empty", lambda: predict(http, served, {"items": []}), 422),
        ("not an object", lambda: predict(http, served, ["x"]), 422),
    ]
    for name, send, status in cases:
        resp = send()
        assert resp.status_code == status, (name, resp.text)
        assert set(resp.json()["error"]) == {"message", "type", "code"}, name
        if status == 401:
            assert resp.headers["www-authenticate"].startswith("Bearer") and TOKEN not in resp.text
        good = predict(http, served, ok)
        assert good.status_code == 200 and len(good.json()["difficulties"]) == 2, name


def test_health_needs_no_token(served):
    import httpx

    assert httpx.get(f"{served}/health").json()["status"] == "ok"
    assert httpx.get(f"{served}/v1/models").status_code == 401


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(served, http):
    from ray import serve

    handle = serve.get_app_handle("proxy")
    bodies = [{"items": items(1 + k % 3, offset=k)} for k in range(6)]
    alone = [predict(http, served, b).json()["difficulties"] for b in bodies]
    before = len(handle.stats.remote().result()["requests_per_batch"])
    results: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def send(i):
        barrier.wait()
        results[i] = predict(http, served, bodies[i]).json()["difficulties"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = handle.stats.remote().result()
    batches = stats["requests_per_batch"][before:]
    assert sum(batches) == len(bodies) and max(batches) > 1, stats
    for a, b in zip(alone, results):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_the_deployment_handle_answers_like_http(served, http):
    from ray import serve

    body = {"items": items(3)}
    via_handle = serve.get_app_handle("proxy").predict.remote(body).result()
    np.testing.assert_allclose(via_handle["difficulties"], predict(http, served, body).json()["difficulties"],
                               rtol=1e-5, atol=1e-6)
    assert serve.get_app_handle("proxy").predict.remote({"items": []}).result()["status"] == 422


def test_a_proxy_behind_a_uri_is_fetched_once_into_the_cache(proxy_run, tmp_path, monkeypatch):
    from compeffdist_ray.serving.apps import localize_proxy

    monkeypatch.setenv("COMPEFFDIST_CACHE", str(tmp_path / "cache"))
    local = localize_proxy(f"file://{proxy_run}")
    assert os.path.isfile(os.path.join(local, "proxy_config.json")) and str(tmp_path / "cache") in local
    assert localize_proxy(f"file://{proxy_run}") == local
