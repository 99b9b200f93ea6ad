"""Stage 7 core, difficulty: the (warmed-up) student scores (instruction, text, response) rows.

Reads rows (mappings) with the columns ``instruction``, ``text``, ``response`` and optionally
``group``. Returns, for each row and in the input order, a dict with the columns of
:data:`METRIC_COLUMNS`: ``rank_score``, ``rank_score_all``, ``nll``, ``ppl``, ``ifd``,
``n_response_tokens``. Needs torch and transformers; CPU or GPU (the model's own device).
Pure: no Ray, no files; the stage wrapper owns I/O.

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from compeffdist_ray.difficulty import score_batch
    from compeffdist_ray.models import resolve_model

    path = resolve_model("smollm2-135m-instruct")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [{"instruction": "Label the sentiment: positive, negative or neutral.",
             "text": "The soup was cold.", "response": "negative"}]
    print(score_batch(model, tokenizer, rows))

What is scored
--------------
The conditioned sequence of a row is ``prompt + response``. The prompt is the student's chat
template applied to one user turn, ``render_instruction(instruction, text)``, with the generation
prompt added, tokenized without adding special tokens (the template writes its own); a tokenizer
without a chat template gets ``format_chat``'s plain ``User: ... Assistant:`` form, tokenized
*with* the tokenizer's usual special tokens (e.g. its BOS). The response is the response text
tokenized without special tokens, then the tokenizer's EOS id. Only response positions are
scored: logits at position ``t - 1`` predict response token ``t``. One forward pass per row
gives every metric except the denominator of IFD.

Metrics (per row, over its R response tokens y_1..y_R)
------------------------------------------------------
``rank_score``, the paper's ranking-based difficulty (COMPEFFDIST's public
``rank_score_compute.py``): for each y_t order the vocabulary by the student's next-token
logits, highest first, ties broken by the lower token id (ordering by logit is ordering by
probability, softmax being monotone; using the logits keeps apart two tokens whose float
probabilities happen to round to the same value). The top-p nucleus is the shortest prefix of
that order whose cumulative probability reaches ``top_p`` (default 0.95, the paper's code):
``n = 1 + #{k : C_k < top_p}`` for the cumulative sums ``C_k`` (float64), at most V. If y_t sits
at 0-based position x < n its score is x / n, otherwise 1.0. The row's ``rank_score`` is the
mean over the tokens whose score is *non-zero*: tokens the student ranks first (x = 0) are
left out, as the paper's code does (it keeps scores > 1e-6; for V < 10^6 that is the same
set). A row whose tokens are all top-1 scores 0.0. ``rank_score_all`` averages over *all*
response tokens instead; the two differ in what an easy token does: in ``rank_score`` a top-1
token changes nothing (a row with one hard token among ten easy ones scores like a row of only
that hard token), in ``rank_score_all`` it pulls the mean towards 0, so ``rank_score_all`` is
the share-weighted view and never exceeds ``rank_score``.

Note: DESIGN.md's first reading (share of tokens outside a p = 0.9 nucleus) is a different
statistic; this module implements the paper's code, with its default p = 0.95.

``nll`` = mean over t of -log p(y_t | prompt, y_<t) (natural log, float64 softmax of the float32
logits); ``ppl`` = exp(nll).

``ifd`` (Instruction-Following Difficulty, Li et al. 2024, "From Quantity to Quality") =
nll(response | prompt) / nll(response alone). "Alone" means a second, separate forward over
``[start] + response``, where ``start`` is the tokenizer's BOS id, or its EOS id when it has
no BOS (those tokenizers use EOS as the document separator); every response token, the first
included, is scored in both passes, so numerator and denominator average over the same tokens.
This is the ratio of mean cross-entropies; some follow-up work writes IFD as the ratio of
perplexities, exp(nll_c) / exp(nll_u), which orders rows differently. ``ifd`` is NaN when the
unconditioned nll is 0.

The two scorers
---------------
:func:`score_reference` is the ground truth: one row at a time, full forward, full logits,
one full-vocabulary sort per response token. :func:`score_batch` is the fast path and must
agree with it (to float32 noise); see its docstring for the three speed-ups, and
``benchmarks/scoring_throughput.py`` for what they buy against the paper's way. Both reduce
per-token values with the same :func:`summarize`, and the per-token rank rule has a sorting
implementation (:func:`rank_scores_sorted`) and a sort-free one (:func:`rank_scores`) that give
identical results on identical logits. The two scorers' logits themselves differ by float32
noise (~1e-7 on tiny models, ~1e-6 on SmolLM2), so a token whose cumulative probability sits
within that noise of ``top_p``, or whose logit nearly ties a neighbour's, can land on different
sides in the two; its score then moves by about 1/n (or to 1.0). Rare, never seen on the test
or benchmark rows, but it is why agreement on ``rank_score`` is exact only almost always.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import weakref
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from compeffdist_ray.errors import UserError

__all__ = [
    "INPUT_COLUMNS",
    "METRIC_COLUMNS",
    "EncodedRow",
    "cache_kwargs",
    "common_prefix_len",
    "encode_row",
    "expand_cache",
    "logits_at",
    "metrics_from_logits",
    "prefix_cache",
    "project_hidden",
    "projection_setup",
    "rank_scores",
    "rank_scores_sorted",
    "score_batch",
    "score_reference",
    "summarize",
    "token_nll",
    "unconditioned_ids",
]

INPUT_COLUMNS = ("instruction", "text", "response")
METRIC_COLUMNS = ("rank_score", "rank_score_all", "nll", "ppl", "ifd", "n_response_tokens")

# float64 softmax work is done in chunks of at most this many logits (64 MiB of float64).
_CHUNK_ELEMENTS = 1 << 23
# The sort-free nucleus starts from the top-k with this k and doubles it while k tokens hold
# less than top_p of the mass (peaked real models usually stop early; flat random ones go to V).
_TOPK_START = 64


# --------------------------------------------------------------------------------------------
# pure metric functions: logits + target ids in, numbers out
# --------------------------------------------------------------------------------------------


def _check_top_p(top_p: float) -> float:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < float(top_p) <= 1.0:
        raise UserError(f"top_p must be a number in (0, 1], got {top_p!r}; the paper's code uses 0.95")
    return float(top_p)


def _as_2d(logits, targets):
    import torch

    if logits.dim() != 2:
        raise ValueError(f"logits must be [tokens, vocab], got shape {tuple(logits.shape)}")
    targets = torch.as_tensor(targets, dtype=torch.long, device=logits.device).reshape(-1)
    if targets.numel() != logits.shape[0]:
        raise ValueError(f"{logits.shape[0]} logit rows but {targets.numel()} target ids")
    return logits, targets


def token_nll(logits, targets):
    """Per-token negative log-likelihood, float64: ``logsumexp(l) - l[y]`` for each row of ``logits``."""
    import torch

    logits, targets = _as_2d(logits, targets)
    out = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, logits.shape[1]))
    for lo in range(0, logits.shape[0], step):
        lg = logits[lo:lo + step].float().double()
        tg = targets[lo:lo + step]
        out[lo:lo + step] = torch.logsumexp(lg, dim=-1) - lg.gather(1, tg[:, None]).squeeze(1)
    return out


def rank_scores_sorted(logits, targets, *, top_p: float = 0.95):
    """Per-token rank scores, the literal way: one full sort of the vocabulary per token.

    Order: logits descending, ties by lower token id (a stable sort of the ids). Nucleus size
    n = 1 + #{k : C_k < top_p} (at most V) over the float64 cumulative probabilities in that
    order. Score x / n when the target's 0-based position x is < n, else 1.0. float64 tensor.
    """
    import torch

    top_p = _check_top_p(top_p)
    logits, targets = _as_2d(logits, targets)
    vocab = logits.shape[1]
    out = torch.empty(logits.shape[0], dtype=torch.float64, device=logits.device)
    for i in range(logits.shape[0]):
        row = logits[i].float()
        order = torch.sort(row, descending=True, stable=True).indices
        row64 = row.double()
        probs = torch.exp(row64[order] - torch.logsumexp(row64, dim=0))
        cumulative = torch.cumsum(probs, dim=0)
        n = min(vocab, int((cumulative < top_p).sum().item()) + 1)
        x = int((order == targets[i]).nonzero()[0, 0].item())
        out[i] = x / n if x < n else 1.0
    return out


def rank_scores(logits, targets, *, top_p: float = 0.95):
    """Per-token rank scores without sorting the vocabulary: same rule as :func:`rank_scores_sorted`.

    x = #{v : l_v > l_y} + #{v < y : l_v = l_y} (exactly the stable-sort position); n comes from
    the cumulative probabilities of a top-k prefix, k doubling until it holds ``top_p`` of the
    mass (the top-k values are the sorted prefix, whatever order ties come in).
    """
    import torch

    top_p = _check_top_p(top_p)
    logits, targets = _as_2d(logits, targets)
    n_tok, vocab = logits.shape
    out = torch.empty(n_tok, dtype=torch.float64, device=logits.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, vocab))
    ids = torch.arange(vocab, device=logits.device)
    for lo in range(0, n_tok, step):
        lg = logits[lo:lo + step].float()
        tg = targets[lo:lo + step]
        ly = lg.gather(1, tg[:, None])
        x = (lg > ly).sum(1) + ((lg == ly) & (ids[None, :] < tg[:, None])).sum(1)
        lse = torch.logsumexp(lg.double(), dim=-1)
        n = torch.empty_like(x)
        todo = torch.arange(lg.shape[0], device=lg.device)
        k = min(_TOPK_START, vocab)
        while todo.numel():
            top = torch.topk(lg[todo], k, dim=-1, sorted=True).values.double()
            cumulative = torch.cumsum(torch.exp(top - lse[todo, None]), dim=-1)
            reached = cumulative[:, -1] >= top_p
            if k == vocab:
                reached = torch.ones_like(reached)
            n[todo[reached]] = torch.clamp((cumulative[reached] < top_p).sum(1) + 1, max=vocab)
            todo = todo[~reached]
            k = min(vocab, 2 * k)
        xs, ns = x.double(), n.double()
        out[lo:lo + step] = torch.where(x < n, xs / ns, torch.ones_like(xs))
    return out


def summarize(rank_tok: Sequence[float], nll_tok: Sequence[float],
              nll_uncond_tok: Sequence[float] | None = None) -> dict:
    """Reduce one row's per-token values to its metric dict (exact sums, math.fsum)."""
    rank_tok = [float(v) for v in rank_tok]
    nll_tok = [float(v) for v in nll_tok]
    n = len(rank_tok)
    if n == 0 or len(nll_tok) != n:
        raise ValueError(f"a row needs at least one response token and as many nll values ({n} vs {len(nll_tok)})")
    hard = [v for v in rank_tok if v > 0.0]
    nll = math.fsum(nll_tok) / n
    ifd = float("nan")
    if nll_uncond_tok is not None:
        if len(nll_uncond_tok) != n:
            raise ValueError(f"unconditioned nll has {len(nll_uncond_tok)} tokens, conditioned has {n}")
        nll_u = math.fsum(float(v) for v in nll_uncond_tok) / n
        ifd = nll / nll_u if nll_u > 0.0 else float("nan")
    return {
        "rank_score": math.fsum(hard) / len(hard) if hard else 0.0,
        "rank_score_all": math.fsum(rank_tok) / n,
        "nll": nll,
        "ppl": math.exp(nll) if nll < 709.0 else float("inf"),
        "ifd": ifd,
        "n_response_tokens": n,
    }


def metrics_from_logits(logits, targets, *, uncond_logits=None, top_p: float = 0.95,
                        method: str = "sorted") -> dict:
    """One row's metrics from its response-position logits ``[R, V]`` and response ids ``[R]``.

    ``uncond_logits`` (``[R, V]``, the same tokens predicted without the prompt) gives ``ifd``;
    without it ``ifd`` is NaN. ``method``: ``"sorted"`` (reference) or ``"fast"`` (sort-free).
    """
    if method not in ("sorted", "fast"):
        raise ValueError(f"method must be 'sorted' or 'fast', got {method!r}")
    ranker = rank_scores_sorted if method == "sorted" else rank_scores
    rank_tok = ranker(logits, targets, top_p=top_p).tolist()
    nll_tok = token_nll(logits, targets).tolist()
    nll_u = token_nll(uncond_logits, targets).tolist() if uncond_logits is not None else None
    return summarize(rank_tok, nll_tok, nll_u)


# --------------------------------------------------------------------------------------------
# rows -> token ids
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedRow:
    """A row as token ids: the rendered prompt and the response (EOS included)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    @property
    def full_ids(self) -> tuple[int, ...]:
        return self.prompt_ids + self.response_ids


def _check_rows(rows) -> None:
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Sequence):
        raise UserError(f"rows must be a list of dicts with columns {list(INPUT_COLUMNS)}, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise UserError(f"row {i} is a {type(row).__name__}, expected a dict with columns {list(INPUT_COLUMNS)}")
        missing = [c for c in INPUT_COLUMNS if c not in row]
        if missing:
            raise UserError(f"row {i} lacks column(s) {missing}: it has {sorted(map(str, row))}, "
                            f"expected {list(INPUT_COLUMNS)} (+ optional 'group')")
        bad = [c for c in INPUT_COLUMNS if not isinstance(row[c], str)]
        if bad:
            raise UserError(f"row {i}: column(s) {bad} must be strings, got "
                            f"{[type(row[c]).__name__ for c in bad]}")


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no eos token: the response "
                        f"is scored up to and including EOS; set tokenizer.eos_token before scoring")
    return int(eos)


def encode_row(tokenizer, row: Mapping) -> EncodedRow:
    """Prompt ids (chat template, generation prompt) and response ids (+ EOS) for one row."""
    from compeffdist_ray.prompts import render_instruction
    from compeffdist_ray.teacher.transformers_backend import format_chat

    messages = [{"role": "user", "content": render_instruction(row["instruction"], row["text"])}]
    prompt = format_chat(tokenizer, messages)
    has_template = bool(getattr(tokenizer, "chat_template", None))
    prompt_ids = tokenizer(prompt, add_special_tokens=not has_template)["input_ids"]
    response_ids = tokenizer(row["response"], add_special_tokens=False)["input_ids"] + [_eos_id(tokenizer)]
    if not prompt_ids:
        raise UserError("the rendered prompt tokenized to nothing; check the tokenizer and its chat template")
    return EncodedRow(tuple(int(t) for t in prompt_ids), tuple(int(t) for t in response_ids))


def unconditioned_ids(tokenizer, response_ids: Sequence[int]) -> tuple[int, ...]:
    """``[start] + response``: start is the BOS id, or the EOS id for tokenizers without a BOS."""
    start = tokenizer.bos_token_id
    if start is None:
        start = _eos_id(tokenizer)
    return (int(start),) + tuple(int(t) for t in response_ids)


# --------------------------------------------------------------------------------------------
# model plumbing shared by both scorers
# --------------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(model):
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        if was_training:
            model.train()


def _device(model):
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------------
# reference: one row at a time
# --------------------------------------------------------------------------------------------


def score_reference(model, tokenizer, rows: Sequence[Mapping], *, top_p: float = 0.95) -> list[dict]:
    """The ground truth: per row one full forward (all logits), one sort per response token,
    and a second forward over ``[start] + response`` for IFD's denominator."""
    import torch

    _check_rows(rows)
    top_p = _check_top_p(top_p)
    device = _device(model)
    out = []
    with _eval_mode(model):
        for row in rows:
            enc = encode_row(tokenizer, row)
            n_prompt, n_resp = len(enc.prompt_ids), len(enc.response_ids)
            ids = torch.tensor([enc.full_ids], dtype=torch.long, device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, n_prompt - 1:n_prompt - 1 + n_resp]
            alone = torch.tensor([unconditioned_ids(tokenizer, enc.response_ids)], dtype=torch.long, device=device)
            uncond = model(input_ids=alone, use_cache=False).logits[0, :n_resp]
            out.append(metrics_from_logits(logits, list(enc.response_ids), uncond_logits=uncond,
                                           top_p=top_p, method="sorted"))
    return out


# --------------------------------------------------------------------------------------------
# fast path
# --------------------------------------------------------------------------------------------

_HEAD_CHECKED: weakref.WeakSet = weakref.WeakSet()


def _base_model(model):
    base = getattr(model, "base_model", model)
    if base is model or model.get_output_embeddings() is None:
        raise UserError(
            f"{type(model).__name__} is not a causal LM with a separate decoder and lm_head; "
            f"score it with response_only_projection=False"
        )
    return base


def project_hidden(model, hidden):
    """lm_head plus the family's final logit processing, on already-gathered hidden states."""
    import torch

    logits = model.get_output_embeddings()(hidden)
    cfg = model.config
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2 / 3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(cfg, "logit_scale", None)  # Cohere
    if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale != 1:
        logits = logits * scale
    divisor = getattr(cfg, "logits_scaling", None)  # Granite
    if isinstance(divisor, (int, float)) and not isinstance(divisor, bool) and divisor != 1:
        logits = logits / divisor
    return logits


def _check_head_once(model, base, probe_ids) -> None:
    """Once per model object: lm_head + final processing on hidden states == the model's logits."""
    import torch

    if model in _HEAD_CHECKED:
        return
    ids = torch.tensor([probe_ids[:16]], dtype=torch.long, device=_device(model))
    want = model(input_ids=ids, use_cache=False).logits[0]
    got = project_hidden(model, base(input_ids=ids, use_cache=False).last_hidden_state[0])
    if want.shape != got.shape or not torch.allclose(want.float(), got.float(), atol=1e-4, rtol=1e-4):
        raise UserError(
            f"{type(model).__name__}: logits rebuilt from hidden states (lm_head + known final processing) do not "
            f"match the model's own logits (max diff {(want.float() - got.float()).abs().max().item():.3g}); this "
            f"family post-processes its logits in a way this module does not know: use response_only_projection=False"
        )
    _HEAD_CHECKED.add(model)


def common_prefix_len(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all of ``seqs`` share."""
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for i in range(n):
        tok = first[i]
        if any(s[i] != tok for s in seqs[1:]):
            return i
    return n


def cache_kwargs(module, cache) -> dict:
    """The keyword a transformers forward takes its KV cache by: ``cache`` from transformers 5.2x
    on, ``past_key_values`` before (deprecated since, removed in 5.40); read off the signature."""
    return {_cache_keyword(type(module)): cache}


@functools.lru_cache(maxsize=None)
def _cache_keyword(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def expand_cache(cache, batch: int):
    """A fresh cache holding the prefix's keys/values for ``batch`` rows, without copying them.

    Each layer is shallow-copied and its tensors replaced by ``expand`` views (stride 0 on the
    batch dim); the forward's ``torch.cat`` materialises them once and rebinds the layer's
    tensors, so the shared prefix cache is never written to. Unknown layer types fall back to
    ``deepcopy`` + ``batch_repeat_interleave`` (a real copy).
    """
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    if any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers):
        fresh = copy.deepcopy(cache)
        fresh.batch_repeat_interleave(batch)
        return fresh
    fresh = copy.copy(cache)
    fresh.layers = []
    for layer in cache.layers:
        twin = copy.copy(layer)
        if layer.is_initialized and layer.keys is not None and layer.keys.numel():
            twin.keys = layer.keys.expand(batch, -1, -1, -1)
            twin.values = layer.values.expand(batch, -1, -1, -1)
        fresh.layers.append(twin)
    return fresh


# --- packed forwards: rows end to end in one sequence, each attending to itself (and a prefix) ---

_PACKED_ATTENTION = "compeffdist_packed"
_PACKING_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Packed:
    """One packed forward: the rows' tokens laid end to end (batch 1, no padding).

    Each row attends causally to its own tokens and, if ``prefix`` is given (per layer the
    shared prefix's keys and values, [1, KV, P, d]), to the whole prefix. ``index`` ([B, W], W
    the longest row) and ``at`` lay the packed positions out as padded rows and back, for the
    row-local part of the attention only; every matmul outside the attention runs on real tokens.
    """

    def __init__(self, lengths: Sequence[int], prefix, device):
        import torch

        self.prefix = prefix
        self.width = max(lengths)
        lengths_t = torch.tensor(lengths, dtype=torch.long, device=device)
        starts = torch.cumsum(lengths_t, 0) - lengths_t
        cols = torch.arange(self.width, device=device)
        valid = cols[None, :] < lengths_t[:, None]
        self.index = torch.where(valid, starts[:, None] + cols[None, :], 0)  # [B, W] -> packed position
        self.at = valid.reshape(-1).nonzero().squeeze(1)  # packed position -> flat [B * W] position
        self._mask = None

    def allowed(self, plen: int, device):
        """[W, P + W] bool: every prefix key, then causal over the row's own keys."""
        if self._mask is None:
            import torch

            self._mask = torch.ones((self.width, plen + self.width), dtype=torch.bool, device=device).tril(plen)
        return self._mask


def _cpu_flash_attention(device):
    """torch's CPU flash-attention op (it also returns the logsumexp), or None off CPU or if absent."""
    import torch

    if device.type != "cpu":
        return None
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      packed: _Packed | None = None, **kwargs):
    """An attention function (transformers' ``AttentionInterface``) for a :class:`_Packed` forward.

    ``query`` [1, H, T, d], ``key``/``value`` [1, KV, T, d]: T packed tokens. Returns
    [1, T, H, d] (contiguous), as transformers' own attention functions do. On CPU the row-local part is a
    causal flash attention over the rows laid out padded (a real query never reaches a pad
    key; pad queries are dropped), the prefix part one flash attention of *all* packed queries
    against the prefix (the KV heads as heads, the queries of a head group as one long query:
    the prefix is read, never copied per row), merged by their logsumexps. Elsewhere the prefix
    is broadcast to the rows and concatenated before one masked attention.
    """
    import torch
    from torch.nn.functional import scaled_dot_product_attention

    if packed is None or getattr(module, "layer_idx", None) is None:
        raise RuntimeError("packed attention called without its layout (the model did not pass it through)")
    heads, kv_heads, total, dim = query.shape[1], key.shape[1], query.shape[2], query.shape[3]
    groups = heads // kv_heads
    prefix = packed.prefix[module.layer_idx] if packed.prefix is not None else None

    rows, width = packed.index.shape

    def as_rows(x):  # [1, h, T, d] -> [B, h, W, d], gathering whole tokens ([T, h, d] is their memory order)
        tokens = x[0].transpose(0, 1)
        return tokens.index_select(0, packed.index.reshape(-1)).view(rows, width, *tokens.shape[1:]).transpose(1, 2)

    def as_packed(x):  # [B, h, W, ...] -> [T, h, ...]
        flat = x.transpose(1, 2).reshape(rows * width, *x.shape[1:2], *x.shape[3:])
        return flat.index_select(0, packed.at)

    q_rows, k_rows, v_rows = as_rows(query), as_rows(key), as_rows(value)
    flash = _cpu_flash_attention(query.device)
    if flash is None:
        if prefix is None:
            out = scaled_dot_product_attention(q_rows, k_rows, v_rows, is_causal=True, scale=scaling,
                                               enable_gqa=groups > 1)
        else:
            rows = q_rows.shape[0]
            keys = torch.cat([prefix[0].expand(rows, -1, -1, -1), k_rows], dim=2)
            values = torch.cat([prefix[1].expand(rows, -1, -1, -1), v_rows], dim=2)
            out = scaled_dot_product_attention(q_rows, keys, values, scale=scaling, enable_gqa=groups > 1,
                                               attn_mask=packed.allowed(prefix[0].shape[2], query.device))
        return as_packed(out).unsqueeze(0), None
    if groups > 1:  # head h reads kv head h // groups (transformers' repeat_kv order)
        k_rows = k_rows.repeat_interleave(groups, dim=1)
        v_rows = v_rows.repeat_interleave(groups, dim=1)
    out_rows, lse_rows = flash(q_rows, k_rows, v_rows, 0.0, True, scale=scaling)
    out = as_packed(out_rows)  # [T, H, d]
    if prefix is not None:
        q_all = query[0].reshape(kv_heads, groups * total, dim).unsqueeze(0)
        out_p, lse_p = flash(q_all, prefix[0], prefix[1], 0.0, False, scale=scaling)
        out_p, lse_p = out_p.reshape(heads, total, dim).transpose(0, 1), lse_p.reshape(heads, total).t()
        lse_s = as_packed(lse_rows)  # [T, H]
        lse = torch.logaddexp(lse_p, lse_s)
        out = out * torch.exp(lse_s - lse).unsqueeze(-1).to(out.dtype)
        out += out_p * torch.exp(lse_p - lse).unsqueeze(-1).to(out.dtype)
    return out.unsqueeze(0), None


@contextmanager
def _attention_implementation(model, name: str):
    config = model.config
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


def _packed_forward(model, decoder, seqs: Sequence[Sequence[int]], *, prefix=None, prefix_len: int = 0):
    """The decoder over ``seqs`` packed end to end, each after the shared prefix if given:
    last hidden states [T, hidden], T = the total length of ``seqs``."""
    import torch
    from transformers import AttentionInterface

    AttentionInterface.register(_PACKED_ATTENTION, _packed_attention)
    device = _device(model)
    ids = torch.tensor([[t for s in seqs for t in s]], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(len(s), device=device) for s in seqs])[None, :] + prefix_len
    packed = _Packed([len(s) for s in seqs], prefix, device)
    with _attention_implementation(model, _PACKED_ATTENTION):
        return decoder(input_ids=ids, position_ids=positions, use_cache=False, packed=packed).last_hidden_state[0]


def _prefix_layers(cache) -> list:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _packing_usable(model, decoder, probe_ids: Sequence[int]) -> bool:
    """Once per model object: may rows be packed (see :func:`_packed_attention`)?

    Needs full attention in every layer (a ``DynamicCache`` for the config holds only plain
    ``DynamicLayer`` s: no sliding window, no chunks), no sub-configs, no attention soft-capping,
    and a decoder that passes extra keyword arguments down to its attention. Then a probe
    (rows of different lengths, with and without a cached prefix) must match padded forwards.
    """
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    known = _PACKING_OK.get(model)
    if known is not None:
        return known
    config = model.config
    ok = (all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)
          and not getattr(config, "sub_configs", None)
          and getattr(config, "attn_logit_softcapping", None) is None
          and config._attn_implementation in ("sdpa", "eager")
          and len(probe_ids) >= 8)
    if ok:
        device = _device(model)
        probe = list(probe_ids[:16])
        plen = len(probe) - 5
        rows = [probe[plen:], probe[plen:plen + 2]]
        ids = torch.tensor([r + [r[-1]] * (5 - len(r)) for r in rows], dtype=torch.long, device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (5 - len(r)) for r in rows], dtype=torch.long, device=device)
        cache = DynamicCache(config=config)
        decoder(input_ids=torch.tensor([probe[:plen]], device=device), **cache_kwargs(decoder, cache), use_cache=True)
        want_prefix = decoder(input_ids=ids, **cache_kwargs(decoder, expand_cache(cache, 2)), use_cache=True,
                              attention_mask=torch.cat([torch.ones((2, plen), dtype=torch.long, device=device),
                                                        mask], 1),
                              position_ids=(plen + torch.arange(5, device=device))[None, :].expand(2, -1))
        want_plain = decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        want = [torch.cat([h[b, :len(r)] for b, r in enumerate(rows)]) for h in
                (want_prefix.last_hidden_state, want_plain.last_hidden_state)]
        try:
            got = [_packed_forward(model, decoder, rows, prefix=_prefix_layers(cache), prefix_len=plen),
                   _packed_forward(model, decoder, rows)]
            ok = all(g.shape == w.shape and torch.allclose(g.float(), w.float(), atol=1e-4, rtol=1e-4)
                     for g, w in zip(got, want))
        except (RuntimeError, TypeError, ValueError, KeyError, IndexError):
            ok = False
    _PACKING_OK[model] = ok
    return ok


def _batches(indices: Sequence[int], lengths: Mapping[int, int] | Sequence[int], *, bucketing: bool,
             batch_size: int, max_batch_tokens: int | None, extra: int = 0,
             packed: bool = False) -> list[list[int]]:
    """Split ``indices`` into forward batches; with bucketing, longest first so each batch pads little.

    A batch holds at most ``batch_size`` rows and at most ``max_batch_tokens`` tokens: padded
    ones, counting ``extra`` (the cached prefix) for every row, or, ``packed``, the rows' own
    tokens. A single row may exceed the limit.
    """
    order = sorted(indices, key=lambda i: (-lengths[i], i)) if bucketing else list(indices)
    out: list[list[int]] = []
    batch: list[int] = []
    longest = total = 0
    for i in order:
        wider = max(longest, lengths[i])
        size = total + lengths[i] if packed else (len(batch) + 1) * (wider + extra)
        full = len(batch) >= batch_size or (max_batch_tokens is not None and size > max_batch_tokens)
        if batch and full:
            out.append(batch)
            batch, wider, total = [], lengths[i], 0
        batch.append(i)
        longest, total = wider, total + lengths[i]
    if batch:
        out.append(batch)
    return out


def logits_at(model, base, seqs: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]], *, pad_id: int,
              response_only_projection: bool = True, packed: bool = False, prefix_cache=None,
              prefix_len: int = 0, stats: dict | None = None):
    """One forward over ``seqs`` (each after ``prefix_len`` cached tokens, if any); the logits
    [sum of counts, V] at the positions ``spans`` name, row by row.

    ``spans[b] = (start, count)``: positions start .. start+count-1 of row b. ``packed``: the
    rows run end to end without padding (:func:`_packed_forward`; needs
    ``response_only_projection``), reading ``prefix_cache`` once. Otherwise the rows are
    right-padded (a real token never sees a pad: all pads come after it) and ``prefix_cache``
    is expanded to the batch. ``base`` is the decoder (:func:`_base_model`), needed for
    ``response_only_projection`` (only the named positions go through lm_head).
    """
    import torch

    stats = {} if stats is None else stats
    device = _device(model)
    width = max(len(s) for s in seqs)
    batch = len(seqs)
    real = sum(len(s) for s in seqs)
    n_at = sum(n for _, n in spans)
    stats["tokens_forwarded"] = stats.get("tokens_forwarded", 0) + real
    stats["forwards"] = stats.get("forwards", 0) + 1
    if packed:
        starts = [0]
        for s in seqs[:-1]:
            starts.append(starts[-1] + len(s))
        at = torch.tensor([o + start + k for o, (start, n) in zip(starts, spans) for k in range(n)],
                          dtype=torch.long, device=device)
        prefix = _prefix_layers(prefix_cache) if prefix_cache is not None else None
        hidden = _packed_forward(model, base, seqs, prefix=prefix, prefix_len=prefix_len)
        stats["packed_forwards"] = stats.get("packed_forwards", 0) + 1
        stats["padded_tokens"] = stats.get("padded_tokens", 0)
        stats["projected_positions"] = stats.get("projected_positions", 0) + n_at
        return project_hidden(model, hidden[at])
    ids = torch.full((batch, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((batch, width), dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long, device=device)
        mask[b, :len(s)] = 1
    stats["padded_tokens"] = stats.get("padded_tokens", 0) + batch * width - real
    if prefix_cache is not None:
        kwargs = {
            **cache_kwargs(model, expand_cache(prefix_cache, batch)),  # same class family as `base`
            "use_cache": True,
            "attention_mask": torch.cat([torch.ones((batch, prefix_len), dtype=torch.long, device=device), mask], 1),
            "position_ids": (prefix_len + torch.arange(width, device=device))[None, :].expand(batch, -1),
        }
    else:
        kwargs = {"attention_mask": mask, "use_cache": False}
    rows_idx = torch.cat([torch.full((n,), b, dtype=torch.long) for b, (_, n) in enumerate(spans)]).to(device)
    pos_idx = torch.cat([torch.arange(start, start + n) for start, n in spans]).to(device)
    stats["projected_positions"] = stats.get("projected_positions", 0) + (
        n_at if response_only_projection else batch * width)
    if response_only_projection:
        hidden = base(input_ids=ids, **kwargs).last_hidden_state
        return project_hidden(model, hidden[rows_idx, pos_idx])
    return model(input_ids=ids, **kwargs).logits[rows_idx, pos_idx]


def projection_setup(model, probe_ids: Sequence[int], *, packing: bool = True):
    """(decoder, packed) for the fast paths of :func:`logits_at`: the model's decoder, checked
    once per model object to rebuild its logits from hidden states (response-only projection),
    and whether its rows may be packed (:func:`_packing_usable`; always False if not
    ``packing``). ``probe_ids``: a few real token ids for the checks."""
    base = _base_model(model)
    _check_head_once(model, base, probe_ids)
    return base, bool(packing and _packing_usable(model, base, probe_ids))


def prefix_cache(model, base, prefix_ids: Sequence[int], stats: dict | None = None):
    """The decoder's ``DynamicCache`` after ``prefix_ids`` (batch 1); its own outputs are never
    projected (the decoder runs, lm_head does not)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    decoder = base if base is not None else getattr(model, "base_model", model)
    decoder(input_ids=torch.tensor([list(prefix_ids)], dtype=torch.long, device=_device(model)),
            **cache_kwargs(decoder, cache), use_cache=True)
    if stats is not None:
        stats["tokens_forwarded"] = stats.get("tokens_forwarded", 0) + len(prefix_ids)
    return cache


def _score_sequences(model, base, seqs: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]],
                     targets: Sequence[Sequence[int]], *, pad_id: int, top_p: float,
                     response_only_projection: bool, packed: bool = False, prefix_cache=None,
                     prefix_len: int = 0, want_ranks: bool = True,
                     stats: dict) -> list[tuple[list[float], list[float]]]:
    """Per row (rank scores, nlls) of its ``targets``, predicted at the positions ``spans`` name
    (:func:`logits_at`); rank scores empty unless ``want_ranks``."""
    import torch

    tgt = torch.tensor([t for row in targets for t in row], dtype=torch.long, device=_device(model))
    logits = logits_at(model, base, seqs, spans, pad_id=pad_id, response_only_projection=response_only_projection,
                       packed=packed, prefix_cache=prefix_cache, prefix_len=prefix_len, stats=stats)
    ranks = rank_scores(logits, tgt, top_p=top_p).tolist() if want_ranks else []
    nlls = token_nll(logits, tgt).tolist()
    out, lo = [], 0
    for _, n in spans:
        out.append((ranks[lo:lo + n] if want_ranks else [], nlls[lo:lo + n]))
        lo += n
    return out


def _prefix_jobs(rows, encoded: Sequence[EncodedRow], *, prefix_reuse: bool,
                 min_prefix_tokens: int) -> list[tuple[int, list[int]]]:
    """(prefix length, row indices): one job per group whose rows share a cacheable prefix,
    plus one job (prefix length 0) with every other row."""
    if not prefix_reuse:
        return [(0, list(range(len(rows))))]
    groups: dict[object, list[int]] = {}
    for i, row in enumerate(rows):
        key = row.get("group")
        key = ("instruction", row["instruction"]) if key is None else ("group", repr(key))
        groups.setdefault(key, []).append(i)
    jobs, plain = [], []
    for idxs in groups.values():
        if len(idxs) < 2:
            plain.extend(idxs)
            continue
        prompts = [encoded[i].prompt_ids for i in idxs]
        # Keep the last prompt token out of the prefix: its output predicts the first response token.
        shared = min(common_prefix_len(prompts), min(len(p) for p in prompts) - 1)
        if shared < max(1, min_prefix_tokens):
            plain.extend(idxs)
        else:
            jobs.append((shared, idxs))
    if plain:
        jobs.append((0, sorted(plain)))
    return jobs


def score_batch(model, tokenizer, rows: Sequence[Mapping], *, top_p: float = 0.95, batch_size: int = 16,
                max_batch_tokens: int | None = 16384, bucketing: bool = True,
                response_only_projection: bool = True, prefix_reuse: bool = True, packing: bool = True,
                min_prefix_tokens: int = 16, stats: dict | None = None) -> list[dict]:
    """The fast scorer; returns the same list of metric dicts as :func:`score_reference`.

    - ``bucketing``: rows are sorted by length (longest first) before they are cut into batches
      of at most ``batch_size`` rows and ``max_batch_tokens`` tokens (padding included); off,
      batches follow the input order.
    - ``response_only_projection``: the decoder runs to its last hidden states; only the
      positions that predict response tokens go through lm_head (and the family's final logit
      processing, e.g. Gemma's ``final_logit_softcapping``), checked once per model object
      against the model's own logits. Off: ``model(...).logits`` at every position.
    - ``prefix_reuse``: rows of one group (the ``group`` column, else the instruction) share
      the longest common prefix of their prompt *token ids*, capped one token short of the
      shortest prompt. That prefix runs once (batch 1) into a ``DynamicCache``; each batch of
      the group then runs only its suffixes, with positions continuing after the prefix.
      Groups of one row, or whose shared prefix is shorter than ``min_prefix_tokens``, are
      batched without a cache.
    - ``packing`` (with ``response_only_projection``, for models whose layers all use full
      attention: Llama, Qwen, SmolLM, ...; checked once per model object by the cache's layer
      types and a probe against padded forwards): a batch's rows run end to end as one
      sequence, without padding, through a dedicated attention function
      (:func:`_packed_attention`) in which each row sees only itself and the shared prefix.
      The prefix's keys/values are read once per layer for all rows, never copied per row, so
      it does not count against ``max_batch_tokens``. Otherwise (Gemma 3's sliding-window
      layers, or ``packing=False``) rows are right-padded with an attention mask (pad positions
      are never gathered and, being after every real token, reach no real token) and each batch
      gets a shallow copy of the cache whose keys/values are ``expand`` views to the batch size;
      sliding-window layers keep their own cache layer and offsets there, so prefixes longer
      than the window stay exact.

    IFD's unconditioned pass (``[start] + response``) is batched the same way, without a cache.
    Results come back in the input order. ``stats``, if given, is filled with counters
    (forwards, packed_forwards, padded_tokens, projected_positions, tokens_forwarded: real
    tokens run through the decoder, each shared prefix once; prefix_groups,
    prefix_tokens_computed, prefix_tokens_reused).
    """
    _check_rows(rows)
    top_p = _check_top_p(top_p)
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_batch_tokens is not None and (not isinstance(max_batch_tokens, int) or max_batch_tokens < 1):
        raise UserError(f"max_batch_tokens must be a positive integer or None, got {max_batch_tokens!r}")
    stats = {} if stats is None else stats
    if not rows:
        return []
    encoded = [encode_row(tokenizer, row) for row in rows]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _eos_id(tokenizer)
    cond: list = [None] * len(rows)
    uncond: list = [None] * len(rows)

    with _eval_mode(model):
        base, packed = None, False
        if response_only_projection:
            base, packed = projection_setup(model, encoded[0].full_ids, packing=packing)
        for prefix_len, idxs in _prefix_jobs(rows, encoded, prefix_reuse=prefix_reuse,
                                             min_prefix_tokens=min_prefix_tokens):
            cache = None
            if prefix_len:
                cache = prefix_cache(model, base, encoded[idxs[0]].prompt_ids[:prefix_len], stats)
                stats["prefix_groups"] = stats.get("prefix_groups", 0) + 1
                stats["prefix_tokens_computed"] = stats.get("prefix_tokens_computed", 0) + prefix_len
                stats["prefix_tokens_reused"] = stats.get("prefix_tokens_reused", 0) + prefix_len * (len(idxs) - 1)
            suffix_len = {i: len(encoded[i].full_ids) - prefix_len for i in idxs}
            # an expanded cache holds the prefix once per row; a packed forward reads it once
            for batch in _batches(idxs, suffix_len, bucketing=bucketing, batch_size=batch_size,
                                  max_batch_tokens=max_batch_tokens, extra=0 if packed else prefix_len,
                                  packed=packed):
                seqs = [encoded[i].full_ids[prefix_len:] for i in batch]
                spans = [(len(encoded[i].prompt_ids) - prefix_len - 1, len(encoded[i].response_ids)) for i in batch]
                results = _score_sequences(model, base, seqs, spans, [encoded[i].response_ids for i in batch],
                                           pad_id=pad_id, top_p=top_p,
                                           response_only_projection=response_only_projection, packed=packed,
                                           prefix_cache=cache, prefix_len=prefix_len, stats=stats)
                for i, res in zip(batch, results):
                    cond[i] = res
            del cache

        alone = [unconditioned_ids(tokenizer, enc.response_ids) for enc in encoded]
        lengths = [len(a) for a in alone]
        for batch in _batches(range(len(rows)), lengths, bucketing=bucketing, batch_size=batch_size,
                              max_batch_tokens=max_batch_tokens, packed=packed):
            spans = [(0, len(encoded[i].response_ids)) for i in batch]
            results = _score_sequences(model, base, [alone[i] for i in batch], spans,
                                       [encoded[i].response_ids for i in batch], pad_id=pad_id, top_p=top_p,
                                       response_only_projection=response_only_projection, packed=packed,
                                       want_ranks=False, stats=stats)
            for i, res in zip(batch, results):
                uncond[i] = res

    return [summarize(c[0], c[1], u[1]) for c, u in zip(cond, uncond)]
