"""The command line: exit codes and one-line errors for bad input, before any heavy work."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import CONFIGS, ROOT


def cli(*args: str, timeout: int = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    """`compeffdist ARGS` in a fresh process; `env` adds to (or overrides) this process's environment."""
    return subprocess.run([sys.executable, "-m", "compeffdist_ray", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout, env={**os.environ, **env} if env else None)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_unknown_and_mistyped_keys_all_reported_with_dotted_paths(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("teacher:\n  batchsize: 3\n  openai:\n    retries: 2\nattributes:\n  num_texts: many\n")
    proc = cli("run", "--config", str(cfg), "tasks.bogus=1")
    line = assert_one_line_error(proc, "4 problems", "teacher.batchsize: unknown key (did you mean 'batch_size'?)",
                                 "teacher.openai.retries: unknown key", "tasks.bogus: unknown key",
                                 "attributes.num_texts: expected an integer, got 'many'")
    assert line.startswith("compeffdist: error: invalid config")


def test_missing_input_file(tmp_path):
    proc = cli("run", "--run-dir", str(tmp_path / "r"), f"input.path={tmp_path / 'nope.jsonl'}")
    assert_one_line_error(proc, "input file not found", "nope.jsonl", "input.path")
    assert not (tmp_path / "r" / "attributes").exists()


def test_text_column_not_in_file_lists_the_columns(tmp_path):
    data = tmp_path / "c.csv"
    data.write_text("review,stars\ngood phone,5\nbad phone,1\n")
    proc = cli("run", "--run-dir", str(tmp_path / "r"), f"input.path={data}")
    assert_one_line_error(proc, "text column 'text' is not in", "review, stars", "input.text_column")


def test_unknown_model_alias_lists_the_aliases(tmp_path):
    proc = cli("run", "--run-dir", str(tmp_path / "r"), "teacher.model=smollm-9000")
    assert_one_line_error(proc, "smollm-9000", "smollm2-135m-instruct", "gemma3-270m")


def test_empty_corpus(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    assert_one_line_error(cli("run", "--run-dir", str(tmp_path / "r"), f"input.path={data}"), "empty")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n   \n\n")
    assert_one_line_error(cli("run", "--run-dir", str(tmp_path / "r"), f"input.path={blank}"), "no usable text")


def test_bad_usage_is_one_line_exit_2():
    assert_one_line_error(cli("stage", "nonsense"), "invalid choice")
    assert_one_line_error(cli("run", "not-an-override"), "key.path=value")


def test_until_must_name_a_stage_of_this_run(tmp_path):
    assert_one_line_error(cli("run", "--until", "nonsense"), "argument --until: invalid choice: 'nonsense'")
    data = _answers(tmp_path / "answers.jsonl", ANSWERS)  # answers from a file: the run starts at responses
    proc = cli("run", "--run-dir", str(tmp_path / "r"), "--until", "pairing", f"responses.file={data}")
    assert_one_line_error(proc, "--until pairing: that stage is not part of this run",
                          "(it has: responses, warmup, difficulty")
    assert not (tmp_path / "r").exists()


def test_stage_with_missing_inputs_names_them(tmp_path):
    proc = cli("stage", "tasks", "--config", str(CONFIGS / "tiny-test.yaml"), "--run-dir", str(tmp_path / "r"))
    assert_one_line_error(proc, "stage 'tasks' needs perspectives (waiting)", "compeffdist stage perspectives")


def test_status_of_missing_run_dir(tmp_path):
    assert_one_line_error(cli("status", str(tmp_path / "nothing")), "run directory not found")


def test_config_show_applies_overrides_and_roundtrips(tmp_path):
    proc = cli("config", "show", "--config", str(CONFIGS / "tiny-test.yaml"), "teacher.batch_size=7")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "resolved.yaml"
    out.write_text(proc.stdout)
    again = cli("config", "show", "--config", str(out))
    assert again.returncode == 0 and again.stdout == proc.stdout
    assert "batch_size: 7" in proc.stdout and "model: tiny-random-llama" in proc.stdout


def test_config_keys_documents_every_key():
    proc = cli("config", "keys")
    assert proc.returncode == 0
    assert "perspectives.damping (float, default 0.9)" in proc.stdout
    assert "teacher.openai.api_key_env" in proc.stdout


def test_models_list():
    proc = cli("models", "list")
    assert proc.returncode == 0
    names = [ln.split()[0] for ln in proc.stdout.splitlines()[1:] if ln.strip() and not ln.startswith("cache:")]
    assert {"smollm2-135m-instruct", "gemma3-270m", "all-minilm-l6-v2", "tiny-random-llama"} <= set(names)


def test_status_reports_done_stale_and_incomplete(tmp_path):
    """status reads the run's own config; a changed config makes the stage stale."""
    import pandas as pd

    from compeffdist_ray.artifacts import Manifest, RunDir
    from compeffdist_ray.config import dump_config, load_config
    from compeffdist_ray.pipeline import stage_statuses

    run = tmp_path / "run"
    cfg = load_config(CONFIGS / "tiny-test.yaml", [f"run_dir={run}"])
    rd = RunDir(str(run))
    rd.write_text("config.yaml", dump_config(cfg))
    st = stage_statuses(rd, cfg)[0]
    rd.write_table("attributes", "attributes", pd.DataFrame({"text_id": ["a"], "attribute": ["x"], "raw": ["x"]}))
    rd.write_manifest(Manifest(stage="attributes", fingerprint=st.expected, rows=1, dropped={"unparseable": 2},
                               tokens={"input": 1234, "output": 56}, wall_time_s=3.2))
    (run / "perspectives").mkdir()
    proc = cli("status", str(run))
    assert proc.returncode == 0, proc.stderr
    rows = {ln.split()[0]: ln.split() for ln in proc.stdout.splitlines()[2:6]}
    assert rows["attributes"][1:] == ["done", "1", "2", "1,234", "56", "3.2s"]
    assert rows["perspectives"][1] == "incomplete"
    assert rows["tasks"][1] == "waiting"
    assert "attributes dropped: unparseable 2" in proc.stdout
    js = json.loads(cli("status", str(run), "--json").stdout)
    assert js[0]["manifest"]["tokens"]["input"] == 1234
    # a different teacher setting makes the finished stage stale
    other = tmp_path / "other.yaml"
    other.write_text(dump_config(load_config(CONFIGS / "tiny-test.yaml", [f"run_dir={run}", "teacher.temperature=0.5"])))
    stale = cli("status", str(run), "--config", str(other))
    assert {ln.split()[0]: ln.split()[1] for ln in stale.stdout.splitlines()[2:6]}["attributes"] == "stale"


@pytest.mark.parametrize("module", ["compeffdist_ray", "compeffdist_ray.config", "compeffdist_ray.cli",
                                    "compeffdist_ray.pipeline", "compeffdist_ray.models",
                                    "compeffdist_ray.serving", "compeffdist_ray.serving.auth",
                                    "compeffdist_ray.serving.protocol", "compeffdist_ray.serving.web",
                                    "compeffdist_ray.serving.deploy", "compeffdist_ray.teacher.serve_backend"])
def test_import_is_light(module):
    code = (f"import sys, {module}; heavy = [m for m in ('torch', 'ray', 'transformers', 'vllm', 'fastapi', "
            "'sentence_transformers', 'deepspeed') if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _answers(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ANSWERS = [{"instruction": "Label the sentiment: positive or negative.", "text": t, "response": r}
           for t, r in (("Great value", "positive"), ("Broke in a day", "negative"), ("Love it", "positive"))]


def test_responses_file_missing_a_column(tmp_path):
    data = _answers(tmp_path / "answers.jsonl", [{k: v for k, v in r.items() if k != "response"} for r in ANSWERS])
    proc = cli("run", "--run-dir", str(tmp_path / "r"), f"responses.file={data}")
    assert_one_line_error(proc, "answers.jsonl (from responses.file) has no column 'response'",
                          "it needs instruction, text, response and has: instruction, text")
    assert not (tmp_path / "r" / "responses").exists()


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_keep_ratio_outside_0_1(tmp_path, value):
    proc = cli("run", "--run-dir", str(tmp_path / "r"), f"sampling.keep_ratio={value}")
    assert_one_line_error(proc, f"sampling.keep_ratio: must be in (0, 1], got {float(value)!r}")


def test_student_tokenizer_without_eos_fails_before_any_work(tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from compeffdist_ray.models import resolve_model

    broken = tmp_path / "no-eos"
    shutil.copytree(resolve_model("tiny-random-llama"), broken)
    tok = AutoTokenizer.from_pretrained(broken)
    tok.eos_token = None
    tok.save_pretrained(broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["eos_token_id"] = None
    (broken / "config.json").write_text(json.dumps(cfg))
    data = _answers(tmp_path / "answers.jsonl", ANSWERS)
    proc = cli("run", "--run-dir", str(tmp_path / "r"), f"responses.file={data}", f"student.model={broken}")
    assert_one_line_error(proc, f"student {broken}: its tokenizer has no EOS token", "set eos_token")
    assert not (tmp_path / "r" / "responses").exists()


def test_more_training_workers_than_the_cluster_has(tmp_path):
    data = _answers(tmp_path / "answers.jsonl", ANSWERS)
    proc = cli("run", "--config", str(CONFIGS / "tiny-test.yaml"), "--run-dir", str(tmp_path / "r"),
               f"responses.file={data}", "train.num_workers=6", "train.cpus_per_worker=1", timeout=300)
    assert_one_line_error(proc, "cannot place the training workers: 6 CPUs (6 workers x 1) but the cluster has 2")


def test_student_of_an_unknown_family_without_a_chat_template(tmp_path):
    import shutil

    from compeffdist_ray.models import resolve_model

    odd = tmp_path / "odd-base"
    shutil.copytree(resolve_model("tiny-random-llama"), odd)
    (odd / "chat_template.jinja").unlink()
    cfg = json.loads((odd / "config.json").read_text())
    cfg["model_type"] = "phi3"  # a family transformers knows and this project does not
    (odd / "config.json").write_text(json.dumps(cfg))
    data = _answers(tmp_path / "answers.jsonl", ANSWERS)
    proc = cli("run", "--run-dir", str(tmp_path / "r"), f"responses.file={data}", f"student.model={odd}")
    assert_one_line_error(proc, f"student {odd}: no chat template and an unknown family (model_type 'phi3')",
                          "set student.prompt_format=plain")
    assert not (tmp_path / "r" / "responses").exists()


@pytest.mark.parametrize("override, message", [
    ("train.zero_stage=4", "train.zero_stage: DeepSpeed ZeRO stages are 0, 1, 2 and 3, got 4"),
    ("train.zero_stage=-1", "train.zero_stage: DeepSpeed ZeRO stages are 0, 1, 2 and 3, got -1"),
    ("train.lora.r=-2", "train.lora.r: the LoRA rank must be 0 (off) or positive, got -2"),
    ("train.lora.dropout=1.5", "train.lora.dropout: must be in [0, 1), got 1.5"),
])
def test_bad_training_settings(tmp_path, override, message):
    proc = cli("run", "--run-dir", str(tmp_path / "r"), override)
    assert_one_line_error(proc, message)
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").iterdir())


def test_status_notes_for_the_evaluate_stage():
    from compeffdist_ray.cli import _stage_note

    assert _stage_note("evaluate", {"skipped": "no evaluate.data_dir"}) == (
        "skipped (no evaluate.data_dir; set evaluate.data_dir to a SentiBench copy)")
    stats = {"mean_f1": {"base": 0.412, "distilled": 0.4306}, "k": 8, "limit": 100,
             "results": {"base": {"sc/sst2": {}, "absa/atsa_rest16": {}}, "distilled": {}}}
    assert _stage_note("evaluate", stats) == ("SentiBench mean F1 x100 base 41.2, distilled 43.1 over 2 dataset(s) "
                                              "(k=8, first 100 test rows; table in evaluate/comparison.md)")
