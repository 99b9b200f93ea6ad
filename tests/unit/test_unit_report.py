"""The run report on run directories that are not (or not yet) complete."""

from __future__ import annotations

import pytest

from compeffdist_ray.errors import UserError


def test_a_run_with_no_stage_done_still_reports(tmp_path):
    from compeffdist_ray.config import dump_config, load_config
    from compeffdist_ray.report import write_report

    (tmp_path / "config.yaml").write_text(dump_config(load_config(None, [f"run_dir={tmp_path}"])))
    page = open(write_report(str(tmp_path)), encoding="utf-8").read()
    assert "0 of 10 stages have output" in page and page.count('class="state-') == 10
    assert "This run has no evaluation yet" in page and "<h2>Difficulty" not in page


def test_header_text_is_escaped():
    from compeffdist_ray.report import _table

    assert "<th>&lt;b&gt;</th>" in _table(["<b>"], [])


def test_not_a_run_directory(tmp_path):
    from compeffdist_ray.report import write_report

    with pytest.raises(UserError, match=r"has no config.yaml: not a run directory"):
        write_report(str(tmp_path))
