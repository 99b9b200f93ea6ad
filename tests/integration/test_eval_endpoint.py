"""`compeffdist eval` against an OpenAI-compatible endpoint, on the Ray Data actor pool.

The endpoint here is a small rule-following chat server on loopback (it answers from the
prompt's last sentence, so the expected predictions are known); the served teacher of
`compeffdist serve teacher` is exercised in the serving tests. SentiBench is read from
../shared/sentibench and the tests skip when it is absent.
"""

from __future__ import annotations

import re
import threading

import pytest

from conftest import SHARED

pytestmark = pytest.mark.integration

DATA = SHARED / "sentibench"
needs_data = pytest.mark.skipif(not (DATA / "sc" / "sst2" / "test.json").is_file(),
                                reason=f"SentiBench data not found at {DATA} (the tests read it from ../shared)")
KEY = "sk-endpoint-test"


def rule_label(sentence: str) -> str:
    """The fake model's answer: a rule on the test sentence that is right often enough to score."""
    good = ("good", "great", "best", "love", "fun", "beautiful", "enjoy", "wonderful", "funny", "delight")
    return "positive" if any(w in sentence.lower() for w in good) else "negative"


class RuleServer:
    """Chat completions by rule; `logprobs` decides whether it can return top logprobs."""

    def __init__(self, logprobs: bool):
        self.logprobs = logprobs
        self.requests = 0
        self.refused = 0
        self.lock = threading.Lock()

    def answer(self, body: dict) -> tuple[int, dict]:
        prompt = body["messages"][-1]["content"]
        last = re.findall(r"Sentence: (.*)\n", prompt)[-1]
        if prompt.endswith("Label:"):
            label = rule_label(last)
            text = f"{label.capitalize()}."  # a chat model's way: capitalised, with a full stop
            content = [{"token": label[:3].capitalize(), "logprob": -0.2,
                        "top_logprobs": [{"token": label[:3].capitalize(), "logprob": -0.2},
                                         {"token": "The", "logprob": -1.9},
                                         {"token": ("negative" if label == "positive" else "positive"), "logprob": -2.5}]},
                       {"token": label[3:], "logprob": -0.01, "top_logprobs": []}]
        else:  # ABSA: a fenced JSON list over several lines, the aspect being the sentence's first long word
            word = next((w for w in re.findall(r"[A-Za-z]{5,}", last)), "food")
            text = f"```json\n[\n  {{\"aspect_term\": \"{word.lower()}\", \"sentiment\": \"positive\"}}\n]\n```"
            content = None
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        if body.get("logprobs") and content is not None:
            choice["logprobs"] = {"content": content}
        return 200, {"id": "c", "object": "chat.completion", "model": body["model"], "choices": [choice],
                     "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(text.split()),
                               "total_tokens": len(prompt.split()) + len(text.split())}}

    def handle(self, method: str, path: str, body: dict | None, auth: str | None) -> tuple[int, dict]:
        with self.lock:
            self.requests += 1
        if auth != f"Bearer {KEY}":
            return 401, {"error": {"message": "missing or bad token"}}
        if method == "GET" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": "rule-model", "object": "model"}]}
        if method == "POST" and path == "/v1/chat/completions":
            if body.get("logprobs") and not self.logprobs:
                with self.lock:
                    self.refused += 1
                return 400, {"error": {"message": "logprobs are not supported by this server"}}
            return self.answer(body)
        return 404, {"error": {"message": "no such route"}}


@pytest.fixture
def rule_server(json_servers):
    def start(logprobs: bool):
        state = RuleServer(logprobs)
        return state, json_servers(
            lambda method, path, body, headers: state.handle(method, path, body, headers.get("Authorization")))

    return start


def expected_sst2(limit: int) -> tuple[list[str], list[str]]:
    from compeffdist_ray import evaluation as ev

    ds = ev.load_dataset(DATA, "sc/sst2", ev.CLASSIFICATION, limit=limit)
    return [r["label"] for r in ds.test], [rule_label(r["sentence"]) for r in ds.test]


@needs_data
@pytest.mark.parametrize("logprobs", [True, False], ids=["logprobs", "text-only"])
def test_eval_of_an_endpoint_reads_labels_from_logprobs_or_text(ray_session, rule_server, monkeypatch, tmp_path,
                                                                logprobs):
    from compeffdist_ray import evaluation as ev
    from compeffdist_ray.eval_runner import EvalConfig, predictions_dir_for, run_eval

    state, url = rule_server(logprobs)
    monkeypatch.setenv("RULE_KEY", KEY)
    cfg = EvalConfig(model=url, data_dir=str(DATA), datasets=("sst2", "atsa_rest16"), limit=12, k_shot=2,
                     batch_size=4, concurrency=2, api_key_env="RULE_KEY")
    result = run_eval(cfg, predictions_dir=predictions_dir_for(tmp_path / "r.json"))

    assert result["model_path"] == f"{url} (rule-model)"
    clf, absa = result["datasets"]["sc/sst2"], result["datasets"]["absa/atsa_rest16"]
    gold, pred = expected_sst2(12)
    want = ev.classification_metrics(gold, pred, ["negative", "positive"])
    assert clf["metrics"] == {"macro_f1": want["macro_f1"], "accuracy": want["accuracy"]}
    assert clf["confusion"] == want["confusion"] and clf["parse_failures"] == 0
    assert clf["read_from"] == ({"logprobs": 12} if logprobs else {"text": 12})
    assert [e["pred"] for e in clf["examples"]] == pred[:5]
    # the fenced, multi-line JSON of a chat model parses
    assert absa["parse_failures"] == 0 and absa["counts"]["n_pred"] == 12
    # without logprobs, each actor's client was refused (once per request already in flight) and then
    # stopped asking for them: far fewer refusals than the 12 classification requests
    if logprobs:
        assert state.refused == 0
    else:
        assert 1 <= state.refused <= cfg.concurrency * cfg.batch_size
    assert result["tokens"]["input"] > 0 and result["tokens"]["output"] > 0


@needs_data
def test_endpoint_with_a_wrong_key_stops_before_any_work(rule_server, tmp_path):
    from test_cli import assert_one_line_error, cli

    state, url = rule_server(True)
    proc = cli("eval", "--model", url, "--data-dir", str(DATA), "--datasets", "sst2", "--limit", "2",
               "--out", str(tmp_path / "r.json"), env={"OPENAI_API_KEY": "wrong"})
    assert_one_line_error(proc, f"teacher endpoint {url}/models answered 401 unauthorized: set the API key in the "
                                "variable OPENAI_API_KEY")
    assert state.requests == 1  # one GET /models, no chat request
    proc = cli("eval", "--model", url, "--data-dir", str(DATA), "--endpoint-model", "gpt-x",
               "--out", str(tmp_path / "r.json"), env={"OPENAI_API_KEY": KEY})
    assert_one_line_error(proc, f"endpoint {url} does not serve 'gpt-x'; it lists: rule-model (fix --endpoint-model)")
    assert "wrong" not in proc.stderr and KEY not in proc.stderr
