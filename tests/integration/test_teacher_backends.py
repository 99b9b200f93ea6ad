"""The teacher backends against real models (tiny random Llama / Qwen3 / Gemma 3, SmolLM2)."""

from __future__ import annotations

import pytest

from compeffdist_ray.config import TeacherConfig
from compeffdist_ray.teacher.base import GenParams

pytestmark = pytest.mark.integration

FAMILIES = ["tiny-random-llama", "tiny-random-qwen3", "tiny-random-gemma3"]
CHATS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The soup was cold and the waiter rude."}],
    [{"role": "user", "content": "A much longer question about the battery, screen, price and delivery of my phone?"}],
]


@pytest.mark.parametrize("alias", FAMILIES)
def test_batched_left_padded_generation_matches_one_at_a_time(alias):
    from compeffdist_ray.models import resolve_model
    from compeffdist_ray.teacher.transformers_backend import TransformersBackend

    backend = TransformersBackend(resolve_model(alias), threads=2)
    params = GenParams(max_new_tokens=8, repetition_penalty=1.0)
    batched = backend.generate(CHATS, params)
    single = [backend.generate([c], params)[0] for c in CHATS]
    for b, s in zip(batched, single):
        assert b.text == s.text
        assert (b.input_tokens, b.output_tokens, b.finish_reason) == (s.input_tokens, s.output_tokens, s.finish_reason)
    # token counts: prompt tokens are the chat-templated prompt, not the padding
    prompts = [backend.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in CHATS]
    expected = [len(backend.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert [g.input_tokens for g in batched] == expected
    assert all(1 <= g.output_tokens <= 8 for g in batched)


def test_prompt_longer_than_limit_is_cut_from_the_left_and_counted():
    from compeffdist_ray.models import resolve_model
    from compeffdist_ray.teacher.transformers_backend import TransformersBackend

    backend = TransformersBackend(resolve_model("tiny-random-llama"), max_prompt_tokens=16, threads=2)
    gens = backend.generate([[{"role": "user", "content": "word " * 200}], CHATS[0]], GenParams(max_new_tokens=2))
    assert gens[0].input_tokens == 16 and backend.truncated_prompts == 1


@pytest.mark.parametrize("alias", FAMILIES)
def test_tiny_random_teacher_on_ray_actor_pool_accounts_every_row(ray_session, alias, tmp_path):
    """Random weights answer garbage: every row is retried, then kept or dropped with a reason."""
    import json

    import pandas as pd

    from compeffdist_ray.prompts import attributes_messages
    from compeffdist_ray.stages.attributes import parse_attributes
    from compeffdist_ray.teacher import run_generation

    cfg = TeacherConfig(model=alias, max_new_tokens=12, max_attempts=2, batch_size=3, num_cpus=0.5)
    texts = [f"text number {i}: the food was {'great' if i % 2 else 'awful'}" for i in range(7)]
    df = pd.DataFrame({"key": [f"k{i}" for i in range(7)],
                       "messages": [json.dumps(attributes_messages(t)) for t in texts]})
    out = run_generation(df, cfg, parse_attributes, seed=1)
    assert list(out["key"]) == list(df["key"])  # order kept, nothing lost
    assert (out["attempts"] >= 1).all() and (out["attempts"] <= 2).all()
    assert (out.loc[~out["ok"], "attempts"] == 2).all()  # failures used every attempt
    assert out["error"].isna().eq(out["ok"]).all()
    assert (out["input_tokens"] > 0).all() and (out["output_tokens"] > 0).all()


def test_smollm2_follows_the_attribute_prompt():
    from compeffdist_ray.models import resolve_model
    from compeffdist_ray.prompts import attributes_messages
    from compeffdist_ray.stages.attributes import parse_attributes
    from compeffdist_ray.teacher.transformers_backend import TransformersBackend

    backend = TransformersBackend(resolve_model("smollm2-135m-instruct"), threads=2)
    texts = ["The battery died after two hours and support never answered my emails.",
             "Oh great, another 'update' that deletes my settings. Just what I needed."]
    gens = backend.generate([attributes_messages(t) for t in texts], GenParams(max_new_tokens=64, repetition_penalty=1.1))
    parsed = [parse_attributes(g.text) for g in gens]
    assert all(p for p in parsed), [g.text for g in gens]
    assert all(g.finish_reason == "stop" for g in gens)


def test_vllm_processor_config_builds_without_vllm():
    pytest.importorskip("ray.data.llm")
    from compeffdist_ray.config import load_config
    from compeffdist_ray.teacher.vllm_backend import _sampling_params, build_vllm_config

    cfg = load_config("configs/llama-70b-to-3b.yaml").teacher
    vc = build_vllm_config(cfg, cfg.model)
    assert vc.model_source == "meta-llama/Llama-3.1-70B-Instruct"
    assert vc.engine_kwargs["tensor_parallel_size"] == 8 and vc.engine_kwargs["dtype"] == "bfloat16"
    assert vc.batch_size == 64 and vc.accelerator_type == "H100" and vc.should_continue_on_error
    qwen = load_config("configs/qwen3-32b-to-4b.yaml").teacher
    qc = build_vllm_config(qwen, qwen.model)
    assert qc.chat_template_stage["chat_template_kwargs"] == {"enable_thinking": False}
    assert qc.engine_kwargs["tensor_parallel_size"] == 2
    sp = _sampling_params(GenParams(max_new_tokens=10, temperature=0.0, seed=3))
    assert sp == {"max_tokens": 10, "temperature": 0.0, "repetition_penalty": 1.0, "seed": 3}


def test_openai_backend_retries_then_succeeds(scripted_teacher):
    from compeffdist_ray.teacher.openai_backend import OpenAIBackend

    teacher, url = scripted_teacher(fail_first=2)
    backend = OpenAIBackend(base_url=url, model="m", max_retries=3, backoff_s=0.01, max_concurrency=1)
    gen = backend.generate([[{"role": "user", "content": "hello"}]], GenParams(max_new_tokens=5))[0]
    assert gen.finish_reason == "stop" and gen.text == "positive" and gen.input_tokens == 1
    assert backend.retries == 2 and teacher.requests == 3


def test_openai_backend_gives_up_after_bounded_retries():
    from compeffdist_ray.teacher.openai_backend import OpenAIBackend

    backend = OpenAIBackend(base_url="http://127.0.0.1:9/v1", model="m", max_retries=2, backoff_s=0.01)
    gen = backend.generate([[{"role": "user", "content": "x"}]], GenParams(max_new_tokens=5))[0]
    assert gen.finish_reason == "error" and "ConnectError" in gen.error and backend.requests_sent == 3
