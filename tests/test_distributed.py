"""torchrun on CPU (gloo, 2 processes): replicas stay identical, SyncBN matches one big
batch, a 2-process run resumes as a 1-process run, split validation equals one process.

Two torchrun launches (about 10 s each on 2 cores): the training CLI with a probe
callback, and this module itself as a worker (``-m test_distributed``) that runs DAT
steps with injected draws. Collectives time out after 60 s and each launch after 240 s,
so a broken rendezvous fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import dat.distributed
from dat.callbacks import robust_accuracy
from dat.checkpoint import load_checkpoint
from dat.config import ConfigError, DataConfig, load_config
from dat.data import load_dataset
from dat.distributed import (
    DistInfo,
    cleanup_distributed,
    convert_sync_bn,
    init_distributed,
    prepare_modules,
    resume_position,
)
from dat.generator import AmplitudeGenerator
from dat.methods import DATDraws, DATStep
from dat.models import DualBatchNorm, create
from dat.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
PER_RANK, STEPS = 8, 3  # per-rank batch and DAT steps of the SyncBN comparison
# fp64 model and AAG: the runs differ by the order of float sums only (measured: at most
# 1.4e-15 absolute after 3 steps); an attack step that flips one gradient sign would not.
SYNC_BN_RTOL, SYNC_BN_ATOL = 1e-7, 1e-9

TINY = [
    "data.name=cifar10-sample", "model.name=resnet_tiny", "method.name=dat",
    "data.batch_size=8", "data.eval_batch_size=20", "data.test_subset=40",
    "train.epochs=1", "train.steps_per_epoch=3", "train.val_examples=40",
    "train.val_pgd_steps=2", "method.attack.steps=2", "perf.log_every=1",
    "train.image_every=0", "train.test_attacks=[clean]", "train.checkpoint_every=2",
    "optim.lr_scaling=linear", "optim.schedule=constant",
    "method.awp_gamma=0.01",  # AWP's proxy gradients are averaged too, or replicas drift
]

PROBE = '''
import torch

SEEN = {"losses": []}

def probe(trainer, event, payload):
    """Every rank saves what it holds at the end: weights, AAG, local losses, RNG start."""
    if event == "train_start":
        SEEN["rng_start"] = torch.get_rng_state()
    if event == "step_end":
        SEEN["losses"].append(float(payload["loss"]))
    if event == "train_end":
        torch.save({"model": trainer.model.state_dict(),
                    "generator": trainer.method.generator.state_dict(), **SEEN,
                    "val": dict(trainer.state.last_val), "world": trainer.dist.world_size,
                    "shard": (trainer.loader.rank, trainer.loader.world_size)},
                   f"{trainer.run_dir}/rank{trainer.dist.rank}.pt")
'''


def _torchrun(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DAT_DIST_TIMEOUT": "60",
           "PYTHONPATH": os.pathsep.join([str(cwd), str(REPO / "tests"), str(REPO)])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", *args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]


def _equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    """``torchrun --nproc_per_node=2 train.py``: one epoch of 3 DAT steps, 8 images a rank."""
    tmp = tmp_path_factory.mktemp("ddp")
    (tmp / "ddp_probe.py").write_text(PROBE)
    _torchrun([str(REPO / "train.py"), "--no-progress", *TINY, f"train.out_dir={tmp}/runs",
               "train.run_name=two", "train.callbacks=[ddp_probe:probe]"], tmp)
    return tmp / "runs" / "two"


def _copy_run(run: Path, tmp_path: Path) -> Path:
    """A private copy of the 2-process run (resuming writes into its directory)."""
    copy = tmp_path / "runs" / run.name
    shutil.copytree(run, copy)
    return copy


def test_every_rank_holds_bit_identical_classifier_and_generator(two_rank_run) -> None:
    r0, r1 = (torch.load(two_rank_run / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert (r0["world"], r0["shard"], r1["shard"]) == (2, (0, 2), (1, 2))
    assert len(r0["losses"]) == STEPS and r0["losses"] != r1["losses"]  # different data
    assert not torch.equal(r0["rng_start"], r1["rng_start"])  # different attack/AAG noise
    assert _equal(r0["model"], r1["model"])  # parameters and averaged BN statistics
    assert _equal(r0["generator"], r1["generator"])
    last = load_checkpoint(two_rank_run / "checkpoints" / "last.pt")
    assert _equal(last["model"], r0["model"])  # rank 0 wrote what every rank holds
    assert _equal(last["method"]["generator"], r0["generator"])
    assert (last["loader"]["world_size"], last["loader"]["global_batch"]) == (2, 16)
    assert len(last["rng_ranks"]) == 2
    assert len(list((two_rank_run / "tb").glob("events.out.tfevents.*"))) == 1  # rank 0 only


def test_a_two_process_run_resumes_as_one_process(two_rank_run, tmp_path, capsys) -> None:
    run = _copy_run(two_rank_run, tmp_path)
    last = run / "checkpoints" / "last.pt"
    cfg = load_config(str(run / "config.yaml"),
                      [f"train.resume={last}", "train.epochs=2", "train.callbacks=[]"])
    trainer = Trainer(cfg, progress=False)
    assert trainer.dist == DistInfo() and trainer.global_batch == 8
    assert (trainer.state.epoch, trainer.state.step_in_epoch) == (1, 0)
    r0 = torch.load(two_rank_run / "rank0.pt", weights_only=True)
    assert _equal(trainer.model.state_dict(), r0["model"])
    metrics = trainer.fit()
    assert "in epoch 2 (1-based, as in metrics.json), after 0 of its" in capsys.readouterr().out
    assert (metrics["epochs"], metrics["steps"], metrics["world_size"]) == (2, 2 * STEPS, 1)
    assert [v["epoch"] for v in metrics["val_history"]] == [1, 2]
    assert metrics["val_history"][0] == r0["val"]  # the 2-process validation is kept
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 8 / 128)


def test_a_mid_epoch_checkpoint_maps_to_the_new_global_batch(two_rank_run, tmp_path) -> None:
    run = _copy_run(two_rank_run, tmp_path)
    mid = run / "checkpoints" / "last.1.pt"  # after step 2 of 3, global batch 16
    assert load_checkpoint(mid)["trainer"]["step_in_epoch"] == 2
    cfg = load_config(str(run / "config.yaml"), [f"train.resume={mid}", "train.callbacks=[]"])
    trainer = Trainer(cfg, progress=False)
    assert (trainer.state.epoch, trainer.state.step_in_epoch) == (0, 4)  # 32 images = 4 x 8
    assert resume_position(2, 16, 8) == (4, "")
    assert resume_position(3, 8, 24) == (1, "")
    step, note = resume_position(1, 8, 16)  # 8 images is half a step of 16: restart
    assert step == 0 and "epoch restarts" in note


def test_split_validation_equals_one_process(two_rank_run, tmp_path) -> None:
    best = load_checkpoint(two_rank_run / "checkpoints" / "best.pt")
    r0, r1 = (torch.load(two_rank_run / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["val"] == r1["val"] == best["val"]  # reduced: every rank has the totals
    cfg = load_config(str(two_rank_run / "config.yaml"), [
        f"train.out_dir={tmp_path}", "train.run_name=one", "train.callbacks=[]"])
    trainer = Trainer(cfg, progress=False)  # builds the same 40 validation images
    model = create("resnet_tiny", num_classes=10, dual_bn=True)
    model.load_state_dict(best["model"])
    x, y = trainer.val_data
    clean, robust = robust_accuracy(model, x, y, 8 / 255, 2 / 255, steps=2, batch_size=20,
                                    seed=cfg.train.seed)
    assert (clean, robust) == (best["val"]["clean"], best["val"]["pgd2"])


# ---- SyncBN: 2 ranks x 8 images == 1 process x 16 images, same draws ---------------------
class _Counting(nn.Module):
    """Counts the images a model is asked to classify (shows the validation split)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seen = inner, 0

    def forward(self, x: Tensor) -> Tensor:
        self.seen += len(x)
        return self.inner(x)


def _rows(draws: DATDraws, rows: slice) -> DATDraws:
    """A slice of every draw, floats in fp64."""
    out = {}
    for f in fields(draws):
        value = getattr(draws, f.name)[rows]
        out[f.name] = value.double() if value.is_floating_point() else value
    return DATDraws(**out)


def dat_steps(rank: int, world: int) -> dict:
    """STEPS DAT steps on a global batch of 2 x PER_RANK sample images; this rank's rows.

    One process (world 1) takes the whole batch; two take halves, with SyncBN.
    """
    torch.manual_seed(0)
    splits = load_dataset(DataConfig(name="cifar10-sample"))
    n = 2 * PER_RANK
    x_all, y_all = splits.train.subset(torch.arange(STEPS * n) * 7).tensors()
    model = create("resnet_tiny", num_classes=10, dual_bn=True).double()
    generator = AmplitudeGenerator(10, (3, 32, 32)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen_opt = torch.optim.SGD(generator.parameters(), lr=0.1, momentum=0.9)
    prepare_modules([model, generator], [opt, gen_opt], sync_bn=True, device_type="cpu")
    step = DATStep(model, generator, opt, gen_opt, steps=2)
    draw_gen = torch.Generator().manual_seed(1)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK) if world == 2 else slice(0, n)
    for s in range(STEPS):
        draws = DATDraws.sample(n, (3, 32, 32), generator=draw_gen)  # (2B, ...) global
        x, y = x_all[s * n:(s + 1) * n][rows].double(), y_all[s * n:(s + 1) * n][rows]
        step.run(x, y, draws=_rows(draws, rows))
    return {"model": model.state_dict(), "generator": generator.state_dict()}


def _validate(model: nn.Module, splits) -> tuple[tuple[float, float], int]:
    x, y = splits.val.subset(torch.arange(40) * 25).tensors()
    counting = _Counting(model.float())
    accuracy = robust_accuracy(counting, x, y, 8 / 255, 2 / 255, steps=2, batch_size=10)
    return accuracy, counting.seen


def _worker_main(out: Path) -> None:
    """torchrun entry (``-m test_distributed OUT``): DAT steps, then split validation."""
    torch.set_num_threads(1)
    dat.distributed._BUCKET_ELEMENTS = 4096  # many small buckets (the trainer run: one)
    info = init_distributed("cpu")
    result = dat_steps(info.rank, info.world_size)
    model = create("resnet_tiny", num_classes=10, dual_bn=True)
    model.load_state_dict(result["model"])
    result["val"], result["seen"] = _validate(model, load_dataset(DataConfig(
        name="cifar10-sample")))
    torch.save(result, out / f"rank{info.rank}.pt")
    cleanup_distributed()


@pytest.fixture(scope="module")
def sync_bn_ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("syncbn")
    _torchrun(["-m", "test_distributed", str(tmp)], tmp)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_sync_bn_matches_one_process_with_the_global_batch(sync_bn_ranks) -> None:
    r0, r1 = sync_bn_ranks
    assert _equal(r0["model"], r1["model"]) and _equal(r0["generator"], r1["generator"])
    single = dat_steps(0, 1)
    start = create("resnet_tiny", num_classes=10, dual_bn=True).state_dict()
    for part in ("model", "generator"):
        for key, value in single[part].items():
            if value.is_floating_point():  # weights, biases, running statistics
                torch.testing.assert_close(r0[part][key], value, rtol=SYNC_BN_RTOL,
                                           atol=SYNC_BN_ATOL, msg=f"{part}.{key}")
            else:
                assert torch.equal(r0[part][key], value), key
    moved = [k for k, v in start.items() if v.is_floating_point()
             and not torch.allclose(v.double(), single["model"][k], atol=1e-4)]
    assert len(moved) > len(start) // 2  # the steps changed the model: not a vacuous match


def test_split_validation_counts_each_image_once(sync_bn_ranks, sample_splits) -> None:
    r0, r1 = sync_bn_ranks
    assert r0["seen"] > 0 and r0["seen"] == r1["seen"]  # each rank classified half
    model = create("resnet_tiny", num_classes=10, dual_bn=True)
    model.load_state_dict(r0["model"])
    accuracy, seen = _validate(model, sample_splits)
    assert tuple(r0["val"]) == tuple(r1["val"]) == accuracy
    assert seen == r0["seen"] + r1["seen"]


# ---- in-process checks (no process group) --------------------------------------------
def test_convert_sync_bn_covers_both_branches_and_the_aag_keeping_parameters() -> None:
    model = create("resnet_tiny", num_classes=10, dual_bn=True)
    generator = AmplitudeGenerator(10, (3, 32, 32))
    for module in (model, generator):
        before = [id(p) for p in module.parameters()]
        x = torch.rand(4, 3, 32, 32) if module is model else torch.randn(4, 10)
        torch.manual_seed(0)
        expected = module(x)
        convert_sync_bn(module, "cpu")
        bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert bns and all(type(m).__name__ == "_GlobalBatchNorm" for m in bns)
        assert [id(p) for p in module.parameters()] == before  # optimisers stay valid
        torch.manual_seed(0)
        torch.testing.assert_close(module(x), expected)  # one process: plain BatchNorm
    duals = [m for m in model.modules() if isinstance(m, DualBatchNorm)]
    assert all(type(d.main) is type(d.aux) for d in duals)


def test_torchrun_variables_without_a_rank_give_a_one_line_error(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigError, match="launch with torchrun"):
        init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_distributed("cpu") == DistInfo()


if __name__ == "__main__":
    _worker_main(Path(sys.argv[1]))
