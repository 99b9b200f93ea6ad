"""Stage 8 core, proxy: predict a row's difficulty from (instruction, text) alone, before the teacher answers.

Reads a DataFrame of scored rows (the difficulty stage's output: at least ``instruction``,
``text`` and the target column, ``rank_score`` by default; ``task_id``, when present, names the
row's group). Trains a regression head on a backbone's pooled hidden states, measures it on a
held-out split and returns a :class:`ProxyModel` that predicts for any batch of
(instruction, text) pairs; :meth:`ProxyModel.save` / :func:`load_proxy` move it through a
directory in Hugging Face format. Needs torch and transformers; CPU (fp32). Pure: no Ray, no
files except in ``save`` / ``load_proxy``.

    import pandas as pd
    from compeffdist_ray.proxy import ProxyParams, load_proxy, train_proxy

    rows = pd.read_parquet("run/difficulty/difficulty.parquet")
    model, metrics = train_proxy(rows, ProxyParams(backbone="smollm2-135m-instruct"))
    print(metrics["spearman"], metrics["mae"], metrics["mae_baseline"])
    model.save("run/proxy/model")
    proxy = load_proxy("run/proxy/model")
    proxy.predict(["Label the sentiment: positive, negative or neutral."], ["The soup was cold."])

Inputs
------
The backbone is loaded with ``AutoModel`` (the base model, no LM head), in float32. Its kind is
read from its config: ``*ForCausalLM`` / ``*LMHeadModel`` architectures (or a model type that
only has a causal-LM head) make a **decoder**, anything else an **encoder** (BERT-like);
encoder-decoder models are refused.

* decoder: the input is the student's own prompt for the row, the prompt the difficulty stage
  scores the response under (:func:`compeffdist_ray.difficulty.encode_row`): the chat template
  over one user turn ``render_instruction(instruction, text)`` with the generation prompt. With
  ``pooling="last"`` the feature is the final hidden state at the last prompt token, the state
  from which the student would start its answer.
* encoder: the text and the instruction are encoded *separately* (each truncated to
  ``max_length`` on its own, so a long instruction never pushes the text out) and the feature is
  ``[t, i, t * i]`` for their pooled embeddings ``t`` and ``i``. A frozen sentence encoder was
  trained on single texts, so each side stays in distribution; the product lets even a linear
  head weigh the text differently per task; and an instruction shared by many rows is encoded
  once per call (and kept in a small cache between calls).

Too long a decoder prompt (over ``max_length`` tokens) is shortened in its instruction, from the
end (demonstrations go first, the task description stays); a text that does not fit even with
an empty instruction keeps the prompt's last ``max_length`` tokens (its end and the generation
prompt). Forward passes run in batches of similar length (rows sorted by token count) padded on
the right with an attention mask; pooling reads real tokens only, so a row's features do not
depend on what it is batched with (to float32 noise). Decoder rows of one instruction share a
long prompt prefix (template header, instruction, demonstrations): with ``prefix_reuse`` that
prefix runs once into a KV cache and only each row's remainder (its text and the generation
prompt) runs per row, which divides the cost by about prompt length / text length. Give
``predict`` the rows of a task together to profit from it.

Training
--------
The rows are split once, deterministically under ``seed``: ``split="rows"`` (default) holds out
``eval_fraction`` of the rows, stratified by group (``task_id``, else the instruction) so every
task is represented on both sides. That is the realistic split: the proxy predicts for *new
texts of the same tasks* (the pairs the teacher has not answered yet), not for new tasks.
``split="groups"`` holds out whole groups instead, to measure transfer to unseen tasks.

With a frozen backbone (default) features are computed once for every row and only the head is
trained, on standardised features (train-split mean and std, stored with the head). The
default head, ``ridge``, is one linear layer fitted in closed form (least squares with an L2
penalty), the penalty picked from :data:`RIDGE_GRID` by exact leave-one-out error
(:func:`fit_ridge`): no epochs, no learning rate, deterministic, milliseconds. Scored rows are
few (hundreds) next to the feature width (576 for SmolLM2, 3 x 384 for MiniLM), and a
gradient-trained linear head overfits there: on SmolLM2-scored rows (240 rows, 3 tasks) ridge
reached held-out Spearman 0.83 and MAE 0.020 (constant baseline 0.032) where the AdamW linear
head gave Spearman 0.00 and MAE 0.060. ``linear`` (the same layer trained with AdamW) and
``mlp`` (one hidden GELU layer) train with MSE, AdamW and a cosine learning rate for
``epochs`` passes in mini-batches of ``train_batch_size``, the output bias starting at the
train mean. ``train_backbone=True`` then fine-tunes backbone and head together for
``finetune_epochs`` (probe first, then fine-tune: the head does not start random), the
backbone at ``backbone_lr``, the head at ``lr``. Metrics are those of the model trained on the train split; with ``refit``
(default) the returned model is then trained again, the same way, on all rows (the held-out
metrics are the estimate for it). Everything random (head init, mini-batch order, dropout when
fine-tuning) runs under ``seed`` inside ``torch.random.fork_rng``: two trainings on the same
rows give identical predictions, and the global RNG is left as it was. Threads: whatever
``torch.get_num_threads()`` says; this module never changes it.

Predictions are clamped into the range of the training targets (``[0, 1]`` at most for
``rank_score``).

Metrics (held-out rows): ``spearman`` and ``pearson`` (None when undefined, e.g. constant
predictions), ``mae``, ``rmse``, ``mae_baseline`` (the MAE of always predicting the train
mean), ``spearman_within_groups`` (Spearman inside each group with at least 2 held-out rows and
non-constant values, averaged: what per-instruction sampling relies on) with
``n_groups_within``; plus ``n_rows``, ``n_train``, ``n_eval``, ``n_dropped_nonfinite``,
``train_mean``, ``target_min``, ``target_max``, ``input_stats`` (truncations, reused prefix
tokens), ``ridge`` (the chosen penalty) and timings.

On disk (:meth:`ProxyModel.save`)
---------------------------------
``<dir>/config.json``, ``model.safetensors``, tokenizer files: the backbone (base model) and its
tokenizer, loadable by ``AutoModel`` / ``AutoTokenizer.from_pretrained(<dir>)``;
``proxy_head.safetensors``: the head's weights and the feature standardisation
(``feature_mean``, ``feature_std``); ``proxy_config.json``: format, kind, pooling, max_length,
feature dim, head type, target, target range, the training params and metrics.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import pathlib
import secrets
import shutil
import threading
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from compeffdist_ray.difficulty import cache_kwargs
from compeffdist_ray.errors import UserError

log = logging.getLogger("compeffdist_ray")

__all__ = [
    "HEADS",
    "INPUT_COLUMNS",
    "MIN_ROWS",
    "PROXY_CONFIG",
    "PROXY_HEAD",
    "RIDGE_GRID",
    "ProxyModel",
    "ProxyParams",
    "backbone_kind",
    "evaluate_predictions",
    "fit_ridge",
    "is_proxy_dir",
    "load_proxy",
    "resolve_backbone",
    "split_rows",
    "train_proxy",
]

INPUT_COLUMNS = ("instruction", "text")
PROXY_CONFIG = "proxy_config.json"
PROXY_HEAD = "proxy_head.safetensors"
FORMAT = "compeffdist-proxy"
FORMAT_VERSION = 1
MIN_ROWS = 8  # fewer finite-target rows than this cannot be both trained on and held out
MAX_BATCH_TOKENS = 16384  # padded tokens per forward pass at most (a single longer row still runs)
MIN_PREFIX_TOKENS = 16  # decoder rows of one instruction share a cached prefix when it is at least this long
_INSTRUCTION_CACHE_SIZE = 1024  # encoder: pooled instruction embeddings kept between predict calls
_GROUP_COLUMNS = ("task_id", "instruction")  # the first one present names a row's group

HEADS = ("ridge", "linear", "mlp")
# ridge penalties tried, as multiples of the number of training rows (features are standardised)
RIDGE_GRID = tuple(float(10.0 ** (k / 4)) for k in range(-16, 13))  # 1e-4 .. 1e3
_RIDGE_CHUNK = 4096  # rows per block when computing leave-one-out errors

Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyParams:
    """Everything that decides what proxy is trained (``batch_size`` and ``prefix_reuse`` only change speed)."""

    backbone: str | None = None
    """Alias, local directory or Hugging Face id of the backbone; None = the student (the caller fills it in)."""
    pooling: str = "auto"
    """'last' (last real token), 'mean' (mean over real tokens) or 'auto': last for decoders, mean for encoders."""
    max_length: int = 1024
    """Tokens per input at most (also capped by the backbone's positions); the instruction is shortened, not the text."""
    head: str = "ridge"
    """'ridge': linear, closed form, penalty chosen by leave-one-out; 'linear' / 'mlp' (one hidden GELU layer): AdamW."""
    hidden_dim: int = 256
    """Width of the mlp head's hidden layer (unused by 'ridge' and 'linear')."""
    train_backbone: bool = False
    """False: frozen backbone, features computed once, only the head trains (fast on CPU). True: then fine-tune all."""
    epochs: int = 100
    """Passes over the cached features when training a 'linear' or 'mlp' head (unused by 'ridge')."""
    lr: float = 1e-3
    """AdamW learning rate of a 'linear' or 'mlp' head, and of any head while fine-tuning."""
    weight_decay: float = 0.01
    """AdamW weight decay (head and, when fine-tuning, backbone)."""
    train_batch_size: int = 32
    """Rows per optimiser step (head and fine-tuning)."""
    finetune_epochs: int = 1
    """Passes over the rows when ``train_backbone`` fine-tunes backbone and head together."""
    backbone_lr: float = 2e-5
    """AdamW learning rate of the backbone when ``train_backbone``."""
    eval_fraction: float = 0.2
    """Share of the rows held out for the metrics, in (0, 0.5]."""
    split: str = "rows"
    """'rows': hold out rows, stratified by task (new texts of known tasks); 'groups': hold out whole tasks."""
    refit: bool = True
    """After measuring, train again on all rows (train + held out); the metrics stay those of the split."""
    target: str = "rank_score"
    """Column to predict (any numeric difficulty column: rank_score, rank_score_all, nll, ifd, ...)."""
    seed: int = 0
    """Seed of the split, the head's initialisation, the mini-batch order and fine-tuning dropout."""
    batch_size: int = 32
    """Rows per forward pass when computing features (speed only: results do not depend on it)."""
    prefix_reuse: bool = True
    """Decoders: run the prompt prefix shared by an instruction's rows once (KV cache); speed only."""

    def __post_init__(self):
        problems = _param_problems(self)
        if problems:
            raise UserError("invalid proxy settings: " + "; ".join(problems))

    @property
    def resolved_pooling(self) -> str | None:
        return None if self.pooling == "auto" else self.pooling


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _param_problems(p: ProxyParams) -> list[str]:
    out = []
    if p.backbone is not None and (not isinstance(p.backbone, str) or not p.backbone.strip()):
        out.append(f"backbone must be a model alias, directory or Hugging Face id (or null for the student), got {p.backbone!r}")
    if p.pooling not in ("auto", "last", "mean"):
        out.append(f"pooling must be 'auto', 'last' or 'mean', got {p.pooling!r}")
    if p.head not in HEADS:
        out.append(f"head must be one of {list(HEADS)}, got {p.head!r}")
    if p.split not in ("rows", "groups"):
        out.append(f"split must be 'rows' or 'groups', got {p.split!r}")
    for name, low in (("max_length", 8), ("hidden_dim", 1), ("epochs", 1), ("train_batch_size", 1),
                      ("finetune_epochs", 1), ("batch_size", 1)):
        value = getattr(p, name)
        if not _is_int(value) or value < low:
            out.append(f"{name} must be an integer >= {low}, got {value!r}")
    for name in ("lr", "backbone_lr"):
        value = getattr(p, name)
        if not _is_num(value) or value <= 0:
            out.append(f"{name} must be a positive number, got {value!r}")
    if not _is_num(p.weight_decay) or p.weight_decay < 0:
        out.append(f"weight_decay must be a number >= 0, got {p.weight_decay!r}")
    if not _is_num(p.eval_fraction) or not 0.0 < float(p.eval_fraction) <= 0.5:
        out.append(f"eval_fraction must be in (0, 0.5], got {p.eval_fraction!r}")
    if not isinstance(p.target, str) or not p.target:
        out.append(f"target must be a column name, got {p.target!r}")
    if not _is_int(p.seed):
        out.append(f"seed must be an integer, got {p.seed!r}")
    for name in ("train_backbone", "refit", "prefix_reuse"):
        if not isinstance(getattr(p, name), bool):
            out.append(f"{name} must be true or false, got {getattr(p, name)!r}")
    return out


# --------------------------------------------------------------------------------------------
# split and metrics (numpy only)
# --------------------------------------------------------------------------------------------


def split_rows(groups: Sequence, eval_fraction: float, *, seed: int, by: str = "rows"):
    """Boolean numpy mask of the held-out rows, deterministic under ``seed``.

    ``by="rows"``: rows are shuffled, ordered by group (groups in a shuffled order) and every
    ``1 / eval_fraction``-th row from a random offset is held out, so each group gives about
    ``eval_fraction`` of its rows and the total is ``round(n * eval_fraction)`` give or take one.
    ``by="groups"``: whole groups (shuffled) are held out until they hold about that share of
    the rows. Both keep at least 2 rows on each side when ``n >= 4``.
    """
    import numpy as np

    n = len(groups)
    if n < 4:
        raise UserError(f"cannot split {n} rows into train and held-out parts: need at least 4")
    rng = np.random.default_rng(seed)
    keys = [repr(g) for g in groups]
    uniq = sorted(set(keys))
    group_rank = dict(zip(uniq, rng.permutation(len(uniq)).tolist()))
    mask = np.zeros(n, dtype=bool)
    want = min(max(2, int(round(n * eval_fraction))), n - 2)
    if by == "groups":
        if len(uniq) < 2:
            raise UserError(f"split='groups' needs at least 2 groups (tasks), got {len(uniq)}; use split='rows'")
        sizes = {k: 0 for k in uniq}
        for k in keys:
            sizes[k] += 1
        taken = 0
        held = set()
        for k in sorted(uniq, key=group_rank.__getitem__):
            if taken >= want or len(held) == len(uniq) - 1:
                break
            held.add(k)
            taken += sizes[k]
        mask[:] = [k in held for k in keys]
        return mask
    if by != "rows":
        raise ValueError(f"by must be 'rows' or 'groups', got {by!r}")
    tiebreak = rng.permutation(n)
    order = sorted(range(n), key=lambda i: (group_rank[keys[i]], tiebreak[i]))
    offset = float(rng.random())
    for pos, i in enumerate(order):
        if math.floor((pos + 1) * eval_fraction + offset) > math.floor(pos * eval_fraction + offset):
            mask[i] = True
    # the systematic draw can be one off the target; it must keep both sides usable
    held = int(mask.sum())
    if held < 2 or held > n - 2:
        mask[:] = False
        mask[[order[j] for j in rng.permutation(n)[:want]]] = True
    return mask


def _corr(kind: str, a, b) -> float | None:
    import numpy as np
    from scipy import stats

    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = stats.spearmanr(a, b)[0] if kind == "spearman" else stats.pearsonr(a, b)[0]
    value = float(value)
    return value if math.isfinite(value) else None


def evaluate_predictions(y_true, y_pred, *, groups: Sequence | None = None,
                         baseline: float | None = None) -> dict[str, Any]:
    """Held-out metrics: spearman, pearson, mae, rmse, mae_baseline (constant ``baseline``),
    spearman_within_groups (mean over groups with >= 2 rows and a defined correlation), n_groups_within.

    Correlations that are undefined (fewer than 2 rows, constant input) are None.
    """
    import numpy as np

    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.shape} targets but {y_pred.shape} predictions")
    out: dict[str, Any] = {
        "spearman": _corr("spearman", y_true, y_pred),
        "pearson": _corr("pearson", y_true, y_pred),
        "mae": float(np.mean(np.abs(y_true - y_pred))) if y_true.size else None,
        "rmse": float(np.sqrt(np.mean((y_true - y_pred) ** 2))) if y_true.size else None,
        "mae_baseline": (float(np.mean(np.abs(y_true - baseline)))
                         if baseline is not None and y_true.size else None),
    }
    within = []
    if groups is not None:
        keys = [repr(g) for g in groups]
        if len(keys) != y_true.size:
            raise ValueError(f"{len(keys)} groups for {y_true.size} rows")
        members: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            members.setdefault(k, []).append(i)
        for idx in members.values():
            if len(idx) >= 2:
                rho = _corr("spearman", y_true[idx], y_pred[idx])
                if rho is not None:
                    within.append(rho)
    out["spearman_within_groups"] = float(np.mean(within)) if within else None
    out["n_groups_within"] = len(within)
    return out


# --------------------------------------------------------------------------------------------
# backbone plumbing
# --------------------------------------------------------------------------------------------


def backbone_kind(config) -> str:
    """'decoder' or 'encoder' for a transformers config (encoder-decoder models raise UserError)."""
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "decoder"
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(
            f"backbone {getattr(config, 'name_or_path', '') or config.model_type!r} is an encoder-decoder model "
            f"({archs or config.model_type}); the proxy needs a decoder (causal LM) or an encoder (BERT-like)"
        )
    if getattr(config, "is_decoder", False) is True:
        return "decoder"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "decoder"  # e.g. a saved base model ("LlamaModel")
    return "encoder"


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load report (the unused lm_head) and its loading bar while
    loading or saving; both settings are restored afterwards."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


def resolve_backbone(name: str) -> str:
    """What ``from_pretrained`` should load for a backbone name: an alias of any kind (causal LM or
    embedding), a local directory (a sentence-transformers one: its transformer module's folder)
    or a Hugging Face id. Raises UserError for anything else (see ``models.resolve_model``)."""
    from compeffdist_ray.models import ALIASES, resolve_model

    value = name.strip()
    if value in ALIASES:
        return resolve_model(value, kind=ALIASES[value].kind)
    path = pathlib.Path(value).expanduser()
    if path.is_dir() and (path / "modules.json").is_file():
        # a sentence-transformers directory: its transformer module may sit in a subfolder
        try:
            modules = json.loads((path / "modules.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"backbone '{value}': cannot read modules.json ({exc})") from exc
        for module in modules if isinstance(modules, list) else []:
            if isinstance(module, dict) and str(module.get("type", "")).endswith("models.Transformer"):
                sub = path / str(module.get("path") or "")
                if (sub / "config.json").is_file():
                    return str(sub.absolute())
        return resolve_model(value, kind="embedding")
    return resolve_model(value, kind="causal_lm")


_resolve_backbone = resolve_backbone  # the name callers used first


def _load_backbone(path: str, device: str):
    """(tokenizer, base model in fp32 eval mode on ``device``, kind)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
        kind = backbone_kind(config)
        with _quiet_transformers(), torch.random.fork_rng(devices=[]):  # loading may draw initial weights
            model = AutoModel.from_pretrained(path, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot load the proxy backbone from '{path}': {exc}".splitlines()[0]) from exc
    return tokenizer, model.to(device).eval(), kind


def _max_positions(model, tokenizer) -> int | None:
    limits = []
    for value in (getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)):
        if _is_int(value) and 0 < value < 10**7:
            limits.append(value)
    return min(limits) if limits else None


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if value is not None:
            return int(value)
    return 0  # pragma: no cover


# --------------------------------------------------------------------------------------------
# tokenisation
# --------------------------------------------------------------------------------------------


def _student_prompts(tokenizer, instructions: Sequence[str], texts: Sequence[str]) -> list[str]:
    from compeffdist_ray.prompts import render_instruction
    from compeffdist_ray.teacher.transformers_backend import format_chat

    return [format_chat(tokenizer, [{"role": "user", "content": render_instruction(i, t)}])
            for i, t in zip(instructions, texts)]


def _decoder_ids(tokenizer, instructions: Sequence[str], texts: Sequence[str], max_length: int,
                 stats: dict) -> list[list[int]]:
    """The student's prompt ids per row (as ``difficulty.encode_row``), shortened to ``max_length``."""
    special = not bool(getattr(tokenizer, "chat_template", None))
    if not instructions:
        return []
    ids = [list(x) for x in tokenizer(_student_prompts(tokenizer, instructions, texts),
                                      add_special_tokens=special)["input_ids"]]
    for r, seq in enumerate(ids):
        if len(seq) <= max_length:
            continue
        stats["truncated"] = stats.get("truncated", 0) + 1
        instr_ids = tokenizer(instructions[r].strip(), add_special_tokens=False)["input_ids"]
        keep = len(instr_ids) - (len(seq) - max_length)
        fitted = None
        for margin in (0, 2, 8, 32):  # decode + re-render can move a token boundary or two
            k = keep - margin
            if k < 1:
                break
            short = tokenizer.decode(instr_ids[:k])
            cand = tokenizer(_student_prompts(tokenizer, [short], [texts[r]])[0], add_special_tokens=special)["input_ids"]
            if len(cand) <= max_length:
                fitted = list(cand)
                break
        if fitted is None:  # the text alone is too long: keep the end, where the answer starts
            stats["text_truncated"] = stats.get("text_truncated", 0) + 1
            fitted = seq[-max_length:]
        ids[r] = fitted
    return ids


def _encoder_ids(tokenizer, strings: Sequence[str], max_length: int, stats: dict, what: str) -> list[list[int]]:
    if not strings:
        return []
    full = tokenizer(list(strings), add_special_tokens=True, truncation=True, max_length=max_length,
                     return_length=False)["input_ids"]
    n_cut = sum(1 for seq in full if len(seq) >= max_length)
    if n_cut:
        stats[f"{what}_at_max_length"] = stats.get(f"{what}_at_max_length", 0) + n_cut
    return [list(seq) for seq in full]


def _length_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None,
                    extra: int = 0) -> list[list[int]]:
    """Indices cut into forward batches, longest first, each at most ``batch_size`` rows and
    ``max_batch_tokens`` padded tokens, counting ``extra`` (a shared cached prefix) for every row
    (a single longer row still gets its own batch)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out, batch = [], []
    for i in order:
        width = (lengths[batch[0]] if batch else lengths[i]) + extra  # longest first: the first row sets it
        if batch and (len(batch) >= batch_size or
                      (max_batch_tokens is not None and (len(batch) + 1) * width > max_batch_tokens)):
            out.append(batch)
            batch = []
        batch.append(i)
    if batch:
        out.append(batch)
    return out


def _prefix_jobs(ids: Sequence[Sequence[int]], instructions: Sequence[str], *,
                 enabled: bool) -> list[tuple[int, list[int]]]:
    """(shared prefix length, row indices): one job per instruction whose rows share at least
    ``MIN_PREFIX_TOKENS`` leading prompt tokens, plus one job (prefix 0) with every other row.
    The prefix stops one token short of the shortest prompt: each row keeps its last token."""
    from compeffdist_ray.difficulty import common_prefix_len

    if not enabled:
        return [(0, list(range(len(ids))))]
    groups: dict[str, list[int]] = {}
    for i, instruction in enumerate(instructions):
        groups.setdefault(instruction, []).append(i)
    jobs, plain = [], []
    for idxs in groups.values():
        shared = 0
        if len(idxs) >= 2:
            seqs = [ids[i] for i in idxs]
            shared = min(common_prefix_len(seqs), min(len(s) for s in seqs) - 1)
        if shared >= MIN_PREFIX_TOKENS:
            jobs.append((shared, idxs))
        else:
            plain.extend(idxs)
    if plain:
        jobs.append((0, sorted(plain)))
    return jobs


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------


def _make_head(head: str, dim: int, hidden_dim: int, feature_mean, feature_std):
    import torch
    from torch import nn

    class _Head(nn.Module):
        """Standardise the features, then linear or one-hidden-layer MLP; returns [batch]."""

        def __init__(self):
            super().__init__()
            self.register_buffer("feature_mean", torch.as_tensor(feature_mean, dtype=torch.float32).clone())
            self.register_buffer("feature_std", torch.as_tensor(feature_std, dtype=torch.float32).clone())
            if head in ("ridge", "linear"):
                self.net = nn.Linear(dim, 1)
            else:
                self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, 1))

        def forward(self, x):
            return self.net((x - self.feature_mean) / self.feature_std).squeeze(-1)

        def output_layer(self):
            return self.net if head in ("ridge", "linear") else self.net[-1]

    return _Head()


class ProxyModel:
    """A backbone, its tokenizer and a regression head; :meth:`predict` scores (instruction, text) pairs.

    Build it with :func:`train_proxy` or :func:`load_proxy`. Prediction runs the backbone in
    eval mode under ``torch.inference_mode`` on the backbone's device and returns float64.
    """

    def __init__(self, tokenizer, backbone, head, *, kind: str, pooling: str, max_length: int,
                 target: str, target_range: tuple[float, float], params: ProxyParams,
                 metrics: dict | None = None, source: str | None = None):
        self.tokenizer = tokenizer
        self.backbone = backbone
        self.head = head
        self.kind = kind
        self.pooling = pooling
        self.max_length = int(max_length)
        self.target = target
        self.target_range = (float(target_range[0]), float(target_range[1]))
        self.params = params
        self.metrics = dict(metrics or {})
        self.source = source
        self.pad_id = _pad_id(tokenizer)
        self.stats: dict[str, int] = {}
        self.fit_info: dict[str, Any] = {}  # ridge: the chosen penalty and its leave-one-out error
        self._instruction_cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_lock = threading.Lock()

    # ---- shape ------------------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        return int(self.backbone.config.hidden_size)

    @property
    def feature_dim(self) -> int:
        """Length of one row's feature vector: hidden size (decoder) or 3 x hidden size (encoder)."""
        return self.hidden_size * (3 if self.kind == "encoder" else 1)

    @property
    def device(self):
        return next(self.backbone.parameters()).device

    # ---- forward ----------------------------------------------------------------------------

    def _pool_batch(self, seqs: Sequence[Sequence[int]], prefix=None):
        """One right-padded forward over ``seqs``: [len(seqs), hidden] pooled states (differentiable).

        ``prefix`` = (cache, prefix_len, prefix_hidden_sum): every row continues the same, already
        computed prefix (decoders only); the batch gets its own copy of the prefix's keys/values,
        positions continue after it and mean pooling counts its states.
        """
        import torch

        device = self.device
        n = len(seqs)
        lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long, device=device)
        width = int(lengths.max())
        ids = torch.full((n, width), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros((n, width), dtype=torch.long, device=device)
        for b, s in enumerate(seqs):  # right padding: a real token never attends to a pad
            ids[b, :len(s)] = torch.as_tensor(list(s), dtype=torch.long, device=device)
            mask[b, :len(s)] = 1
        kwargs = {"input_ids": ids, "attention_mask": mask}
        if self.kind == "decoder":
            kwargs["use_cache"] = False
        prefix_len, prefix_sum = 0, None
        if prefix is not None:
            cache, prefix_len, prefix_sum = prefix
            batch_cache = copy.deepcopy(cache)  # the forward appends to it: keep the shared one intact
            batch_cache.batch_repeat_interleave(n)
            kwargs.update(
                **cache_kwargs(self.backbone, batch_cache),
                use_cache=True,
                attention_mask=torch.cat([torch.ones((n, prefix_len), dtype=torch.long, device=device), mask], 1),
                position_ids=(prefix_len + torch.arange(width, device=device))[None, :].expand(n, -1),
            )
        hidden = self.backbone(**kwargs).last_hidden_state
        if self.pooling == "last":
            return hidden[torch.arange(n, device=device), lengths - 1]
        total = (hidden * mask.to(hidden.dtype).unsqueeze(-1)).sum(1)
        if prefix_sum is not None:
            total = total + prefix_sum
        return total / (lengths + prefix_len).to(hidden.dtype).unsqueeze(-1)

    def _pool_all(self, seqs: Sequence[Sequence[int]], *, batch_size: int, max_batch_tokens: int | None,
                  prefix=None, done: Callable[[int], None] | None = None):
        """Pooled states of ``seqs`` (CPU float32), batched by length; ``done(k)`` after each batch of k."""
        import torch

        out = torch.empty((len(seqs), self.hidden_size), dtype=torch.float32)
        extra = prefix[1] if prefix is not None else 0
        for batch in _length_batches([len(s) for s in seqs], batch_size, max_batch_tokens, extra=extra):
            pooled = self._pool_batch([seqs[i] for i in batch], prefix)
            out[torch.as_tensor(batch)] = pooled.float().cpu()
            if done is not None:
                done(len(batch))
        return out

    def _decoder_features(self, ids: Sequence[Sequence[int]], instructions: Sequence[str], *, batch_size: int,
                          max_batch_tokens: int | None, prefix_reuse: bool, done):
        """Pooled states of the prompts ``ids``; rows of one instruction share their prompt prefix."""
        import torch
        from transformers import DynamicCache

        out = torch.empty((len(ids), self.hidden_size), dtype=torch.float32)
        for prefix_len, idxs in _prefix_jobs(ids, instructions, enabled=prefix_reuse):
            rows = torch.as_tensor(idxs, dtype=torch.long)
            if not prefix_len:
                out[rows] = self._pool_all([ids[i] for i in idxs], batch_size=batch_size,
                                           max_batch_tokens=max_batch_tokens, done=done)
                continue
            cache = DynamicCache(config=self.backbone.config)
            head = torch.as_tensor([list(ids[idxs[0]][:prefix_len])], dtype=torch.long, device=self.device)
            states = self.backbone(input_ids=head, **cache_kwargs(self.backbone, cache), use_cache=True).last_hidden_state[0]
            prefix_sum = states.sum(0) if self.pooling == "mean" else None
            self.stats["prefix_tokens_reused"] = self.stats.get("prefix_tokens_reused", 0) + prefix_len * (len(idxs) - 1)
            out[rows] = self._pool_all([ids[i][prefix_len:] for i in idxs], batch_size=batch_size,
                                       max_batch_tokens=max_batch_tokens, prefix=(cache, prefix_len, prefix_sum),
                                       done=done)
            del cache
        return out

    def _tokenize(self, instructions: Sequence[str], texts: Sequence[str]):
        """decoder: list of prompt ids; encoder: (text ids, unique instructions, their ids, row -> index)."""
        if self.kind == "decoder":
            return _decoder_ids(self.tokenizer, instructions, texts, self.max_length, self.stats)
        uniq = list(dict.fromkeys(instructions))
        where = {s: j for j, s in enumerate(uniq)}
        return (_encoder_ids(self.tokenizer, texts, self.max_length, self.stats, "texts"), uniq,
                [where[s] for s in instructions])

    def _combine(self, t, i):
        import torch

        return torch.cat([t, i, t * i], dim=-1)

    def _features(self, instructions: Sequence[str], texts: Sequence[str], *, batch_size: int,
                  max_batch_tokens: int | None, progress: Progress | None = None, use_cache: bool = True,
                  prefix_reuse: bool | None = None):
        import torch

        counter = [0]

        def done(k: int) -> None:
            counter[0] += k
            if progress is not None:
                progress("features", counter[0], len(texts))

        with torch.inference_mode():
            tok = self._tokenize(instructions, texts)
            if self.kind == "decoder":
                reuse = self.params.prefix_reuse if prefix_reuse is None else prefix_reuse
                return self._decoder_features(tok, instructions, batch_size=batch_size,
                                              max_batch_tokens=max_batch_tokens, prefix_reuse=reuse, done=done)
            text_ids, uniq, index = tok
            local = {}
            if use_cache:
                with self._cache_lock:
                    local = {s: self._instruction_cache[s] for s in uniq if s in self._instruction_cache}
            missing = [s for s in uniq if s not in local]
            if missing:
                ids = _encoder_ids(self.tokenizer, missing, self.max_length, self.stats, "instructions")
                pooled = self._pool_all(ids, batch_size=batch_size, max_batch_tokens=max_batch_tokens)
                local.update((s, vec.clone()) for s, vec in zip(missing, pooled))
            instr = torch.stack([local[s] for s in uniq]) if uniq else torch.empty((0, self.hidden_size))
            if use_cache:
                with self._cache_lock:  # least recently used instructions leave first
                    for s in uniq:
                        self._instruction_cache[s] = local[s]
                        self._instruction_cache.move_to_end(s)
                    while len(self._instruction_cache) > _INSTRUCTION_CACHE_SIZE:
                        self._instruction_cache.popitem(last=False)
            t = self._pool_all(text_ids, batch_size=batch_size, max_batch_tokens=max_batch_tokens, done=done)
            return self._combine(t, instr[torch.as_tensor(index, dtype=torch.long)])

    # ---- public -----------------------------------------------------------------------------

    def clear_cache(self) -> None:
        """Forget the encoder's cached instruction embeddings (after changing the backbone's weights)."""
        with self._cache_lock:
            self._instruction_cache.clear()

    def features(self, instructions: Sequence[str], texts: Sequence[str], *, batch_size: int | None = None,
                 max_batch_tokens: int | None = MAX_BATCH_TOKENS, prefix_reuse: bool | None = None) -> "Any":
        """The pooled backbone features the head reads, one row per pair: numpy float32 [n, feature_dim].
        ``prefix_reuse`` (decoders) defaults to ``params.prefix_reuse``."""
        instructions, texts = _check_pairs(instructions, texts)
        if not instructions:
            import numpy as np

            return np.zeros((0, self.feature_dim), dtype=np.float32)
        self.backbone.eval()
        return self._features(instructions, texts, batch_size=batch_size or self.params.batch_size,
                              max_batch_tokens=max_batch_tokens, prefix_reuse=prefix_reuse).numpy()

    def predict(self, instructions: Sequence[str], texts: Sequence[str], *, batch_size: int | None = None,
                max_batch_tokens: int | None = MAX_BATCH_TOKENS) -> "Any":
        """Predicted target (e.g. rank_score) per (instruction, text) pair, clamped into the training
        targets' range: numpy float64 [n]. ``batch_size`` rows per forward (default: params.batch_size)."""
        import numpy as np
        import torch

        instructions, texts = _check_pairs(instructions, texts)
        if not instructions:
            return np.zeros(0, dtype=np.float64)
        self.backbone.eval()
        self.head.eval()
        feats = self._features(instructions, texts, batch_size=batch_size or self.params.batch_size,
                               max_batch_tokens=max_batch_tokens)
        with torch.inference_mode():
            pred = self.head(feats.to(self.head.feature_mean.device)).double().cpu().numpy()
        return np.clip(pred, *self.target_range)

    def predict_rows(self, rows, *, batch_size: int | None = None,
                     max_batch_tokens: int | None = MAX_BATCH_TOKENS) -> "Any":
        """:meth:`predict` for a DataFrame or a list of mappings with ``instruction`` and ``text``."""
        frame = _as_frame(rows, INPUT_COLUMNS)
        return self.predict(list(frame["instruction"]), list(frame["text"]), batch_size=batch_size,
                            max_batch_tokens=max_batch_tokens)

    def config(self) -> dict:
        """What ``proxy_config.json`` holds."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "pooling": self.pooling,
            "max_length": self.max_length,
            "hidden_size": self.hidden_size,
            "feature_dim": self.feature_dim,
            "feature": "last_hidden_state" + (" [text, instruction, text*instruction]" if self.kind == "encoder" else ""),
            "head": self.params.head,
            "hidden_dim": self.params.hidden_dim if self.params.head == "mlp" else None,
            "target": self.target,
            "target_range": list(self.target_range),
            "source": self.source,
            "params": dataclasses.asdict(self.params),
            "metrics": self.metrics,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }

    def save(self, path) -> pathlib.Path:
        """Write the backbone (Hugging Face format, safetensors), tokenizer, head and config to ``path``.

        The directory is built next to ``path`` and renamed into place at the end; an existing
        proxy directory there is replaced, any other non-empty directory is refused.
        """
        from safetensors.torch import save_file

        final = pathlib.Path(path).expanduser().absolute()
        if final.exists() and (not final.is_dir() or (any(final.iterdir()) and not is_proxy_dir(final))):
            raise UserError(f"cannot save the proxy to '{final}': it exists and is not a proxy directory "
                            f"(no {PROXY_CONFIG}); choose an empty or new directory")
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            with _quiet_transformers():
                self.backbone.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            state = {k: v.detach().float().cpu().contiguous() for k, v in self.head.state_dict().items()}
            save_file(state, str(tmp / PROXY_HEAD), metadata={"format": FORMAT})
            (tmp / PROXY_CONFIG).write_text(json.dumps(_jsonable(self.config()), indent=2) + "\n", encoding="utf-8")
            if final.exists():
                old = final.parent / f".{final.name}.old-{secrets.token_hex(4)}"
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _jsonable(obj.item())
    return obj


# --------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------


def _check_pairs(instructions, texts) -> tuple[list[str], list[str]]:
    for name, value in (("instructions", instructions), ("texts", texts)):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):  # lists, arrays, Series
            raise UserError(f"{name} must be a list of strings, got {type(value).__name__}")
    instructions, texts = list(instructions), list(texts)
    if len(instructions) != len(texts):
        raise UserError(f"got {len(instructions)} instructions but {len(texts)} texts: pass one of each per pair")
    for name, values in (("instruction", instructions), ("text", texts)):
        bad = [i for i, v in enumerate(values) if not isinstance(v, str)]
        if bad:
            raise UserError(f"{len(bad)} {name}(s) are not strings (first at position {bad[0]}: "
                            f"{type(values[bad[0]]).__name__}); every pair needs a string instruction and text")
    return instructions, texts


def _as_frame(rows, required: Sequence[str]):
    import pandas as pd

    if isinstance(rows, pd.DataFrame):
        frame = rows
    elif isinstance(rows, Sequence) and not isinstance(rows, (str, bytes)) and all(isinstance(r, Mapping) for r in rows):
        frame = pd.DataFrame(list(rows))
    else:
        raise UserError(f"rows must be a pandas DataFrame or a list of dicts, got {type(rows).__name__}")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise UserError(f"rows lack column(s) {missing}: they have {sorted(map(str, frame.columns))}, "
                        f"expected {list(required)}")
    return frame


# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


def _set_lr(opt, base_lrs: list[float], step: int, total: int) -> None:
    factor = 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))
    for group, base in zip(opt.param_groups, base_lrs):
        group["lr"] = base * factor


def _fit_head(head, feats, y, params: ProxyParams, generator, progress: Progress | None) -> list[float]:
    """Train ``head`` on cached features; returns the mean train loss per epoch."""
    import torch

    n = feats.shape[0]
    opt = torch.optim.AdamW(head.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    steps_per_epoch = math.ceil(n / params.train_batch_size)
    total = params.epochs * steps_per_epoch
    losses, step = [], 0
    head.train()
    for epoch in range(params.epochs):
        perm = torch.randperm(n, generator=generator)
        running = 0.0
        for lo in range(0, n, params.train_batch_size):
            idx = perm[lo:lo + params.train_batch_size]
            _set_lr(opt, [params.lr], step, total)
            loss = torch.nn.functional.mse_loss(head(feats[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running += float(loss.detach()) * len(idx)
            step += 1
        losses.append(running / n)
        if progress is not None:
            progress("head", epoch + 1, params.epochs)
    head.eval()
    return losses


def fit_ridge(z, y, *, grid: Sequence[float] = RIDGE_GRID) -> dict:
    """Ridge regression of ``y`` on the (already standardised) features ``z``, with an
    unpenalised intercept and the penalty chosen by exact leave-one-out error.

    The penalty is ``alpha = lam * n`` for ``lam`` in ``grid`` (smallest leave-one-out mean squared
    error; ties go to the stronger penalty). Uses one eigendecomposition of the d x d Gram matrix
    and streams the rows in blocks, so memory is O(d^2 + block * d) whatever the number of rows.
    Returns {coef (numpy [d]), intercept, alpha, lam, loo_mse, at_grid_edge}.
    """
    import numpy as np

    z = np.asarray(z, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = z.shape
    mu_z = z.mean(0)
    mu_y = float(y.mean())
    yc = y - mu_y
    gram = np.zeros((d, d))
    zty = np.zeros(d)
    for lo in range(0, n, _RIDGE_CHUNK):
        block = z[lo:lo + _RIDGE_CHUNK] - mu_z
        gram += block.T @ block
        zty += block.T @ yc[lo:lo + _RIDGE_CHUNK]
    evals, evecs = np.linalg.eigh(gram)
    evals = np.clip(evals, 0.0, None)
    alphas = np.asarray(grid, dtype=np.float64) * n
    inv = 1.0 / (evals[:, None] + alphas[None, :])  # [d, grid]
    proj = evecs.T @ zty  # V^T Z^T y
    sse = np.zeros(len(alphas))
    for lo in range(0, n, _RIDGE_CHUNK):
        zv = (z[lo:lo + _RIDGE_CHUNK] - mu_z) @ evecs  # rows in the eigenbasis
        fitted = zv @ (proj[:, None] * inv)  # [block, grid]
        hat = (zv ** 2) @ inv + 1.0 / n  # diagonal of the hat matrix (+ the intercept's 1/n)
        resid = (yc[lo:lo + _RIDGE_CHUNK, None] - fitted) / np.clip(1.0 - hat, 1e-12, None)
        sse += (resid ** 2).sum(0)
    loo = sse / n
    best = int(np.flatnonzero(loo <= loo.min() * (1 + 1e-12))[-1])
    coef = evecs @ (proj * inv[:, best])
    return {
        "coef": coef,
        "intercept": mu_y - float(mu_z @ coef),
        "alpha": float(alphas[best]),
        "lam": float(grid[best]),
        "loo_mse": float(loo[best]),
        "at_grid_edge": best in (0, len(alphas) - 1),
    }


def _finetune(model: ProxyModel, tok, y, params: ProxyParams, generator, progress: Progress | None) -> list[float]:
    """Train backbone and head together over tokenised rows; returns the mean loss per epoch."""
    import torch

    n = len(y)
    backbone, head = model.backbone, model.head
    for p in backbone.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [p for p in backbone.parameters()], "lr": params.backbone_lr},
                             {"params": list(head.parameters()), "lr": params.lr}],
                            weight_decay=params.weight_decay)
    steps_per_epoch = math.ceil(n / params.train_batch_size)
    total = params.finetune_epochs * steps_per_epoch
    losses, step = [], 0
    backbone.train()
    head.train()
    device = model.device
    try:
        for epoch in range(params.finetune_epochs):
            perm = torch.randperm(n, generator=generator).tolist()
            running = 0.0
            for lo in range(0, n, params.train_batch_size):
                idx = perm[lo:lo + params.train_batch_size]
                if model.kind == "decoder":
                    feats = model._pool_batch([tok[i] for i in idx])
                else:
                    text_ids, uniq_ids, index = tok
                    local = list(dict.fromkeys(index[i] for i in idx))
                    where = {j: k for k, j in enumerate(local)}
                    t = model._pool_batch([text_ids[i] for i in idx])
                    instr = model._pool_batch([uniq_ids[j] for j in local])
                    feats = model._combine(t, instr[torch.as_tensor([where[index[i]] for i in idx], device=device)])
                _set_lr(opt, [params.backbone_lr, params.lr], step, total)
                target = y[torch.as_tensor(idx)].to(device)
                loss = torch.nn.functional.mse_loss(head(feats), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                running += float(loss.detach()) * len(idx)
                step += 1
                if progress is not None:
                    progress("finetune", step, total)
            losses.append(running / n)
    finally:
        for p in backbone.parameters():
            p.requires_grad_(False)
        backbone.eval()
        head.eval()
    return losses


def _new_model(loaded, params: ProxyParams, target_range: tuple[float, float]) -> ProxyModel:
    """A ProxyModel around a loaded (tokenizer, backbone, kind) with a placeholder head."""
    import torch

    tokenizer, backbone, kind = loaded
    for p in backbone.parameters():
        p.requires_grad_(False)
    pooling = params.resolved_pooling or ("last" if kind == "decoder" else "mean")
    limit = _max_positions(backbone, tokenizer)
    max_length = min(params.max_length, limit) if limit else params.max_length
    dim = int(backbone.config.hidden_size) * (3 if kind == "encoder" else 1)
    with torch.random.fork_rng(devices=[]):
        head = _make_head(params.head, dim, params.hidden_dim, torch.zeros(dim), torch.ones(dim))
    return ProxyModel(tokenizer, backbone, head, kind=kind, pooling=pooling, max_length=max_length,
                      target=params.target, target_range=target_range, params=params, source=params.backbone)


def _train_once(loaded, instructions: list[str], texts: list[str], y, params: ProxyParams, *,
                feats=None, progress: Progress | None) -> tuple[ProxyModel, list[float]]:
    """One full training on the given rows: head on (``feats`` or freshly computed) frozen
    features, then, with ``train_backbone``, backbone and head together. Returns (model, losses)."""
    import numpy as np
    import torch

    y_t = torch.as_tensor(np.asarray(y, dtype=np.float32))
    model = _new_model(loaded, params, (float(y_t.min()), float(y_t.max())))
    if feats is None:
        feats = model._features(instructions, texts, batch_size=params.batch_size,
                                max_batch_tokens=MAX_BATCH_TOKENS, progress=progress, use_cache=False)
    mean = feats.mean(0)
    std = feats.std(0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        generator = torch.Generator().manual_seed(params.seed)
        head = _make_head(params.head, model.feature_dim, params.hidden_dim, mean, std)
        model.head = head
        if params.head == "ridge":
            fit = fit_ridge(((feats - mean) / std).numpy(), y_t.numpy())
            with torch.no_grad():
                head.net.weight.copy_(torch.as_tensor(fit["coef"], dtype=torch.float32)[None, :])
                head.net.bias.fill_(fit["intercept"])
            losses = [float(torch.mean((head(feats).detach() - y_t) ** 2))]
            model.fit_info = {k: fit[k] for k in ("alpha", "lam", "loo_mse", "at_grid_edge")}
            if progress is not None:
                progress("head", 1, 1)
        else:
            with torch.no_grad():
                head.output_layer().bias.fill_(float(y_t.mean()))
            losses = _fit_head(head, feats, y_t, params, generator, progress)
        if params.train_backbone:
            head.to(model.device)
            tok = model._tokenize(instructions, texts)
            if model.kind == "encoder":
                text_ids, uniq, index = tok
                tok = (text_ids, _encoder_ids(model.tokenizer, uniq, model.max_length, model.stats, "instructions"),
                       index)
            losses += _finetune(model, tok, y_t, params, generator, progress)
            model.clear_cache()
    return model, losses


def train_proxy(rows, params: ProxyParams, *, device: str = "cpu",
                progress: Progress | None = None) -> tuple[ProxyModel, dict]:
    """Train a proxy on scored rows; return (model, held-out metrics).

    ``rows``: a DataFrame (or list of dicts) with ``instruction``, ``text`` and ``params.target``;
    ``task_id`` (else the instruction) groups rows for the split and the within-group metric.
    Rows whose target is missing or not finite are dropped and counted (``n_dropped_nonfinite``).
    ``params.backbone`` must be set (the stage passes the student when the config leaves it
    empty). ``progress(phase, done, total)`` is called with phase 'features', 'head' or 'finetune'.
    Raises UserError for a missing column, non-string inputs, or fewer than ``MIN_ROWS`` usable rows.
    """
    import numpy as np
    import pandas as pd
    import torch

    if not isinstance(params, ProxyParams):
        raise TypeError(f"params must be a ProxyParams, got {type(params).__name__}")
    frame = _as_frame(rows, (*INPUT_COLUMNS, params.target))
    if params.backbone is None:
        raise UserError("the proxy has no backbone: set its backbone (alias, directory or Hugging Face id); "
                        "the pipeline uses student.model when the proxy's backbone is left empty")
    target = pd.to_numeric(frame[params.target], errors="coerce").to_numpy(dtype=np.float64)
    finite = np.isfinite(target)
    n_dropped = int((~finite).sum())
    frame = frame.loc[finite].reset_index(drop=True)
    y = target[finite]
    if len(frame) < MIN_ROWS:
        raise UserError(
            f"the proxy needs at least {MIN_ROWS} rows with a finite '{params.target}' to train and hold out "
            f"{params.eval_fraction:.0%} of them, got {len(frame)}"
            + (f" ({n_dropped} dropped as missing or non-finite)" if n_dropped else "")
            + "; score more rows (e.g. raise pairing.num_texts) or turn the proxy off")
    instructions, texts = _check_pairs(list(frame["instruction"]), list(frame["text"]))
    group_col = next(c for c in _GROUP_COLUMNS if c in frame.columns)
    groups = list(frame[group_col])
    held = split_rows(groups, params.eval_fraction, seed=params.seed, by=params.split)
    tr, ev = np.flatnonzero(~held), np.flatnonzero(held)
    pick = lambda seq, idx: [seq[i] for i in idx]  # noqa: E731

    backbone_path = resolve_backbone(params.backbone)
    t0 = time.perf_counter()
    loaded = _load_backbone(backbone_path, device)
    load_s = time.perf_counter() - t0

    # every row's frozen features, once: the split's head and the refit's both read them
    t1 = time.perf_counter()
    frozen = _new_model(loaded, params, (0.0, 1.0))
    feats = frozen._features(instructions, texts, batch_size=params.batch_size, max_batch_tokens=MAX_BATCH_TOKENS,
                             progress=progress, use_cache=False)
    feature_s = time.perf_counter() - t1

    t2 = time.perf_counter()
    if params.train_backbone:  # fine-tuning changes the weights: the refit needs the original ones
        split_loaded = _load_backbone(backbone_path, device) if params.refit else loaded
    else:
        split_loaded = loaded
    model, losses = _train_once(split_loaded, pick(instructions, tr), pick(texts, tr), y[tr], params,
                                feats=feats[torch.as_tensor(tr)], progress=progress)
    if params.train_backbone:
        pred = model.predict(pick(instructions, ev), pick(texts, ev))
    else:
        with torch.inference_mode():
            pred = np.clip(model.head(feats[torch.as_tensor(ev)]).double().numpy(), *model.target_range)
    train_mean = float(np.mean(y[tr]))
    metrics = evaluate_predictions(y[ev], pred, groups=pick(groups, ev), baseline=train_mean)
    metrics.update({
        "target": params.target,
        "split": params.split,
        "group_column": group_col,
        "n_rows": int(len(frame)),
        "n_train": int(len(tr)),
        "n_eval": int(len(ev)),
        "n_dropped_nonfinite": n_dropped,
        "train_mean": train_mean,
        "target_min": float(np.min(y)),
        "target_max": float(np.max(y)),
        "final_train_loss": losses[-1] if losses else None,
        "kind": model.kind,
        "pooling": model.pooling,
        "max_length": model.max_length,
        "feature_dim": model.feature_dim,
        "input_stats": dict(frozen.stats),  # truncated prompts, prefix tokens reused
        "head": params.head,
        "ridge": dict(model.fit_info) or None,
        "refit": params.refit,
    })
    if params.refit:
        del model
        model, losses = _train_once(loaded, instructions, texts, y, params, feats=feats, progress=progress)
    metrics["load_seconds"] = round(load_s, 3)
    metrics["feature_seconds"] = round(feature_s, 3)
    metrics["train_seconds"] = round(time.perf_counter() - t2, 3)
    model.metrics = dict(metrics)
    log.info("proxy (%s, %s pooling, %s head) on %d/%d rows: spearman %s, mae %.4f (constant baseline %.4f), "
             "within-group spearman %s over %d groups", model.kind, model.pooling, params.head, metrics["n_train"],
             metrics["n_eval"], _fmt(metrics["spearman"]), metrics["mae"], metrics["mae_baseline"],
             _fmt(metrics["spearman_within_groups"]), metrics["n_groups_within"])
    return model, metrics


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def is_proxy_dir(path) -> bool:
    """True when ``path`` holds a saved proxy (its config, head and backbone config)."""
    p = pathlib.Path(path)
    return all((p / name).is_file() for name in (PROXY_CONFIG, PROXY_HEAD, "config.json"))


def load_proxy(path, *, device: str = "cpu") -> ProxyModel:
    """A :class:`ProxyModel` from a directory written by :meth:`ProxyModel.save`."""
    import torch
    from safetensors.torch import load_file

    root = pathlib.Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"proxy directory '{root}' does not exist (train the proxy stage first, or check the path)")
    missing = [name for name in (PROXY_CONFIG, PROXY_HEAD, "config.json") if not (root / name).is_file()]
    if missing:
        raise UserError(f"'{root}' is not a saved proxy: missing {', '.join(missing)} "
                        f"(a proxy directory holds the backbone, {PROXY_HEAD} and {PROXY_CONFIG})")
    try:
        cfg = json.loads((root / PROXY_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"'{root / PROXY_CONFIG}' is not readable JSON: {exc}") from exc
    if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
        raise UserError(f"'{root / PROXY_CONFIG}' is not a proxy config (format is "
                        f"{cfg.get('format') if isinstance(cfg, dict) else None!r}, expected {FORMAT!r})")
    if cfg.get("format_version") != FORMAT_VERSION:
        raise UserError(f"'{root}' holds a proxy of format version {cfg.get('format_version')!r}; this version "
                        f"reads {FORMAT_VERSION}: train it again")
    known = {f.name for f in dataclasses.fields(ProxyParams)}
    params = ProxyParams(**{k: v for k, v in (cfg.get("params") or {}).items() if k in known})
    tokenizer, backbone, _ = _load_backbone(str(root), device)
    kind = cfg["kind"]
    dim = int(cfg["feature_dim"])
    state = load_file(str(root / PROXY_HEAD))
    with torch.random.fork_rng(devices=[]):
        head = _make_head(cfg.get("head", params.head), dim, int(cfg.get("hidden_dim") or params.hidden_dim),
                          torch.zeros(dim), torch.ones(dim))
    try:
        head.load_state_dict(state)
    except RuntimeError as exc:
        raise UserError(f"'{root / PROXY_HEAD}' does not match {PROXY_CONFIG} (head {cfg.get('head')}, "
                        f"feature_dim {dim}): {str(exc).splitlines()[0]}") from exc
    head.eval()
    model = ProxyModel(tokenizer, backbone, head.to(device), kind=kind, pooling=cfg["pooling"],
                       max_length=int(cfg["max_length"]), target=cfg["target"],
                       target_range=tuple(cfg["target_range"]), params=params, metrics=cfg.get("metrics"),
                       source=cfg.get("source"))
    if model.feature_dim != dim:
        raise UserError(f"'{root}': the backbone gives {model.feature_dim} features but the head reads {dim}")
    return model
