"""Fault injection: each failure a user can meet gives a clean outcome.

kill -9 then resume is bit-identical; NaN batches are skipped and counted; too many in
a row stop the run with a good checkpoint; bad config values, bad datasets and unusable
checkpoints give one line ``error: ...`` and exit status 2 (no traceback).
"""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from dat.checkpoint import load_checkpoint
from dat.cli import train_main
from dat.config import load_config
from dat.data import DataError, DatasetSplits, ImageSet
from dat.generator import AmplitudeGenerator
from dat.guard import StepGuard, generator_warnings
from dat.methods.dat import generator_health
from dat.trainer import Trainer, TrainingError

REPO = Path(__file__).resolve().parent.parent

TINY = [  # a few seconds per run on one CPU thread
    "data.name=cifar10-sample", "model.name=resnet_tiny", "data.batch_size=16",
    "data.eval_batch_size=64", "data.test_subset=32", "train.epochs=2",
    "train.steps_per_epoch=3", "train.val_examples=32", "train.val_pgd_steps=2",
    "train.test_attacks=[clean]", "train.image_every=0", "perf.log_every=1",
    "method.attack.steps=2",
]

CALLBACK_MODULE = '''
import os, time

def pause(trainer, event, payload):
    """Signal, then sleep right after step DAT_PAUSE_AT (so the test can kill -9 us)."""
    at = os.environ.get("DAT_PAUSE_AT")
    if event == "step_end" and at and trainer.state.global_step == int(at):
        for callback in trainer.callbacks:  # what TensorBoard logged so far is on disk
            if getattr(callback, "writer", None) is not None:
                callback.writer.flush()
        open(os.environ["DAT_READY"], "w").close()
        time.sleep(300)
'''


def _cli(args: list[str], tmp_path: Path, **env: str) -> subprocess.Popen:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env,
                "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    return subprocess.Popen([sys.executable, str(REPO / "train.py"), "--no-progress", *args],
                            cwd=tmp_path, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the training process never reached the pause"
        time.sleep(0.1)


def _state_equal(a: dict, b: dict) -> bool:
    """Bit-identical nested dicts of tensors / primitives."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b, strict=True))
    if torch.is_tensor(a):
        return torch.equal(a, b)
    return a == b


def test_kill_minus_nine_then_resume_is_bit_identical(tmp_path: Path) -> None:
    (tmp_path / "pause_cb.py").write_text(CALLBACK_MODULE)
    common = [*TINY, "method.name=dat", "train.checkpoint_every=4",
              "train.callbacks=[pause_cb:pause]", "train.out_dir=runs"]
    straight = _cli([*common, "train.run_name=straight"], tmp_path)
    ready = tmp_path / "ready"
    killed = _cli([*common, "train.run_name=killed"], tmp_path,
                  DAT_PAUSE_AT="6", DAT_READY=str(ready))
    _wait_for(ready, killed)  # steps 5 and 6 done (5 logged); last.pt is from step 4
    os.kill(killed.pid, signal.SIGKILL)
    killed.communicate()
    assert killed.returncode == -signal.SIGKILL
    mid = load_checkpoint(tmp_path / "runs/killed/checkpoints/last.pt")
    assert (mid["trainer"]["global_step"], mid["trainer"]["step_in_epoch"]) == (4, 1)
    resumed = _cli(["--resume", "runs/killed/checkpoints/last.pt"], tmp_path)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "in epoch 2 (1-based, as in metrics.json), after 1 of its" in out
    straight_out, straight_err = straight.communicate(timeout=300)
    assert straight.returncode == 0, straight_err[-2000:]
    a = load_checkpoint(tmp_path / "runs/straight/checkpoints/last.pt")
    b = load_checkpoint(tmp_path / "runs/killed/checkpoints/last.pt")
    assert a["trainer"]["global_step"] == b["trainer"]["global_step"] == 6
    for key in ("model", "optimizer", "method"):  # method: the AAG and its optimiser
        assert _state_equal(a[key], b[key]), key
    assert a["trainer"]["history"] == b["trainer"]["history"]
    # TensorBoard: step 5, logged before the kill, is replaced rather than shown twice
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "runs/killed/tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[-1] == 6


class _PoisonedStep:
    """Wraps a method step and feeds NaN images on the given (0-based) steps."""

    def __init__(self, step, poisoned: set[int]) -> None:
        self.inner, self.poisoned, self.calls = step, poisoned, 0

    def run(self, x, y, x_raw=None):
        if self.calls in self.poisoned:
            x = x.clone()
            x[0, 0, 0, 0] = float("nan")
        self.calls += 1
        return self.inner.run(x, y, x_raw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _tiny_trainer(tmp_path: Path, *extra: str) -> Trainer:
    cfg = load_config(None, [*TINY, "method.name=trades", f"train.out_dir={tmp_path}",
                             "train.run_name=run", *extra])
    return Trainer(cfg, progress=False)


def test_a_nan_batch_is_skipped_and_counted(tmp_path: Path) -> None:
    trainer = _tiny_trainer(tmp_path, "train.epochs=1")
    trainer.method = _PoisonedStep(trainer.method, {1})
    before, after = {}, {}

    def watch(tr, event, payload) -> None:
        if event == "step_start" and tr.state.global_step == 1:
            before.update({k: v.clone() for k, v in tr.model.state_dict().items()})
            before["momentum"] = [s["momentum_buffer"].clone()
                                  for s in tr.optimizer.state.values()]
        if event == "step_end" and tr.state.global_step == 2:
            after.update({k: v.clone() for k, v in tr.model.state_dict().items()})
            after["momentum"] = [s["momentum_buffer"].clone()
                                 for s in tr.optimizer.state.values()]

    trainer.add_callback(watch)
    metrics = trainer.fit()
    assert metrics["bad_steps"] == 1 and metrics["steps"] == 3
    assert _state_equal(before, after)  # weights, BN statistics and momentum untouched
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_consecutive_nan_steps_stop_the_run_with_a_good_checkpoint(tmp_path: Path) -> None:
    trainer = _tiny_trainer(tmp_path, "train.max_bad_steps=2", "train.epochs=1")
    trainer.method = _PoisonedStep(trainer.method, {1, 2})
    with pytest.raises(TrainingError, match="2 consecutive non-finite steps"):
        trainer.fit()
    last = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert last["trainer"]["bad_steps"] == 2


def _error_line(capsys, argv: list[str]) -> str:
    code = train_main(["--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(("override", "expected"), [
    ("method.attack.eps=8", "0-255 units"),
    ("method.attack.alpha=16/255", "larger than method.attack.eps"),
    ("model.name=resnet_huge", "model.name='resnet_huge' is unknown"),
    ("model.name=no_such_nets.py:build", "no_such_nets.py does not exist; pass the path of"),
    ("model.name=nets.py:build-net", "must look like module:function or path/file.py:function"),
    ("method.name=fgsm_at", "method.name='fgsm_at' is not valid"),
    ("data.name=imagenet21k", "data.name='imagenet21k' is not valid"),
    ("train.epohcs=3", "train.epohcs"),
    ("train.callbacks=[no_such_module_xyz:fn]", "cannot import 'no_such_module_xyz'"),
    ("train.max_bad_steps=0", "train.max_bad_steps=0 must be >= 1"),
    ("train.test_attacks=[clean,pgd20,deepfool]", "unknown attack 'deepfool'"),
    # each of these used to pass validation and fail mid-run with a traceback, or run on
    ("data.batch_size=1", "data.batch_size=1 must be >= 2 for DAT: the amplitude generator"),
    ("method.attack.eps=nan", "method.attack.eps=nan must be a finite number"),
    ("method.attack.eps=inf", "method.attack.eps=inf must be a finite number"),
    ("optim.lr=inf", "optim.lr=inf must be a finite number"),
    ("train.seed=-1", "train.seed=-1 must be in [0, 2**32)"),
    ("optim.momentum=-1", "optim.momentum=-1.0 must be in [0, 1)"),
    ("optim.reference_batch_size=0", "optim.reference_batch_size=0 must be >= 1"),
    ("data.num_workers=-1", "data.num_workers=-1 must be >= 0"),
    ("data.crop_padding=-1", "data.crop_padding=-1 must be >= 0"),
    ("method.generator.hidden=[0]", "method.generator.hidden=[0]: every entry must be >= 1"),
    ("train.run_name=../elsewhere", "must stay inside train.out_dir (no absolute path, no"),
    ("train.test_attacks=pgd20", "train.test_attacks takes a list; write train.test_attacks=["),
    ("method.name=trades method.awp_gamma=5", "method.awp_gamma=5.0 must be < 1: a fraction"),
])
def test_bad_config_values_give_one_line_errors(capsys, tmp_path, override, expected) -> None:
    err = _error_line(capsys, [*TINY, f"train.out_dir={tmp_path}", *override.split()])
    assert expected in err


def test_rules_added_later_do_not_lock_out_stored_runs() -> None:
    """A checkpoint's config passes the rules its run was made under: it still resumes
    and evaluates (config_from_dict), while a new config gets today's rules."""
    from dat.config import ConfigError, config_from_dict, config_to_dict

    old = config_to_dict(load_config(None, [*TINY, "method.name=pgd_at"]))
    old["train"]["run_name"] = "/scratch/ablation"  # accepted before 2026-11-27
    assert config_from_dict(old).train.run_name == "/scratch/ablation"
    with pytest.raises(ConfigError, match="must stay inside train.out_dir"):
        load_config(None, [*TINY, "train.run_name=/scratch/ablation"])
    assert load_config(None, [*TINY, "train.run_name=ablations/nojs"])  # nested is fine
    assert load_config(None, [*TINY, "method.name=pgd_at", "data.batch_size=1"])  # BN copes


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_one_line_error(capsys, tmp_path) -> None:
    err = _error_line(capsys, [*TINY, f"train.out_dir={tmp_path}", "train.device=cuda"])
    assert "CUDA is not available" in err


def test_unwritable_output_directory(capsys, tmp_path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")  # works even as root, unlike chmod
    err = _error_line(capsys, [*TINY, f"train.out_dir={blocker}/runs"])
    assert "is not writable" in err
    # out_dir is fine, but a file stands where the run's folder goes: name that, not out_dir
    err = _error_line(capsys, [*TINY, f"train.out_dir={tmp_path}", "train.run_name=a_file"])
    assert err.startswith(f"error: run folder {blocker} cannot be created (")
    assert "choose another train.run_name" in err and "train.out_dir" not in err


def _disk_full_save(obj, f, *args, **kwargs):
    """torch.save on a full disk: the OSError comes back as a RuntimeError raised while
    handling it ("[enforce fail at inline_container.cc] . unexpected pos ...")."""
    f.write(b"partial")
    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError:  # implicit chaining (__context__), as torch's zip writer raises it
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos "  # noqa: B904
                           "10431872 vs 10431760")


def test_a_full_disk_keeps_the_old_file_and_says_so(tmp_path, monkeypatch) -> None:
    from dat.checkpoint import WriteError, save_checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint({"x": torch.ones(2)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _disk_full_save)
    with pytest.raises(WriteError, match=r"could not write .*last.pt: No space left on device"):
        save_checkpoint({"x": torch.zeros(2)}, path, keep=1)
    assert path.read_bytes() == before  # intact, and no temporary file left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_full_quota_is_reported_like_a_full_disk(tmp_path, monkeypatch) -> None:
    """EDQUOT (a user's quota on a shared file system, common on clusters) means the same
    as ENOSPC: the old file is intact and the message says so, not a raw OSError."""
    from dat.checkpoint import WriteError, save_checkpoint

    path = save_checkpoint({"x": torch.ones(2)}, tmp_path / "last.pt")
    before = path.read_bytes()

    def over_quota(obj, f, *args, **kwargs):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(torch, "save", over_quota)
    with pytest.raises(WriteError, match="Disk quota exceeded .*last.pt, if any, is unchanged"
                       ) as info:
        save_checkpoint({"x": torch.zeros(2)}, path, keep=1)
    assert info.value.errno == errno.EDQUOT
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]

def test_a_full_disk_during_training_is_one_line(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(torch, "save", _disk_full_save)
    code = train_main(["--no-progress", *TINY, f"train.out_dir={tmp_path}",
                       "train.run_name=full"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1, err
    assert err[-1].startswith("error: could not write ") and "No space left" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_missing_dataset_offline(capsys, tmp_path) -> None:
    err = _error_line(capsys, [*TINY, "data.name=cifar10", f"data.root={tmp_path}/none",
                               f"train.out_dir={tmp_path}"])
    assert "cifar10 not found under data.root" in err


def _folder(root: Path, sizes: dict[str, tuple[int, int]]) -> None:
    for split in ("train", "test"):
        for cls, size in sizes.items():
            for i in range(3):
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                Image.new("RGB", size, (40 * i, 90, 160)).save(root / split / cls / f"{i}.png")


def test_imagefolder_without_train_split(capsys, tmp_path) -> None:
    (tmp_path / "data" / "val").mkdir(parents=True)
    err = _error_line(capsys, [*TINY, "data.name=imagefolder", f"data.root={tmp_path}/data",
                               f"train.out_dir={tmp_path}"])
    assert "has no train/ folder" in err


def test_images_of_mixed_sizes(capsys, tmp_path) -> None:
    _folder(tmp_path / "data", {"cat": (32, 32), "dog": (24, 24)})
    err = _error_line(capsys, [*TINY, "data.name=imagefolder", f"data.root={tmp_path}/data",
                               "data.val_size=2", "data.loader=resident",
                               f"train.out_dir={tmp_path}"])
    assert "resize" in err


@pytest.mark.filterwarnings("ignore:data.val_size=2 holds out")  # 6 images: a tiny folder
def test_a_relative_data_root_is_stored_absolute(tmp_path, monkeypatch) -> None:
    """A run made with data.root=data/ds could not be resumed or evaluated from another
    working folder: its config.yaml kept the relative path."""
    from dat.config import load_config
    from dat.trainer import Trainer

    _folder(tmp_path / "data" / "ds", {"cat": (8, 8), "dog": (8, 8)})
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [*TINY, "data.name=imagefolder", "data.root=data/ds",
                             "data.val_size=2", "train.epochs=1", "train.steps_per_epoch=1",
                             "data.batch_size=2", "train.val_examples=2",
                             f"train.out_dir={tmp_path}/runs", "train.run_name=rel"])
    trainer = Trainer(cfg, progress=False)
    assert trainer.cfg.data.root == str(tmp_path / "data" / "ds")
    trainer.fit()
    saved = load_config(str(tmp_path / "runs" / "rel" / "config.yaml"))
    assert saved.data.root == str(tmp_path / "data" / "ds")


def test_images_that_do_not_fit_the_model(capsys, tmp_path) -> None:
    err = _error_line(capsys, [*TINY, "model.name=timm/vit_tiny_patch16_224", "method.name=trades",
                               f"train.out_dir={tmp_path}"])
    assert "do not fit model timm/vit_tiny_patch16_224" in err
    assert "model.name=nets.py:build, e.g. a timm ViT with img_size=32" in err


def test_labels_out_of_range(sample_splits, tmp_path) -> None:
    train = sample_splits.train.subset(torch.arange(64))
    bad = ImageSet(train.labels.clone(), images=train.images, image_shape=train.image_shape)
    bad.labels[5] = 12
    splits = DatasetSplits(bad, sample_splits.val, sample_splits.test, sample_splits.classes)
    cfg = load_config(None, [*TINY, f"train.out_dir={tmp_path}"])
    with pytest.raises(DataError, match=r"train labels range 0\.\.12 but the dataset has 10"):
        Trainer(cfg, splits=splits, progress=False)


def test_resume_from_a_truncated_checkpoint_falls_back_to_the_previous_one(
        capsys, tmp_path) -> None:
    run = [*TINY, "method.name=pgd_at", f"train.out_dir={tmp_path}", "train.run_name=r",
           "train.steps_per_epoch=1"]
    assert train_main(["--no-progress", *run]) == 0
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:3000])  # torn by a crash
    capsys.readouterr()
    assert train_main(["--no-progress", "--resume", str(last)]) == 0
    captured = capsys.readouterr()
    assert "warning: " in captured.err and "is corrupt or truncated" in captured.err
    assert "resumed from" in captured.out and "last.1.pt" in captured.out
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    best = load_checkpoint(tmp_path / "r" / "checkpoints" / "best.pt")
    assert metrics["best_epoch"] == best["epoch"] and metrics["steps"] == 2
    assert load_checkpoint(last)["trainer"]["epoch"] == 2  # a good last.pt again


def test_resume_with_another_architecture_or_missing_checkpoint(capsys, tmp_path) -> None:
    out = [*TINY, "method.name=pgd_at", f"train.out_dir={tmp_path}", "train.run_name=r",
           "train.epochs=1", "train.steps_per_epoch=1"]
    assert train_main(["--no-progress", *out]) == 0
    capsys.readouterr()
    last = str(tmp_path / "r" / "checkpoints" / "last.pt")
    err = _error_line(capsys, ["--resume", last, "model.name=resnet_small"])
    assert "saved for model resnet_tiny with 10 classes" in err
    err = _error_line(capsys, ["--resume", last, "train.weight_averaging=ema"])
    assert "does not match this run's method, optimiser or weight averaging" in err
    err = _error_line(capsys, ["--resume", str(tmp_path / "nowhere" / "last.pt")])
    assert "no usable checkpoint" in err
    best = tmp_path / "r" / "checkpoints" / "best.pt"
    err = _error_line(capsys, ["--resume", str(best), *out])  # used to blame the optimiser
    assert f"{best} holds model weights only" in err and f"resume from {last}" in err
    # a run directory (or its checkpoints/ folder) means its last.pt
    assert train_main(["--no-progress", "--resume", str(tmp_path / "r"), *out]) == 0
    assert f"resumed from {last}" in capsys.readouterr().out
    best.write_bytes(b"torn")  # best.pt has no older copy: say what is lost, offer none
    assert train_main(["--no-progress", "--resume", last, *out, "train.epochs=2"]) == 0
    assert (f"warning: {best} is corrupt or unreadable, so the best weights so far are lost; "
            "the next validation writes a new best.pt") in capsys.readouterr().err
    err = _error_line(capsys, [*out])  # same run name again without --resume
    assert "already holds a run" in err
    # --config on a resume is the config, checked like overrides (it used to be ignored)
    err = _error_line(capsys, ["--config", "trades_cifar10_resnet18", "--resume", last, *out])
    assert "checkpoint does not match this run's" in err and "method.beta: trained with 15" in err


def test_a_saturated_or_collapsed_generator_is_reported() -> None:
    torch.manual_seed(0)
    g = AmplitudeGenerator(num_classes=10, image_shape=(3, 8, 8))
    logits = torch.randn(16, 10)
    with torch.no_grad():
        healthy = {k: float(v) for k, v in generator_health(g.unit(logits)).items()}
        g.net[-1].weight.zero_()  # pin every sigmoid output at 1, whatever the input
        g.net[-1].bias.fill_(50.0)
        pinned = {k: float(v) for k, v in generator_health(g.unit(logits)).items()}
    assert generator_warnings(healthy) == []
    assert pinned["gen_saturated"] == 1.0 and pinned["gen_batch_std"] < 1e-6
    messages = generator_warnings(pinned)
    assert [m.split(":")[0] for m in messages] == ["generator saturated", "generator collapsed"]


@pytest.mark.parametrize("fused", [True, None])
def test_step_guard_rolls_back_every_layout_exactly_in_a_few_kernels(fused) -> None:
    """Rollback is bit-exact for channels_last, non-dense and integer tensors. Fused (the
    CUDA default) it costs a handful of operations however many tensors there are (each
    is a kernel launch on a GPU); the CPU default uses one per tensor, half the bytes."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 3, 3) for _ in range(40)]
    model = nn.Sequential(*layers, nn.BatchNorm2d(3))
    model[0].to(memory_format=torch.channels_last)
    model[1].weight.data = model[1].weight.data.transpose(0, 1)  # not dense in any layout
    assert not model[1].weight.is_contiguous()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = StepGuard([model], [opt], fused=fused)

    def step(poison: bool) -> None:
        guard.snapshot()
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
        model[-1].num_batches_tracked += 1
        loss = torch.tensor(float("nan") if poison else 1.0)
        guard.commit(loss)

    step(False)  # creates the momentum buffers
    state = {k: v.clone() for k, v in model.state_dict().items()}
    momentum = [s["momentum_buffer"].clone() for s in opt.state.values()]
    step(True)
    assert _state_equal(state, model.state_dict())
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(
        momentum, opt.state.values(), strict=True))
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    step(False)
    assert not torch.equal(state["0.weight"], model[0].weight)  # a good step is kept
    for st in opt.state.values():  # new state tensors (e.g. a reloaded optimiser) ...
        st["momentum_buffer"] = st["momentum_buffer"].clone()
    guard.snapshot()
    assert len(guard._buffers) == len(guard._saved)  # ... do not leave stale copies behind

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += not func.is_view
            return func(*args, **(kwargs or {}))

    with Count():
        guard.snapshot()
        guard.commit(torch.tensor(1.0))
    assert len(guard._tensors()) > 160
    assert Count.n < 40 if fused else Count.n > 160, Count.n


def _guarded_sgd_step(guard: StepGuard, model: nn.Module, opt, grad: float, loss: float) -> bool:
    """One guarded step with every gradient set to ``grad``; returns the guard's flag."""
    guard.snapshot()
    for p in model.parameters():
        p.grad = torch.full_like(p, grad)
    opt.step()
    return bool(guard.commit(torch.tensor(loss)))


def test_step_guard_counts_streaks_and_resets_the_counts_on_each_read() -> None:
    """The trainer stops at ``max_bad_steps`` consecutive bad steps and adds the bad steps
    to ``state.bad_steps`` at each log: a good step must end a streak, and a read must not
    report the same streak or the same bad steps again."""
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = StepGuard([model], [opt])

    def steps(pattern: str) -> list[float]:
        for c in pattern:  # B: a non-finite loss, G: a good step
            _guarded_sgd_step(guard, model, opt, 1.0, float("nan") if c == "B" else 1.0)
        return [float(v) for v in guard.counters(torch.device("cpu"))]

    assert steps("BGBBG") == [2, 3]  # longest streak 2 (not 3: G broke it), 3 bad in all
    assert steps("G") == [0, 0]  # nothing new since the read
    assert steps("BGB") == [1, 2]  # streaks of one, even though 2 was seen before
    assert steps("B") == [2, 1]  # a streak running across a read is still counted whole


def test_step_guard_zeroes_optimiser_state_created_by_a_bad_first_step() -> None:
    """SGD creates its momentum buffers on the first step; when that step is non-finite the
    snapshot has no copy to restore, so the guard zeroes them: a NaN kept there would
    poison every later step, and a run would stop at max_bad_steps with nothing learnt."""
    torch.manual_seed(0)
    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = StepGuard([model], [opt])
    before = [p.detach().clone() for p in model.parameters()]
    assert not _guarded_sgd_step(guard, model, opt, float("nan"), 1.0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(torch.equal(s["momentum_buffer"], torch.zeros_like(s["momentum_buffer"]))
               for s in opt.state.values())
    assert _guarded_sgd_step(guard, model, opt, 1.0, 1.0)  # the next good step trains
    assert all(torch.isfinite(p).all() and not torch.equal(a, p)
               for a, p in zip(before, model.parameters(), strict=True))


def test_step_guard_refuses_non_finite_gradients_with_finite_weights() -> None:
    """ok also needs finite gradients (the module docstring's contract), e.g. for a
    parameter the optimiser does not step: its weight stays finite, its gradient is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    opt = torch.optim.SGD(model[0].parameters(), lr=0.1)  # model[1] is not stepped
    guard = StepGuard([model], [opt])
    guard.snapshot()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    model[1].weight.grad[0, 0] = float("inf")
    before = model[0].weight.detach().clone()
    opt.step()
    assert not bool(guard.commit(torch.tensor(1.0)))
    assert torch.equal(model[0].weight, before)  # the whole step was rolled back


def test_step_guard_also_rolls_back_what_the_method_owns() -> None:
    """``extra`` (the trainer passes its method) adds the modules and optimisers held as its
    attributes, e.g. DAT's amplitude generator and its SGD: a bad step that moved the
    generator must leave it as it was, like the classifier."""
    torch.manual_seed(0)
    model, generator = nn.Linear(2, 2), nn.Linear(2, 2)

    class Method:  # like a method step: the generator and its optimiser as attributes
        def __init__(self) -> None:
            self.generator = generator
            self.gen_opt = torch.optim.SGD(generator.parameters(), lr=0.1, momentum=0.9)

    method = Method()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = StepGuard([model], [opt], extra=method)
    for loss in (1.0, float("nan")):  # the first creates the generator's momentum
        state = {k: v.clone() for k, v in generator.state_dict().items()}
        momentum = [s["momentum_buffer"].clone() for s in method.gen_opt.state.values()]
        guard.snapshot()
        for p in [*model.parameters(), *generator.parameters()]:
            p.grad = torch.ones_like(p)
        opt.step()
        method.gen_opt.step()
        guard.commit(torch.tensor(loss))
    assert _state_equal(state, generator.state_dict())
    assert all(torch.equal(a, s["momentum_buffer"]) for a, s in zip(
        momentum, method.gen_opt.state.values(), strict=True))


def test_a_second_process_is_refused_while_a_run_or_an_evaluation_holds_its_folder(
        capsys, tmp_path, make_tiny_model, sample_batch, lock_elsewhere) -> None:
    from dat.evaluation import evaluate
    from dat.folder_lock import FolderInUse

    run = [*TINY, "method.name=pgd_at", f"train.out_dir={tmp_path}", "train.run_name=r",
           "train.epochs=1", "train.steps_per_epoch=1"]
    holder = lock_elsewhere(tmp_path / "r", "hold")
    assert holder.stdout.readline().strip() == "held"
    err = _error_line(capsys, run)
    assert f"{tmp_path / 'r'} is in use by another process (pid {holder.pid} on " in err
    assert err.endswith("wait for it to finish or stop it (a new run can take another "
                        "train.run_name)")
    assert not (tmp_path / "r" / "checkpoints").exists()  # nothing was written
    err = _error_line(capsys, ["--resume", "auto", *run])  # not "no checkpoint": it is busy
    assert f"in use by another process (pid {holder.pid} on " in err

    report_dir = tmp_path / "report"
    other = lock_elsewhere(report_dir, "hold")
    assert other.stdout.readline().strip() == "held"
    with pytest.raises(FolderInUse, match=f"pid {other.pid} on .*pass another out_dir"):
        evaluate(make_tiny_model(), sample_batch, attacks=["clean"], out_dir=report_dir,
                 progress=False)
    assert not (report_dir / "progress.json").exists()

    for process in (holder, other):  # kill -9 leaves no stale lock behind
        process.kill()
        process.wait()
    assert train_main(["--no-progress", *run]) == 0
    # the finished run let go of its folder: another process may take it now
    after = lock_elsewhere(tmp_path / "r", "try")
    assert after.communicate(timeout=60)[0].strip() == "held" and after.returncode == 0
    evaluate(make_tiny_model(), sample_batch, attacks=["clean"], out_dir=report_dir,
             progress=False)
    assert (report_dir / "progress.json").is_file()


def test_a_run_dropped_before_fit_lets_go_of_its_folder(tmp_path, lock_elsewhere) -> None:
    cfg = load_config("quickstart", [*TINY, "method.name=pgd_at", f"train.out_dir={tmp_path}",
                                     "train.run_name=r"])
    trainer = Trainer(cfg, progress=False)
    busy = lock_elsewhere(tmp_path / "r", "try")
    assert "is in use by another process" in busy.communicate(timeout=60)[0]
    assert busy.returncode == 3
    del trainer
    gc.collect()  # the trainer may sit in a reference cycle
    free = lock_elsewhere(tmp_path / "r", "try")
    assert free.communicate(timeout=60)[0].strip() == "held"


def test_a_new_run_sets_aside_the_best_pt_of_an_attempt_that_saved_no_last_pt(
        capsys, tmp_path) -> None:
    run = [*TINY, "method.name=pgd_at", f"train.out_dir={tmp_path}", "train.epochs=1",
           "train.steps_per_epoch=1"]
    # an earlier attempt with another model stopped after writing best.pt, before last.pt
    assert train_main(["--no-progress", *run, "train.run_name=old",
                       "model.name=resnet_small"]) == 0
    run.append("train.val_every=0")
    folder = tmp_path / "new" / "checkpoints"
    folder.mkdir(parents=True)
    stale = (tmp_path / "old" / "checkpoints" / "best.pt").read_bytes()
    (folder / "best.pt").write_bytes(stale)
    capsys.readouterr()
    assert train_main(["--no-progress", *run, "train.run_name=new"]) == 0
    err = capsys.readouterr().err
    assert "held best.pt from an earlier attempt that saved no last.pt; moved to" in err
    metrics = json.loads((tmp_path / "new" / "metrics.json").read_text())
    assert metrics["evaluated"] == "final weights (no validation ran)"  # not the stale file
    [aside] = folder.glob("abandoned-*")
    assert (aside / "best.pt").read_bytes() == stale and not (folder / "best.pt").exists()
    # an older last.N.pt alone is still a run a resume falls back to: not set aside
    (tmp_path / "new" / "checkpoints" / "last.pt").rename(folder / "last.1.pt")
    err = _error_line(capsys, [*run, "train.run_name=new"])
    assert "already holds a run; resume it with --resume auto" in err


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch) -> None:
    import dat.build
    from dat.folder_lock import key_of, release

    monkeypatch.setattr(dat.build.time, "strftime", lambda fmt: "20261127-101010")
    dirs = []
    for _ in range(3):
        cfg = load_config(None, [*TINY, f"train.out_dir={tmp_path}"])
        dirs.append(dat.build.prepare_run_dir(cfg, None))
        release(key_of(dirs[-1]))
    base = "dat-resnet_tiny-cifar10-sample-20261127-101010"
    assert [d.name for d in dirs] == [base, f"{base}-2", f"{base}-3"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_keep_the_folder_locked(tmp_path) -> None:
    """DataLoader workers are forked: their copy of the lock's descriptor used to keep the
    folder locked after the parent let go (and after a kill -9 of the parent)."""
    from dat.folder_lock import acquire, release

    key = acquire(tmp_path / "run", "fix")
    ready, go = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child only waits
        os.write(go, b"x")
        time.sleep(5)
        os._exit(0)
    assert os.read(ready, 1) == b"x"  # the child runs: its at-fork hook has run
    try:
        release(key)
        release(acquire(tmp_path / "run", "fix"))  # refused before: the child held it
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_refused_resume_lets_go_of_the_folder_at_once(tmp_path, lock_elsewhere) -> None:
    from dat.checkpoint import CheckpointError

    run = [*TINY, "method.name=pgd_at", f"train.out_dir={tmp_path}", "train.run_name=r",
           "train.epochs=1", "train.steps_per_epoch=1", "train.val_every=0"]
    assert train_main(["--no-progress", *run]) == 0
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["model"].pop(next(iter(state["model"])))  # refused only once the folder is held
    torch.save(state, last)
    cfg = load_config(None, [*run, "train.resume=auto"])
    with pytest.raises(CheckpointError, match="does not fit this model") as refused:
        Trainer(cfg, progress=False)
    assert refused.traceback  # the trainer is still referenced from here, yet the folder is free
    free = lock_elsewhere(tmp_path / "r", "try")
    assert free.communicate(timeout=60)[0].strip() == "held"


def test_a_resume_on_another_validation_split_is_refused(tmp_path, sample_splits) -> None:
    """The split follows the dataset's files: images added or removed since move it, and
    best.pt would then compare scores from two validation sets."""
    from dat.checkpoint import CheckpointError
    from dat.data import load_dataset

    run = [*TINY, "method.name=pgd_at", f"train.out_dir={tmp_path}", "train.run_name=r",
           "train.epochs=1", "train.steps_per_epoch=1", "train.val_every=0"]
    assert train_main(["--no-progress", *run]) == 0
    cfg = load_config(None, [*run, "train.resume=auto", "train.epochs=2"])
    changed = load_dataset(cfg.data)
    changed.val.images = changed.val.images.flip(-1).contiguous()  # other files, same count
    with pytest.raises(CheckpointError, match="validated on other images than this run's"):
        Trainer(cfg, splits=changed, progress=False)
    Trainer(cfg, splits=load_dataset(cfg.data), progress=False)  # the same split resumes
