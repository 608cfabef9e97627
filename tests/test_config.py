"""params.yaml sections -> validated dataclasses, with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import (
    ConfigError,
    DataConfig,
    LossConfig,
    TrainConfig,
    build_train_config,
    load_params,
    section,
)


def test_repository_params_yaml_builds_every_section(repo_root) -> None:
    params = load_params(repo_root / "params.yaml")
    for name in ("data", "augment", "teacher", "cache", "student", "loss", "train", "eval"):
        assert section(params, name) is not None


@pytest.mark.parametrize(("cls", "values", "fragment"), [
    (LossConfig, {"betta": 8}, "loss.betta: unknown key. Did you mean 'beta'?"),
    (LossConfig, {"tau": "four"}, "loss.tau: expected a number"),
    (LossConfig, {"tau": 0.0}, "loss.tau: 0.0 is below the minimum"),
    (LossConfig, {"name": "akt"}, "loss.name: 'akt' is not one of"),
    (LossConfig, {"w_min": 2.0, "w_max": 1.0}, "loss.w_min (2.0) must not exceed"),
    (DataConfig, {"shard_size": 0}, "data.shard_size: 0 is below the minimum 1"),
    (DataConfig, {"source": "folder"}, "data.root: required"),
    (DataConfig, {"download": "yes"}, "data.download: expected true or false"),
    (TrainConfig, {"epochs": 2.5}, "train.epochs: expected an integer"),
    (TrainConfig, {"milestones": [0.5, 1.5]}, "train.milestones: 1.5 is above the maximum"),
])
def test_bad_values_name_the_key(cls, values, fragment) -> None:
    with pytest.raises(ConfigError) as err:
        cls.from_params(values)
    assert fragment in str(err.value)


def test_int_is_accepted_for_float_and_bool_is_not_a_number() -> None:
    assert LossConfig.from_params({"beta": 8}).beta == 8.0
    with pytest.raises(ConfigError):
        LossConfig.from_params({"beta": True})


def test_train_recipe_preset_is_overridden_by_explicit_keys() -> None:
    cfg = build_train_config({"recipe": "cifar_240ep", "lr": 0.01})
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.lr_schedule) == (240, 64, 0.01, "multistep")
    assert cfg.milestones == (0.625, 0.75, 0.875)
    with pytest.raises(ConfigError, match="train.recipe"):
        build_train_config({"recipe": "cifar_999ep"})


def test_unknown_section_is_rejected(tmp_path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("los:\n  beta: 1\n")
    with pytest.raises(ConfigError, match="unknown section 'los'. Did you mean 'loss'"):
        load_params(path)


def test_bare_no_written_by_dvc_exp_run_is_a_string(tmp_path) -> None:
    """`dvc exp run -S` drops the quotes of "no" (YAML 1.2 writer); it must still read as "no"."""
    path = tmp_path / "params.yaml"
    path.write_text("cache: {mixed_precision: no, codec: fp16}\ndata: {download: false}\n")
    params = load_params(path)
    assert section(params, "cache").mixed_precision == "no"
    assert section(params, "data").download is False


def test_a_key_set_twice_is_rejected(tmp_path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.05\n")
    with pytest.raises(ConfigError, match="line 4: key 'lr' is set twice"):
        load_params(path)


@pytest.mark.parametrize("preset", sorted((Path(__file__).resolve().parents[1] / "presets").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_preset_is_a_valid_params_file(preset: Path) -> None:
    params = load_params(preset)
    for name in ("data", "augment", "teacher", "cache", "student", "loss", "train", "eval"):
        assert section(params, name) is not None
