"""The one error path every command shares (stages/common.py): expected failures are one paragraph
without a traceback; `aekt --debug` / AEKT_DEBUG=1 shows the traceback; OS errors name path and fix."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest

from pipeline.config import ConfigError
from stages.common import DEBUG_ENV, os_error_message
from tests.conftest import REPO, cli_env
from tests.pipeline_fixture import COMMANDS, aekt_inproc, user_error

# Imported by the command bodies only: `aekt --help` must not pay for them (seconds on a busy machine).
HEAVY_MODULES = ("torch", "numpy", "zarr", "accelerate", "matplotlib", "webdataset", "PIL", "torchvision",
                 "safetensors", "sklearn", "numcodecs", "yaml")
# Renders every help page the way the console script does, then reports which heavy modules were imported.
_HELP_PROBE = """
import json, sys
from stages.cli import main
pages = [["--help"], ["--version"]] + [[name, "--help"] for name in main.commands]
codes = [main.main(args, prog_name="aekt", standalone_mode=False) for args in pages]
print(json.dumps({"codes": codes, "heavy": [m for m in sys.argv[1:] if m in sys.modules]}))
"""


@pytest.mark.parametrize(("code", "fragment"), [
    (errno.ENOSPC, "the disk is full"), (errno.EFBIG, "ulimit -f"), (errno.EACCES, "permission denied"),
    (errno.ENOTDIR, "is a file, not a folder"), (errno.EROFS, "read-only"),
])
def test_os_errors_name_the_path_and_the_fix(code: int, fragment: str) -> None:
    message = os_error_message(OSError(code, os.strerror(code), "models/student.safetensors"))
    assert message.startswith("models/student.safetensors: ") and fragment in message
    assert f"errno {code}" in message and "\n" not in message


def test_an_os_error_raised_with_our_own_message_keeps_it() -> None:
    assert os_error_message(FileNotFoundError("manifest x.json: not found; run `aekt prepare`")) == \
        "manifest x.json: not found; run `aekt prepare`"


def test_debug_shows_the_traceback_and_the_default_does_not(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "params.yaml").write_text("train: [1\n")
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests/digits.json").write_text("{}")
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    assert "not valid YAML" in user_error(aekt_inproc(COMMANDS["student"], tmp_path))
    debug = aekt_inproc(["--debug", *COMMANDS["student"]], tmp_path)
    os.environ.pop(DEBUG_ENV, None)  # the flag sets it for child processes; keep other tests clean
    assert isinstance(debug.exception, ConfigError) and debug.exit_code != 0


def test_cli_lists_debug_and_the_stages() -> None:
    result = aekt_inproc(["--help"], Path.cwd())
    assert result.exit_code == 0 and "--debug" in result.output
    for name in ("prepare", "teacher", "cache", "student", "evaluate", "verify-cache", "inspect"):
        assert name in result.output
    version = aekt_inproc(["--version"], Path.cwd())
    assert version.exit_code == 0 and version.output.startswith("aekt, version ")


def test_preset_args_round_trip_through_the_params_loader(repo_root: Path, tmp_path: Path) -> None:
    """`aekt preset-args PRESET` gives `-S key=value` pairs that rebuild the preset's values."""
    import yaml

    from pipeline.config import SECTIONS, load_params, section
    from stages.preset import set_param_args

    for preset in sorted((repo_root / "presets").glob("*.yaml")):
        params = load_params(preset)
        args = set_param_args(params)
        assert args[::2] == ["-S"] * (len(args) // 2) and all(" " not in a for a in args)
        rebuilt: dict = {}
        for pair in args[1::2]:
            key, value = pair.split("=", 1)
            name, field = key.split(".")
            rebuilt.setdefault(name, {})[field] = yaml.safe_load(value) if value != "no" else "no"
        path = tmp_path / preset.name
        path.write_text(yaml.safe_dump(rebuilt))
        again = load_params(path)
        assert {n: section(again, n) for n in SECTIONS} == {n: section(params, n) for n in SECTIONS}


def test_preset_args_pins_a_relative_data_root(repo_root: Path, tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("data: {source: folder, root: imgs}\n")
    result = aekt_inproc(["preset-args", "p.yaml"], tmp_path)
    assert result.exit_code == 0 and f"data.root={tmp_path.resolve() / 'imgs'}" in result.output


def test_help_and_version_import_no_heavy_module() -> None:
    """Deterministic stand-in for "`aekt --help` is fast": the help pages import none of torch & co."""
    proc = subprocess.run([sys.executable, "-c", _HELP_PROBE, *HEAVY_MODULES], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report == {"codes": [0] * len(report["codes"]), "heavy": []}, report


def test_the_console_script_prints_the_package_version() -> None:
    from importlib.metadata import version

    aekt = Path(sys.executable).with_name("aekt")
    proc = subprocess.run([str(aekt), "--version"], env=cli_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == f"aekt, version {version('aekt-pipeline')}\n"


def _commands() -> list[tuple[str, click.Command]]:
    from stages.cli import main

    return [("aekt", main), *sorted(main.commands.items())]


@pytest.mark.parametrize(("name", "command"), _commands(), ids=[name for name, _ in _commands()])
def test_every_option_and_argument_is_explained(name: str, command: click.Command) -> None:
    """`aekt X --help` explains every option (click has no help for arguments: the command's own
    text must name each one, as it appears in the usage line)."""
    ctx = click.Context(command, info_name=name)
    for param in command.get_params(ctx):
        if isinstance(param, click.Option):
            assert param.help and param.help.strip(), f"aekt {name} {param.opts[0]}: no help text"
        else:
            assert param.human_readable_name in (command.help or ""), \
                f"aekt {name}: the help does not explain the argument {param.human_readable_name}"


@pytest.mark.parametrize(("name", "command"), [pytest.param(n, c, id=n) for n, c in _commands()])
def test_every_value_option_says_its_default(name: str, command: click.Command) -> None:
    """An option that takes a value shows `[default: ...]` (or says in words what leaving it out
    does), unless it is required or repeatable; flags are off unless given."""
    ctx = click.Context(command, info_name=name)
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option) or param.is_flag or param.required or param.multiple:
            continue
        record = param.get_help_record(ctx)
        assert record and "default" in record[1], f"aekt {name} {param.opts[0]}: the help hides the default"


# ---- paths left out default to dvc.yaml's layout -------------------------------------------------

LAYOUT_PARAMS = "data: {source: digits, name: mnistish}\nteacher: {arch: resnet56}\n"
# Options of dvc.yaml's commands that params.yaml does not determine: everything else may be left out.
NOT_FROM_PARAMS = {"teacher": {"--live", "--no-progress"}, "cache": {"--rebuild", "--summary", "--no-progress"},
                   "student": {"--live", "--no-progress"}, "evaluate": {"--teacher"}, "inspect": {"--json-out"}}


def _parsed(args: list[str]) -> dict:
    """The values `aekt ARGS` would run with (options parsed, defaults filled), without running it."""
    from stages.cli import main

    command = main.commands[args[0]]
    with command.make_context(args[0], args[1:]) as ctx:
        return dict(ctx.params)


def _dvc_commands(repo_root: Path) -> dict[str, list[str]]:
    import shlex

    import yaml

    stages = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    values = {"${data.name}": "mnistish", "${teacher.arch}": "resnet56"}
    commands = {}
    for name, spec in stages.items():
        cmd = spec["cmd"]
        for key, value in values.items():
            cmd = cmd.replace(key, value)
        assert "${" not in cmd, f"dvc.yaml {name}: the test does not know {cmd}"
        args = shlex.split(cmd)
        assert args[0] == "aekt", cmd
        commands[name] = args[1:]
    return commands


def test_every_path_params_determine_defaults_to_dvc_yamls_layout(repo_root: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """For each command line of dvc.yaml (still valid as written): leaving out any option whose value
    follows from params.yaml changes nothing, so `aekt student` alone is `dvc repro student`'s run."""
    from stages.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(LAYOUT_PARAMS)
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests/mnistish.json").write_text('{"dataset": "mnistish"}')
    for stage, args in _dvc_commands(repo_root).items():
        full = _parsed(args)
        needed = set()
        for i, token in enumerate(args):
            if not token.startswith("--"):
                continue
            option = next(p for p in main.commands[args[0]].params if token in getattr(p, "opts", ()))
            shorter = args[:i] + args[i + (1 if option.is_flag else 2):]
            if _parsed(shorter) != full:
                needed.add(token)
        assert needed == NOT_FROM_PARAMS.get(stage, set()), f"dvc.yaml {stage}: {needed}"


def test_left_out_paths_follow_the_given_manifest_and_given_paths_win(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(LAYOUT_PARAMS)
    (tmp_path / "other.json").write_text('{"dataset": "cifar10"}')
    values = _parsed(["student", "--manifest", "other.json", "--out", "elsewhere/s.safetensors"])
    paths = {"manifest_path": "other.json", "shards_dir": "data/shards/cifar10",
             "teacher_path": "models/cifar10/teacher.safetensors", "store_path": "cache/cifar10-resnet56.zarr",
             "model_out": "elsewhere/s.safetensors", "metrics": "metrics/student.json",
             "history": "plots/train.csv", "checkpoints": "runs/cifar10/student"}
    assert {key: values[key] for key in paths} == paths
    assert _parsed(["prepare"]) == {"params_path": "params.yaml", "shards_dir": "data/shards/mnistish",
                                    "manifest_path": "manifests/mnistish.json"}


def test_help_shows_the_layout_defaults() -> None:
    text = aekt_inproc(["student", "--help"], Path.cwd()).output
    for shown in ("[default: manifests/<data.name>.json]", "[default: cache/<dataset>-<teacher.arch>.zarr]",
                  "[default: models/<dataset>/student.safetensors]"):
        assert shown in " ".join(text.split()), text


@pytest.mark.parametrize(("params", "fragment"), [
    (None, "params.yaml: params file not found"),
    ("data: {name: ../x}\n", "params.yaml data.name: '../x' names files and folders"),
])
def test_a_default_params_cannot_give_is_one_paragraph(tmp_path: Path, params: str | None, fragment: str) -> None:
    if params is not None:
        (tmp_path / "params.yaml").write_text(params)
    message = user_error(aekt_inproc(["student"], tmp_path))
    assert fragment in message and "--manifest was left out" in message, message


def test_a_left_out_manifest_that_is_missing_says_to_run_prepare(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(LAYOUT_PARAMS)
    result = aekt_inproc(["cache"], tmp_path)
    assert result.exit_code == 2 and "manifests/mnistish.json" in result.output
    assert "run `aekt prepare` first, or pass --manifest PATH" in result.output, result.output


def test_prepare_with_no_options_writes_dvc_yamls_paths(tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text("data: {source: digits, name: few, max_per_class: 3, shard_size: 8}\n")
    result = aekt_inproc(["prepare"], tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "manifests/few.json").is_file() and sorted((tmp_path / "data/shards/few").glob("*.tar"))
