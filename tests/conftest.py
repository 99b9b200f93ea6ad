"""Shared fixtures: a scripted OpenAI-compatible teacher on loopback, paths, Ray."""

from __future__ import annotations

import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CONFIGS = ROOT / "configs"

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


class ScriptedTeacher:
    """A fake teacher that answers by rule: attributes, task definitions, demonstrations.

    It speaks the OpenAI chat-completions protocol over real HTTP, so the `openai` backend,
    Ray actors and the stages run for real around it. Knobs: `fail_first` (answer 500 to the
    first N requests), `garbage_every` (every k-th answer is unparseable), `task_delay_s`
    (slow task-definition requests, to kill a run mid-stage), `require_key`.
    """

    def __init__(self, *, fail_first: int = 0, garbage_every: int = 0, task_delay_s: float = 0.0,
                 require_key: str | None = None):
        self.fail_first = fail_first
        self.garbage_every = garbage_every
        self.task_delay_s = task_delay_s
        self.require_key = require_key
        self.requests = 0
        self.kinds: dict[str, int] = {}
        self.tokens = {"input": 0, "output": 0}
        self.probe_tokens = {"input": 0, "output": 0}
        self.lock = threading.Lock()

    def answer(self, messages: list[dict]) -> tuple[str, str]:
        last = messages[-1]["content"]
        if last == "ping":  # the backend's reachability probe before a run
            return "probe", "pong"
        if last.startswith("List the sentiment-related attributes"):
            text = last.split("Text:", 1)[1].lower()
            words = [w for w in re.findall(r"[a-z]{5,}", text)][:3]
            items = ["overall sentiment"] + [f"{w} opinion" for w in words]
            if "!" in text or "?" in text:
                items.append("emotion intensity")
            return "attributes", "\n".join(f"- {i}" for i in items)
        if last.startswith("Invent one sentiment-analysis task"):
            persp = re.search(r'perspective "([^"]+)"', last).group(1)
            style = re.search(r"must be (.+?)\. Give", last).group(1)
            return "task", (f"Name: {persp.title()} check\nDescription: Judge the {persp} of a text.\n"
                            f"Instruction: Read the text and judge its {persp}. The answer must be {style}.")
        return "demonstration", "positive"

    def handle(self, body: dict, headers) -> tuple[int, dict]:
        with self.lock:
            self.requests += 1
            n = self.requests
        if self.require_key and headers.get("Authorization") != f"Bearer {self.require_key}":
            return 401, {"error": {"message": "bad key"}}
        if n <= self.fail_first:
            return 500, {"error": {"message": "injected failure"}}
        kind, text = self.answer(body["messages"])
        with self.lock:
            self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if kind == "task" and self.task_delay_s:
            time.sleep(self.task_delay_s)
        if self.garbage_every and n % self.garbage_every == 0:
            text = "" if kind == "demonstration" else "{{{"
        prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
        with self.lock:  # the probe's tokens are billed apart: no stage spends them
            bill = self.probe_tokens if kind == "probe" else self.tokens
            bill["input"] += prompt_tokens
            bill["output"] += len(text.split())
        return 200, {
            "id": f"cmpl-{n}",
            "object": "chat.completion",
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
                      "total_tokens": prompt_tokens + len(text.split())},
        }


def start_json_server(handle) -> tuple[ThreadingHTTPServer, str]:
    """An HTTP server on 127.0.0.1 (random port, own thread) answering JSON: `handle(method, path,
    body, headers)` returns (status, payload); a POST body that is not JSON gets 400. Returns
    (server, base URL ending in /v1); stop it with shutdown() and server_close()."""

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, method: str):
            body = None
            if method == "POST":
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length))
                except ValueError as exc:
                    return self._send(400, {"error": {"message": str(exc)}})
            try:
                status, payload = handle(method, self.path, body, self.headers)
            except (ValueError, KeyError) as exc:
                status, payload = 400, {"error": {"message": str(exc)}}
            self._send(status, payload)

        def _send(self, status: int, payload: dict):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):  # noqa: N802
            self._answer("GET")

        def do_POST(self):  # noqa: N802
            self._answer("POST")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture
def json_servers():
    """`start(handle) -> base_url`: start_json_server, each server stopped when the test ends."""
    servers = []

    def start(handle) -> str:
        server, url = start_json_server(handle)
        servers.append(server)
        return url

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def scripted_teacher(json_servers):
    """Start a ScriptedTeacher on 127.0.0.1 (random port); yields (teacher, base_url)."""

    def start(**kwargs):
        teacher = ScriptedTeacher(**kwargs)
        return teacher, json_servers(lambda method, path, body, headers: teacher.handle(body, headers))

    return start


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the in-process integration tests."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def scripted_overrides(base_url: str, run_dir: Path) -> list[str]:
    """Overrides that point the tiny-test profile at a scripted teacher."""
    return [
        f"run_dir={run_dir}",
        "teacher.backend=openai",
        "teacher.model=scripted",
        f"teacher.openai.base_url={base_url}",
        "teacher.openai.backoff_s=0.01",
        "teacher.openai.max_concurrency=4",
        "attributes.num_texts=12",
        "tasks.max_perspectives=3",
        "tasks.tasks_per_perspective=2",
        "tasks.num_demonstrations=3",
        "pairing.num_texts=40",
    ]
