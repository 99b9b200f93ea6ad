"""The pure parts of training: example encoding (label mask), packing, collation, step counts,
the DeepSpeed config, the LR schedule, resource checks. No Ray, no DeepSpeed engine."""

from __future__ import annotations

import math

import pytest

from compeffdist_ray.errors import UserError
from compeffdist_ray.sft import IGNORE_INDEX, collate, encode_example, encode_rows, pack, training_steps
from compeffdist_ray.training import (
    TrainSpec,
    check_resources,
    deepspeed_config,
    effective_warmup,
    epoch_order,
    lr_lambda,
    train_view,
)

ROW = {"instruction": "Classify the sentiment of the text as positive, negative or neutral.",
       "text": "The soup was cold but the staff were lovely.", "response": "neutral"}


@pytest.fixture(scope="module", params=["tiny-random-llama", "tiny-random-qwen3", "tiny-random-gemma3"])
def tokenizer(request):
    from transformers import AutoTokenizer

    from compeffdist_ray.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(request.param))


def test_label_mask_covers_exactly_the_chat_prompt(tokenizer):
    from compeffdist_ray.prompts import render_instruction
    from compeffdist_ray.teacher.transformers_backend import format_chat

    ex = encode_example(tokenizer, ROW, 4096)
    ids, labels = ex["input_ids"], ex["labels"]
    assert len(ids) == len(labels)
    n_prompt = sum(1 for x in labels if x == IGNORE_INDEX)
    # every masked position comes before every trained one
    assert all(x == IGNORE_INDEX for x in labels[:n_prompt]) and IGNORE_INDEX not in labels[n_prompt:]
    prompt_text = format_chat(tokenizer, [{"role": "user", "content": render_instruction(ROW["instruction"], ROW["text"])}])
    assert tokenizer.decode(ids[:n_prompt]) == prompt_text
    # the trained tokens are the response and EOS, nothing of the prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[n_prompt:-1]) == ROW["response"]


def test_too_long_rows_are_dropped_and_counted(tokenizer):
    n = len(encode_example(tokenizer, ROW, 4096)["input_ids"])
    assert encode_example(tokenizer, ROW, n) is not None
    assert encode_example(tokenizer, ROW, n - 1) is None
    long_row = dict(ROW, text=ROW["text"] * 50)
    examples, too_long = encode_rows(tokenizer, [ROW, long_row, ROW], n)
    assert len(examples) == 2 and too_long == 1


def test_pack_keeps_labels_and_restarts_positions():
    exs = [{"input_ids": [1] * 5, "labels": [-100] * 3 + [1] * 2},
           {"input_ids": [2] * 4, "labels": [-100] * 2 + [2] * 2},
           {"input_ids": [3] * 6, "labels": [-100] * 1 + [3] * 5}]
    packed = pack(exs, 10)
    assert [len(p["input_ids"]) for p in packed] == [9, 6]
    assert packed[0]["position_ids"] == list(range(5)) + list(range(4))
    assert packed[0]["labels"] == exs[0]["labels"] + exs[1]["labels"]
    assert sum(len(p["input_ids"]) for p in packed) == 15
    # an example longer than max_length still gets its own sequence (encode drops those earlier)
    assert len(pack([{"input_ids": [1] * 12, "labels": [1] * 12}], 10)) == 1


def test_collate_pads_right_and_masks_padding():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert "position_ids" not in batch
    packed = collate(pack([{"input_ids": [5, 6], "labels": [5, 6]}, {"input_ids": [7], "labels": [7]}], 8), pad_id=0)
    assert packed["position_ids"].tolist() == [[0, 1, 0]]


@pytest.mark.parametrize("n,workers,mb,acc,max_steps,expected", [
    (96, 2, 4, 1, None, (12, 12)),
    (97, 2, 4, 1, None, (12, 12)),   # the odd row is dropped, ranks stay in step
    (96, 2, 4, 5, None, (2, 10)),    # 12 micro-batches -> 2 whole steps of 5
    (96, 1, 4, 1, 5, (5, 5)),
    (7, 2, 4, 1, None, (0, 0)),
])
def test_training_steps_are_equal_on_every_rank(n, workers, mb, acc, max_steps, expected):
    assert training_steps(n, num_workers=workers, micro_batch_size=mb, gradient_accumulation_steps=acc,
                          max_steps=max_steps) == expected


def _spec(**kw):
    return TrainSpec(model_path="/m", storage_path="/s", name="n", **kw)


def test_deepspeed_config_follows_the_spec():
    cfg = deepspeed_config(_spec(zero_stage=2, micro_batch_size=4, gradient_accumulation_steps=2), world_size=2)
    assert cfg["train_batch_size"] == 16 and cfg["zero_optimization"] == {"stage": 2}
    assert cfg["bf16"] == {"enabled": False}  # CPU: fp32
    assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.95] and cfg["optimizer"]["params"]["torch_adam"] is True
    gpu3 = deepspeed_config(_spec(zero_stage=3, use_gpu=True, offload_optimizer=True, offload_params=True), 8)
    assert gpu3["bf16"] == {"enabled": True}
    assert gpu3["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert gpu3["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert gpu3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert deepspeed_config(_spec(zero_stage=0), 1)["zero_optimization"] == {"stage": 0}


def test_lr_schedule_warms_up_then_decays():
    spec = _spec(warmup_steps=100, lr_schedule="cosine")
    assert effective_warmup(spec, 10_000) == 100
    assert effective_warmup(spec, 30) == 3  # capped at a tenth of a short run
    f = lr_lambda(spec, 1000)
    assert f(0) == pytest.approx(0.01) and f(99) == pytest.approx(1.0)
    assert f(100) == pytest.approx(1.0) and f(550) == pytest.approx(0.5) and f(1000) == pytest.approx(0.0, abs=1e-12)
    assert all(f(s) >= f(s + 1) - 1e-12 for s in range(100, 1000))
    lin = lr_lambda(_spec(warmup_steps=0, lr_schedule="linear"), 100)
    assert lin(50) == pytest.approx(0.5)
    const = lr_lambda(_spec(warmup_steps=10, lr_schedule="constant"), 1000)
    assert const(500) == 1.0 and math.isclose(const(4), 0.5)


def test_resource_check_fails_fast_with_what_was_asked_and_what_is_there():
    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}]
    check_resources(_spec(num_workers=2, cpus_per_worker=0.5), {"CPU": 2.0}, nodes)
    with pytest.raises(UserError, match=r"6 CPUs \(3 workers x 2\) but the cluster has 2"):
        check_resources(_spec(num_workers=3, cpus_per_worker=2), {"CPU": 2.0}, nodes)
    with pytest.raises(UserError, match=r"GPUs .* the cluster has 0"):
        check_resources(_spec(num_workers=1, use_gpu=True), {"CPU": 2.0}, nodes)
    with pytest.raises(UserError, match=r"STRICT_SPREAD needs 2 nodes .* has 1"):
        check_resources(_spec(num_workers=2, cpus_per_worker=0.5, placement_strategy="STRICT_SPREAD"),
                        {"CPU": 2.0}, nodes)
    two = nodes + [{"Alive": True, "Resources": {"CPU": 1.0}}]
    check_resources(_spec(num_workers=2, cpus_per_worker=0.5, placement_strategy="STRICT_SPREAD"), {"CPU": 3.0}, two)


def test_epoch_order_is_a_seeded_permutation_per_epoch():
    order = epoch_order(10, 3, seed=7)
    assert len(order) == 30 and all(sorted(order[i * 10:(i + 1) * 10]) == list(range(10)) for i in range(3))
    assert order == epoch_order(10, 3, seed=7) and order != epoch_order(10, 3, seed=8)
    assert order[:10] != order[10:20]


def test_train_fingerprint_ignores_placement_but_not_the_recipe():
    from compeffdist_ray.config import load_config

    base = train_view(load_config(None, []).train)
    assert train_view(load_config(None, ["train.cpus_per_worker=0.5", "train.checkpoint_every=7",
                                         "train.storage_path=/x"]).train) == base
    assert train_view(load_config(None, ["train.lr=1e-4"]).train) != base
    assert train_view(load_config(None, ["train.num_workers=2"]).train) != base  # global batch changes
    # LoRA settings count only with LoRA on: full fine-tuning runs stay done when they change
    assert train_view(load_config(None, ["train.lora.alpha=8", "train.lora.dropout=0.2"]).train) == base
    lora = train_view(load_config(None, ["train.lora.r=8"]).train)
    assert lora != base and train_view(load_config(None, ["train.lora.r=8", "train.lora.alpha=8"]).train) != lora


def test_trainer_drops_rays_placement_group_cleaner():
    # Ray 2.60's cleaner removed a live run's placement group on a loaded machine (seen in CI)
    from ray.train import ScalingConfig

    from compeffdist_ray.training import _trainer_class

    trainer = _trainer_class()(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    names = [type(cb).__name__ for cb in trainer._create_default_callbacks()]
    assert "PlacementGroupCleanerCallback" not in names and "BackendSetupCallback" in names


@pytest.mark.parametrize("has_template, model_type, setting, layout", [
    (True, "llama", "auto", "chat"),
    (True, "mystery", "chat", "chat"),
    (False, "qwen3", "auto", "plain"),  # a base model of a known family
    (False, "mystery", "plain", "plain"),  # the user said so
])
def test_prompt_format_resolves(has_template, model_type, setting, layout):
    from compeffdist_ray.sft import check_prompt_format

    assert check_prompt_format("m", has_template, model_type, setting) == layout


@pytest.mark.parametrize("has_template, model_type, setting, message", [
    (False, "mystery", "auto", "no chat template and an unknown family (model_type 'mystery'); set "
                               "student.prompt_format=plain"),
    (False, "llama", "chat", "student.prompt_format=chat but its tokenizer has no chat template"),
    (True, "llama", "plain", "its tokenizer has a chat template"),
])
def test_prompt_format_mismatch_names_the_fix(has_template, model_type, setting, message):
    from compeffdist_ray.sft import check_prompt_format

    with pytest.raises(UserError, match=r"^student models/x: ") as err:
        check_prompt_format("models/x", has_template, model_type, setting)
    assert message in str(err.value)


def test_lora_config_from_the_spec():
    from compeffdist_ray.training import lora_config

    assert lora_config(TrainSpec(model_path="m", storage_path="/s", name="n")) is None  # full fine-tuning
    cfg = lora_config(TrainSpec(model_path="m", storage_path="/s", name="n", lora_r=8, lora_alpha=16,
                                lora_dropout=0.0, lora_target_modules="q_proj, v_proj"))
    assert (cfg.r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.0)
    assert set(cfg.target_modules) == {"q_proj", "v_proj"}
    assert lora_config(TrainSpec(model_path="m", storage_path="/s", name="n", lora_r=4)).target_modules == "all-linear"


def test_lora_on_a_real_tiny_model_trains_only_the_adapters_and_bad_targets_are_named():
    from transformers import AutoModelForCausalLM

    from compeffdist_ray.models import resolve_model
    from compeffdist_ray.training import with_lora

    spec = TrainSpec(model_path=resolve_model("tiny-random-qwen3"), storage_path="/s", name="n", lora_r=4)
    model = with_lora(AutoModelForCausalLM.from_pretrained(spec.model_path), spec)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any("mlp" in n for n in trainable) and not any("lm_head" in n for n in trainable)  # all-linear
    bad = TrainSpec(model_path=spec.model_path, storage_path="/s", name="n", lora_r=4, lora_target_modules="qkv")
    with pytest.raises(UserError, match=r"train.lora.target_modules='qkv': .*use all-linear"):
        with_lora(AutoModelForCausalLM.from_pretrained(spec.model_path), bad)
