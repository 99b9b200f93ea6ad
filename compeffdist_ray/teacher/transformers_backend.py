"""Teacher generation with Hugging Face transformers (CPU or GPU), batched with left padding."""

from __future__ import annotations

import logging
import os

from compeffdist_ray.teacher.base import Generation, GenParams, Messages

log = logging.getLogger("compeffdist_ray")

__all__ = ["TransformersBackend", "format_chat", "load_causal_lm", "torch_dtype"]


def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def format_chat(tokenizer, messages: Messages, template_kwargs: dict | None = None) -> str:
    """The prompt text for `messages`: the model's chat template, or a plain format without one."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             **(template_kwargs or {}))
    parts = []
    for m in messages:
        role = {"system": "System", "user": "User", "assistant": "Assistant"}.get(m["role"], m["role"])
        parts.append(f"{role}: {m['content']}")
    return "\n\n".join(parts) + "\n\nAssistant:"


def load_causal_lm(model_path: str, *, dtype: str = "auto", device: str = "cpu", threads: int | None = None):
    """(tokenizer, model) from a local Hugging Face dir, on `device`, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype(dtype, device))
    return tokenizer, model.to(device).eval()


class TransformersBackend:
    """Loads the model once; `generate` runs one padded batch per call."""

    def __init__(self, model_path: str, *, dtype: str = "auto", device: str | None = None,
                 max_prompt_tokens: int = 3072, threads: int | None = None,
                 chat_template_kwargs: dict | None = None):
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer, self.model = load_causal_lm(model_path, dtype=dtype, device=self.device, threads=threads)
        self.tokenizer.padding_side = "left"  # generation continues every row from its last token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.max_prompt_tokens = max_prompt_tokens
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.eos_ids = self._eos_ids()
        self.truncated_prompts = 0

    def _eos_ids(self) -> set[int]:
        ids = set()
        gen_eos = getattr(self.model.generation_config, "eos_token_id", None)
        for value in (gen_eos, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        return ids

    def generate(self, conversations: list[Messages], params: GenParams) -> list[Generation]:
        import torch

        if not conversations:
            return []
        prompts = [format_chat(self.tokenizer, m, self.chat_template_kwargs) for m in conversations]
        enc = self.tokenizer(prompts, add_special_tokens=False)
        ids = []
        for seq in enc["input_ids"]:
            if len(seq) > self.max_prompt_tokens:  # keep the end: the question sits there
                seq = seq[-self.max_prompt_tokens :]
                self.truncated_prompts += 1
            ids.append(seq)
        batch = self.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        sample = params.temperature > 0
        kwargs = dict(
            max_new_tokens=params.max_new_tokens,
            do_sample=sample,
            repetition_penalty=params.repetition_penalty,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=sorted(self.eos_ids) or None,
        )
        if sample:
            kwargs.update(temperature=params.temperature, top_p=params.top_p)
            if params.seed is not None:
                torch.manual_seed(params.seed)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = self.model.generate(**batch, **kwargs)
        prompt_len = batch["input_ids"].shape[1]
        results = []
        for row, seq in enumerate(out[:, prompt_len:].tolist()):
            n_out, finish = len(seq), "length"
            for i, tok in enumerate(seq):
                if tok in self.eos_ids:
                    n_out, finish = i + 1, "stop"
                    break
            text = self.tokenizer.decode(seq[:n_out], skip_special_tokens=True).strip()
            results.append(Generation(text=text, input_tokens=len(ids[row]), output_tokens=n_out, finish_reason=finish))
        return results


def default_threads(num_cpus: float, concurrency: int) -> int:
    """Torch threads per actor: the CPUs it reserved, or a fair share of the machine's cores."""
    cores = os.cpu_count() or 1
    return max(1, int(num_cpus) if num_cpus >= 1 else 1, cores // max(1, concurrency))
