"""`compeffdist eval`: bad input gives one line on stderr and exit code 2, before any model runs."""

from __future__ import annotations

import json

import pytest

from test_cli import assert_one_line_error, cli


def write_json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\ufeff" + json.dumps(value, indent=2), encoding="utf-8")
    return path


def sst2(root, test=None, train=None):
    write_json(root / "sc" / "sst2" / "test.json", test or [{"sentence": "fine", "label": "positive"}])
    write_json(root / "sc" / "sst2" / "train.json", train or [{"sentence": "great", "label": "positive"},
                                                               {"sentence": "awful", "label": "negative"}])
    return root


def test_data_dir_without_a_known_dataset(tmp_path):
    write_json(tmp_path / "misc" / "reviews" / "test.json", [{"sentence": "ok", "label": "positive"}])
    line = assert_one_line_error(cli("eval", "--model", "tiny-random-llama", "--data-dir", str(tmp_path)),
                                 f"no known SentiBench dataset in {tmp_path}: found misc/reviews; known: sc/sst2")
    assert "absa/asqp_rest16" in line
    assert_one_line_error(cli("eval", "--model", "tiny-random-llama", "--data-dir", str(tmp_path / "nope")),
                          "data directory not found")


def test_test_file_that_is_not_json_names_file_and_line(tmp_path):
    sst2(tmp_path)
    (tmp_path / "sc" / "sst2" / "test.json").write_text('\ufeff[\n  {"sentence": "a", "label": "positive"},\n'
                                                         '  {"sentence": "b", "label": }\n]\n', encoding="utf-8")
    assert_one_line_error(cli("eval", "--model", "tiny-random-llama", "--data-dir", str(tmp_path)),
                          f"{tmp_path / 'sc' / 'sst2' / 'test.json'} is not valid JSON: Expecting value at line 3")


def test_encoder_model_is_refused(tmp_path):
    sst2(tmp_path)
    assert_one_line_error(cli("eval", "--model", "all-minilm-l6-v2", "--data-dir", str(tmp_path)),
                          "model alias 'all-minilm-l6-v2' is an embedding model but a causal_lm model is needed")
    from compeffdist_ray.models import resolve_model

    encoder_dir = resolve_model("all-minilm-l6-v2", kind="embedding")
    assert_one_line_error(cli("eval", "--model", encoder_dir, "--data-dir", str(tmp_path)),
                          "is not a causal language model (architectures: BertModel, model_type: bert)")


def test_label_first_token_collision(tmp_path):
    # the tiny models' small BPE vocabulary starts " negative" and " neutral" with the same " ne"
    sst2(tmp_path, train=[{"sentence": "awful", "label": "negative"}, {"sentence": "so so", "label": "neutral"},
                          {"sentence": "great", "label": "positive"}])
    assert_one_line_error(cli("eval", "--model", "tiny-random-llama", "--data-dir", str(tmp_path)),
                          "label first tokens collide for tiny-random-llama on sc/sst2: 'negative' and 'neutral' "
                          "share their first token ' ne' (id ")


@pytest.mark.parametrize("args, message", [
    (["--model", "http://127.0.0.1:9/v1"], "endpoint http://127.0.0.1:9/v1/models is unreachable (ConnectError); "
                                           "start the server or fix the URL"),
    (["--model", "tiny-random-llama", "--endpoint-model", "x"], "--endpoint-model names a model of an "
                                                                 "OpenAI-compatible endpoint"),
    (["--model", "tiny-random-llama", "--demos", "some"], "argument --demos: invalid choice: 'some'"),
    (["--model", "tiny-random-llama", "--limit", "0"], "--limit must be a positive integer, got 0"),
    (["--model", "tiny-random-llama", "--k-shot", "-1"], "--k-shot must be an integer >= 0, got -1"),
    (["--model", "tiny-random-llama", "--datasets", "yelp5"], "--datasets: 'yelp5' is not in the data directory; "
                                                               "available: sc/sst2"),
    (["--data-dir", "."], "eval needs --model MODEL and --data-dir DIR"),
])
def test_bad_eval_options(tmp_path, args, message):
    if "--data-dir" not in args:
        args = args + ["--data-dir", str(sst2(tmp_path))]
    assert_one_line_error(cli("eval", *args), message)


def test_compare_bad_files(tmp_path):
    assert_one_line_error(cli("eval", "--compare", str(tmp_path / "none.json")), "result file not found")
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": "m",\n "datasets": {,}}')
    assert_one_line_error(cli("eval", "--compare", str(bad)), f"{bad} is not valid JSON: Expecting property name")
    other = tmp_path / "other.json"
    other.write_text('{"rows": 3}')
    assert_one_line_error(cli("eval", "--compare", str(other)), "is not a result file of 'compeffdist eval'")
    assert_one_line_error(cli("eval", "--compare", str(other), "--model", "x"), "--compare only reads result files")
