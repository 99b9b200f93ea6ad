"""Unit tests for compeffdist_ray.config: defaults, YAML, overrides, validation, help."""

from __future__ import annotations

import dataclasses
import pathlib

import pytest
import yaml

from compeffdist_ray.config import (
    BUILTIN_CORPUS,
    Config,
    ConfigError,
    config_from_dict,
    config_to_dict,
    dump_config,
    get_path,
    iter_help,
    load_config,
    parse_overrides,
    read_yaml,
)
from compeffdist_ray.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def _write(tmp_path, text: str, name: str = "cfg.yaml") -> pathlib.Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def _is_mapping_field(dotted: str) -> bool:
    """True for fields whose value is a free-form mapping (e.g. teacher.chat_template_kwargs)."""
    try:
        return isinstance(get_path(Config(), dotted), dict)
    except AttributeError:
        return False


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        where = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value and not _is_mapping_field(where):
            yield from _leaves(value, where)
        else:
            yield where, value


# ------------------------------------------------------------------------------------------
# defaults, YAML, overrides
# ------------------------------------------------------------------------------------------


def test_defaults_load_and_are_the_local_demo():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    assert cfg.input.path == BUILTIN_CORPUS
    assert cfg.teacher.backend == "transformers"
    assert cfg.seed == 42
    assert cfg == Config()


def test_config_error_is_a_user_error():
    assert issubclass(ConfigError, UserError)


def test_yaml_then_overrides_precedence(tmp_path):
    p = _write(tmp_path, "seed: 7\nteacher:\n  batch_size: 4\n  temperature: 0.3\n")
    cfg = load_config(p, ["teacher.batch_size=16", "tasks.max_perspectives=null"])
    assert cfg.teacher.batch_size == 16  # override beats YAML
    assert cfg.teacher.temperature == 0.3  # YAML kept where not overridden
    assert cfg.seed == 7
    assert cfg.tasks.max_perspectives is None  # override beats default
    assert cfg.teacher.max_attempts == Config().teacher.max_attempts  # default elsewhere


def test_override_merges_into_yaml_section_without_dropping_siblings(tmp_path):
    p = _write(tmp_path, "teacher:\n  openai:\n    base_url: http://x:1/v1\n    max_retries: 9\n")
    cfg = load_config(p, ["teacher.openai.max_retries=2"])
    assert cfg.teacher.openai.base_url == "http://x:1/v1"
    assert cfg.teacher.openai.max_retries == 2


def test_overrides_without_yaml():
    cfg = load_config(None, ["teacher.batch_size=4", "pairing.method=attribute"])
    assert cfg.teacher.batch_size == 4
    assert cfg.pairing.method == "attribute"


def test_parse_overrides_yaml_scalar_typing():
    tree = parse_overrides(["a.b=3", "a.c=2.5", "x=null", "y=true", "s=hello", "e=", "u=s3://b/k", "l=[1, 2]"])
    assert tree == {"a": {"b": 3, "c": 2.5}, "x": None, "y": True, "s": "hello", "e": "", "u": "s3://b/k", "l": [1, 2]}
    assert type(tree["a"]["b"]) is int
    assert type(tree["y"]) is bool


def test_parse_overrides_value_may_hold_equals_sign():
    assert parse_overrides(["teacher.model=a=b"]) == {"teacher": {"model": "a=b"}}


@pytest.mark.parametrize("bad", ["noequals", "=3", "a..b=1", ".a=1", "a.=1"])
def test_parse_overrides_malformed(bad):
    with pytest.raises(ConfigError):
        parse_overrides([bad])


def test_parse_overrides_conflict_scalar_then_section():
    with pytest.raises(ConfigError, match="conflicts"):
        parse_overrides(["teacher=3", "teacher.batch_size=2"])


def test_int_given_for_float_field_becomes_float():
    cfg = load_config(None, ["teacher.temperature=1"])
    assert cfg.teacher.temperature == 1.0
    assert isinstance(cfg.teacher.temperature, float)


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------


def test_unknown_keys_at_every_depth_all_reported_once():
    data = {
        "tacher": {},
        "teacher": {"batch_sise": 3, "openai": {"bogus_key": 1}},
        "pairing": {"num_text": 5},
    }
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    msg = str(info.value)
    assert "4 problems" in msg
    for path in ("tacher", "teacher.batch_sise", "teacher.openai.bogus_key", "pairing.num_text"):
        assert f"{path}: unknown key" in msg
    assert "did you mean 'teacher'" in msg
    assert "did you mean 'batch_size'" in msg
    assert "did you mean 'num_texts'" in msg


def test_unknown_key_from_override_reported_with_path():
    with pytest.raises(ConfigError, match=r"teacher\.vllm\.tensor_paralel_size: unknown key \(did you mean 'tensor_parallel_size'"):
        load_config(None, ["teacher.vllm.tensor_paralel_size=2"])


def test_unknown_key_far_from_any_name_has_no_hint():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"zzzzqqq": 1})
    assert "zzzzqqq: unknown key" in str(info.value)
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"teacher": {"batch_size": "eight"}}, "teacher.batch_size: expected an integer, got 'eight'"),
        ({"teacher": {"batch_size": True}}, "teacher.batch_size: expected an integer, got True"),
        ({"seed": 1.5}, "seed: expected an integer"),
        ({"teacher": {"temperature": "hot"}}, "teacher.temperature: expected a number"),
        ({"teacher": {"temperature": False}}, "teacher.temperature: expected a number"),
        ({"ray": [1, 2]}, "ray: expected a mapping"),
        ({"teacher": {"openai": "x"}}, "teacher.openai: expected a mapping"),
        ({"teacher": {"vllm": {"engine_kwargs": [1]}}}, "teacher.vllm.engine_kwargs: expected a mapping"),
        ({"ray": {"include_dashboard": "yes"}}, "ray.include_dashboard: expected true or false"),
        ({"teacher": {"backend": "llamacpp"}}, "teacher.backend: expected one of 'transformers', 'vllm', 'openai'"),
        ({"tasks": {"max_perspectives": "all"}}, "tasks.max_perspectives: expected int or null"),
        ({"teacher": {"model": 3}}, "teacher.model: expected a string"),
    ],
)
def test_wrong_types_reported_with_path(data, expected):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert expected in str(info.value)


def test_several_type_errors_in_one_message():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"teacher": {"batch_size": "x", "max_attempts": True}, "ray": [1]})
    msg = str(info.value)
    assert "3 problems" in msg
    assert "teacher.batch_size" in msg and "teacher.max_attempts" in msg and "ray:" in msg


@pytest.mark.parametrize(
    "override, path",
    [
        ("perspectives.damping=1.5", "perspectives.damping"),
        ("perspectives.damping=0.2", "perspectives.damping"),
        ("sampling.keep_ratio=0", "sampling.keep_ratio"),
        ("sampling.keep_ratio=1.01", "sampling.keep_ratio"),
        ("teacher.top_p=0", "teacher.top_p"),
        ("teacher.batch_size=0", "teacher.batch_size"),
        ("teacher.max_attempts=-1", "teacher.max_attempts"),
        ("teacher.temperature=-0.1", "teacher.temperature"),
        ("perspectives.preference_percentile=101", "perspectives.preference_percentile"),
        ("tasks.max_perspectives=0", "tasks.max_perspectives"),
        ("input.text_column=''", "input.text_column"),
    ],
)
def test_range_errors_reported(override, path):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert f"{path}:" in str(info.value)


def test_boundary_values_accepted():
    cfg = load_config(None, ["sampling.keep_ratio=1", "teacher.top_p=1", "perspectives.damping=0.5",
                             "teacher.temperature=0", "perspectives.preference_percentile=0"])
    assert cfg.sampling.keep_ratio == 1.0 and cfg.perspectives.damping == 0.5


def test_several_range_errors_in_one_message():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["perspectives.damping=1.5", "sampling.keep_ratio=0", "teacher.top_p=0"])
    msg = str(info.value)
    assert "3 problems" in msg
    assert "perspectives.damping" in msg and "sampling.keep_ratio" in msg and "teacher.top_p" in msg


# ------------------------------------------------------------------------------------------
# YAML files
# ------------------------------------------------------------------------------------------


def test_invalid_yaml_names_the_line(tmp_path):
    p = _write(tmp_path, "seed: 1\nteacher:\n  batch_size: 4\n  model: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(p)
    msg = str(info.value)
    assert str(p) in msg
    assert "line 5" in msg or "line 4" in msg
    assert "not valid YAML" in msg


def test_invalid_yaml_exact_line(tmp_path):
    p = _write(tmp_path, "seed: 1\nrun_dir: x\nteacher: : bad\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(p)


def test_yaml_top_level_list_rejected(tmp_path):
    p = _write(tmp_path, "- seed: 1\n- teacher: {}\n")
    with pytest.raises(ConfigError, match="mapping at the top"):
        load_config(p)


def test_yaml_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_empty_yaml_gives_defaults(tmp_path):
    p = _write(tmp_path, "# only a comment\n")
    assert read_yaml(p) == {}
    assert load_config(p) == Config()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads_and_applies_each_value(path):
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for dotted, value in _leaves(raw):
        got = get_path(cfg, dotted)
        assert got == value, f"{path.name}: {dotted} is {got!r}, the file says {value!r}"


def test_shipped_configs_found():
    names = {p.name for p in CONFIGS}
    assert {"local-demo.yaml", "tiny-test.yaml"} <= names
    assert len(CONFIGS) >= 3


def test_local_demo_yaml_equals_embedded_defaults():
    demo = load_config(REPO / "configs" / "local-demo.yaml")
    default = load_config(None)
    # the code gives run_dir no special treatment: the demo profile spells out the default too
    assert demo.run_dir == default.run_dir
    assert config_to_dict(demo) == config_to_dict(default)


# ------------------------------------------------------------------------------------------
# dump and help
# ------------------------------------------------------------------------------------------


def test_dump_config_round_trips_defaults():
    cfg = Config()
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_dump_config_round_trips_non_default_values():
    cfg = load_config(None, [
        "seed=3", "teacher.backend=openai", "teacher.temperature=0.25", "tasks.max_perspectives=null",
        "teacher.vllm.engine_kwargs={enforce_eager: true, max_num_seqs: 4}", "ray.address=auto",
        "input.id_column=null", "perspectives.similarity=cosine",
    ])
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg
    assert again.teacher.vllm.engine_kwargs == {"enforce_eager": True, "max_num_seqs": 4}
    assert again != Config()


def _all_leaf_paths(cls=Config, prefix=""):
    for f in dataclasses.fields(cls):
        where = f"{prefix}.{f.name}" if prefix else f.name
        cls.__dataclass_fields__[f.name].type
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if dataclasses.is_dataclass(default):
            yield from _all_leaf_paths(type(default), where)
        else:
            yield where


def test_iter_help_yields_every_leaf_with_help_text():
    items = list(iter_help())
    keys = [k for k, _, _, _ in items]
    assert len(keys) == len(set(keys))
    assert set(keys) == set(_all_leaf_paths())
    for key, type_name, default, help_text in items:
        assert help_text.strip(), f"{key} has no help text"
        assert type_name
        assert default == get_path(Config(), key)
    assert "teacher.openai.base_url" in keys
    assert "teacher.openai" not in keys  # sections are not leaves


def test_iter_help_type_names():
    types = {k: t for k, t, _, _ in iter_help()}
    assert types["teacher.batch_size"] == "int"
    assert types["tasks.max_perspectives"] == "int or null"
    assert "'transformers'" in types["teacher.backend"]


def test_scientific_notation_without_a_dot_is_a_number():
    # YAML 1.1 reads `1e-4` as a string; float fields must still take it (from files and overrides)
    cfg = load_config(None, ["train.lr=1e-4", "warmup.lr=3E-5"])
    assert cfg.train.lr == 1e-4 and cfg.warmup.lr == 3e-5
    with pytest.raises(ConfigError, match="train.lr: expected a number, got 'fast'"):
        load_config(None, ["train.lr=fast"])
