"""`compeffdist serve`: bad input ends with exit code 2 and one line, before Ray starts; Serve
config files are written; the serving package imports nothing heavy."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import yaml

from conftest import CONFIGS, ROOT

TOKEN_ENV = "COMPEFFDIST_SERVE_TOKEN"


def cli(*args: str, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "compeffdist_ray", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=full)


def one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


WITH_TOKEN = {TOKEN_ENV: "cli-test-token-0123456789abcdef"}


def test_missing_proxy_model_dir(tmp_path):
    one_line_error(cli("serve", "proxy", "--model", str(tmp_path / "nope"), env=WITH_TOKEN), "does not exist",
                   "run directory")


def test_run_dir_without_a_proxy(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 1\n")
    one_line_error(cli("serve", "proxy", "--model", str(tmp_path), env=WITH_TOKEN),
                   "run directory without a trained proxy", "filtering.proxy.enabled=true")


def test_a_backend_that_cannot_be_served_and_an_unknown_one():
    one_line_error(cli("serve", "teacher", "teacher.backend=openai", env=WITH_TOKEN),
                   "teacher.backend=openai cannot be served", "transformers or vllm")
    one_line_error(cli("serve", "teacher", "teacher.backend=tgi", env=WITH_TOKEN),
                   "teacher.backend: expected one of", "'serve', got 'tgi'")


def test_bad_port_and_port_in_use():
    one_line_error(cli("serve", "teacher", "--port", "70000", env=WITH_TOKEN), "serve.port: must be a TCP port")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        one_line_error(cli("serve", "teacher", "--config", str(CONFIGS / "tiny-test.yaml"), "--port", str(port),
                           env=WITH_TOKEN), f"port {port} on 127.0.0.1 is in use", "--port")


def test_a_token_file_that_is_not_there(tmp_path):
    line = one_line_error(cli("serve", "teacher", "--config", str(CONFIGS / "tiny-test.yaml"),
                              f"serve.token_file={tmp_path / 'tok'}"), "serve.token_file", "does not exist")
    assert not (tmp_path / "tok").exists() and "secrets.token_urlsafe" in line


def test_serve_config_prints_or_writes_a_serve_config(tmp_path):
    proc = cli("serve", "config", "teacher", "--config", "configs/tiny-test.yaml", "serve.port=8111")
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert data["http_options"] == {"host": "127.0.0.1", "port": 8111}
    assert data["applications"][0]["args"] == {"config": "configs/tiny-test.yaml", "overrides": ["serve.port=8111"]}
    out = tmp_path / "deep" / "proxy.yaml"
    proc = cli("serve", "config", "proxy", "--model", "runs/x", "--out", str(out))
    assert proc.returncode == 0 and proc.stdout.strip() == str(out)
    assert yaml.safe_load(out.read_text())["applications"][0]["args"] == {"model": "runs/x"}
    assert cli("serve", "config", "student").returncode == 2
