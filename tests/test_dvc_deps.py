"""dvc.yaml's code dependencies are complete: every module a stage's command can import (its stage
module and everything that imports, transitively, inside pipeline/ and stages/) is listed as a dep,
itself or through its folder. Otherwise a library edit leaves `dvc status` silent and results stale.

Imports inside functions count (they run when the code path runs). The `aekt` entry point
(stages/cli.py) imports every stage module at load, but only the invoked command's body runs, so
other stages' modules are not required.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

PACKAGES = ("pipeline", "stages")


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imports(path: Path, package: str) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            names += [module, *(f"{module}.{a.name}" for a in node.names)]
    return [n for n in names if n.split(".")[0] in PACKAGES]


def import_closure(module: str) -> set[str]:
    """Repository files (relative paths) that importing and running ``module`` can execute."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        if path is None or path in seen:
            continue
        seen.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages' __init__
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        todo += _imports(path, package)
    return {str(p.relative_to(REPO)) for p in seen}


def _stages() -> dict[str, dict]:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("stage", list(_stages()))
def test_each_stage_depends_on_every_module_it_runs(stage: str) -> None:
    deps = [d if isinstance(d, str) else next(iter(d)) for d in _stages()[stage]["deps"]]
    covered = lambda f: any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)  # noqa: E731
    missing = sorted(f for f in import_closure(f"stages.{stage}") if not covered(f))
    assert not missing, f"dvc.yaml stage {stage!r} runs {missing} but does not depend on them"


def test_closure_follows_function_level_and_package_imports() -> None:
    closure = import_closure("stages.student")
    assert {"stages/student.py", "pipeline/student.py", "pipeline/losses.py", "pipeline/loss_terms.py",
            "pipeline/__init__.py", "pipeline/models/__init__.py"} <= closure
    assert "pipeline/inspect_plots.py" not in closure
