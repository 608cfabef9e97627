"""Model artifacts: safetensors weights plus a JSON card (arch, classes, provenance, sha256).

Weights are written with safetensors (no pickle, so loading a shared artifact runs no code). The
card sits beside the weights (``teacher.safetensors`` -> ``teacher.json``) and records the sha256 of
the weights file, which the cache stores as provenance and stage 2 checks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.models import build_model, load_weights

_RERUN = "rerun the stage that wrote it (`aekt teacher` / `aekt student`, or `dvc repro`)"


class ArtifactError(ValueError):
    """A model artifact is missing, damaged, or does not describe its weights."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".json")


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def save_model(model: torch.nn.Module, weights: str | Path, card: dict[str, Any]) -> dict[str, Any]:
    """Write ``weights`` (safetensors, atomically) and its card; returns the card with the sha256."""
    weights = Path(weights)
    weights.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, weights)
    card = {**card, "weights": weights.name, "sha256": sha256_file(weights)}
    write_json_atomic(card_path(weights), card)
    return card


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
    return card


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
