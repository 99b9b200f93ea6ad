"""`compeffdist eval`: a causal LM over SentiBench on a Ray Data actor pool; results as JSON.

Reads: ``DATA_DIR/<category>/<dataset>/{train,test}.json`` (the SentiBench layout; see
``compeffdist_ray.evaluation`` for the protocol). Writes: one JSON file with, per dataset, the
kind, metrics, n, confusion counts (classification), parse failures (ABSA) and a few example
predictions, plus the model, k, seed, limit and wall time. Needs: CPU by default (every actor
loads the model once; ``num_gpus`` puts each actor on a GPU); the driver loads only the
config and the tokenizer, to check the model and the labels before any Ray work starts.

Example::

    compeffdist eval --model smollm2-135m-instruct --data-dir ../shared/sentibench --limit 50
    compeffdist eval --compare base.json distilled.json
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from compeffdist_ray import __version__
from compeffdist_ray.errors import UserError
from compeffdist_ray import evaluation as ev

log = logging.getLogger("compeffdist_ray")

__all__ = ["EvalConfig", "LMScorer", "PredictionStore", "check_causal_lm", "run_eval", "write_result",
           "default_out_path", "predictions_dir_for", "OUTPUT_COLUMNS"]

OUTPUT_COLUMNS = ["key", "pred", "logits", "text", "finish", "input_tokens", "output_tokens"]
PREDICTIONS_VERSION = 1  # bump when the scoring or generation code changes what a prompt gives


def _f(default=None, *, help: str, factory=None):  # noqa: A002 - the field's help text
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class EvalConfig:
    """Options of one evaluation run (the CLI's defaults come from here)."""

    model: str = _f(help="Model: an alias (compeffdist models list), a local directory, a Hugging Face id, or an "
                         "OpenAI-compatible endpoint URL (http://host:port/v1).")
    data_dir: str = _f(help="A SentiBench copy: <category>/<dataset>/{train,test}.json.")
    datasets: Optional[tuple[str, ...]] = _f(None, help="Datasets to run (sc/sst2 or sst2); default: every usable one found.")
    k_shot: int = _f(8, help="Demonstrations per prompt, drawn from the train split.")
    seed: int = _f(42, help="Seed of the demonstration draw.")
    limit: Optional[int] = _f(None, help="Evaluate only the first N test rows of each dataset.")
    batch_size: int = _f(8, help="Prompts per forward pass / generate call (left-padded).")
    max_new_tokens: int = _f(128, help="Token limit of an ABSA answer.")
    max_prompt_tokens: int = _f(4096, help="Longest prompt; demonstrations are dropped from the end to fit.")
    demos: str = _f("shared", help="Demonstrations: 'shared' (one draw per dataset and seed, its prefix computed "
                                   "once) or 'per-example' (a fresh draw per test example, as the SentiBench "
                                   "reference scripts do).")
    concurrency: int = _f(1, help="Model actors (one model load each).")
    num_cpus: Optional[float] = _f(None, help="CPUs reserved per actor; default 1 for a model, 0.25 for an endpoint.")
    num_gpus: float = _f(0.0, help="GPUs per actor (0 runs on CPU).")
    dtype: str = _f("auto", help="Model dtype: auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")
    ray_address: Optional[str] = _f(None, help="Ray cluster address; unset starts a local Ray instance.")
    endpoint_model: Optional[str] = _f(None, help="With an endpoint URL as --model: the model name to request; "
                                                   "default: the first one its /models lists.")
    api_key_env: str = _f("OPENAI_API_KEY", help="With an endpoint URL as --model: the environment variable holding "
                                                 "its API key (COMPEFFDIST_SERVE_TOKEN for compeffdist serve teacher).")
    resume: bool = _f(True, help="Reuse the per-dataset predictions an earlier run with the same model, prompts "
                                 "and options saved beside the result file.")

    def __post_init__(self):
        problems = []
        if not self.model or not str(self.model).strip():
            problems.append("--model is required")
        if not self.data_dir:
            problems.append("--data-dir is required")
        for name, low in (("k_shot", 0), ("batch_size", 1), ("max_new_tokens", 1), ("max_prompt_tokens", 16),
                          ("concurrency", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                problems.append(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            problems.append(f"--limit must be a positive integer, got {self.limit!r}")
        if (self.num_cpus is not None and self.num_cpus < 0) or self.num_gpus < 0:
            problems.append("--num-cpus and --num-gpus must not be negative")
        if self.demos not in ev.DEMO_DRAWS:
            problems.append(f"--demos must be {' or '.join(ev.DEMO_DRAWS)}, got {self.demos!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            problems.append(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if problems:
            raise UserError("invalid eval options: " + "; ".join(problems))
        if isinstance(self.datasets, str):
            self.datasets = tuple(d for d in self.datasets.split(",") if d.strip())
        if self.num_cpus is None:
            self.num_cpus = 0.25 if self.is_endpoint else 1.0
        if self.endpoint_model and not self.is_endpoint:
            raise UserError(f"--endpoint-model names a model of an OpenAI-compatible endpoint, but --model "
                            f"{self.model} is not an http(s) URL")

    @property
    def is_endpoint(self) -> bool:
        """--model is an OpenAI-compatible endpoint (``http(s)://host:port/v1``), not a model to load."""
        return str(self.model).strip().lower().startswith(("http://", "https://"))


# --------------------------------------------------------------------------------------------
# the model, on the driver (checks) and in the actors (scoring and generation)
# --------------------------------------------------------------------------------------------


def check_causal_lm(model_path: str, shown: str):
    """The model's config, after checking it is a causal LM; UserError otherwise (no weights loaded)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read the config of model {shown!r} ({model_path}): {first}") from exc
    archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    model_type = getattr(config, "model_type", None)
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if archs:
        ok = any(a in causal or a.endswith("ForCausalLM") for a in archs)
    else:
        ok = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    if not ok:
        raise UserError(
            f"model {shown!r} is not a causal language model (architectures: {', '.join(archs) or 'none'}, "
            f"model_type: {model_type}); eval needs a decoder-only LM such as LlamaForCausalLM "
            f"(e.g. smollm2-135m-instruct)"
        )
    return config


def _context_length(config, tokenizer) -> int:
    for name in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(getattr(config, "text_config", None) or config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    return value if isinstance(value, int) and 0 < value < 10**7 else 2048


class LMScorer:
    """One model in memory: next-token scores over candidate tokens, and greedy one-line answers.

    Rows that carry ``prefix_tokens`` (the length of the token prefix they share with the
    other prompts of their dataset: the instruction and the shared demonstrations) run after
    that prefix's KV cache, computed once per prefix and kept for the next batches
    (:mod:`compeffdist_ray.difficulty`'s packed or padded forwards; greedy decoding on top of
    an expanded copy). Other rows run whole, on left-padded batches with an attention mask
    and position ids that skip the padding. Either way a row's result does not depend on the
    other rows of its batch, and both ways agree to float noise (a test checks it).
    """

    PREFIX_CACHES = 2  # prefixes kept (a dataset whose long prompts lost demonstrations has a few)

    def __init__(self, model_path: str, *, dtype: str = "auto", device: str | None = None, threads: int | None = None):
        import torch

        from compeffdist_ray.teacher.transformers_backend import load_causal_lm

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer, self.model = load_causal_lm(model_path, dtype=dtype, device=self.device, threads=threads)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise UserError(f"model {model_path}: its tokenizer has neither a pad nor an EOS token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        ids = set()
        for value in (getattr(self.model.generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(v for v in value if isinstance(v, int))
        self.eos_ids = sorted(ids)
        self._fast = None  # (decoder, packed) once probed; decoder None: no prefix path for this model
        self._caches: dict[tuple[int, ...], object] = {}
        self.stats: dict = {}

    def _prefix_groups(self, rows: list[dict], *, decoding: bool = False
                       ) -> tuple[dict[tuple[int, ...], list[tuple[int, list[int]]]], list[int]]:
        """({prefix ids: [(row index, full ids)]} for rows that run after a cached prefix, [other row indices]).

        `decoding`: only for models with full attention in every layer (those whose rows can
        be packed): decoding after a prefix leaves pad slots between a row's prompt and its
        answer, which a sliding-window layer would count against its window.
        """
        from compeffdist_ray import difficulty as dif

        groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
        plain = []
        for i, r in enumerate(rows):
            p = int(r.get("prefix_tokens") or 0)
            if p:
                ids = self.tokenizer(r["prompt"], add_special_tokens=True)["input_ids"]
                if self._fast is None:
                    try:
                        self._fast = dif.projection_setup(self.model, ids)
                    except UserError:  # logits not rebuildable from hidden states: whole prompts only
                        self._fast = (None, False)
                if self._fast[0] is not None and p < len(ids) and (self._fast[1] or not decoding):
                    groups.setdefault(tuple(ids[:p]), []).append((i, ids))
                    continue
            plain.append(i)
        return groups, plain

    def _prefix(self, key: tuple[int, ...]):
        from compeffdist_ray import difficulty as dif

        cache = self._caches.pop(key, None)
        if cache is None:
            while len(self._caches) >= self.PREFIX_CACHES:
                self._caches.pop(next(iter(self._caches)))
            cache = dif.prefix_cache(self.model, self._fast[0], key, self.stats)
            self.stats["prefixes_computed"] = self.stats.get("prefixes_computed", 0) + 1
        self._caches[key] = cache  # most recently used last
        return cache

    def _encode(self, prompts: list[str]):
        batch = self.tokenizer(prompts, add_special_tokens=True, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}

    def classify(self, rows: list[dict]) -> list[dict]:
        """:meth:`score` for request rows (their ``prompt``, JSON ``candidates`` and ``prefix_tokens``)."""
        import torch

        from compeffdist_ray import difficulty as dif

        out: list = [None] * len(rows)
        groups, plain = self._prefix_groups(rows)
        if plain:
            for i, res in zip(plain, self.score([rows[i]["prompt"] for i in plain],
                                                [json.loads(rows[i]["candidates"]) for i in plain])):
                out[i] = res
        for key, members in groups.items():
            base, packed = self._fast
            with torch.inference_mode():
                cache = self._prefix(key)
                seqs = [ids[len(key):] for _, ids in members]
                logits = dif.logits_at(self.model, base, seqs, [(len(q) - 1, 1) for q in seqs],
                                       pad_id=self.tokenizer.pad_token_id, packed=packed, prefix_cache=cache,
                                       prefix_len=len(key), stats=self.stats).float()
            for row, (i, ids) in enumerate(members):
                values = logits[row, torch.tensor(json.loads(rows[i]["candidates"]), device=logits.device)]
                out[i] = {"pred": int(torch.argmax(values)), "logits": [float(v) for v in values.tolist()],
                          "input_tokens": len(ids)}
        return out

    def generate_rows(self, rows: list[dict], max_new_tokens: int) -> list[dict]:
        """:meth:`generate` for request rows; those with a cached prefix decode after it."""
        out: list = [None] * len(rows)
        groups, plain = self._prefix_groups(rows, decoding=True)
        if plain:
            for i, res in zip(plain, self.generate([rows[i]["prompt"] for i in plain], max_new_tokens)):
                out[i] = res
        for key, members in groups.items():
            for (i, _), res in zip(members, self._generate_after(key, [ids for _, ids in members], max_new_tokens)):
                out[i] = res
        return out

    def _generate_after(self, key: tuple[int, ...], full_ids: list[list[int]], max_new_tokens: int) -> list[dict]:
        """Greedy decoding of rows that share the prefix `key`: their suffixes run right-padded
        after an expanded copy of the prefix's cache, then one token per row and step (the pad
        slots masked out, positions per row), until every row is done."""
        import torch

        from compeffdist_ray import difficulty as dif

        base = self._fast[0]
        device = self.model.device
        p = len(key)
        seqs = [ids[p:] for ids in full_ids]
        rows, width = len(seqs), max(len(q) for q in seqs)
        lengths = torch.tensor([len(q) for q in seqs], device=device)
        ids = torch.full((rows, width), self.tokenizer.pad_token_id, dtype=torch.long, device=device)
        mask = torch.zeros((rows, p + width), dtype=torch.long, device=device)
        mask[:, :p] = 1
        for b, q in enumerate(seqs):
            ids[b, :len(q)] = torch.tensor(q, dtype=torch.long, device=device)
            mask[b, p:p + len(q)] = 1
        generated: list[list[int]] = [[] for _ in range(rows)]
        finish = ["length"] * rows
        done = [False] * rows
        with torch.inference_mode():
            cache = dif.expand_cache(self._prefix(key), rows)
            positions = (p + torch.arange(width, device=device))[None, :].expand(rows, -1)
            hidden = base(input_ids=ids, attention_mask=mask, position_ids=positions, **dif.cache_kwargs(base, cache),
                          use_cache=True).last_hidden_state
            hidden = hidden[torch.arange(rows, device=device), lengths - 1]
            for step in range(max_new_tokens):
                tokens = dif.project_hidden(self.model, hidden).argmax(-1)
                for b, tok in enumerate(tokens.tolist()):
                    if done[b]:
                        continue
                    if tok in self.eos_ids:
                        done[b], finish[b] = True, "eos"
                        continue
                    generated[b].append(tok)
                    if "\n" in self.tokenizer.decode(generated[b], skip_special_tokens=True).lstrip():
                        done[b] = True
                if all(done) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones((rows, 1), dtype=torch.long, device=device)], 1)
                hidden = base(input_ids=tokens[:, None], attention_mask=mask,
                              position_ids=(p + lengths + step)[:, None], **dif.cache_kwargs(base, cache),
                              use_cache=True).last_hidden_state[:, -1]
        results = []
        for b in range(rows):
            text = self.tokenizer.decode(generated[b], skip_special_tokens=True).lstrip()
            if "\n" in text:
                text, finish[b] = text.split("\n", 1)[0], "line"
            results.append({"text": text.strip(), "finish": finish[b], "input_tokens": len(full_ids[b]),
                            "output_tokens": len(generated[b]) + (finish[b] == "eos")})
        return results

    def score(self, prompts: list[str], candidates: list[list[int]]) -> list[dict]:
        """Per prompt: `pred` (the index of the candidate token with the highest next-token logit)
        and `logits` (the candidates' logits)."""
        import torch

        if not prompts:
            return []
        batch = self._encode(prompts)
        mask = batch["attention_mask"]
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            logits = self.model(**batch, position_ids=positions, logits_to_keep=1).logits[:, -1, :].float()
        out = []
        for row, cand in enumerate(candidates):
            values = logits[row, torch.tensor(cand, device=logits.device)]
            out.append({"pred": int(torch.argmax(values)), "logits": [float(v) for v in values.tolist()],
                        "input_tokens": int(mask[row].sum())})
        return out

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[dict]:
        """Greedy answers, each cut at its first line break after some text.

        A row stops as soon as its answer holds a line break after non-blank text, at EOS, or
        at `max_new_tokens` (``finish`` "line", "eos" or "length").
        """
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        if not prompts:
            return []
        batch = self._encode(prompts)
        prompt_len = batch["input_ids"].shape[1]
        tokenizer = self.tokenizer

        class LineDone(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
                return torch.tensor(["\n" in t.lstrip() for t in texts], dtype=torch.bool, device=input_ids.device)

        with torch.inference_mode():
            out = self.model.generate(
                **batch, max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=self.eos_ids or None,
                stopping_criteria=StoppingCriteriaList([LineDone()]),
            )
        results = []
        for row, seq in enumerate(out[:, prompt_len:].tolist()):
            n, finish = len(seq), "length"
            for i, tok in enumerate(seq):
                if tok in self.eos_ids:
                    n, finish = i, "eos"
                    break
            text = tokenizer.decode(seq[:n], skip_special_tokens=True).lstrip()
            if "\n" in text:
                text, finish = text.split("\n", 1)[0], "line"
            n_out = len(seq)
            while n_out and seq[n_out - 1] == tokenizer.pad_token_id:  # rows that stopped early are padded
                n_out -= 1
            results.append({"text": text.strip(), "finish": finish, "input_tokens": int(batch["attention_mask"][row].sum()),
                            "output_tokens": n_out})
        return results


class EndpointScorer:
    """An OpenAI-compatible chat endpoint in place of a loaded model (a served teacher, vLLM, an API).

    Each prompt is sent as one user message, greedily (temperature 0). Classification asks for
    the top logprobs of the answer's tokens and reads the label off the first token that is
    not blank or punctuation (:func:`~compeffdist_ray.evaluation.label_from_logprobs`); when
    the server sends no logprobs, or they point to no single label, the label is read from
    the answer's text (``finish`` records which: "logprobs", "text" or "unparsed").
    ABSA answers are parsed whole (a chat model may fence its JSON over several lines).
    """

    LABEL_TOKENS = 8  # generated tokens for a classification answer
    TOP_LOGPROBS = 20  # alternatives per token (OpenAI's maximum)

    def __init__(self, base_url: str, model: str, api_key_env: str, api_key: str | None = None,
                 max_concurrency: int = 8, timeout_s: float = 120.0):
        from compeffdist_ray.teacher.openai_backend import OpenAIBackend

        self.backend = OpenAIBackend(base_url=base_url, model=model, api_key_env=api_key_env, api_key=api_key,
                                     timeout_s=timeout_s, max_concurrency=max_concurrency)

    def _ask(self, prompts: list[str], params):
        return self.backend.generate([[{"role": "user", "content": p}] for p in prompts], params)

    def classify(self, rows: list[dict]) -> list[dict]:
        from compeffdist_ray.teacher.base import GenParams

        gens = self._ask([r["prompt"] for r in rows], GenParams(max_new_tokens=self.LABEL_TOKENS, temperature=0.0,
                                                                top_logprobs=self.TOP_LOGPROBS))
        out = []
        for r, g in zip(rows, gens):
            labels = json.loads(r["labels"])
            pred, how = None, "error" if g.finish_reason == "error" else "unparsed"
            first = next((alts for alts in (g.top_logprobs or []) if any(t.strip(" \t\n\"'`*:.") for t in alts)), None)
            if g.finish_reason != "error":
                pred = ev.label_from_logprobs(first, labels)
                how = "logprobs" if pred is not None else how
                if pred is None:
                    pred = ev.label_from_text(g.text, labels)
                    how = "text" if pred is not None else how
            out.append({"pred": -1 if pred is None else pred, "logits": [], "text": g.text,
                        "finish": how, "input_tokens": g.input_tokens, "output_tokens": g.output_tokens})
        return out

    def generate_rows(self, rows: list[dict], max_new_tokens: int) -> list[dict]:
        from compeffdist_ray.teacher.base import GenParams

        gens = self._ask([r["prompt"] for r in rows], GenParams(max_new_tokens=max_new_tokens, temperature=0.0))
        return [{"text": g.text, "finish": g.finish_reason, "input_tokens": g.input_tokens,
                 "output_tokens": g.output_tokens} for g in gens]


class EvalUDF:
    """A Ray Data callable class: one model load (or endpoint client) per actor, reused for every batch."""

    def __init__(self, model_path: str | None, dtype: str, threads: int | None, max_new_tokens: int,
                 device: str | None, endpoint: dict | None = None):
        if endpoint:
            self.scorer = EndpointScorer(**endpoint)
        else:
            self.scorer = LMScorer(model_path, dtype=dtype, threads=threads, device=device)
        self.max_new_tokens = max_new_tokens

    def __call__(self, batch):
        import pandas as pd

        return pd.DataFrame(run_rows(self.scorer, batch.to_dict("records"), self.max_new_tokens), columns=OUTPUT_COLUMNS)


def run_rows(scorer, rows: list[dict], max_new_tokens: int) -> list[dict]:
    """Classify or generate for request rows (key, mode, prompt, candidates, labels); one output row each, in order."""
    out: dict[str, dict] = {}
    score = [r for r in rows if r["mode"] == "score"]
    gen = [r for r in rows if r["mode"] == "generate"]
    for r, res in zip(score, scorer.classify(score)):
        out[r["key"]] = dict(key=r["key"], pred=res["pred"], logits=json.dumps(res["logits"]), text=res.get("text", ""),
                             finish=res.get("finish", "score"), input_tokens=res["input_tokens"],
                             output_tokens=res.get("output_tokens", 0))
    for r, res in zip(gen, scorer.generate_rows(gen, max_new_tokens)):
        out[r["key"]] = dict(key=r["key"], pred=-1, logits="[]", text=res["text"], finish=res["finish"],
                             input_tokens=res["input_tokens"], output_tokens=res["output_tokens"])
    return [out[r["key"]] for r in rows]


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------


def _ensure_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.print_on_execution_start = False


def _threads(cfg: EvalConfig) -> int | None:
    if cfg.num_gpus or cfg.is_endpoint:
        return None
    from compeffdist_ray.teacher.transformers_backend import default_threads

    return default_threads(cfg.num_cpus, cfg.concurrency)


def _check_endpoint(cfg: EvalConfig) -> dict:
    """The endpoint's client settings (URL, model name, key variable) after one ``GET /models``."""
    from compeffdist_ray.teacher.openai_backend import OpenAIBackend

    url = str(cfg.model).strip().rstrip("/")
    backend = OpenAIBackend(base_url=url, model=cfg.endpoint_model or "", api_key_env=cfg.api_key_env)
    try:
        models = backend.list_models()
    finally:
        backend.close()
    name = cfg.endpoint_model
    if name is None:
        if not models:
            raise UserError(f"endpoint {url} lists no model under /models; name one with --endpoint-model")
        name = models[0]
    elif models and name not in models:
        raise UserError(f"endpoint {url} does not serve {name!r}; it lists: {', '.join(models)} (fix --endpoint-model)")
    # The key is read here, where the user runs the command, and handed to the actors (which may
    # run on other nodes, whose environment does not have it); it never goes into the result.
    return {"base_url": url, "model": name, "api_key_env": cfg.api_key_env,
            "api_key": os.environ.get(cfg.api_key_env, ""), "max_concurrency": cfg.batch_size}


def prepare(cfg: EvalConfig):
    """Everything before the model runs, on the driver: datasets, model checks, label tokens, prompts.

    Returns (model_path, endpoint, datasets, requests by dataset, skipped); `endpoint` is the
    client settings when --model is an endpoint URL (then `model_path` is None). Every bad
    input raises a UserError here, before Ray starts.
    """
    found, skipped = ev.discover_datasets(cfg.data_dir)
    chosen = ev.select_datasets(found, skipped, cfg.datasets)
    datasets = [ev.load_dataset(cfg.data_dir, name, kind, limit=cfg.limit) for name, kind in chosen.items()]

    model_path = endpoint = count = None
    if cfg.is_endpoint:  # prompts go out whole: no local tokenizer to fit them to a context
        endpoint = _check_endpoint(cfg)
        plans = [(ds, "[]", None) for ds in datasets]
    else:
        from transformers import AutoTokenizer

        from compeffdist_ray.models import resolve_model

        model_path = resolve_model(cfg.model, kind="causal_lm")
        config = check_causal_lm(model_path, cfg.model)
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_path)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load the tokenizer of model {cfg.model!r}: {str(exc).splitlines()[0]}") from exc
        context = _context_length(config, tokenizer)

        def count(text: str) -> int:
            return len(tokenizer(text, add_special_tokens=True)["input_ids"])

        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        plans = []  # (dataset, candidate token ids as JSON, prompt token budget): all checked before any output
        for ds in datasets:
            if ds.kind == ev.CLASSIFICATION:
                candidates = json.dumps(ev.label_first_tokens(encode, ds.labels, decode=tokenizer.decode,
                                                              model=f"{cfg.model} on {ds.name}"))
                budget = min(cfg.max_prompt_tokens, context - 1)
            else:
                candidates = "[]"
                budget = min(cfg.max_prompt_tokens, context - cfg.max_new_tokens)
            if budget < 16:
                raise UserError(f"model {cfg.model!r} has a context of {context} tokens: too short for "
                                f"--max-new-tokens {cfg.max_new_tokens}")
            plans.append((ds, candidates, budget))
    for why in skipped.values():
        log.warning("skipped: %s", why)

    from tqdm.auto import tqdm

    requests = {}
    for ds, candidates, budget in tqdm(plans, desc="building prompts", unit="dataset", disable=len(plans) < 2):
        rows = ev.build_requests(ds, k=cfg.k_shot, seed=cfg.seed, count_tokens=count, max_prompt_tokens=budget,
                                 demos=cfg.demos)
        labels = json.dumps(list(ds.labels))
        ids = [tokenizer(r["prompt"], add_special_tokens=True)["input_ids"] for r in rows] if count else None
        shared = shared_prefix_lengths(ids, [r["demos"] for r in rows]) if ids else [0] * len(rows)
        for i, r in enumerate(rows):
            r["candidates"] = candidates
            r["labels"] = labels
            r["n_tokens"] = len(ids[i]) if ids else len(r["prompt"])
            r["prefix_tokens"] = shared[i]
        requests[ds.name] = rows
    return model_path, endpoint, datasets, requests, skipped


MIN_PREFIX_TOKENS = 64  # a shorter shared prefix is not worth a cache of its own


def shared_prefix_lengths(ids: list[list[int]], groups: list) -> list[int]:
    """Per prompt, how many leading tokens it shares with every prompt of its group (same
    number of demonstrations kept: the instruction and those demonstrations), one short of its
    own length; 0 when under MIN_PREFIX_TOKENS.

    With per-example demonstrations only the instruction line is shared: every row gets 0.
    """
    from compeffdist_ray.difficulty import common_prefix_len

    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = [0] * len(ids)
    for idxs in members.values():
        if len(idxs) < 2:
            continue
        shared = common_prefix_len([ids[i] for i in idxs])
        for i in idxs:
            n = min(shared, len(ids[i]) - 1)
            out[i] = n if n >= MIN_PREFIX_TOKENS else 0
    return out


def model_identity(model_path: str) -> dict:
    """What identifies the weights behind `model_path` without reading them all.

    A local directory: the content hash of its small files (config, tokenizer, ...) and the
    name, size and modification time of its large ones (weights). Anything else (a hub id):
    the name itself.
    """
    root = Path(model_path)
    if not root.is_dir():
        return {"id": str(model_path)}
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(str(f.relative_to(root)).encode() + b"\0")
        if st.st_size <= 16 * 2**20:
            h.update(f.read_bytes())
        else:
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    return {"dir": str(root.resolve()), "files": h.hexdigest()[:16]}


def dataset_fingerprint(cfg: EvalConfig, model: dict, rows: list[dict]) -> str:
    """The hash of everything a dataset's predictions depend on: weights, prompts, candidates, options."""
    h = hashlib.sha256(json.dumps({"model": model, "dtype": cfg.dtype, "device": "gpu" if cfg.num_gpus else "cpu",
                                   "max_new_tokens": cfg.max_new_tokens, "v": PREDICTIONS_VERSION},
                                  sort_keys=True).encode())
    for r in rows:
        h.update("\0".join((r["key"], r["mode"], r["prompt"], r["candidates"])).encode() + b"\1")
    return h.hexdigest()[:20]


class PredictionStore:
    """Per-dataset model outputs of one result file, saved as each dataset completes.

    ``<folder>/<category>__<dataset>.jsonl`` holds one output row per test example (the key
    ``dataset|index``, the predicted label index and the candidates' logits, or the generated
    answer); ``_index.json`` records, per dataset, the fingerprint of what produced it. A file
    counts only once the index names it with the same fingerprint (it is written last, by
    rename), so a run killed mid-dataset redoes that dataset and reuses the finished ones.
    """

    INDEX = "_index.json"

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def _file(self, name: str) -> Path:
        return self.folder / (name.replace("/", "__") + ".jsonl")

    def _index(self) -> dict:
        try:
            return json.loads((self.folder / self.INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def load(self, name: str, fingerprint: str, keys: list[str]) -> dict[str, dict] | None:
        """The saved outputs of `name` by key, if they were made by `fingerprint` and cover `keys`."""
        if self._index().get(name, {}).get("fingerprint") != fingerprint:
            return None
        try:
            with open(self._file(name), encoding="utf-8") as fh:
                rows = [json.loads(line) for line in fh if line.strip()]
        except (OSError, ValueError):
            return None
        by_key = {r.get("key"): r for r in rows}
        if len(by_key) != len(rows) or set(by_key) != set(keys):
            return None
        return by_key

    def save(self, name: str, fingerprint: str, rows: list[dict]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self._file(name)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, target)
        index = self._index()
        index[name] = {"fingerprint": fingerprint, "rows": len(rows), "file": target.name}
        tmp = self.folder / (self.INDEX + ".tmp")
        tmp.write_text(json.dumps(index, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.folder / self.INDEX)


def _plain(row: dict) -> dict:
    """An output row with plain Python values (numpy scalars from pandas become int/str)."""
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}


def run_eval(cfg: EvalConfig, predictions_dir: str | os.PathLike | None = None) -> dict:
    """Evaluate `cfg.model` on the datasets of `cfg.data_dir`; the result dict (see `write_result`).

    With `predictions_dir`, each dataset's outputs are saved there as soon as the dataset is
    complete, and datasets saved by an earlier run with the same model, prompts and options
    are reused (unless ``cfg.resume`` is off): an interrupted run picks up where it stopped.
    """
    start = time.perf_counter()
    model_path, endpoint, datasets, requests, skipped = prepare(cfg)  # every input check, before Ray starts
    store = PredictionStore(predictions_dir) if predictions_dir else None
    model = model_identity(model_path) if endpoint is None else {"endpoint": endpoint["base_url"],
                                                                  "model": endpoint["model"]}
    fingerprints = {ds.name: dataset_fingerprint(cfg, model, requests[ds.name]) for ds in datasets}
    outputs: dict[str, dict] = {}
    reused, todo = [], []
    for ds in datasets:
        keys = [r["key"] for r in requests[ds.name]]
        saved = store.load(ds.name, fingerprints[ds.name], keys) if store and cfg.resume else None
        if saved is None:
            todo.append(ds)
        else:
            outputs.update(saved)
            reused.append(ds.name)
            log.info("eval: %s: reusing the %d saved predictions in %s", ds.name, len(saved), store.folder)
    if todo:
        _run_model(cfg, model_path, endpoint, todo, requests, outputs, store, fingerprints)
    result = assemble(cfg, model_path or f"{endpoint['base_url']} ({endpoint['model']})", datasets, requests,
                      outputs, skipped, wall_time_s=time.perf_counter() - start)
    result["reused_predictions"] = reused
    if store:
        result["predictions_dir"] = str(store.folder)
    return result


def _run_model(cfg: EvalConfig, model_path: str | None, endpoint: dict | None, todo, requests, outputs: dict, store,
               fingerprints) -> None:
    """The model over the prompts of `todo` on a Ray Data actor pool; outputs by key into `outputs`."""
    import pandas as pd

    from compeffdist_ray.actor_pool import RowsLost, stream_on_actor_pool

    rows = [r for ds in todo for r in requests[ds.name]]
    log.info("eval: %s on %d dataset(s), %d prompts (k=%d, seed=%d%s)", cfg.model, len(todo), len(rows),
             cfg.k_shot, cfg.seed, f", limit {cfg.limit}" if cfg.limit else "")
    # Dataset by dataset (so each is complete, and saved, as early as possible), longest prompts
    # first within each: batches of similar length pad less, and a prompt that does not fit in
    # memory fails at once. Results do not depend on the batching.
    order = {ds.name: i for i, ds in enumerate(todo)}
    frame = pd.DataFrame(rows)[["key", "dataset", "mode", "prompt", "candidates", "labels", "n_tokens",
                                "prefix_tokens"]]
    frame["order"] = frame["dataset"].map(order)
    frame = frame.sort_values(["order", "n_tokens", "key"], ascending=[True, False, True], kind="stable")
    frame = frame.reset_index(drop=True)

    _ensure_ray(cfg.ray_address)
    pending = {ds.name: {r["key"] for r in requests[ds.name]} for ds in todo}
    got: dict[str, dict[str, dict]] = {ds.name: {} for ds in todo}
    by_name = {ds.name: ds for ds in todo}
    started = time.perf_counter()
    for part in stream_on_actor_pool(
        frame[["key", "mode", "prompt", "candidates", "labels", "prefix_tokens"]], EvalUDF,
        constructor_kwargs=dict(model_path=model_path, dtype=cfg.dtype, threads=_threads(cfg),
                                max_new_tokens=cfg.max_new_tokens, device="cuda" if cfg.num_gpus else None,
                                endpoint=endpoint),
        batch_size=cfg.batch_size, concurrency=cfg.concurrency, num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
        what="eval",
    ):
        for row in part.to_dict("records"):
            row = _plain(row)
            name = row["key"].rsplit("|", 1)[0]
            if name not in got or row["key"] not in pending[name] or row["key"] in got[name]:
                raise RowsLost(f"eval: unexpected or repeated output row {row['key']!r}")
            got[name][row["key"]] = row
            if len(got[name]) == len(pending[name]):
                outputs.update(got[name])
                if store:
                    store.save(name, fingerprints[name], [got[name][r["key"]] for r in requests[name]])
                block = ev.score_dataset(by_name[name], requests[name], got[name])
                log.info("eval: %s done: %d prompts, F1 %.1f (%d of %d, %.0f s)", name, len(got[name]),
                         100 * ev.headline(block), sum(len(got[n]) == len(pending[n]) for n in got), len(todo),
                         time.perf_counter() - started)
    lost = {n: len(pending[n]) - len(got[n]) for n in pending if len(got[n]) != len(pending[n])}
    if lost:  # never lose a row silently
        raise RowsLost(f"eval: {sum(lost.values())} of {len(frame)} rows did not come back "
                       f"({', '.join(f'{n}: {k}' for n, k in lost.items())})")


def assemble(cfg: EvalConfig, model_path: str, datasets, requests, outputs: dict, skipped: dict,
             wall_time_s: float) -> dict:
    """The result dict from the model's outputs (by key)."""
    blocks = {ds.name: ev.score_dataset(ds, requests[ds.name], outputs) for ds in datasets}
    scores = [ev.headline(b) for b in blocks.values()]
    return {
        "model": cfg.model,
        "model_path": model_path,
        "data_dir": str(Path(cfg.data_dir).expanduser().absolute()),
        "k": cfg.k_shot,
        "seed": cfg.seed,
        "limit": cfg.limit,
        "demos": cfg.demos,
        "prompt_format": "plain completion prompt (no chat template); classification read off next-token logits",
        "options": {k: v for k, v in asdict(cfg).items()
                    if k not in ("model", "data_dir", "k_shot", "seed", "limit", "demos")},
        "mean_f1": sum(scores) / len(scores) if scores else None,
        "datasets": blocks,
        "skipped": skipped,
        "tokens": {"input": int(sum(int(o["input_tokens"]) for o in outputs.values())),
                   "output": int(sum(int(o["output_tokens"]) for o in outputs.values()))},
        "wall_time_s": round(wall_time_s, 2),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "compeffdist_version": __version__,
    }


def predictions_dir_for(out_path: str | os.PathLike) -> Path:
    """Where the per-dataset predictions of result file `out_path` live: ``NAME.predictions/`` beside it."""
    path = Path(out_path).expanduser()
    stem = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    return path.with_name(stem + ".predictions")


def default_out_path(cfg: EvalConfig) -> str:
    if cfg.is_endpoint:  # the model name if given, else host and port
        from urllib.parse import urlparse

        url = urlparse(str(cfg.model).strip())
        host = f"{url.hostname}-{url.port}" if url.port else str(url.hostname)
        raw = os.path.basename(cfg.endpoint_model.rstrip("/")) if cfg.endpoint_model else host
    else:
        raw = os.path.basename(str(cfg.model).rstrip("/"))
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", raw or "model")
    return f"eval-{name}-k{cfg.k_shot}-seed{cfg.seed}{f'-limit{cfg.limit}' if cfg.limit else ''}.json"


def write_result(result: dict, path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
