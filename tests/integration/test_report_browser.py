"""The run report opens in a real browser (headless Chromium, when the machine has it)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

pytestmark = pytest.mark.integration

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (Debian: apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    from compeffdist_ray.config import dump_config, load_config
    from compeffdist_ray.report import write_report

    (tmp_path / "config.yaml").write_text(dump_config(load_config(None, [f"run_dir={tmp_path}"])))
    page = write_report(str(tmp_path))
    shot = tmp_path / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", f"file://{page}"], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "<h1>compeffdist run report</h1>" in dom.stdout and "0 of 10 stages have output" in dom.stdout
    # the page loads nothing and runs no script: no console message, no failed request
    assert "CONSOLE" not in dom.stderr and "net::ERR" not in dom.stderr, dom.stderr[-2000:]
    subprocess.run([CHROMIUM, *flags, "--window-size=1200,1600", f"--screenshot={shot}", f"file://{page}"],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:4] == b"\x89PNG" and shot.stat().st_size > 10_000
