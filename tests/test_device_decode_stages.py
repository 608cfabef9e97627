"""augment.decode: device wired through stage 1, stage 2 and verify-cache, on real ImageNet JPEGs.

Stage 1 leaves the JPEGs encoded in its DataLoader and decodes + augments each batch on the
teacher's device; the stream leaves them encoded and the trainer decodes each batch on its device.
On the CPU both run torchvision's decoder; the tests check the replay is exact per path, that the
store records where its pixels came from, and that a run decoding elsewhere is refused.
"""

from __future__ import annotations

import dataclasses
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.augment import Normalization
from pipeline.cache.build import expected_provenance
from pipeline.cache.store import LogitStore
from pipeline.cache.verify import verify_cache
from pipeline.cache.writer import ShardSource, write_items
from pipeline.config import AugmentConfig, CacheConfig, DataConfig
from pipeline.data import Manifest, prepare
from pipeline.models import build_model
from pipeline.stream import ShardStream, StreamSpec, batch_images
from pipeline.train import predict

CLASSES, SIZE = 3, 48
# torchvision 0.29 deprecates its decoders for TorchCodec (pipeline/device_decode.py notes the port)
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


@pytest.fixture(scope="module")
def imagenet_tree(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder tree of 15 real ImageNet JPEGs: 3 classes x (4 train + 1 val)."""
    root = tmp_path_factory.mktemp("inet")
    with tarfile.open(shared_data / "imagenet-sample" / "val.tar") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)[:CLASSES * 5]
        for i, member in enumerate(members):
            split, cls = ("val" if i % 5 == 4 else "train"), f"c{i // 5}"
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            (root / split / cls / Path(member.name).name).write_bytes(tar.extractfile(member).read())
    return root


def build(root: Path, tree: Path, decode: str) -> dict:
    cfg = DataConfig(source="folder", name="inet", root=str(tree), shard_size=5, format="encoded")
    manifest = prepare(cfg, shards_dir=root / "shards", manifest_path=root / "m.json", progress=False)
    aug = AugmentConfig(recipe="imagenet", seed=0, views=2, size=SIZE, decode=decode)
    cache = CacheConfig(codec="fp32", batch_size=3)
    torch.manual_seed(0)
    teacher = build_model("resnet18", num_classes=manifest.num_classes).eval()
    card = {"arch": "resnet18", "num_classes": manifest.num_classes, "sha256": "0" * 64,
            "input_norm": Normalization.of_recipe("imagenet").to_dict()}
    prov = expected_provenance(manifest, card, cache, aug, "cpu")
    store = LogitStore.create(root / "store.zarr", prov, compressor=cache.compressor, clevel=cache.clevel)
    items = [(v, s) for v in range(2) for s in range(len(manifest.splits["train"].shards))]
    write_items(store, ShardSource(manifest, root / "shards"), teacher, items, cache, aug,
                norm=Normalization.from_card(card), device=torch.device("cpu"), progress=False)
    return {"manifest": manifest, "aug": aug, "cache": cache, "teacher": teacher, "card": card, "root": root}


@pytest.fixture(scope="module")
def built(imagenet_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    return {d: build(tmp_path_factory.mktemp(d), imagenet_tree, d) for d in ("pil", "device")}


def test_the_store_records_where_its_pixels_came_from(built: dict[str, dict]) -> None:
    assert LogitStore.open(built["device"]["root"] / "store.zarr").provenance.pixel_source == "device-cpu"
    assert LogitStore.open(built["pil"]["root"] / "store.zarr").provenance.pixel_source == "pil"
    b = built["device"]
    cuda = expected_provenance(b["manifest"], b["card"], b["cache"], b["aug"], "cuda")
    diff = LogitStore.open(b["root"] / "store.zarr").provenance.mismatches(cuda)
    assert diff == ["pixel_source: store has 'device-cpu', inputs give 'device-cuda'"]  # stage 2 refuses
    raw = dataclasses.replace(b["manifest"], image_format="raw")
    assert expected_provenance(raw, b["card"], b["cache"], b["aug"], "cuda").pixel_source == "pil"


def test_on_cpu_both_paths_give_the_same_cache(built: dict[str, dict]) -> None:
    """torchvision's CPU decoder and PIL share libjpeg-turbo (pipeline/device_decode.py measures it)."""
    a = LogitStore.open(built["pil"]["root"] / "store.zarr").group
    b = LogitStore.open(built["device"]["root"] / "store.zarr").group
    for name in ("logits", "params", "done"):
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)


@pytest.mark.parametrize("decode", ["pil", "device"])
def test_stage2_replays_the_views_stage1_decoded(built: dict[str, dict], decode: str) -> None:
    b = built[decode]
    root, manifest = b["root"], b["manifest"]
    spec = StreamSpec(manifest_path=root / "m.json", shards_dir=root / "shards", split="train", recipe="imagenet",
                      image_size=SIZE, aug_seed=0, views=2, store_path=root / "store.zarr", batch_augment=True,
                      decode=decode)
    for epoch in (1, 2):  # views 1 and 0
        for batch in ShardStream(spec, epoch=epoch).batched(4):
            assert isinstance(batch["image"], list) == (decode == "device")  # left encoded for the device
            images = batch_images(batch, spec, channels=manifest.channels, device=torch.device("cpu"))
            assert images.shape[1:] == (3, SIZE, SIZE)
            with torch.no_grad():
                fresh = b["teacher"](Normalization.from_card(b["card"])(images))
            torch.testing.assert_close(fresh, batch["teacher"], rtol=1e-4, atol=1e-4)


def test_eval_stream_decodes_on_the_device_too(built: dict[str, dict]) -> None:
    outs = []
    for decode in ("pil", "device"):
        root = built[decode]["root"]
        spec = StreamSpec(manifest_path=root / "m.json", shards_dir=root / "shards", split="test", recipe="imagenet",
                          image_size=SIZE, aug_seed=0, views=1, train=False, decode=decode)
        logits, labels = predict(built[decode]["teacher"], ShardStream(spec), device=torch.device("cpu"),
                                 batch_size=2, norm=Normalization.of_recipe("imagenet"))
        outs.append(logits)
        assert labels.tolist() == [0, 1, 2]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_verify_cache_replays_a_device_decoded_store(built: dict[str, dict], tmp_path: Path) -> None:
    b = built["device"]
    root = b["root"]
    weights = tmp_path / "teacher.safetensors"
    from pipeline.artifacts import save_model

    card = b["card"] | {"in_channels": 3, "classes": list(b["manifest"].classes), "recipe": "imagenet",
                        "dataset": "inet", "manifest_sha256": Manifest.load(root / "m.json").sha256}
    card["sha256"] = save_model(b["teacher"], weights, card)["sha256"]
    store = LogitStore.open(root / "store.zarr", mode="r+")
    prov = dataclasses.replace(store.provenance, teacher_sha256=card["sha256"])
    store.group.attrs["provenance"] = dataclasses.asdict(prov)  # the saved file's hash, as stage 1 records it
    report = verify_cache(store_path=root / "store.zarr", manifest_path=root / "m.json", shards_dir=root / "shards",
                          teacher_path=weights, cfg=b["cache"], aug=b["aug"], samples=16)
    assert report["ok"], report["failures"]
    assert report["params_replayable"] and report["max_abs_logit_error"] < 1e-4
