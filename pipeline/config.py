"""Typed, validated configuration built from the sections of ``params.yaml``.

Each params section has one frozen dataclass. ``from_params`` rejects unknown keys (with the
allowed list and a did-you-mean), wrong types and out-of-range values, naming the key, so a typo
in ``params.yaml`` fails before any work starts instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

import yaml

from pipeline.errors import UserError


class ConfigError(UserError, ValueError):
    """A params.yaml value is missing, unknown, of the wrong type or out of range."""


def _opt(default: Any = None, *, choices: tuple | None = None, lo: float | None = None,
         hi: float | None = None, doc: str = "") -> Any:
    return field(default=default, metadata={"choices": choices, "lo": lo, "hi": hi, "doc": doc})


def _check_type(section: str, key: str, value: Any, annotation: Any) -> Any:
    """Return ``value`` coerced to ``annotation`` (int -> float only) or raise ConfigError."""
    where = f"params.yaml {section}.{key}"
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check_type(section, key, value, inner[0])
    if origin is list or origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(annotation)[:1]
        return tuple(_check_type(section, key, v, item) for v in value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            # NaN passes every min/max comparison and .inf turns a schedule into a constant.
            raise ConfigError(f"{where}: {value!r} is not a finite number; write a plain number.")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise AssertionError(f"unsupported annotation {annotation} for {where}")


class Section:
    """Mixin: build a frozen dataclass from one params.yaml section with validation."""

    SECTION: ClassVar[str] = ""
    # Keys that existed once: a clear migration message instead of "unknown key".
    RETIRED: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_params(cls, values: dict[str, Any] | None) -> Self:
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"params.yaml {cls.SECTION}: expected a mapping of keys to values, got "
                              f"{type(values).__name__} {values!r}; write it as '{cls.SECTION}:' followed by "
                              "indented 'key: value' lines.")
        values = dict(values or {})
        bad = [k for k in values if not isinstance(k, str)]
        if bad:
            raise ConfigError(f"params.yaml {cls.SECTION}: key {bad[0]!r} is not a name; keys are words "
                              f"such as {', '.join(f.name for f in dataclasses.fields(cls)[:3])}.")  # type: ignore[arg-type]
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        retired = cls.RETIRED.keys() & values.keys()
        if retired:
            key = sorted(retired)[0]
            raise ConfigError(f"params.yaml {cls.SECTION}.{key}: {cls.RETIRED[key]}")
        unknown = sorted(set(values) - set(fields))
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"params.yaml {cls.SECTION}.{key}: unknown key.{hint} "
                f"Allowed keys in '{cls.SECTION}': {', '.join(sorted(fields))}."
            )
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in values.items():
            value = _check_type(cls.SECTION, name, value, hints[name])
            meta = fields[name].metadata
            _check_range(cls.SECTION, name, value, meta)
            kwargs[name] = value
        obj = cls(**kwargs)
        obj.validate()
        return obj

    def validate(self) -> None:
        """Cross-field checks; subclasses extend."""

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]


def _check_range(section: str, key: str, value: Any, meta: Any) -> None:
    if value is None:
        return
    where = f"params.yaml {section}.{key}"
    choices = meta.get("choices")
    items = value if isinstance(value, tuple) else (value,)
    for item in items if choices else ():
        if item not in choices:
            close = difflib.get_close_matches(str(item), [str(c) for c in choices], n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: {item!r} is not one of {', '.join(map(str, choices))}.{hint}")
    lo, hi = meta.get("lo"), meta.get("hi")
    for item in items:
        if isinstance(item, int | float) and not isinstance(item, bool):
            if lo is not None and item < lo:
                raise ConfigError(f"{where}: {item!r} is below the minimum {lo}.")
            if hi is not None and item > hi:
                raise ConfigError(f"{where}: {item!r} is above the maximum {hi}.")


DATA_SOURCES = ("digits", "cifar10", "cifar100", "folder", "imagenet")
RECIPES = ("digits", "cifar", "imagenet")
CODECS = ("fp32", "fp16", "int8", "topk")
LOSS_NAMES = ("ce", "kd", "dkd", "nkd", "dist", "aekt")
DISTILL_LOSSES = LOSS_NAMES[1:]


# Upper bounds on sizes: far above any real run, low enough that a typo (an extra 000) fails at once
# instead of allocating until the machine swaps. Data-dependent bounds (a batch larger than the
# split) are checked where the data is known.
MAX_SAMPLES = 100_000_000   # samples per batch / shard / class: ImageNet-21k has 14M
MAX_EPOCHS = 100_000
MAX_WORKERS = 1024
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class DataConfig(Section):
    SECTION: ClassVar[str] = "data"
    # digits is bundled with scikit-learn, so the default pipeline runs offline anywhere.
    source: str = _opt("digits", choices=DATA_SOURCES)
    # Dataset name: names the manifest (manifests/<name>.json) and the cache store in dvc.yaml.
    name: str = "digits"
    # Directory (cifar pickles, ImageFolder tree) or .tar of an ImageFolder tree; unused for digits.
    root: str | None = None
    download: bool = False  # cifar10/cifar100 only: let torchvision fetch the official release.
    # Samples per shard; one shard is one Zarr chunk row of the cache, so it sets I/O granularity.
    shard_size: int = _opt(128, lo=1, hi=MAX_SAMPLES)
    test_fraction: float = _opt(0.25, lo=0.01, hi=0.9)  # digits: stratified held-out share
    split_seed: int = _opt(0, lo=0, hi=MAX_SEED)
    max_per_class: int | None = _opt(None, lo=1, hi=MAX_SAMPLES)  # keep the first N samples of each class per split
    on_corrupt: str = _opt("fail", choices=("fail", "skip"))
    workers: int = _opt(0, lo=0, hi=MAX_WORKERS)  # processes encoding shards in parallel (0 = in-process)
    # How shards hold pixels: "encoded" keeps JPEG/PNG bytes (any image size; what ImageNet needs),
    # "raw" stores decoded uint8 pixels as .npy members (one image size per dataset; reading is a
    # copy, not a decode: the fast path for digits and CIFAR). Both give the model the same pixels.
    format: str = _opt("encoded", choices=("encoded", "raw"))

    def validate(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.name):
            raise ConfigError(f"params.yaml data.name: {self.name!r} names files and folders "
                              "(manifests/<name>.json, data/shards/<name>/); use letters, digits, '_', '-' "
                              "and '.', starting with a letter or digit.")
        if self.source in ("folder", "imagenet") and not self.root:
            raise ConfigError(f"params.yaml data.root: required for data.source={self.source!r} "
                              "(an ImageFolder directory or a .tar of one).")
        if self.source in ("cifar10", "cifar100") and not self.root and not self.download:
            raise ConfigError(f"params.yaml data.root: required for data.source={self.source!r} "
                              "unless data.download is true.")


@dataclass(frozen=True)
class AugmentConfig(Section):
    SECTION: ClassVar[str] = "augment"
    recipe: str = _opt("digits", choices=RECIPES)
    seed: int = _opt(0, lo=0, hi=MAX_SEED)
    # Views cached per sample; stage 2 epoch e uses view e mod V by default.
    views: int = _opt(8, lo=1, hi=1000)
    # Output side for the imagenet recipe (RandomResizedCrop size); ignored by fixed-size recipes.
    size: int = _opt(224, lo=8, hi=4096)


@dataclass(frozen=True)
class ScheduleConfig(Section):
    """Optimiser and schedule fields shared by the teacher and student trainers.

    Every field is an explicit key of params.yaml (no hidden recipe presets), so `dvc exp run -S
    train.lr=…` sweeps it, `dvc params diff` shows it and the model card records it.
    """

    epochs: int = _opt(30, lo=1, hi=MAX_EPOCHS)
    batch_size: int = _opt(64, lo=1, hi=MAX_SAMPLES)
    lr: float = _opt(0.05, lo=0.0)
    momentum: float = _opt(0.9, lo=0.0, hi=1.0)
    weight_decay: float = _opt(5e-4, lo=0.0, hi=1.0)
    lr_schedule: str = _opt("multistep", choices=("multistep", "cosine", "constant"))
    # Fractions of the run (0..1) at which multistep multiplies the lr by lr_gamma; fractions scale
    # with `epochs`, so a short run keeps the recipe's shape (240ep: 150/180/210 = .625/.75/.875).
    milestones: tuple[float, ...] = _opt((0.625, 0.75, 0.875), lo=0.0, hi=1.0)
    lr_gamma: float = _opt(0.1, lo=0.0, hi=1.0)
    # Linear lr warm-up from 0 over the first lr_warmup_epochs (fractional allowed), then the
    # schedule; large-batch ImageNet recipes use ~5. 0 = off.
    lr_warmup_epochs: float = _opt(0.0, lo=0.0, hi=MAX_EPOCHS)
    no_decay_norm_bias: bool = False  # exclude norm weights and biases from weight decay
    seed: int = _opt(0, lo=0, hi=MAX_SEED)
    workers: int = _opt(0, lo=0, hi=MAX_WORKERS)  # DataLoader workers per process
    mixed_precision: str = _opt("no", choices=("no", "bf16", "fp16"))
    grad_accum: int = _opt(1, lo=1, hi=10_000)

    def validate(self) -> None:
        if self.lr_warmup_epochs > self.epochs:
            raise ConfigError(f"params.yaml {self.SECTION}.lr_warmup_epochs ({self.lr_warmup_epochs}) exceeds "
                              f"{self.SECTION}.epochs ({self.epochs}): the lr would never reach its value; "
                              "shorten the warm-up.")
        if list(self.milestones) != sorted(self.milestones):
            raise ConfigError(f"params.yaml {self.SECTION}.milestones: {list(self.milestones)} must be in "
                              "increasing order (fractions of the run).")


@dataclass(frozen=True)
class TeacherConfig(ScheduleConfig):
    SECTION: ClassVar[str] = "teacher"
    arch: str = "digits_cnn"
    # Import this checkpoint instead of training (a path, or a torchvision weights enum name).
    checkpoint: str | None = None
    # With a checkpoint: fine-tune it on the training shards for `epochs` epochs with this section's
    # schedule (lr, lr_schedule, weight_decay, ...) instead of using it as imported.
    finetune: bool = False

    def validate(self) -> None:
        super().validate()
        if self.finetune and not self.checkpoint:
            raise ConfigError("params.yaml teacher.finetune: true needs teacher.checkpoint (the weights to "
                              "fine-tune); set the checkpoint, or set finetune: false to train from scratch.")


@dataclass(frozen=True)
class StudentConfig(Section):
    SECTION: ClassVar[str] = "student"
    arch: str = "digits_mlp"


@dataclass(frozen=True)
class CacheConfig(Section):
    SECTION: ClassVar[str] = "cache"
    codec: str = _opt("fp16", choices=CODECS)
    topk: int = _opt(20, lo=1, hi=100_000)  # k for the topk codec
    compressor: str = _opt("zstd", choices=("zstd", "lz4", "none"))
    clevel: int = _opt(3, lo=0, hi=9)
    batch_size: int = _opt(256, lo=1, hi=MAX_SAMPLES)  # teacher inference batch (within one shard)
    mixed_precision: str = _opt("no", choices=("no", "bf16", "fp16"))
    workers: int = _opt(0, lo=0, hi=MAX_WORKERS)  # DataLoader workers decoding + augmenting shards


@dataclass(frozen=True)
class LossConfig(Section):
    SECTION: ClassVar[str] = "loss"
    name: str = _opt("aekt", choices=LOSS_NAMES)
    tau: float = _opt(4.0, lo=0.05, hi=100.0)
    ce_weight: float = _opt(1.0, lo=0.0, hi=1e6)  # weight of CE on z_cls
    kd_weight: float = _opt(1.0, lo=0.0, hi=1e6)  # KD only: weight of the KD term (recipe: CE .1, KD .9)
    alpha: float = _opt(1.0, lo=0.0, hi=1e6)  # DKD/AEKT: explicit (target-class) term weight
    beta: float = _opt(8.0, lo=0.0, hi=1e6)  # DKD/AEKT only: NCKD weight
    gamma: float = _opt(1.0, lo=0.0, hi=1e6)  # NKD only: non-target weight
    # DIST has its own weights, so `loss.name=dist` never inherits DKD's beta = 8: the DIST paper's
    # CIFAR-100 setting is inter = intra = 2 at tau 4 (ImageNet: 1 and 1 at tau 1).
    dist_beta: float = _opt(2.0, lo=0.0, hi=1e6)  # DIST: inter-class (per-sample) weight
    dist_gamma: float = _opt(2.0, lo=0.0, hi=1e6)  # DIST: intra-class (per-class) weight
    adaptive: str = _opt("ratio", choices=("ratio", "none"))
    explicit: str = _opt("binary_kl", choices=("binary_kl", "nkd"))
    head: str = _opt("serial", choices=("serial", "parallel", "none"))
    w_min: float = _opt(0.0, lo=0.0, hi=1e6)
    w_max: float = _opt(10.0, lo=0.0, hi=1e6)
    # Linear warm-up of the distillation weight, lambda(e) = min(1, e / warmup_epochs); 0 = off.
    warmup_epochs: float = _opt(20.0, lo=0.0, hi=MAX_EPOCHS)
    # The losses the warm-up applies to: DKD's published recipe and AEKT have one; KD, NKD and DIST
    # do not, so by default they train at full distillation weight from epoch 1.
    warmup_losses: tuple[str, ...] = _opt(("dkd", "aekt"), choices=DISTILL_LOSSES)
    # The serial head FC_TS acts on logits (|z| ~ 10): at the body's lr it diverges, so it gets
    # its own. Only FC_TS: the parallel head reads features and trains at the body's lr.
    head_lr_scale: float = _opt(0.01, lo=0.0, hi=1e3)

    @property
    def effective_head(self) -> str:
        """The head actually built: the serialization head is part of AEKT; baselines have none."""
        return self.head if self.name == "aekt" else "none"

    def uses_warmup(self) -> bool:
        return self.name != "ce" and self.name in self.warmup_losses and self.warmup_epochs > 0

    def validate(self) -> None:
        if self.w_min > self.w_max:
            raise ConfigError(f"params.yaml loss.w_min ({self.w_min}) must not exceed loss.w_max "
                              f"({self.w_max}).")


# What `train.recipe` named once, now written out in full (presets/*.yaml carry the CIFAR and
# ImageNet ones; params.yaml the digits one). Kept here only for the migration message.
_RECIPE_GONE = ("was removed: every training hyperparameter is now an explicit key of 'train' "
                "(epochs, batch_size, lr, momentum, weight_decay, lr_schedule, milestones, lr_gamma, "
                "lr_warmup_epochs). Delete train.recipe and write its values out; presets/cifar10.yaml "
                "(cifar_240ep) and presets/imagenet.yaml (imagenet_100ep) show them in full.")


@dataclass(frozen=True)
class TrainConfig(ScheduleConfig):
    SECTION: ClassVar[str] = "train"
    RETIRED: ClassVar[dict[str, str]] = {"recipe": _RECIPE_GONE}
    # Defaults: the digits schedule of the embedded default pipeline (params.yaml writes them out).
    epochs: int = _opt(40, lo=1, hi=MAX_EPOCHS)
    lr: float = _opt(0.01, lo=0.0)
    lr_schedule: str = _opt("cosine", choices=("multistep", "cosine", "constant"))
    view_policy: str = _opt("cycle", choices=("cycle", "random"))
    teacher: str = _opt("cached", choices=("cached", "online"))
    checkpoint_every: int = _opt(0, lo=0, hi=MAX_EPOCHS)  # epochs between resumable checkpoints (0 = none)
    # torch.compile the loss (pipeline.losses.compiled_loss_terms): on a GPU it fuses the loss's
    # ~100 tiny ops into a few kernels; costs a one-off compile (tens of seconds, cached on disk).
    compile_loss: bool = False


@dataclass(frozen=True)
class EvalConfig(Section):
    SECTION: ClassVar[str] = "eval"
    batch_size: int = _opt(256, lo=1, hi=MAX_SAMPLES)
    top_k: int = _opt(5, lo=1, hi=100_000)
    # auto: the GPU when there is one (ImageNet val is 50k full-size images), else the CPU.
    device: str = _opt("auto", choices=("auto", "cpu", "cuda"))
    workers: int = _opt(0, lo=0, hi=MAX_WORKERS)  # DataLoader processes decoding the test shards


SECTIONS: dict[str, type[Section]] = {
    "data": DataConfig, "augment": AugmentConfig, "teacher": TeacherConfig, "cache": CacheConfig,
    "student": StudentConfig, "loss": LossConfig, "train": TrainConfig, "eval": EvalConfig,
}


class ParamsLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans (only true/false), as DVC reads params.yaml.

    `dvc exp run -S` rewrites params.yaml with a YAML 1.2 writer that drops the quotes of
    ``mixed_precision: "no"``; YAML 1.1 (PyYAML's default) would read the bare ``no`` as false.
    """

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}


ParamsLoader.add_implicit_resolver("tag:yaml.org,2002:bool",
                                   re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _mapping_without_duplicates(loader: ParamsLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    # PyYAML keeps the last of two equal keys silently; a twice-set hyperparameter is a mistake.
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str | int | float | bool) and key is not None:
            raise ConfigError(f"params.yaml line {line}: a key must be a plain name, got "
                              f"{type(key).__name__} {key!r}; write 'name: value'.")
        if key in seen:
            raise ConfigError(f"params.yaml line {line}: key '{key}' is set twice "
                              "in the same section; keep one.")
        seen.add(key)
    return loader.construct_mapping(node)


ParamsLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_without_duplicates)


def _parse_yaml(path: Path) -> Any:
    """The YAML document in ``path``; anything that is not plain YAML text is one ConfigError."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {err.start} is {err.object[err.start]:#04x}); "
                          "params.yaml must be YAML text — restore it with `git checkout -- params.yaml` "
                          "or copy a preset from presets/.") from err
    if "\0" in text:
        raise ConfigError(f"{path}: contains NUL bytes; params.yaml must be YAML text — restore it with "
                          "`git checkout -- params.yaml` or copy a preset from presets/.")
    try:
        return yaml.load(text, Loader=ParamsLoader)
    except yaml.constructor.ConstructorError as err:
        # e.g. `!!python/object` tags: the safe loader refuses them; say so instead of a traceback.
        mark = err.problem_mark
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: {err.problem}; params.yaml holds plain values only (no tags "
                          "such as !!python/...). Remove the tag.") from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}{where}: not valid YAML ({problem}); fix the indentation/quoting there, "
                          "or restore the file with `git checkout -- params.yaml`.") from err


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found. Run from the repository root or pass "
                          "--params PATH.")
    if not path.is_file():
        raise ConfigError(f"{path}: not a regular file; pass the params YAML file with --params PATH.")
    params = _parse_yaml(path) or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (data:, augment:, …), got "
                          f"{type(params).__name__}; see the repository's params.yaml for the layout.")
    bad = [k for k in params if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{path}: section name {bad[0]!r} is not a word; sections are "
                          f"{', '.join(SECTIONS)}.")
    unknown = sorted(set(params) - set(SECTIONS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(SECTIONS), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{path}: unknown section '{unknown[0]}'.{hint} "
                          f"Allowed sections: {', '.join(SECTIONS)}.")
    return params


def section(params: dict[str, Any], name: str) -> Any:
    """Build the validated dataclass for params section ``name``."""
    return SECTIONS[name].from_params(params.get(name))
