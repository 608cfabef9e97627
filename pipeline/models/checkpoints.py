"""Reading model weights safely: KD-zoo / DataParallel checkpoints, safetensors, torchvision hub files.

Checkpoints are untrusted input (teachers are downloaded from the internet), so pickles are only
ever read with ``torch.load(..., weights_only=True)``: a file that needs arbitrary Python objects is
refused instead of executed. Loading into a model is strict and, on mismatch, says which keys and
shapes disagree and which architectures the checkpoint would fit.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import re
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlparse

import safetensors
import safetensors.torch
import torch
import torchvision
from torch import Tensor, nn

from pipeline.errors import UserError
from pipeline.models.registry import ARCH_ATTR, MODEL_NAMES, build_model, count_parameters

__all__ = ["CheckpointError", "load_checkpoint", "load_weights", "torchvision_weights"]

log = logging.getLogger(__name__)

# Keys under which KD codebases nest the state dict (CRD/mdistiller: "model"; Lightning and many
# others: "state_dict"; some CIFAR repos: "net"), tried in this order.
_NESTING_KEYS = ("model", "state_dict", "net")
# Prefixes added by wrappers: DataParallel / DDP ("module.") and torch.compile ("_orig_mod.").
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 10  # how many keys of each kind a mismatch message lists
_SAFETENSORS_HEADER_START = 8  # safetensors: 8-byte little-endian header length, then a JSON object


class CheckpointError(UserError, ValueError):
    """A checkpoint is missing, unreadable, unsafe, or does not fit the model it is loaded into."""


def load_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """Read a state dict from a ``.pt``/``.pth`` pickle (weights-only) or a ``.safetensors`` file, on CPU.

    Unwraps ``{"model": sd}``, ``{"state_dict": sd}``, ``{"net": sd}`` (also nested) and strips a
    ``module.`` (DataParallel) or ``_orig_mod.`` (torch.compile) prefix shared by every key.

    Raises:
        CheckpointError: file missing, unreadable, holding non-tensor Python objects (refused, never
            executed), or containing no state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint file not found: {path} (resolved: {path.resolve()})")
    obj = _read_safetensors(path) if _is_safetensors(path) else _read_pickle(path)
    return _state_dict_from(obj, path)


def _is_safetensors(path: Path) -> bool:
    # Sniff the content rather than trust the suffix: exported students are often renamed.
    if path.suffix == ".safetensors":
        return True
    with path.open("rb") as f:
        head = f.read(_SAFETENSORS_HEADER_START + 1)
    return len(head) > _SAFETENSORS_HEADER_START and head[:2] != b"PK" and head[-1:] == b"{"


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"Could not read {path} as a safetensors file: {err}") from err


def _read_pickle(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"Refusing to load {path}: it contains Python objects other than tensors and plain containers "
            f"({_unsafe_globals(path, err)}), and unpickling them could run arbitrary code. If you trust its "
            "origin, re-save just the state dict (torch.save(model.state_dict(), ...)) or convert it to "
            ".safetensors in a separate, trusted step."
        ) from err
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"Could not read {path} as a PyTorch checkpoint ({type(err).__name__}: {err}); "
            "is the file complete and saved with torch.save or safetensors?"
        ) from err


def _unsafe_globals(path: Path, err: pickle.UnpicklingError) -> str:
    """Name the offending globals without unpickling: all of them for zip-format files, else the first."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (RuntimeError, ValueError, OSError, KeyError, zipfile.BadZipFile):
        names = re.findall(r"GLOBAL ([\w.]+)", str(err))[:1]
    return "found: " + ", ".join(names) if names else "objects torch's weights-only loader blocks"


def _state_dict_from(obj: object, path: Path) -> dict[str, Tensor]:
    for _ in range(len(_NESTING_KEYS) + 1):  # nestings such as {"state_dict": {"model": sd}}
        if not isinstance(obj, Mapping):
            break
        key = next((k for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}, not a state dict of tensors "
            f"(looked inside the keys {', '.join(map(repr, _NESTING_KEYS))}); save model.state_dict()"
        )
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise CheckpointError(
            f"{path} is not a state dict of tensors: {len(bad)} entries are not tensors, e.g. "
            f"{', '.join(bad[:_SHOW])}; if the weights are nested under another key, re-save them alone"
        )
    sd = {str(k): v for k, v in obj.items()}
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k.removeprefix(prefix): v for k, v in sd.items()}
                stripped = True
    return sd


def nonfinite_tensors(state_dict: Mapping[str, Tensor]) -> list[str]:
    """Names of the floating-point tensors holding NaN or inf (a diverged or damaged model)."""
    return [k for k, v in state_dict.items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def name_list(names: list[str], show: int = 5) -> str:
    """The first ``show`` names, then how many more: for messages about many tensors."""
    return ", ".join(names[:show]) + (f" and {len(names) - show} more" if len(names) > show else "")


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str) -> None:
    """Strictly load ``state_dict`` into ``model``, explaining any mismatch.

    ``source`` names where the weights came from (a path, a torchvision enum) for the error message.
    BatchNorm ``num_batches_tracked`` counters may be absent (pre-0.4.1 checkpoints); the model's own
    values are kept then. Everything else must match in name and shape.

    Raises:
        CheckpointError: missing keys, unexpected keys or shape mismatches (first few of each, with
            counts), naming ``source``, the architecture, and architectures whose keys do match.
    """
    expected = model.state_dict()
    sd = dict(state_dict)
    for k, v in expected.items():
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = v
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointError(_mismatch_message(model, source, sd, missing, unexpected, mismatched))
    model.load_state_dict(sd, strict=True)
    log.info("loaded %d tensors from %s into %s", len(sd), source, _arch_of(model))


def _arch_of(model: nn.Module) -> str:
    name = getattr(model, ARCH_ATTR, None) or type(model).__name__
    return f"{name}, {count_parameters(model):,} parameters"


def _listing(title: str, items: list[str]) -> str:
    more = f", ... (+{len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return f"\n  {title} ({len(items)}): {', '.join(items[:_SHOW])}{more}"


def _mismatch_message(
    model: nn.Module,
    source: str,
    sd: Mapping[str, Tensor],
    missing: list[str],
    unexpected: list[str],
    mismatched: list[str],
) -> str:
    msg = f"Weights from {source} do not fit the model ({_arch_of(model)}):"
    for title, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatches", mismatched),
    ):
        if items:
            msg += _listing(title, items)
    fits = matching_architectures(sd)
    if fits:
        msg += f"\nThe checkpoint's parameter names match: {', '.join(fits)}."
    if mismatched and not (missing or unexpected):
        msg += "\nOnly shapes differ: check num_classes (the classifier's output size) as well."
    return (
        msg + "\nCheck teacher.arch in params.yaml against the architecture the checkpoint was trained with."
    )


def matching_architectures(state_dict: Mapping[str, Tensor]) -> list[str]:
    """Registry names whose parameter/buffer names equal those of ``state_dict`` (BN counters ignored).

    Models are built on the meta device, so this allocates no memory and takes milliseconds per model.
    """

    wanted = _param_names(state_dict)
    fits = []
    with torch.device("meta"):
        for arch in MODEL_NAMES:
            if _param_names(build_model(arch, num_classes=10).state_dict()) == wanted:
                fits.append(arch)
    return fits


def _param_names(keys: Iterable[str]) -> frozenset[str]:
    return frozenset(k for k in keys if not k.endswith("num_batches_tracked"))


def torchvision_weights(arch: str, enum_name: str) -> dict[str, Tensor]:
    """The state dict of torchvision's pretrained ``enum_name`` for ``arch``, from the local hub cache only.

    ``enum_name`` is e.g. ``"ResNet34_Weights.IMAGENET1K_V1"`` (or just ``"IMAGENET1K_V1"`` / ``"DEFAULT"``).
    Machines are offline, so nothing is downloaded: the file must already be at
    ``$TORCH_HOME/hub/checkpoints/<file name of the weights URL>``, and its hash prefix is verified.

    Raises:
        CheckpointError: unknown architecture or weights name, file not in the cache, or corrupt file.
    """
    try:
        enum_cls = torchvision.models.get_model_weights(arch)
    except ValueError as err:
        raise CheckpointError(
            f"torchvision has no pretrained weights for architecture {arch!r}: {err}"
        ) from err
    cls_name, _, member = enum_name.rpartition(".")
    valid = ", ".join(f"{enum_cls.__name__}.{m}" for m in enum_cls.__members__)
    if (cls_name and cls_name != enum_cls.__name__) or member not in enum_cls.__members__:
        raise CheckpointError(f"{enum_name!r} are not torchvision weights for {arch!r}; valid: {valid}")
    weights = enum_cls[member]
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
    if not file.is_file():
        raise CheckpointError(
            f"Pretrained weights {weights} for {arch} are not in the local torch hub cache: expected {file}. "
            f"This machine is offline, so they are never downloaded here: fetch {weights.url} on a "
            f"connected machine and copy it to {file} (or point TORCH_HOME at a cache that has it)."
        )
    _verify_hub_hash(file)
    return load_checkpoint(file)


def _verify_hub_hash(file: Path) -> None:
    """torch.hub file names carry a sha256 prefix (``resnet34-b627a593.pth``); a partial copy fails it."""
    match = re.search(r"-([a-f0-9]{6,})\.", file.name)
    if match is None:
        return
    digest = hashlib.sha256()
    with file.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if not digest.hexdigest().startswith(match.group(1)):
        raise CheckpointError(
            f"{file} is corrupt or incomplete: its sha256 {digest.hexdigest()[:12]}... does not start with "
            f"{match.group(1)} as its name says; copy the file again"
        )
