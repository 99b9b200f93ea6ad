"""The pure core of `compeffdist eval`: datasets, prompts, label tokens, ABSA parsing, metrics, tables."""

from __future__ import annotations

import json

import pytest

from compeffdist_ray import evaluation as ev
from compeffdist_ray.errors import UserError


def write_json(path, value, *, bom=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + json.dumps(value, indent=2), encoding="utf-8")
    return path


def clf(sentence, label):
    return {"sentence": sentence, "label": label}


TRAIN = [clf(f"train sentence {i}", "positive" if i % 2 else "negative") for i in range(20)]


# ---- datasets ------------------------------------------------------------------------------


def test_discover_known_generic_and_unknown(tmp_path):
    write_json(tmp_path / "sc/sst2/test.json", [clf("good", "positive")])
    write_json(tmp_path / "sc/sst2/train.json", TRAIN)
    write_json(tmp_path / "sc/sst5/test.json", [clf("good", "very positive")])  # sc/*: sentence/label records
    write_json(tmp_path / "sc/sst5/train.json", [clf("bad", "very negative")])
    write_json(tmp_path / "sc/odd/test.json", [{"text": "good", "stars": 5}])  # sc/* but other fields
    write_json(tmp_path / "absa/atsa_lap14/test.json", [{"sentence": "s", "aspects": []}])
    write_json(tmp_path / "absa/atsa_rest16/test.json", [{"sentence": "s", "aspects": []}])  # no train.json
    found, skipped = ev.discover_datasets(tmp_path)
    assert found == {"sc/sst2": "classification", "sc/sst5": "classification"}
    assert skipped == {"sc/odd": "unknown dataset sc/odd", "absa/atsa_lap14": "unknown dataset absa/atsa_lap14",
                       "absa/atsa_rest16": "absa/atsa_rest16 has no train.json (needed for the demonstrations "
                                           "and the label set)"}


def test_data_dir_without_known_dataset_says_what_it_found(tmp_path):
    write_json(tmp_path / "misc/reviews/test.json", [clf("good", "positive")])
    with pytest.raises(UserError, match=r"no known SentiBench dataset in .*: found misc/reviews; known: sc/sst2, "):
        ev.discover_datasets(tmp_path)
    with pytest.raises(UserError, match="data directory not found"):
        ev.discover_datasets(tmp_path / "nope")
    write_json(tmp_path / "sc_only/sst2/test.json", [clf("good", "positive")])
    with pytest.raises(UserError, match="looks like one category folder: give its parent directory"):
        ev.discover_datasets(tmp_path / "sc_only")


def test_invalid_json_names_file_and_line(tmp_path):
    path = tmp_path / "sc/sst2/test.json"
    path.parent.mkdir(parents=True)
    path.write_text('\ufeff[\n  {"sentence": "a", "label": "positive"},\n  {"sentence": "b" "label": 1}\n]\n',
                    encoding="utf-8")
    with pytest.raises(UserError, match=r"sc/sst2/test.json is not valid JSON: Expecting ',' delimiter at line 3"):
        ev.read_json_array(path)


def test_load_dataset_limit_labels_and_record_check(tmp_path):
    write_json(tmp_path / "sc/twitter/test.json", [clf(f"t{i}", "neutral") for i in range(10)])
    write_json(tmp_path / "sc/twitter/train.json", [clf("a", "positive"), clf("b", "neutral"), clf("c", "negative")])
    ds = ev.load_dataset(tmp_path, "sc/twitter", "classification", limit=3)
    assert ds.labels == ["negative", "neutral", "positive"]  # sorted train labels
    assert [r["sentence"] for r in ds.test] == ["t0", "t1", "t2"] and ds.n_test_total == 10
    write_json(tmp_path / "sc/twitter/test.json", [clf("x", "positive"), {"text": "y", "label": "neutral"}])
    with pytest.raises(UserError, match=r"test.json: record 1 has no sentence .*the record has: text, label"):
        ev.load_dataset(tmp_path, "sc/twitter", "classification")


def test_select_datasets_by_full_or_short_name():
    found = {"sc/sst2": "classification", "sc/imdb": "classification", "absa/atsa_rest16": "atsa"}
    assert list(ev.select_datasets(found, {}, ["atsa_rest16", "sc/sst2"])) == ["sc/sst2", "absa/atsa_rest16"]
    with pytest.raises(UserError, match=r"'yelp5' is not in the data directory; available: sc/sst2, sc/imdb"):
        ev.select_datasets(found, {}, ["yelp5"])
    with pytest.raises(UserError, match=r"'odd' was skipped: unknown dataset sc/odd"):
        ev.select_datasets(found, {"sc/odd": "unknown dataset sc/odd"}, ["odd"])


# ---- prompts -------------------------------------------------------------------------------


def test_classification_prompt_exact_text():
    instruction = ev.classification_instruction("sc/sst2", ["negative", "positive"])
    prompt = ev.classification_prompt(instruction, [("A fine\nfilm.", "positive"), ("Dull.", "negative")], "Loved it")
    assert prompt == (
        "Given a sentence, assign a sentiment polarity label from ['negative', 'positive'].\n"
        "\n"
        "Sentence: A fine film.\n"
        "Label: positive\n"
        "\n"
        "Sentence: Dull.\n"
        "Label: negative\n"
        "\n"
        "Sentence: Loved it\n"
        "Label:"
    )
    assert ev.classification_instruction("multifaced/irony18", ["irony", "non-irony"]) == (
        "Given a sentence, assign an irony label from ['irony', 'non-irony'].")


def test_absa_prompt_exact_text_and_gold_rendering():
    record = {"sentence": "Great sushi, slow service.", "aspects": [
        {"target": "sushi", "category": "FOOD#QUALITY", "polarity": "positive"},
        {"target": "service", "category": "SERVICE#GENERAL", "polarity": "negative"},
        {"target": "NULL", "category": "RESTAURANT#GENERAL", "polarity": "positive"},
        {"target": "sushi", "category": "FOOD#PRICES", "polarity": "positive"}]}
    objs = ev.gold_objects(record, "atsa")
    assert objs == [{"aspect_term": "sushi", "sentiment": "positive"}, {"aspect_term": "service", "sentiment": "negative"}]
    assert ev.gold_tuples(record, "acsa") == {("food#quality", "positive"), ("service#general", "negative"),
                                              ("restaurant#general", "positive"), ("food#prices", "positive")}
    prompt = ev.absa_prompt(ev.absa_instruction("atsa"), [(record["sentence"], objs)], "Nice  view.")
    assert prompt.endswith(
        '\n\nSentence: Great sushi, slow service.\n'
        'Answer: [{"aspect_term": "sushi", "sentiment": "positive"}, {"aspect_term": "service", "sentiment": "negative"}]\n'
        '\nSentence: Nice view.\nAnswer:')
    assert prompt.startswith('Extract every aspect term of the sentence with its sentiment polarity')


def test_demo_sampling_is_deterministic_and_excludes_the_test_sentence():
    sentences = [f"s{i}" for i in range(30)] + ["The Test  sentence", "the test sentence"]
    a = ev.sample_demos(sentences, "the test sentence", 8, 42, "sc/sst2|3")
    assert a == ev.sample_demos(sentences, "the test sentence", 8, 42, "sc/sst2|3")
    assert len(a) == len(set(a)) == 8
    assert not {30, 31} & set(a)
    assert a != ev.sample_demos(sentences, "the test sentence", 8, 43, "sc/sst2|3")
    assert a != ev.sample_demos(sentences, "the test sentence", 8, 42, "sc/sst2|4")
    for seed in range(200):  # never the test sentence, whatever the draw
        assert not {30, 31} & set(ev.sample_demos(sentences, "The test sentence", 31, seed, "k"))
    assert ev.sample_demos(sentences, "x", 0, 42, "k") == []
    assert len(ev.sample_demos(sentences[:3], "s0", 8, 42, "k")) == 2  # fewer rows than k


def test_build_requests_is_stable_and_fits_the_token_budget(tmp_path):
    ds = ev.EvalDataset(name="sc/sst2", kind="classification", labels=["negative", "positive"],
                        train=TRAIN + [clf("train sentence 3", "negative")],
                        test=[clf("train sentence 3", "positive"), clf("fresh one", "negative")])
    rows = ev.build_requests(ds, k=4, seed=7, demos="per-example")
    assert rows == ev.build_requests(ds, k=4, seed=7, demos="per-example")
    assert [r["key"] for r in rows] == ["sc/sst2|0", "sc/sst2|1"] and {r["mode"] for r in rows} == {"score"}
    assert "Sentence: train sentence 3\nLabel: " not in rows[0]["prompt"].rsplit("\n\n", 1)[0]
    assert all(r["demos"] == 4 and not r["sentence_cut"] for r in rows)
    words = len  # count characters as "tokens"
    short = ev.build_requests(ds, k=4, seed=7, count_tokens=words, max_prompt_tokens=200, demos="per-example")
    assert all(len(r["prompt"]) <= 200 and r["demos"] < 4 for r in short)
    assert short[0]["prompt"] == ev.classification_prompt(
        ev.classification_instruction("sc/sst2", ds.labels),
        [(ds.train[j]["sentence"], ds.train[j]["label"]) for j in
         ev.sample_demos([t["sentence"] for t in ds.train], "train sentence 3", 4, 7, "sc/sst2|0")][: short[0]["demos"]],
        "train sentence 3")
    tiny = ev.build_requests(ds, k=4, seed=7, count_tokens=words, max_prompt_tokens=110, demos="per-example")
    assert tiny[0]["demos"] == 0 and tiny[0]["sentence_cut"] and len(tiny[0]["prompt"]) <= 110


def test_shared_demonstrations_are_one_draw_per_dataset_outside_the_test_split(tmp_path):
    train = [clf(f"train sentence {i}", "positive" if i % 2 else "negative") for i in range(40)]
    test = [clf(f"train sentence {i}", "positive") for i in (3, 5, 7)] + [clf(f"new sentence {i}", "negative")
                                                                            for i in range(5)]
    write_json(tmp_path / "sc/sst2/train.json", train)
    write_json(tmp_path / "sc/sst2/test.json", test)
    ds = ev.load_dataset(tmp_path, "sc/sst2", ev.CLASSIFICATION)
    rows = ev.build_requests(ds, k=6, seed=7)
    heads = {r["prompt"].rsplit("Sentence: ", 1)[0] for r in rows}
    assert len(heads) == 1 and all(r["demos"] == 6 for r in rows)  # every prompt: the same instruction and demos
    (head,) = heads
    assert len(ev.DEMO_DRAWS) == 2 and head.count("Label: ") == 6
    for sentence in ("train sentence 3", "train sentence 5", "train sentence 7"):  # test sentences never demonstrate
        assert f"Sentence: {sentence}\n" not in head
    # --limit changes neither the draw nor the prompts (the exclusion uses the whole test split)
    limited = ev.build_requests(ev.load_dataset(tmp_path, "sc/sst2", ev.CLASSIFICATION, limit=2), k=6, seed=7)
    assert [r["prompt"] for r in limited] == [r["prompt"] for r in rows[:2]]
    assert rows[0]["prompt"] != ev.build_requests(ds, k=6, seed=8)[0]["prompt"]  # another seed, another draw
    picks = ev.shared_demos([t["sentence"] for t in train], ds.test_normed, 6, 7, "sc/sst2")
    assert head.endswith("".join(f"Sentence: {train[j]['sentence']}\nLabel: {train[j]['label']}\n\n" for j in picks))
    # a prompt over the budget keeps the first demonstrations of the shared draw
    fitted = ev.build_requests(ds, k=6, seed=7, count_tokens=len, max_prompt_tokens=len(rows[0]["prompt"]) - 1)
    assert fitted[0]["demos"] == 5 and rows[0]["prompt"].startswith(fitted[0]["prompt"].rsplit("Sentence: ", 1)[0])
    with pytest.raises(UserError, match="demonstration draw must be one of shared, per-example, got 'all'"):
        ev.build_requests(ds, k=6, seed=7, demos="all")


def test_shared_prefix_lengths_group_prompts_by_demonstrations_kept():
    from compeffdist_ray.eval_runner import MIN_PREFIX_TOKENS, shared_prefix_lengths

    head = list(range(100, 100 + MIN_PREFIX_TOKENS + 10))
    ids = [head + [1, 2], head + [1, 3, 4], head[:MIN_PREFIX_TOKENS + 2] + [9], head[:MIN_PREFIX_TOKENS + 2] + [8, 7],
           head[:5] + [6], head + [1]]
    groups = [8, 8, 5, 5, 0, 8]
    assert shared_prefix_lengths(ids, groups) == [len(head) + 1, len(head) + 1, MIN_PREFIX_TOKENS + 2,
                                                  MIN_PREFIX_TOKENS + 2, 0, len(head)]  # at most len - 1
    assert shared_prefix_lengths([head + [1], head[:3] + [2]], [8, 8]) == [0, 0]  # too short to share


# ---- label tokens --------------------------------------------------------------------------


TOY_VOCAB: dict[str, int] = {}


def toy_encode(text):
    """Words (with their leading space) cut into 3-character pieces, like a crude subword tokenizer."""
    ids = []
    for i, word in enumerate(text.split(" ")):
        piece = (" " if i else "") + word
        ids.extend(TOY_VOCAB.setdefault(piece[j : j + 3], len(TOY_VOCAB)) for j in range(0, len(piece), 3))
    return ids


def test_label_first_tokens_in_context_and_collisions():
    ids = ev.label_first_tokens(toy_encode, ["negative", "positive"])
    assert ids == [toy_encode(" negative")[0], toy_encode(" positive")[0]] and ids[0] != ids[1]
    with pytest.raises(UserError) as err:  # " po" starts both
        ev.label_first_tokens(toy_encode, ["negative", "positive", "postal"], decode=lambda t: f"<{t[0]}>",
                              model="m")
    msg = str(err.value)
    assert "label first tokens collide for m: 'positive' and 'postal' share their first token" in msg
    assert f"(id {toy_encode(' positive')[0]})" in msg and "negative" not in msg.split(":")[1]


def test_label_first_token_merged_with_anchor_falls_back_to_the_label_alone():
    vocab = {"Label:": [1], "Label: yes": [2], "Label: no": [1, 3], " yes": [4, 5], " no": [3]}
    assert ev.label_first_tokens(lambda t: vocab[t], ["no", "yes"]) == [3, 4]


# ---- ABSA answers --------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ('[{"aspect_term": "sushi", "sentiment": "positive"}]', [("sushi", "positive")]),
    ('Sure! Here it is:\n```json\n[{"aspect_term": "Sushi", "sentiment": "Positive"},]\n```', [("sushi", "positive")]),
    ("[{'aspect_term': 'wine  list', 'sentiment': 'neutral'}]", [("wine list", "neutral")]),
    ('[{"term": "sushi", "polarity": "positive"}, {"aspect": "service", "sentiment": "negative"}, '
     '{"aspect_term": "sushi", "sentiment": "positive"}]', [("sushi", "positive"), ("service", "negative")]),
    ('[["sushi", "positive"], ["decor", "neutral"]]', [("sushi", "positive"), ("decor", "neutral")]),
    ('{"aspect_term": "sushi", "sentiment": "positive"}', [("sushi", "positive")]),
    ('{"aspects": [{"aspect_term": "sushi", "sentiment": "positive"}]}', [("sushi", "positive")]),
    ('[{"aspect_term": "sushi", "sentiment": "positive"}, {"aspect_term": "ser', [("sushi", "positive")]),
    ('[{"aspect_term": "sushi", "sentiment": "positive"}, {"aspect_te', [("sushi", "positive")]),
    ("sushi: positive\n- service: negative\nOverall sentiment: positive", [("sushi", "positive"), ("service", "negative")]),
    ("sushi: positive, decor: neutral", [("sushi", "positive"), ("decor", "neutral")]),
    ("[]", []),
    ("There are no aspects here: []", []),
])
def test_parse_atsa_answers(text, expected):
    assert ev.parse_absa_answer(text, "atsa").tuples == expected


@pytest.mark.parametrize("text", ["", "   ", "I think the food was good.", "Label: positive", "{{{", "[1, 2, 3]",
                                  '[{"aspect_term": "sushi"}]', "sushi: delicious"])
def test_unparseable_atsa_answers(text):
    assert ev.parse_absa_answer(text, "atsa").tuples is None


def test_invalid_items_are_counted():
    parsed = ev.parse_absa_answer('[{"aspect_term": "sushi", "sentiment": "positive"}, {"aspect_term": "x"}, 3]', "atsa")
    assert parsed.tuples == [("sushi", "positive")] and parsed.invalid_items == 2


def test_parse_acsa_and_asqp_answers():
    assert ev.parse_absa_answer('[{"category": "FOOD#QUALITY", "sentiment": "positive"}]', "acsa").tuples == [
        ("food#quality", "positive")]
    assert ev.parse_absa_answer("FOOD#QUALITY: negative", "acsa").tuples == [("food#quality", "negative")]
    quad = '[{"aspect": "NULL", "category": "Food Quality", "sentiment": "positive", "opinion": "tasty"}]'
    assert ev.parse_absa_answer(quad, "asqp").tuples == [("null", "food quality", "positive", "tasty")]
    assert ev.parse_absa_answer("(pizza, food quality, negative, soggy) (staff, service general, positive, kind)",
                                "asqp").tuples == [("pizza", "food quality", "negative", "soggy"),
                                                   ("staff", "service general", "positive", "kind")]
    assert ev.parse_absa_answer("pizza: negative", "asqp").tuples is None


# ---- metrics -------------------------------------------------------------------------------


def test_classification_metrics_with_a_class_never_predicted():
    gold = ["pos", "pos", "neg", "neu", "neu", "neg"]
    pred = ["pos", "neg", "neg", "pos", "pos", "neg"]
    m = ev.classification_metrics(gold, pred, ["neg", "neu", "pos"])
    assert m["accuracy"] == pytest.approx(3 / 6)
    # pos: P 1/3 R 1/2 F1 0.4; neg: P 2/3 R 1 F1 0.8; neu: never predicted, F1 0
    assert m["per_label"]["neu"]["f1"] == 0.0
    assert m["macro_f1"] == pytest.approx((0.4 + 0.8 + 0.0) / 3)
    assert m["confusion"] == {"neg": {"neg": 2, "neu": 0, "pos": 0}, "neu": {"neg": 0, "neu": 0, "pos": 2},
                              "pos": {"neg": 1, "neu": 0, "pos": 1}}
    from sklearn.metrics import accuracy_score, f1_score

    assert m["macro_f1"] == pytest.approx(f1_score(gold, pred, average="macro"))
    assert m["accuracy"] == pytest.approx(accuracy_score(gold, pred))


def test_classification_metrics_perfect_and_unexpected_gold_label():
    m = ev.classification_metrics(["a", "b"], ["a", "b"], ["a", "b"])
    assert m["macro_f1"] == 1.0 and m["accuracy"] == 1.0
    m = ev.classification_metrics(["a", "c"], ["a", "a"], ["a", "b"])  # 'c' only in the test split
    assert m["confusion"]["c"] == {"a": 1, "b": 0} and m["macro_f1"] == pytest.approx((2 / 3 + 0) / 2)


def test_classification_metrics_count_unparsed_answers_as_wrong_not_as_a_class():
    m = ev.classification_metrics(["positive", "negative", "negative", "positive"],
                                  ["positive", None, "negative", None], ["negative", "positive"])
    assert m["accuracy"] == 0.5 and m["unparsed"] == 2
    assert set(m["per_label"]) == {"negative", "positive"}  # no "(unparsed)" class in the macro average
    assert m["per_label"]["positive"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["macro_f1"] == pytest.approx(2 / 3)
    assert m["confusion"]["negative"] == {"negative": 1, "positive": 0, ev.UNPARSED: 1}


@pytest.mark.parametrize("alternatives, expected", [
    ({"positive": -0.1, "negative": -2.5}, 1),  # labels ["negative", "positive"]: index 1
    ({" Negative": -0.3, "pos": -1.2}, 0),  # case and spaces ignored, a split label counts by its first piece
    ({"pos": -0.2, "itive": -0.1, "neg": -3.0}, 1),  # "itive" begins no label
    ({"The": -0.1, "I": -0.5}, None),  # no alternative begins a label
    ({}, None),
    (None, None),
])
def test_label_from_logprobs(alternatives, expected):
    assert ev.label_from_logprobs(alternatives, ["negative", "positive"]) == expected


def test_label_from_logprobs_refuses_a_token_shared_by_two_labels():
    labels = ["negative", "neutral", "positive"]
    assert ev.label_from_logprobs({"ne": -0.1, "positive": -2.0}, labels) is None  # "ne" begins two labels
    assert ev.label_from_logprobs({"neutral": -0.1, "ne": -0.5}, labels) == 1
    assert ev.label_from_logprobs({"NEG": -0.4, "neutral": -0.4}, labels) is None  # an exact tie


@pytest.mark.parametrize("text, expected", [
    ("positive", 1),
    ("Positive.", 1),
    ('"negative"', 0),
    ("Label: negative", 0),  # the only label it mentions
    ("The sentiment is clearly positive here.", 1),
    ("positive or negative, hard to say", 1),  # the label it starts with wins
    ("It is neither.", None),
    ("Could be negative, could be positive.", None),  # names both
    ("", None),
])
def test_label_from_text(text, expected):
    assert ev.label_from_text(text, ["negative", "positive"]) == expected


def test_label_from_text_prefers_longer_labels():
    labels = ["irony", "non-irony"]
    assert ev.label_from_text("non-irony", labels) == 1
    assert ev.label_from_text("This tweet is non-irony.", labels) == 1  # "irony" inside "non-irony" does not count
    assert ev.label_from_text("irony, not non-irony", labels) == 0  # starts with a label
    assert ev.label_from_text("either irony or non-irony", labels) is None


def test_tuple_metrics_micro_with_duplicates_and_empty_predictions():
    gold = [{("sushi", "positive"), ("service", "negative")}, {("decor", "neutral")}, set(), {("wine", "positive")}]
    pred = [[("sushi", "positive"), ("sushi", "positive"), ("service", "positive")],  # dup counts once
            None,  # unparseable: predicts nothing
            [("bread", "positive")],  # a false positive on an example without gold
            []]
    m = ev.tuple_metrics(gold, pred)
    assert (m["tp"], m["n_pred"], m["n_gold"]) == (1, 3, 4)
    assert m["precision"] == pytest.approx(1 / 3) and m["recall"] == pytest.approx(1 / 4)
    assert m["f1"] == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))
    assert ev.tuple_metrics([set()], [None]) == {"n": 1, "precision": 0.0, "recall": 0.0, "f1": 0.0, "tp": 0,
                                                 "n_pred": 0, "n_gold": 0}


def test_score_dataset_absa_counts_failures_and_terms_outside_the_sentence():
    test = [{"sentence": "Great sushi.", "aspects": [{"target": "sushi", "category": "FOOD#QUALITY", "polarity": "positive"}]},
            {"sentence": "Meh.", "aspects": []},
            {"sentence": "Rude staff.", "aspects": [{"target": "staff", "category": "SERVICE#GENERAL", "polarity": "negative"}]}]
    ds = ev.EvalDataset(name="absa/atsa_rest16", kind="atsa", test=test, train=test, n_test_total=3)
    requests = ev.build_requests(ds, k=1, seed=0)
    outputs = {requests[0]["key"]: {"text": '[{"aspect_term": "sushi", "sentiment": "positive"}]', "finish": "line"},
               requests[1]["key"]: {"text": '[{"aspect_term": "pizza", "sentiment": "negative"}]', "finish": "line"},
               requests[2]["key"]: {"text": "I cannot tell", "finish": "length"}}
    block = ev.score_dataset(ds, requests, outputs)
    assert block["metrics"] == {"f1": pytest.approx(0.5), "precision": 0.5, "recall": 0.5}
    assert block["counts"] == {"tp": 1, "n_pred": 2, "n_gold": 2}
    assert block["parse_failures"] == 1 and block["truncated_answers"] == 1 and block["terms_not_in_sentence"] == 1
    assert block["examples"][2]["pred"] is None and len(block["examples"]) == 3


# ---- tables --------------------------------------------------------------------------------


def result(model, scores, k=8, seed=42):
    blocks = {}
    for name, f1 in scores.items():
        if name.startswith("absa/"):
            blocks[name] = {"kind": "atsa", "n": 10, "metrics": {"f1": f1, "precision": f1, "recall": f1},
                            "parse_failures": 2}
        else:
            blocks[name] = {"kind": "classification", "n": 10, "metrics": {"macro_f1": f1, "accuracy": f1}}
    return {"model": model, "k": k, "seed": seed, "limit": 10, "datasets": blocks}


def test_results_table():
    table = ev.results_table(result("m", {"sc/sst2": 0.5, "absa/atsa_rest16": 0.25}))
    lines = table.splitlines()
    assert lines[0].split("|")[1:4] == [" dataset          ", " kind           ", "  n "]
    assert [c.strip() for c in lines[2].split("|")[1:-1]] == ["sc/sst2", "classification", "10", "50.0", "50.0", "-", "-", "-"]
    assert [c.strip() for c in lines[3].split("|")[1:-1]] == ["absa/atsa_rest16", "atsa", "10", "25.0", "-", "25.0",
                                                               "25.0", "2"]
    assert [c.strip() for c in lines[4].split("|")[1:-1]][:4] == ["mean", "", "", "37.5"]


def test_compare_table_with_mean_rows():
    a = result("base", {"sc/sst2": 0.5, "sc/imdb": 0.7, "absa/atsa_rest16": 0.1})
    b = result("distilled", {"sc/sst2": 0.8, "absa/atsa_rest16": 0.3})
    names = ev.compare_names([a, b], ["a.json", "b.json"])
    assert names == ["base (k=8, seed=42)", "distilled (k=8, seed=42)"]
    rows = [[c.strip() for c in ln.split("|")[1:-1]] for ln in ev.compare_table([a, b], names).splitlines()]
    assert rows[0] == ["dataset", *names]
    assert rows[2:] == [["sc/sst2", "50.0", "80.0"], ["sc/imdb", "70.0", "-"], ["absa/atsa_rest16", "10.0", "30.0"],
                        ["mean", "43.3", "55.0"], ["mean (2 common)", "30.0", "55.0"]]
    same = ev.compare_names([a, a], ["x/one.json", "two.json"])
    assert same == ["base (k=8, seed=42) [one.json]", "base (k=8, seed=42) [two.json]"]
    # the evaluate stage's files carry their role in the run, which names the column instead of a model path
    staged = dict(b, model="/runs/demo/finetune/model", label="distilled")
    assert ev.compare_names([staged], ["distilled.json"]) == ["distilled (k=8, seed=42)"]


def test_load_result_rejects_other_files(tmp_path):
    good = write_json(tmp_path / "r.json", result("m", {"sc/sst2": 0.5}), bom=False)
    assert ev.load_result(good)["model"] == "m"
    with pytest.raises(UserError, match="is not a result file of 'compeffdist eval'"):
        ev.load_result(write_json(tmp_path / "x.json", [1, 2]))
    with pytest.raises(UserError, match="result file not found"):
        ev.load_result(tmp_path / "missing.json")


def test_absa_items_are_checked_on_load(tmp_path):
    write_json(tmp_path / "absa/asqp_rest16/test.json", [{"sentence": "s", "quards": [{"aspect": "a", "category": "c"}]}])
    write_json(tmp_path / "absa/asqp_rest16/train.json", [{"sentence": "s", "quards": []}])
    with pytest.raises(UserError, match=r"record 0, quards\[0\] has no string sentiment, opinion"):
        ev.load_dataset(tmp_path, "absa/asqp_rest16", "asqp")


def test_eval_config_collects_every_problem_and_names_the_output():
    from compeffdist_ray.eval_runner import EvalConfig, default_out_path

    with pytest.raises(UserError) as err:
        EvalConfig(model="m", data_dir="d", k_shot=-1, batch_size=0, limit=0, dtype="int4")
    assert str(err.value) == ("invalid eval options: --k-shot must be an integer >= 0, got -1; --batch-size must be an "
                              "integer >= 1, got 0; --limit must be a positive integer, got 0; --dtype must be auto, "
                              "float32, bfloat16 or float16, got 'int4'")
    endpoint = EvalConfig(model="https://api.example.com/v1", data_dir="d")
    assert endpoint.is_endpoint and endpoint.num_cpus == 0.25  # HTTP clients need little CPU
    assert EvalConfig(model="m", data_dir="d").num_cpus == 1.0
    assert default_out_path(endpoint) == "eval-api.example.com-k8-seed42.json"
    assert default_out_path(EvalConfig(model="http://127.0.0.1:8000/v1", data_dir="d")) == "eval-127.0.0.1-8000-k8-seed42.json"
    assert default_out_path(EvalConfig(model="http://127.0.0.1:8000/v1", data_dir="d",
                                       endpoint_model="org/teacher-70b")) == "eval-teacher-70b-k8-seed42.json"
    with pytest.raises(UserError, match="--endpoint-model names a model of an OpenAI-compatible endpoint"):
        EvalConfig(model="m", data_dir="d", endpoint_model="x")
    cfg = EvalConfig(model="/models/my student/", data_dir="d", datasets="sst2,atsa_rest16", limit=50)
    assert cfg.datasets == ("sst2", "atsa_rest16")
    assert default_out_path(cfg) == "eval-my_student-k8-seed42-limit50.json"
    assert default_out_path(EvalConfig(model="org/name", data_dir="d", seed=1)) == "eval-name-k8-seed1.json"


def test_saved_predictions_count_only_with_the_same_fingerprint_and_every_key(tmp_path):
    from compeffdist_ray.eval_runner import EvalConfig, PredictionStore, dataset_fingerprint, model_identity

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    model = model_identity(str(tmp_path / "m"))
    cfg = EvalConfig(model="m", data_dir="d")
    rows = [{"key": f"sc/sst2|{i}", "mode": "score", "prompt": f"p{i}", "candidates": "[1, 2]"} for i in range(3)]
    fp = dataset_fingerprint(cfg, model, rows)
    assert fp == dataset_fingerprint(EvalConfig(model="m", data_dir="d", batch_size=32), model, rows)  # speed only
    for changed in (EvalConfig(model="m", data_dir="d", max_new_tokens=13), EvalConfig(model="m", data_dir="d",
                                                                                       dtype="bfloat16")):
        assert dataset_fingerprint(changed, model, rows) != fp
    assert dataset_fingerprint(cfg, model, rows[:2] + [{**rows[2], "prompt": "other"}]) != fp
    (tmp_path / "m" / "config.json").write_text('{"vocab_size": 3}')  # other weights or config: other model
    assert dataset_fingerprint(cfg, model_identity(str(tmp_path / "m")), rows) != fp
    assert model_identity("org/name") == {"id": "org/name"}

    store = PredictionStore(tmp_path / "preds")
    keys = [r["key"] for r in rows]
    assert store.load("sc/sst2", fp, keys) is None
    outputs = [{"key": k, "pred": 1} for k in keys]
    store.save("sc/sst2", fp, outputs)
    assert store.load("sc/sst2", fp, keys) == {o["key"]: o for o in outputs}
    assert store.load("sc/sst2", "other", keys) is None  # made by something else
    assert store.load("sc/sst2", fp, keys + ["sc/sst2|3"]) is None  # does not cover the rows asked for
    (tmp_path / "preds" / "sc__sst2.jsonl").write_text('{"key": "sc/sst2|0"}\n{broken')  # a damaged file
    assert store.load("sc/sst2", fp, keys) is None
