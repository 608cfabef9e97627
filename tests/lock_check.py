"""Is the committed dvc.lock fresh? In a clean clone, `dvc status` may report only outputs that are
not there yet (shards, models, the store are not in git) — never a changed dependency, param or
command. Run by `.ci/run` before the tests, and as a test, so a code or params change lands only
with its refreshed dvc.lock and outputs (`dvc repro`, then commit dvc.lock and the outputs).

    python -m tests.lock_check [REPO]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

MISSING = {"deleted", "not in cache"}


def stage_outputs(repo: Path) -> set[str]:
    """Every output path of every stage, as `dvc status` names them (resolved ${...} included)."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return {out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


def stale_entries(status: dict, outputs: set[str]) -> list[str]:
    """What in a `dvc status --json` report says the lock does not describe this checkout."""
    problems = []
    for stage, entries in status.items():
        for entry in entries:
            if isinstance(entry, str):  # "changed command", "always changed"
                problems.append(f"{stage}: {entry}")
                continue
            for kind, changes in entry.items():
                for path, state in changes.items():
                    if isinstance(state, dict):  # params: {"params.yaml": {"loss.beta": "modified"}}
                        problems += [f"{stage}: {kind} {path}:{key} {st}" for key, st in state.items()]
                    elif kind == "changed outs" and state in MISSING:
                        continue
                    elif kind == "changed deps" and state == "deleted" and path in outputs:
                        continue  # an upstream output that this clone has not produced yet
                    else:
                        problems.append(f"{stage}: {kind} {path} {state}")
    return problems


def check(repo: Path) -> list[str]:
    out = subprocess.run(["dvc", "status", "--json"], cwd=repo, capture_output=True, text=True, check=True,
                         timeout=300).stdout
    return stale_entries(json.loads(out or "{}"), stage_outputs(repo))


def main() -> int:
    repo = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    problems = check(repo)
    if problems:
        print(f"{repo}/dvc.lock is stale — it does not describe the committed code and params:", file=sys.stderr)
        for line in problems:
            print(f"  {line}", file=sys.stderr)
        print("Run `dvc repro` and commit dvc.lock with the outputs it refreshed (metrics/, plots/, "
              "manifests/).", file=sys.stderr)
        return 1
    print(f"{repo}/dvc.lock is fresh (only outputs not built in this checkout are missing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
