"""Resumable training checkpoints: atomic, checksummed, described by JSON (never by folder names).

``<dir>/epoch-0005/`` holds ``model.safetensors``, ``optimizer.pt`` (tensors and numbers only, so it
loads with ``weights_only=True``) and ``state.json`` (epoch, history, config fingerprint, sha256 of
the two files). A checkpoint is written into a temporary folder and renamed into place, and only
then does ``latest.json`` point at it; resuming verifies the checksums and falls back to the newest
intact checkpoint when the latest one is torn.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from pipeline.artifacts import save_tensors, sha256_file, write_json_atomic
from pipeline.distributed import broadcast_object
from pipeline.errors import UserError
from pipeline.outputs import with_path

log = logging.getLogger(__name__)
KEEP = 2
CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt")


class ResumeError(UserError, ValueError):
    """No usable checkpoint, or one written by a run with another configuration."""


def checkpoint_dirs(ckpt_dir: Path) -> list[Path]:
    """``epoch-N`` folders of ``ckpt_dir``, oldest first by the number N (as text, ``epoch-10000``
    would sort before ``epoch-9999`` and pruning would delete the newest)."""
    found = [p for p in ckpt_dir.glob("epoch-*") if re.fullmatch(r"epoch-\d+", p.name)]
    return sorted(found, key=lambda p: (int(p.name[len("epoch-"):]), p.name))


def save_checkpoint(ckpt_dir: Path, *, epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], replace_others: bool = False) -> Path:
    """Write ``epoch-NNNN`` atomically, point ``latest.json`` at it, keep the ``KEEP`` newest.

    ``replace_others`` (a fresh run's first checkpoint) deletes every other checkpoint, but only once
    this one is in place: a run that fails while writing it (a full disk) leaves the older ones usable.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"epoch-{epoch:04d}"
    tmp = ckpt_dir / f".tmp-epoch-{epoch:04d}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        save_tensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                     tmp / "model.safetensors")
        # torch.save reports a failed write as a RuntimeError without the errno: serialise in
        # memory, then write, so a full disk is the OSError it is.
        buffer = io.BytesIO()
        torch.save(optimizer.state_dict(), buffer)
        (tmp / "optimizer.pt").write_bytes(buffer.getvalue())
        files = {name: sha256_file(tmp / name) for name in CHECKPOINT_FILES}
        (tmp / "state.json").write_text(json.dumps({**state, "epoch": epoch, "files": files}, indent=2))
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)  # no half-written checkpoint left behind
        if isinstance(err, OSError):
            raise with_path(err, final) from err
        raise
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    write_json_atomic(ckpt_dir / "latest.json", {"epoch": epoch, "dir": final.name})
    kept = checkpoint_dirs(ckpt_dir)
    for old in [p for p in kept if p != final] if replace_others else kept[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _intact(path: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((path / "state.json").read_text())
        # Only our two files, by name: a crafted state.json must not make us read other paths.
        if set(state["files"]) != set(CHECKPOINT_FILES) or not isinstance(state["epoch"], int) \
                or not isinstance(state["history"], list):
            raise ValueError("state.json does not describe one of our checkpoints")
        for name, digest in state["files"].items():
            if sha256_file(path / name) != digest:
                raise ValueError(f"{name} checksum mismatch")
        return state
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        log.warning("checkpoint %s is not usable (%s); trying an older one", path, err)
        return None


def load_checkpoint(ckpt_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    fingerprint: str) -> dict[str, Any]:
    """Restore the newest intact checkpoint into model/optimizer; returns its state.json."""
    candidates = checkpoint_dirs(ckpt_dir)[::-1]
    if not candidates:
        raise ResumeError(f"{ckpt_dir}: no checkpoint to resume from; run without --resume (and set "
                          "train.checkpoint_every > 0 to write checkpoints).")
    for path in candidates:
        state = _intact(path)
        if state is None:
            continue
        if state.get("fingerprint") != fingerprint:
            raise ResumeError(f"{path}: written by a run with other parameters (student/loss/train "
                              "params or the cache changed); run without --resume to start over.")
        try:
            model.load_state_dict(load_file(str(path / "model.safetensors")))
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu",
                                                 weights_only=True))
        # weights_only refuses pickled code (UnpicklingError); the others are foreign contents.
        except (pickle.UnpicklingError, SafetensorError, RuntimeError, ValueError, KeyError,
                EOFError) as err:
            found = ", ".join(dict.fromkeys(re.findall(r"GLOBAL ([\w.]+)", str(err)))) or "?"
            reason = (f"UnpicklingError: optimizer.pt names Python objects ({found}); refused, never "
                      "executed" if isinstance(err, pickle.UnpicklingError)
                      else f"{type(err).__name__}: {str(err).splitlines()[0]}")
            raise ResumeError(f"{path}: cannot restore this checkpoint ({reason}); it was not written "
                              "by `aekt student`. Delete it, or run without --resume to start "
                              "over.") from err
        log.info("resumed from %s (epoch %d)", path, state["epoch"])
        return state
    raise ResumeError(f"{ckpt_dir}: every checkpoint is damaged; run without --resume to start over.")


def resume_from_main(ckpt_dir: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                     fingerprint: str, main: bool, world: int) -> dict[str, Any]:
    """``load_checkpoint`` on the main process, its result sent to every rank.

    Only the main process writes checkpoints, so on a multi-node run ``ckpt_dir`` may exist on its
    node alone: every other rank gets the weights, optimizer state and state.json (or the same
    ResumeError) from the main process, never from its own node's folder, which may be missing or
    hold another run's older checkpoint. A collective: every rank of the world must call it.
    """
    payload: dict[str, Any] = {}
    if main:
        try:
            state = load_checkpoint(ckpt_dir, model=model, optimizer=optimizer, fingerprint=fingerprint)
            payload = {"state": state, "model": model.state_dict(), "optimizer": optimizer.state_dict()}
        except ResumeError as err:
            payload = {"error": str(err)}
            if world == 1:
                raise
    sent = broadcast_object(payload, src=0, world=world)
    if "error" in sent:
        raise ResumeError(sent["error"] if main else f"the main process (rank 0) could not resume: {sent['error']}")
    if not main:
        model.load_state_dict(sent["model"])
        optimizer.load_state_dict(sent["optimizer"])
    return sent["state"]
