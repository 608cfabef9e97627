"""Model artifacts: safetensors weights plus a JSON card (arch, classes, provenance, sha256).

Weights are written with safetensors (no pickle, so loading a shared artifact runs no code). The
card sits beside the weights (``teacher.safetensors`` -> ``teacher.json``) and records the sha256 of
the weights file, which the cache stores as provenance and stage 2 checks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.errors import UserError
from pipeline.models import build_model, load_weights
from pipeline.outputs import atomic_path

_RERUN = "rerun the stage that wrote it (`aekt teacher` / `aekt student`, or `dvc repro`)"


class ArtifactError(UserError, ValueError):
    """A model artifact is missing, damaged, or does not describe its weights."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """safetensors ``save_file``, with an I/O failure (disk full) raised as the OSError it is."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as err:
        found = re.search(r"os error (\d+)", str(err))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from err


def write_json_atomic(path: str | Path, data: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_model(model: torch.nn.Module, weights: str | Path, card: dict[str, Any]) -> dict[str, Any]:
    """Write ``weights`` (safetensors) and its card, both or neither; returns the card with the sha256."""
    weights = Path(weights)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp_weights, atomic_path(card_path(weights)) as tmp_card:
        save_tensors(state, tmp_weights)
        card = {**card, "weights": weights.name, "sha256": sha256_file(tmp_weights)}
        tmp_card.write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
    return card


def check_writable(*, folders: Mapping[str, str | Path] | None = None, **files: str | Path) -> None:
    """Fail before any work when an output cannot be written: ``files`` and ``folders`` map the
    option that named each output (``"--metrics"``) to its path. Each file's folder, and each
    folder, must be (or be creatable as) a writable folder; a file path must not be a folder."""
    for option, raw in [*files.items(), *(folders or {}).items()]:
        path, want_folder = Path(raw), option in (folders or {})
        problem = None
        if want_folder and path.exists() and not path.is_dir():
            problem = "this is a file, not a folder; move the file or pass another folder"
        elif not want_folder and path.is_dir():
            problem = "this is a folder where a file is expected; pass a file path"
        else:
            ancestor = path if want_folder else path.parent
            while not ancestor.exists() and ancestor != ancestor.parent:
                ancestor = ancestor.parent
            if not ancestor.is_dir():
                problem = (f"{ancestor} is a file, not a folder, so nothing can be written under it; "
                           "move that file or choose another path")
            elif not os.access(ancestor, os.W_OK | os.X_OK):
                problem = (f"the folder {ancestor} is not writable by this user; fix its permissions or "
                           "choose another path")
        if problem:
            raise ArtifactError(f"{option} {path}: {problem}. Nothing was run.")


def read_card(weights: str | Path) -> dict[str, Any]:
    path = card_path(weights)
    if not path.is_file():
        raise ArtifactError(f"{path}: model card not found. Produce it with `aekt teacher` / "
                            "`aekt student` (or `dvc repro`).")
    try:
        card = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: not valid JSON ({err}); rerun the stage that writes it.") from err
    for key, kind in (("arch", str), ("num_classes", int), ("in_channels", int), ("sha256", str)):
        if not isinstance(card.get(key), kind):
            raise ArtifactError(f"{path}: field '{key}' missing or not {kind.__name__}.")
    _check_input_norm(card, path)
    return card


def _check_input_norm(card: dict[str, Any], path: Path) -> None:
    """``input_norm`` (absent on older cards: the recipe's statistics) is a mean and a positive std
    per input channel; anything else would feed the model garbage without an error."""
    norm = card.get("input_norm")
    if norm is None:
        if not isinstance(card.get("recipe"), str):
            raise ArtifactError(f"{path}: the card has neither 'input_norm' nor 'recipe', so the model's input "
                                "normalisation is unknown; rerun the stage that wrote it.")
        return
    channels = card["in_channels"]
    ok = isinstance(norm, dict) and all(
        isinstance(norm.get(k), list) and len(norm[k]) == channels
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in norm[k])
        for k in ("mean", "std"))
    if not ok or not all(v > 0 for v in norm["std"]):
        raise ArtifactError(f"{path}: 'input_norm' must be {{'mean': [...], 'std': [...]}} with {channels} finite "
                            f"numbers each and every std > 0, got {norm!r}; rerun the stage that wrote the card.")


def load_model(weights: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model described by the card and load its weights (checksum verified)."""
    weights = Path(weights)
    card = read_card(weights)
    if not weights.is_file():
        raise ArtifactError(f"{weights}: weights file not found (its card exists); {_RERUN}.")
    actual = sha256_file(weights)
    if actual != card["sha256"]:
        raise ArtifactError(f"{weights}: sha256 {actual[:12]}… does not match its card "
                            f"({card['sha256'][:12]}…); the file was modified — {_RERUN}.")
    model = build_model(card["arch"], num_classes=card["num_classes"], in_channels=card["in_channels"])
    load_weights(model, load_file(str(weights)), source=str(weights))
    return model, card
