"""params.yaml sections -> validated dataclasses, with errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import (
    ConfigError,
    DataConfig,
    LossConfig,
    TrainConfig,
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


def test_retired_train_recipe_names_the_explicit_keys() -> None:
    with pytest.raises(ConfigError, match="train.recipe: was removed") as err:
        TrainConfig.from_params({"recipe": "cifar_240ep", "lr": 0.01})
    assert "lr_schedule" in str(err.value) and "presets/cifar10.yaml" in str(err.value)


def test_train_defaults_are_the_digits_schedule() -> None:
    cfg = TrainConfig.from_params({})
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.lr_schedule, cfg.weight_decay) == (40, 64, 0.01, "cosine", 5e-4)


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


@pytest.mark.parametrize(("cls", "values", "fragment"), [
    (LossConfig, {"tau": float("nan")}, "loss.tau: nan is not a finite number"),
    (LossConfig, {"w_max": float("nan")}, "loss.w_max: nan is not a finite number"),
    (LossConfig, {"warmup_epochs": float("inf")}, "loss.warmup_epochs: inf is not a finite number"),
    (TrainConfig, {"lr": float("-inf")}, "train.lr: -inf is not a finite number"),
    (TrainConfig, {"batch_size": 1_000_000_000}, "train.batch_size: 1000000000 is above the maximum"),
    (TrainConfig, {"epochs": 10**23}, "train.epochs: 100000000000000000000000 is above the maximum"),
    (TrainConfig, {"milestones": [0.75, 0.5]}, "train.milestones: [0.75, 0.5] must be in increasing order"),
    (TrainConfig, {"epochs": 2, "lr_warmup_epochs": 3}, "train.lr_warmup_epochs (3.0) exceeds train.epochs"),
    (TrainConfig, 5, "params.yaml train: expected a mapping of keys to values, got int 5"),
    (TrainConfig, [1, 2], "params.yaml train: expected a mapping of keys to values, got list"),
    (TrainConfig, {1: 2}, "params.yaml train: key 1 is not a name"),
    (DataConfig, {"name": "../x"}, "data.name: '../x' names files and folders"),
])
def test_non_finite_oversized_and_malformed_values_name_the_key(cls, values, fragment) -> None:
    with pytest.raises(ConfigError) as err:
        cls.from_params(values)
    assert fragment in str(err.value)


@pytest.mark.parametrize(("content", "fragment"), [
    (b"train:\n  lr: [0.1\n", "not valid YAML"),
    (b"train:\n\tlr: 0.1\n", "not valid YAML"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe", "not a UTF-8 text file"),
    (b"train: {lr: 0.1}\x00\n", "contains NUL bytes"),
    (b"train: !!python/object/apply:os.system ['touch pwned']\n", "no tags such as !!python"),
    (b"train:\n  lr: !!python/name:os.system\n", "no tags such as !!python"),
    (b"1: {lr: 0.1}\n", "section name 1 is not a word"),
    (b"? [a, b]\n: 1\n", "a key must be a plain name"),
    (b"- train\n- loss\n", "expected a mapping of sections"),
    (b"just a string\n", "expected a mapping of sections"),
    (b"train:\n  lr: .nan\n", "train.lr: nan is not a finite number"),
    (b"loss:\n  warmup_epochs: .inf\n", "loss.warmup_epochs: inf is not a finite number"),
])
def test_params_files_that_are_not_plain_yaml_give_one_clear_error(tmp_path: Path, content: bytes,
                                                                    fragment: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        params = load_params(path)
        for name in params:
            section(params, name)
    assert fragment in str(err.value)
    assert not (tmp_path / "pwned").exists()


def test_params_path_that_is_a_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a regular file"):
        load_params(tmp_path)


def test_every_training_hyperparameter_is_written_out(repo_root: Path) -> None:
    """params.yaml and every preset list every key of every section: nothing hides in code defaults."""
    import dataclasses

    import yaml

    from pipeline.config import SECTIONS

    for path in [repo_root / "params.yaml", *sorted((repo_root / "presets").glob("*.yaml"))]:
        raw = yaml.safe_load(path.read_text())
        for name, cls in SECTIONS.items():
            missing = {f.name for f in dataclasses.fields(cls)} - set(raw.get(name) or {})
            assert not missing, f"{path.name} {name}: {sorted(missing)} not written out"
        params = load_params(path)
        for name in SECTIONS:
            section(params, name)
