"""pipeline.models: the model zoo (names, sizes, heads) and safe, strict checkpoint loading."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import Tensor, nn

from pipeline.models import (
    MODEL_NAMES,
    CheckpointError,
    build_model,
    classifier_of,
    count_parameters,
    load_checkpoint,
    load_weights,
    model_family,
    torchvision_weights,
)
from pipeline.models import checkpoints as checkpoints_module

# Parameter counts published with the CRD / DKD benchmarks (CIFAR-100, 100 classes).
PUBLISHED_PARAMS = {
    "resnet8x4": 1.23e6,
    "resnet32x4": 7.43e6,
    "wrn_40_2": 2.26e6,
    "wrn_16_2": 0.70e6,
    "resnet56": 0.86e6,
    "resnet20": 0.28e6,
    "resnet110": 1.74e6,
    "vgg13": 9.46e6,
    "vgg8": 3.96e6,
    "MobileNetV2": 0.81e6,
    "ShuffleV1": 0.95e6,
    "ShuffleV2": 1.36e6,
}

INPUT_SIDE = {"digits": 8, "cifar": 32, "imagenet": 64}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Batch-2 forwards gain nothing from intra-op threads, and on a shared CI box they oversubscribe
    the cores (measured: 9 s single-threaded vs 20-35 s with default threads under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _build(name: str, num_classes: int = 7) -> nn.Module:
    in_channels = 1 if model_family(name) == "digits" else 3
    return build_model(name, num_classes=num_classes, in_channels=in_channels)


def _trained_looking(name: str, seed: int = 0) -> nn.Module:
    """A model whose BN running statistics differ from the defaults, so a lost buffer shows in outputs."""
    torch.manual_seed(seed)
    model = _build(name)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))
    return model.eval()


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_parameter_count_matches_published(name: str) -> None:
    count = count_parameters(build_model(name, num_classes=100))
    assert count == pytest.approx(PUBLISHED_PARAMS[name], rel=0.02)


# State-dict size and telltale keys of the public CRD / mdistiller checkpoints (checked once against
# their model code): a renamed module would silently break loading the published teachers.
PUBLIC_CHECKPOINT_KEYS = {
    "resnet8x4": (62, ["layer1.0.downsample.0.weight", "layer3.0.downsample.1.running_var", "fc.bias"]),
    "resnet56": (344, ["layer2.0.downsample.0.weight", "layer3.8.bn2.num_batches_tracked", "fc.weight"]),
    "wrn_40_2": (227, ["block1.layer.0.convShortcut.weight", "block3.layer.5.conv2.weight", "bn1.weight"]),
    "vgg13": (72, ["block0.0.bias", "block4.4.running_mean", "classifier.weight"]),
    "MobileNetV2": (320, ["conv1.0.weight", "blocks.6.0.conv.7.weight", "classifier.0.weight"]),
    "ShuffleV1": (296, ["layer1.0.conv1.weight", "layer3.3.bn3.running_var", "linear.weight"]),
    "ShuffleV2": (338, ["layer1.0.conv5.weight", "layer3.3.conv3.weight", "bn2.bias", "linear.weight"]),
}


@pytest.mark.parametrize("name", sorted(PUBLIC_CHECKPOINT_KEYS))
def test_state_dict_names_match_public_checkpoints(name: str) -> None:
    n_keys, keys = PUBLIC_CHECKPOINT_KEYS[name]
    sd = build_model(name, num_classes=100).state_dict()
    assert len(sd) == n_keys
    assert set(keys) <= set(sd)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_returns_logits_ending_in_classifier(name: str) -> None:
    model = _build(name, num_classes=7).eval()
    head = classifier_of(model)
    assert isinstance(head, nn.Linear) and head.out_features == 7
    # ViT's positional embedding fixes its input size; everything else takes small images.
    side = getattr(model, "image_size", INPUT_SIDE[model_family(name)])
    x = torch.randn(2, 1 if model_family(name) == "digits" else 3, side, side)
    seen: dict[str, Tensor] = {}
    handle = head.register_forward_hook(lambda _m, inp, out: seen.update(features=inp[0], logits=out))
    with torch.no_grad():
        logits = model(x)
    handle.remove()
    assert isinstance(logits, Tensor) and logits.shape == (2, 7)
    # The head's output *is* the model's output: a pre-hook on it sees the penultimate features.
    torch.testing.assert_close(seen["logits"], logits)
    assert seen["features"].shape == (2, head.in_features)


def test_model_family_covers_every_name() -> None:
    families = {name: model_family(name) for name in MODEL_NAMES}
    assert families["digits_cnn"] == "digits"
    assert families["resnet32x4"] == "cifar"
    assert families["resnet34"] == "imagenet"
    assert set(families.values()) == {"digits", "cifar", "imagenet"}


@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_rgb_models_reject_other_channel_counts(name: str) -> None:
    with pytest.raises(ValueError, match="in_channels=1"):
        build_model(name, num_classes=10, in_channels=1)


@pytest.mark.parametrize(
    ("typo", "suggestion"), [("resnet32X4", "resnet32x4"), ("mobilenetv2", "MobileNetV2")]
)
def test_unknown_name_lists_valid_names_and_suggests(typo: str, suggestion: str) -> None:
    with pytest.raises(ValueError, match="Unknown model name") as err:
        build_model(typo, num_classes=10)
    msg = str(err.value)
    assert "Did you mean" in msg and repr(suggestion) in msg
    assert "Valid names:" in msg and "wrn_40_2" in msg and "digits_mlp16" in msg
    with pytest.raises(ValueError, match="Unknown model name"):
        model_family(typo)


def test_classifier_of_sees_through_wrappers_and_rejects_headless_models() -> None:
    model = build_model("resnet8", num_classes=10)
    assert classifier_of(nn.DataParallel(model)) is model.fc
    with pytest.raises(TypeError, match="No final Linear"):
        classifier_of(nn.Sequential(nn.Conv2d(3, 3, 1)))


def _nested_model(sd: dict[str, Tensor]) -> object:
    return {"epoch": 240, "model": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}


def _nested_data_parallel(sd: dict[str, Tensor]) -> object:
    return {"state_dict": {f"module.{k}": v for k, v in sd.items()}}


@pytest.mark.parametrize("wrap", [_nested_model, _nested_data_parallel], ids=["model", "state_dict+module"])
def test_checkpoint_round_trip(tmp_path: Path, wrap) -> None:
    source = _trained_looking("resnet8")
    path = tmp_path / "teacher.pth"
    torch.save(wrap(source.state_dict()), path)
    target = build_model("resnet8", num_classes=7).eval()
    load_weights(target, load_checkpoint(path), source=str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(target(x), source(x), rtol=0, atol=0)


def test_safetensors_loads_whatever_its_suffix(tmp_path: Path) -> None:
    sd = build_model("digits_mlp", num_classes=10, in_channels=1).state_dict()
    for name in ("student.safetensors", "student.pt"):
        safetensors.torch.save_file(sd, str(tmp_path / name))
        loaded = load_checkpoint(tmp_path / name)
        assert loaded.keys() == sd.keys()
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_missing_batchnorm_counters_are_tolerated() -> None:
    source = _trained_looking("resnet8")
    sd = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    target = build_model("resnet8", num_classes=7)
    load_weights(target, sd, source="old-checkpoint")
    torch.testing.assert_close(target.bn1.running_mean, source.bn1.running_mean)


def test_wrong_architecture_lists_key_differences_and_the_fitting_arch(tmp_path: Path) -> None:
    path = tmp_path / "resnet20.pth"
    torch.save({"model": build_model("resnet20", num_classes=100).state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        load_weights(build_model("resnet32", num_classes=100), load_checkpoint(path), source=str(path))
    msg = str(err.value)
    assert str(path) in msg and "resnet32" in msg and "teacher.arch" in msg
    assert "missing keys (" in msg and "layer1.3.conv1.weight" in msg
    assert "unexpected keys" not in msg  # resnet20's keys are a subset of resnet32's
    assert "(+" in msg  # long lists are cut, with the count of the rest
    assert "match: resnet20" in msg


def test_wrong_class_count_reports_shapes() -> None:
    sd = build_model("resnet8", num_classes=10).state_dict()
    with pytest.raises(
        CheckpointError, match=r"fc\.weight: checkpoint \(10, 64\) vs model \(100, 64\)"
    ) as err:
        load_weights(build_model("resnet8", num_classes=100), sd, source="ckpt")
    assert "num_classes" in str(err.value)


def test_unexpected_keys_are_listed() -> None:
    sd = dict(build_model("resnet8", num_classes=10).state_dict(), **{"extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=r"unexpected keys \(1\): extra\.weight"):
        load_weights(build_model("resnet8", num_classes=10), sd, source="ckpt")


class _Payload:
    """Unpickling this creates ``marker``: stands in for a checkpoint that runs code when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_pickle_is_refused_without_running_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "teacher.pth"
    sd = build_model("digits_mlp16", num_classes=10, in_channels=1).state_dict()
    torch.save({"model": sd, "extra": _Payload(marker)}, path)
    with pytest.raises(CheckpointError, match="Refusing to load") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    # Sanity check that the payload is live: an unsafe load does create the marker.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_missing_or_unreadable_files_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found.*nope.pth"):
        load_checkpoint(tmp_path / "nope.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        load_checkpoint(garbage)
    not_sd = tmp_path / "list.pth"
    torch.save({"epoch": 3, "best_acc": 0.5}, not_sd)
    with pytest.raises(CheckpointError, match="not a state dict"):
        load_checkpoint(not_sd)


def test_legacy_pickle_format_is_also_guarded(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pth"
    with path.open("wb") as f:
        pickle.dump({"x": _Payload(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match=r"legacy\.pth"):
        load_checkpoint(path)
    assert not marker.exists()


def test_torchvision_weights_come_only_from_the_local_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    with pytest.raises(CheckpointError, match="not in the local torch hub cache") as err:
        torchvision_weights("resnet18", "ResNet18_Weights.IMAGENET1K_V1")
    assert str(expected) in str(err.value) and "download.pytorch.org" in str(err.value)

    with pytest.raises(CheckpointError, match="ResNet18_Weights.IMAGENET1K_V1"):
        torchvision_weights("resnet18", "ResNet34_Weights.IMAGENET1K_V1")

    expected.parent.mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, expected)
    with pytest.raises(CheckpointError, match="corrupt or incomplete"):
        torchvision_weights("resnet18", "IMAGENET1K_V1")

    # A file whose hash matches its name (we cannot forge one) is returned as a state dict.
    monkeypatch.setattr(checkpoints_module, "_verify_hub_hash", lambda _path: None)
    assert torch.equal(torchvision_weights("resnet18", "DEFAULT")["w"], torch.ones(2))
