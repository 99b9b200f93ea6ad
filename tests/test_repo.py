"""Repository-level consistency: the stage list, CLI, config and docs agree."""

from __future__ import annotations

import re
import subprocess

from conftest import ROOT

from compeffdist_ray.config import Config
from compeffdist_ray.stages import STAGE_NAMES, STAGES, load_stage_module


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^(python3 -m pip install .*pytest.*)$", ci, re.M).group(1)
    assert command in readme


def test_cli_stage_choices_follow_the_stage_list():
    from compeffdist_ray.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    stage = sub.choices["stage"]
    name = next(a for a in stage._actions if a.dest == "name")
    assert tuple(name.choices) == STAGE_NAMES


def test_every_stage_module_declares_its_contract_and_reads_only_earlier_stages():
    cfg = Config()
    for i, spec in enumerate(STAGES):
        mod = load_stage_module(spec.name)
        for attr in ("inputs", "config_view", "run", "NEEDS_RAY", "VERSION", "REQUIRES"):
            assert hasattr(mod, attr), f"{spec.module} lacks {attr}"
        assert set(mod.inputs(cfg)) <= set(STAGE_NAMES[:i]), spec.name
        assert mod.__doc__ and "Reads" in mod.__doc__ and "Needs" in mod.__doc__, spec.name
        view = mod.config_view(cfg)
        assert "seed" in view  # every stage's randomness follows the seed


def test_nothing_from_shared_is_committed():
    files = subprocess.run(["git", "ls-files"], capture_output=True, text=True, cwd=ROOT).stdout.split()
    assert not [f for f in files if re.search(r"sentibench|compeffdist_ref|attr_list\.json|sampled_.*_input", f)]


def test_no_undefined_or_unused_names():
    """pyflakes rules (ruff F): an undefined name in a rarely-run branch fails here, not on a GPU cluster."""
    import shutil

    ruff = shutil.which("ruff")
    assert ruff, "ruff is part of the test extra: python3 -m pip install -e '.[test]'"
    out = subprocess.run([ruff, "check", "--select", "F", "--output-format", "concise", "--no-cache",
                          "compeffdist_ray", "tests", "benchmarks", "jobs"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
