"""The shared trainer on real Ray Train + DeepSpeed (CPU accelerator, gloo), tiny random models."""

from __future__ import annotations

import os

import pandas as pd
import pytest

pytestmark = pytest.mark.integration


def _rows(n: int = 48) -> pd.DataFrame:
    words = ["great", "awful", "fine", "lovely", "broken", "slow"]
    labels = {"great": "positive", "lovely": "positive", "awful": "negative", "broken": "negative",
              "fine": "neutral", "slow": "negative"}
    picks = [words[i % len(words)] for i in range(n)]
    return pd.DataFrame({
        "pair_id": [f"p{i}" for i in range(n)],
        "instruction": ["Say whether the review is positive, negative or neutral."] * n,
        "text": [f"review {i}: the product was {w}" for i, w in enumerate(picks)],
        "response": [labels[w] for w in picks],
    })


@pytest.mark.parametrize("family", ["tiny-random-llama", "tiny-random-qwen3", "tiny-random-gemma3"])
def test_two_workers_zero2_loss_falls_and_export_generates(ray_session, tmp_path, family):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compeffdist_ray.models import resolve_model
    from compeffdist_ray.training import TrainSpec, remove_run_storage, train_student

    spec = TrainSpec(model_path=resolve_model(family), storage_path=str(tmp_path / "ckpt"),
                     name="zero2", num_workers=2, cpus_per_worker=0.5, zero_stage=2, micro_batch_size=4,
                     lr=1e-3, warmup_steps=2, checkpoint_every=8, keep_checkpoints=2, epochs=4)
    out = tmp_path / "model"
    result = train_student(_rows(), spec, str(out))
    # 48 rows x 4 epochs over 2 workers x 4 per micro-batch: 24 optimizer steps
    assert result.steps == 24 and result.examples == 192 and result.too_long == 0 and result.resumed_from_step == 0
    losses = [h["loss"] for h in result.history]
    assert [h["step"] for h in result.history] == list(range(1, 25))
    # falls: the last epoch's mean well under the first's (single steps are noisy)
    assert sum(losses[-6:]) < 0.85 * sum(losses[:6]), losses
    # checkpoints were reported into the storage path, the oldest pruned (2 kept + the export)
    ckpts = sorted(p for p in os.listdir(tmp_path / "ckpt" / "zero2") if p.startswith("checkpoint_"))
    assert 1 <= len(ckpts) <= 3, ckpts
    remove_run_storage(spec)
    assert not (tmp_path / "ckpt" / "zero2").exists()

    assert {"model.safetensors", "config.json", "tokenizer_config.json", "generation_config.json"} <= set(os.listdir(out))
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "How was it?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > ids["input_ids"].shape[1]
    # the trained weights differ from the base model's
    base = AutoModelForCausalLM.from_pretrained(resolve_model(family))
    name, p = next(iter(model.state_dict().items()))
    assert not torch.equal(p, base.state_dict()[name])
    # the student's chat template travels with the export (vLLM and transformers format prompts with it)
    assert tok.chat_template and tok.chat_template == AutoTokenizer.from_pretrained(resolve_model(family)).chat_template


def test_unplaceable_workers_fail_fast(ray_session, tmp_path):
    from compeffdist_ray.errors import UserError
    from compeffdist_ray.models import resolve_model
    from compeffdist_ray.training import TrainSpec, train_student

    spec = TrainSpec(model_path=resolve_model("tiny-random-llama"), storage_path=str(tmp_path), name="x",
                     num_workers=8, cpus_per_worker=1.0)
    with pytest.raises(UserError, match=r"cannot place the training workers: 8 CPUs \(8 workers x 1\) but the "
                                         r"cluster has 2"):
        train_student(_rows(), spec, str(tmp_path / "out"))


def test_packing_with_zero0_on_one_worker_and_a_storage_uri(ray_session, tmp_path):
    from compeffdist_ray.models import resolve_model
    from compeffdist_ray.training import TrainSpec, remove_run_storage, train_student

    # storage as a URI (pyarrow filesystems: file://, s3://, gs://, ...), as on a cluster
    spec = TrainSpec(model_path=resolve_model("tiny-random-qwen3"), storage_path=f"file://{tmp_path}/ckpt",
                     name="packed", num_workers=1, cpus_per_worker=0.5, zero_stage=0, micro_batch_size=2,
                     max_length=128, lr=1e-3, warmup_steps=1, checkpoint_every=5, packing=True, epochs=3)
    result = train_student(_rows(), spec, str(tmp_path / "model"))
    assert any(p.name.startswith("checkpoint_") for p in (tmp_path / "ckpt" / "packed").iterdir())
    remove_run_storage(spec)
    assert not (tmp_path / "ckpt" / "packed").exists()
    # 144 examples of ~55 tokens packed two to a 128-token sequence: about half the 72 unpacked steps
    assert result.examples == 144 and 4 <= result.steps <= 48, result.steps
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.85 * losses[0], losses
    assert sum(h["tokens"] for h in result.history) == result.train_tokens > 0


def test_killed_finetune_resumes_at_the_saved_step_with_the_same_data_order(tmp_path):
    """SIGKILL the whole run mid-training; the rerun continues from the latest checkpoint, and its
    losses from there on equal those of an uninterrupted run (same data order, same optimizer state)."""
    import glob
    import json
    import signal
    import subprocess
    import sys
    import time

    from conftest import CONFIGS, ROOT

    data = tmp_path / "answers.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _rows(48).drop(columns=["pair_id"]).to_dict("records")))

    def args(run_dir):
        return [sys.executable, "-m", "compeffdist_ray", "run", "--config", str(CONFIGS / "tiny-test.yaml"),
                "--run-dir", str(run_dir), f"responses.file={data}", "warmup.enabled=false", "finetune.epochs=4",
                "train.checkpoint_every=3", "train.keep_checkpoints=2", "train.zero_stage=2"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen(args(killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 400
        while not glob.glob(str(killed / "_train" / "finetune-*" / "checkpoint_*" / "ds")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (killed / "finetune" / "_manifest.json").exists()

    rerun = subprocess.run(args(killed), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "responses: already done" in rerun.stderr
    stats = json.loads((killed / "finetune" / "_manifest.json").read_text())["stats"]
    # 24 kept rows x 4 epochs / micro-batch 4 = 24 steps; the rerun started at a checkpoint (every 3 steps)
    assert stats["steps"] == 24 and 3 <= stats["resumed_from_step"] < 24 and stats["resumed_from_step"] % 3 == 0
    assert f"resumed from step {stats['resumed_from_step']} of 24" in rerun.stdout + rerun.stderr
    resumed = pd.read_parquet(killed / "finetune" / "history.parquet")
    assert list(resumed["step"]) == list(range(1, 25))

    whole = tmp_path / "whole"
    clean = subprocess.run(args(whole), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert clean.returncode == 0, clean.stderr[-3000:]
    reference = pd.read_parquet(whole / "finetune" / "history.parquet")
    assert list(reference["step"]) == list(range(1, 25))
    import numpy as np

    np.testing.assert_allclose(resumed["loss"], reference["loss"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(resumed["lr"], reference["lr"], rtol=1e-6)


def test_gemma3_zero3_two_workers_exports_the_gathered_weights(ray_session, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from compeffdist_ray.models import resolve_model
    from compeffdist_ray.training import TrainSpec, train_student

    base_path = resolve_model("tiny-random-gemma3")
    spec = TrainSpec(model_path=base_path, storage_path=str(tmp_path / "ckpt"), name="zero3", num_workers=2,
                     cpus_per_worker=0.5, zero_stage=3, micro_batch_size=2, gradient_accumulation_steps=2,
                     lr=1e-3, warmup_steps=1, checkpoint_every=3)
    result = train_student(_rows(), spec, str(tmp_path / "model"))
    losses = [h["loss"] for h in result.history]
    # 48 rows / (2 workers x 2 per micro-batch x 2 accumulated): 6 optimizer steps of 8 rows each
    assert result.steps == 6 and losses[-1] < losses[0], losses
    # ZeRO-3 shards every parameter over the ranks: the export must hold all of them, gathered
    base = AutoModelForCausalLM.from_pretrained(base_path).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    assert set(tuned) == set(base)
    assert all(tuned[k].shape == base[k].shape for k in base)
    assert sum(not torch.equal(tuned[k], base[k]) for k in base) >= len(base) - 2  # norms may stay put


def test_lora_zero3_two_workers_survives_a_failure_and_exports_merged_weights(ray_session, tmp_path, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compeffdist_ray.models import resolve_model
    from compeffdist_ray.training import TrainSpec, train_student

    base_path = resolve_model("tiny-random-llama")
    monkeypatch.setenv("COMPEFFDIST_FAIL_AT_STEP", "3")  # one worker raises once at step 3
    monkeypatch.setenv("COMPEFFDIST_FAIL_MARKER", str(tmp_path / "failed-once"))
    spec = TrainSpec(model_path=base_path, storage_path=str(tmp_path / "ckpt"), name="lora", num_workers=2,
                     cpus_per_worker=0.5, zero_stage=3, micro_batch_size=4, lr=2e-2, warmup_steps=1,
                     checkpoint_every=2, max_failures=1, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    result = train_student(_rows(), spec, str(tmp_path / "model"))
    assert (tmp_path / "failed-once").exists()
    # the restarted group loaded the adapters-only checkpoint of step 2 over the frozen base weights
    assert result.resumed_from_step == 2 and [h["step"] for h in result.history] == list(range(1, 7))
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0], losses
    # the export is a plain model: adapters merged, no peft names, every linear weight moved
    base = AutoModelForCausalLM.from_pretrained(base_path).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tuned = merged.state_dict()
    assert set(tuned) == set(base) and not any("lora" in k for k in tuned)
    linear = [k for k in base if k.endswith("proj.weight")]
    assert linear and all(not torch.equal(tuned[k], base[k]) for k in linear)
    assert all(torch.equal(tuned[k], base[k]) for k in base if "norm" in k)  # frozen, untouched
    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    ids = tok.apply_chat_template([{"role": "user", "content": "How was it?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert merged.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] > ids["input_ids"].shape[1]
