"""The typed configuration: defaults, overrides and the errors a user sees."""

from __future__ import annotations

import pytest

from components.config import ConfigError, PipelineConfig, load_config, parse_overrides


def test_defaults_validate():
    cfg = load_config()
    assert cfg == PipelineConfig()
    # every field holds its declared default (numbers are read from the schema, not repeated here)
    for section_name, section_field in PipelineConfig.model_fields.items():
        section = getattr(cfg, section_name)
        if hasattr(type(section), "model_fields"):
            for name, field in type(section).model_fields.items():
                assert getattr(section, name) == field.get_default(call_default_factory=True), f"{section_name}.{name}"
    assert cfg.base.pretrained is None
    assert cfg.ppo.batch_size % cfg.ppo.minibatch_size == 0


def test_override_applies():
    cfg = load_config(overrides=["ppo.steps=3", "seed=5", "ppo.kl_estimator=k3"])
    assert (cfg.ppo.steps, cfg.seed, cfg.ppo.kl_estimator) == (3, 5, "k3")
    assert cfg.ppo.batch_size == PipelineConfig().ppo.batch_size  # untouched siblings keep their defaults


def test_unknown_key_named():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["ppo.stepz=3"])
    message = str(info.value)
    assert "ppo.stepz" in message
    assert "unknown key" in message


def test_wrong_type_named():
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["ppo.steps=abc"])
    message = str(info.value)
    assert "ppo.steps" in message
    assert "unknown key" not in message


def test_out_of_range_named():
    with pytest.raises(ConfigError, match=r"annotators\.target_agreement"):
        load_config(overrides=["annotators.target_agreement=1.5"])


def test_missing_config_file_names_path(tmp_path):
    path = tmp_path / "nope" / "params.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_config_file_values_and_error_source(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 9\nppo:\n  steps: 2\n  lr: 1.0e-4\n")
    cfg = load_config(path, overrides=["ppo.steps=4"])
    assert (cfg.seed, cfg.ppo.steps, cfg.ppo.lr) == (9, 4, 1.0e-4)  # the override wins over the file
    path.write_text("ppo:\n  stepz: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "ppo.stepz" in str(info.value)


def test_parse_overrides_scalars():
    tree = parse_overrides(
        ["ppo.steps=10", "ppo.lr=0.001", "ppo.whiten_rewards=true", "seed=3", "experiment=abc"]
    )
    assert tree == {
        "ppo": {"steps": 10, "lr": 0.001, "whiten_rewards": True},
        "seed": 3,
        "experiment": "abc",
    }
    assert type(tree["ppo"]["steps"]) is int
    assert type(tree["ppo"]["lr"]) is float
    assert type(tree["ppo"]["whiten_rewards"]) is bool
    assert parse_overrides(["ppo.whiten_rewards=false"]) == {"ppo": {"whiten_rewards": False}}


def test_exponent_float_override_validates():
    # PyYAML (YAML 1.1) reads "1e-5" as a string; pydantic's lax mode turns it into the float
    cfg = load_config(overrides=["ppo.lr=1e-5"])
    assert cfg.ppo.lr == pytest.approx(1e-5)
    assert type(cfg.ppo.lr) is float


@pytest.mark.parametrize("bad", ["ppo.steps", "=3", ""])
def test_parse_overrides_rejects_malformed(bad):
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides([bad])


def test_missing_pretrained_folder_named(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["base.pretrained=./no/such/dir"])
    assert "base.pretrained" in str(info.value)
    # an existing folder is accepted
    cfg = load_config(overrides=[f"base.pretrained={tmp_path}"])
    assert cfg.base.pretrained == str(tmp_path)


def test_top_level_list_rejected(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- ppo\n- steps\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value)
    assert "mapping" in str(info.value)


def test_invalid_yaml_names_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("ppo: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "not valid YAML" in str(info.value)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="n_embd"):
        load_config(overrides=["base.n_embd=100", "base.n_head=3"])
    with pytest.raises(ConfigError, match="minibatch_size"):
        load_config(overrides=["ppo.batch_size=10", "ppo.minibatch_size=4"])
