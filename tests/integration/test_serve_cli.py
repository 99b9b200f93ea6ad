"""`compeffdist serve teacher` end to end: a new process starts its own local Ray and Serve, says
where it listens and where the token comes from (never the token), answers, and stops cleanly
on Ctrl-C (SIGINT)."""

from __future__ import annotations

import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from conftest import CONFIGS, ROOT

pytestmark = pytest.mark.integration


def test_serve_teacher_starts_prints_answers_and_stops_on_ctrl_c():
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "cli-" + secrets.token_urlsafe(24)
    env = dict(os.environ, COMPEFFDIST_SERVE_TOKEN=token, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "compeffdist_ray", "serve", "teacher", "--config", str(CONFIGS / "tiny-test.yaml"),
         "--port", str(port), "serve.num_cpus=0.5"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while not any("Ctrl-C stops it" in ln for ln in seen):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(seen)[-3000:]
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        out = "".join(seen)
        assert f"is served at http://127.0.0.1:{port}/v1" in out
        assert "bearer token: from the environment variable COMPEFFDIST_SERVE_TOKEN" in out and token not in out
        resp = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {token}"},
                          json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] >= 1, resp.text
        assert httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json={}).status_code == 401
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(timeout=30)
    while not lines.empty():
        seen.append(lines.get_nowait())
    out = "".join(seen)
    assert "stopping app 'teacher'" in out and "\nstopped\n" in out, out[-2000:]
    assert token not in out
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))
