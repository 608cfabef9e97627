"""Stage 2 trainer: schedules, cached == online on a lossless cache, 2 ranks, exact resume."""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline import augment
from pipeline.artifacts import load_model
from pipeline.config import ScheduleConfig, load_params, section
from pipeline.data import Manifest
from pipeline.losses import compute_loss
from pipeline.stream import ShardStream, StreamSpec
from pipeline.student import build_student
from pipeline.train import lr_at
from tests.conftest import free_port, run

STUDENT = ["student", "--manifest", "manifest.json", "--shards-dir", "shards", "--teacher",
           "teacher.safetensors", "--store", "store.zarr", "--out", "student.safetensors", "--metrics",
           "student-metrics.json", "--history", "train.csv", "--checkpoints", "ckpt", "--no-progress"]


def test_lr_schedules_are_pure_functions_of_progress() -> None:
    multistep = ScheduleConfig(lr_schedule="multistep", milestones=(0.5, 0.75), lr_gamma=0.1)
    assert [lr_at(p, multistep) for p in (0.0, 0.49, 0.5, 0.8)] == pytest.approx([1, 1, 0.1, 0.01])
    cosine = ScheduleConfig(lr_schedule="cosine")
    assert lr_at(0.0, cosine) == 1.0 and lr_at(0.5, cosine) == pytest.approx(0.5) and lr_at(1.0, cosine) == 0


def test_lr_warmup_ramps_linearly_then_follows_the_schedule() -> None:
    warm = ScheduleConfig(epochs=10, lr_schedule="multistep", milestones=(0.5,), lr_gamma=0.1, lr_warmup_epochs=2)
    # progress 0.1 = epoch 1 of a 2-epoch warm-up: half the lr; from 0.2 on the schedule alone.
    assert [lr_at(p, warm) for p in (0.0, 0.1, 0.2, 0.4, 0.6)] == pytest.approx([0, 0.5, 1, 1, 0.1])
    constant = ScheduleConfig(epochs=4, lr_schedule="constant", lr_warmup_epochs=1)
    assert lr_at(0.125, constant) == pytest.approx(0.5) and lr_at(0.9, constant) == 1.0


def test_cached_and_online_teacher_give_the_same_loss(tiny_pipeline: Path) -> None:
    params = load_params(tiny_pipeline / "params.yaml")
    loss = section(params, "loss")
    manifest = Manifest.load(tiny_pipeline / "manifest.json")
    teacher, _ = load_model(tiny_pipeline / "teacher.safetensors")
    teacher.eval()
    student = build_student("digits_mlp", manifest, loss, seed=0)
    base = dict(manifest_path=tiny_pipeline / "manifest.json", shards_dir=tiny_pipeline / "shards",
                split="train", recipe="digits", image_size=224, aug_seed=0, views=2)
    cached = list(ShardStream(StreamSpec(store_path=tiny_pipeline / "store.zarr", **base), epoch=1))[:64]
    online = list(ShardStream(StreamSpec(store_path=None, **base), epoch=1))[:64]
    images = torch.stack([it["image"] for it in cached])
    assert torch.equal(images, torch.stack([it["image"] for it in online]))
    x = augment.normalize(images, "digits")
    y = torch.tensor([it["label"] for it in cached])
    z_cls, z_kd = student(x)
    with torch.no_grad():
        fresh = teacher(x)
    stored = torch.stack([it["teacher"] for it in cached])
    out_cached = compute_loss(loss, z_cls=z_cls, z_kd=z_kd, teacher_logits=stored, targets=y, warmup=1.0)
    out_online = compute_loss(loss, z_cls=z_cls, z_kd=z_kd, teacher_logits=fresh, targets=y, warmup=1.0)
    for name in out_cached.terms:
        torch.testing.assert_close(out_cached.terms[name], out_online.terms[name], rtol=1e-5, atol=1e-6)


def copy_for_student(src: Path, dest: Path, **train: object) -> Path:
    shutil.copytree(src, dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["train"].update(train)
    (dest / "params.yaml").write_text(yaml.safe_dump(params))
    return dest


def history(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_two_ranks_see_every_sample_once(tiny_any: Path, tmp_path: Path) -> None:
    work = copy_for_student(tiny_any, tmp_path / "w")
    run(["torchrun", "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                "-m", "stages.cli", *STUDENT], work)
    rows = history(work / "train.csv")
    assert [int(r["samples"]) for r in rows] == [200, 200, 200]  # both ranks together, per epoch
    assert (work / "student.safetensors").exists()


def test_resume_reaches_the_same_weights(tiny_any: Path, tmp_path: Path) -> None:
    work = copy_for_student(tiny_any, tmp_path / "w", checkpoint_every=1)
    aekt = [sys.executable, "-m", "stages.cli"]
    run([*aekt, *STUDENT], work)
    uninterrupted = load_file(str(work / "student.safetensors"))
    # As if the run had died during epoch 3: drop its checkpoint and resume from epoch 2.
    assert sorted(p.name for p in (work / "ckpt").glob("epoch-*")) == ["epoch-0002", "epoch-0003"]
    shutil.rmtree(work / "ckpt" / "epoch-0003")
    (work / "student.safetensors").unlink()
    out = run([*aekt, *STUDENT, "--resume"], work)
    assert "resumed from" in out.stderr
    resumed = load_file(str(work / "student.safetensors"))
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key
    assert [r["epoch"] for r in history(work / "train.csv")] == ["1", "2", "3"]


def test_term_grad_norms_match_the_closed_form_for_ce() -> None:
    from pipeline.train_checks import term_grad_norms

    z = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    ce = torch.nn.functional.cross_entropy(z, y)
    expected = ((torch.softmax(z, 1) - torch.nn.functional.one_hot(y, 5)) / 8).norm().detach()
    norms = term_grad_norms({"ce": ce, "const": torch.tensor(1.0)}, (z, z))
    assert list(norms) == ["grad/ce"] and float(norms["grad/ce"].detach()) == pytest.approx(float(expected))


def test_a_diverging_run_stops_with_a_clear_error(tiny_pipeline: Path, tmp_path: Path) -> None:
    work = copy_for_student(tiny_pipeline, tmp_path / "w", lr=1.0e30)
    proc = run([sys.executable, "-m", "stages.cli", *STUDENT], work, check=False)
    assert proc.returncode != 0
    assert "loss became non-finite" in proc.stderr and "lower train.lr" in proc.stderr
    assert not (work / "student.safetensors").exists()


def test_probe_on_detached_logits_gives_each_terms_gradient_at_its_logits() -> None:
    """The per-term gradient probe recomputes the loss at detached logits: CE's gradient at z_cls,
    each distillation term's at z_kd (not also through the head back to z_cls), equal to autograd
    on the training graph; the graph itself is left untouched for the step's one backward."""
    from pipeline.config import LossConfig
    from pipeline.train_checks import probe_term_grads

    g = torch.Generator().manual_seed(0)
    z_cls = torch.randn(16, 10, generator=g, requires_grad=True)
    z_kd = 2 * z_cls  # a head's output: depends on z_cls
    teacher, y = 3 * torch.randn(16, 10, generator=g), torch.randint(0, 10, (16,), generator=g)
    cfg = LossConfig(name="aekt")
    out = compute_loss(cfg, z_cls=z_cls, z_kd=z_kd, teacher_logits=teacher, targets=y, warmup=0.5)
    probed = probe_term_grads(cfg, z_cls, z_kd, teacher, y, 0.5)
    assert probed.keys() == {"grad/ce", "grad/explicit", "grad/implicit"}
    for name, at in (("ce", z_cls), ("explicit", z_kd), ("implicit", z_kd)):
        (expected,) = torch.autograd.grad(out.terms[name], at, retain_graph=True)
        torch.testing.assert_close(probed[f"grad/{name}"], expected.norm())
    out.total.backward()  # the step's own backward still runs, once
    assert z_cls.grad is not None


def test_student_with_compiled_loss_trains_and_probes(tiny_pipeline: Path, tmp_path: Path) -> None:
    """train.compile_loss through the real student stage: the compiled loss's backward (which
    cannot run twice) and the per-term gradient probe coexist; the run writes finite terms and
    probes. On CPU this compiles with inductor's C++ backend (tens of seconds, once)."""
    work = copy_for_student(tiny_pipeline, tmp_path / "w", compile_loss=True, epochs=1)
    run([sys.executable, "-m", "stages.cli", *STUDENT], work)
    (row,) = history(work / "train.csv")
    for key in ("loss_explicit", "loss_implicit", "grad_explicit", "grad_implicit", "stat_w_mean"):
        assert float(row[key]) == float(row[key]) and float(row[key]) > 0, key  # finite, not NaN
    assert (work / "student.safetensors").exists()


@pytest.mark.parametrize("name,expected", [("dkd", [0.5, 1.0, 1.0]), ("kd", [1.0, 1.0, 1.0])])
def test_trainer_passes_one_based_epochs_to_the_warmup(tiny_pipeline: Path, tmp_path: Path, name: str,
                                                       expected: list[float]) -> None:
    """λ(e) = min(1, e / warmup_epochs) with e counted from 1: with a 2-epoch warm-up the first epoch
    trains at 0.5 (a 0-based count would give 0, i.e. an epoch of plain CE), and KD, whose recipe
    has no warm-up, trains at 1 from the start."""
    work = copy_for_student(tiny_pipeline, tmp_path / "w")
    params = yaml.safe_load((work / "params.yaml").read_text())
    params["loss"].update(name=name, warmup_epochs=2)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    run([sys.executable, "-m", "stages.cli", *STUDENT], work)
    assert [float(r["stat_warmup"]) for r in history(work / "train.csv")] == expected


class RecordingSGD(torch.optim.SGD):
    """SGD that records, after every step, the lr it used and the weights it left."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[tuple[float, torch.Tensor]] = []

    def step(self, closure: object = None) -> object:
        out = super().step(closure)
        flat = torch.cat([p.detach().flatten() for g in self.param_groups for p in g["params"]]).clone()
        self.records.append((self.param_groups[0]["lr"], flat))
        return out


def _lockstep_rank(rank: int, world: int, port: int, root: str, out: str) -> None:
    """One rank of a 2-rank gloo world training 2 epochs of the tiny student through train_epoch."""
    import os

    from pipeline.config import LossConfig, TrainConfig
    from pipeline.distributed import make_accelerator
    from pipeline.heads import build_param_groups
    from pipeline.train import TrainJob, train_epoch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    accelerator = make_accelerator(cpu=True)
    base = Path(root)
    loss = LossConfig(name="aekt", warmup_epochs=1)
    spec = StreamSpec(manifest_path=base / "manifest.json", shards_dir=base / "shards", split="train",
                      recipe="digits", image_size=8, aug_seed=0, views=2, store_path=base / "store.zarr",
                      batch_augment=True)
    model = build_student("digits_mlp", Manifest.load(spec.manifest_path), loss, 0)
    sched = TrainConfig.from_params({"epochs": 2, "batch_size": 32, "lr": 0.05, "lr_warmup_epochs": 1})
    optimizer = RecordingSGD(build_param_groups(model, lr=sched.lr, weight_decay=5e-4, head_lr_scale=0.01,
                                                no_decay_norm_bias=False), lr=sched.lr, momentum=0.9)
    wrapped, opt = accelerator.prepare(model, optimizer)
    job = TrainJob(model=model, sched=sched, loss=loss, train=spec, test=spec, progress=False)
    stream = ShardStream(spec, rank=rank, world=world)
    epochs = []
    for epoch in (1, 2):
        start = len(optimizer.records)
        train_epoch(job, accelerator, wrapped, opt, stream, epoch)
        epochs.append({"steps": optimizer.records[start:], "momentum": [
            optimizer.state[p]["momentum_buffer"].clone() for g in optimizer.param_groups for p in g["params"]]})
    torch.save(epochs, Path(out) / f"rank{rank}.pt")


def test_uneven_ranks_step_in_lockstep_and_agree_after_every_epoch(tiny_pipeline: Path, tmp_path: Path) -> None:
    """7 shards on 2 ranks: rank 0 runs 4 steps per epoch, rank 1 runs 3 and joins early. While both
    run they apply the same lr to the same all-reduced gradient, so their weights stay equal step by
    step (the schedule used to count each rank's own steps); after each epoch the early joiner
    also has the momentum of the rank that ran every step (it used to keep its own, lagging one),
    so the ranks start the next epoch equal and a checkpoint (rank 0's) is every rank's state."""
    import torch.multiprocessing as mp

    from tests.test_distributed import free_port

    mp.spawn(_lockstep_rank, args=(2, free_port(), str(tiny_pipeline), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for epoch, (mine, theirs) in enumerate(zip(*ranks, strict=True), start=1):
        assert len(mine["steps"]) != len(theirs["steps"]), "the shards should split unevenly"
        common = zip(mine["steps"], theirs["steps"], strict=False)  # the steps both ranks ran
        for step, ((lr0, w0), (lr1, w1)) in enumerate(common, start=1):
            assert lr0 == lr1, f"epoch {epoch} step {step}: lr {lr0} on rank 0, {lr1} on rank 1"
            assert torch.equal(w0, w1), f"epoch {epoch} step {step}: the ranks' weights differ"
        for m0, m1 in zip(mine["momentum"], theirs["momentum"], strict=True):
            assert torch.equal(m0, m1), f"after epoch {epoch}: the ranks' momentum differs"
