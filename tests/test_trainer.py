"""The trainer: a tiny run writes the whole run directory; schedule, averaging, callbacks."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from dat.averaging import WeightAverager
from dat.build import learning_rate
from dat.checkpoint import load_checkpoint
from dat.config import ConfigError, OptimConfig, load_config
from dat.models import create
from dat.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data.name=cifar10-sample", "model.name=resnet_tiny", "data.batch_size=16",
    "data.eval_batch_size=64", "data.test_subset=40", "train.epochs=1",
    "train.steps_per_epoch=4", "train.val_examples=40", "train.val_pgd_steps=2",
    "method.attack.steps=2", "perf.log_every=2", "train.image_every=2",
]

CONFIG_CALLBACK = '''
EVENTS = []

def record(trainer, event, payload):
    EVENTS.append(event)
'''


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One EMA-averaged TRADES epoch of 4 steps, with a Python and a config callback."""
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "cfg_callback.py").write_text(CONFIG_CALLBACK)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(tmp))
        cfg = load_config(None, [*TINY, "method.name=trades", "method.beta=6",
                                 "train.weight_averaging=ema", f"train.out_dir={tmp}",
                                 "train.run_name=tiny", "train.callbacks=[cfg_callback:record]"])
        trainer = Trainer(cfg, progress=False)
        events: list[tuple[str, int]] = []
        trainer.add_callback(lambda tr, event, payload: events.append(
            (event, tr.state.global_step)))
        metrics = trainer.fit()
        import cfg_callback
    return trainer, metrics, events, cfg_callback.EVENTS


def test_a_tiny_run_writes_every_artefact(tiny_run) -> None:
    trainer, metrics, _, _ = tiny_run
    run = trainer.run_dir
    for name in ("config.yaml", "metrics.json", "model.safetensors", "checkpoints/last.pt",
                 "checkpoints/best.pt"):
        assert (run / name).is_file(), name
    assert list((run / "tb").glob("events.out.tfevents.*"))
    umask = os.umask(0)
    os.umask(umask)
    # readable like the other run files (safetensors' save_file would write 0600)
    assert (run / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert load_config(str(run / "config.yaml")) == trainer.cfg
    saved = json.loads((run / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    # the default test report: AutoAttack and the CW margin attack next to PGD
    assert set(saved["test"]) == {"clean", "pgd20", "cw", "aa", "worst_case"}
    assert saved["test_examples"] == 40
    assert all(0 <= v <= 100 for v in saved["test"].values())
    assert (saved["best_epoch"], saved["steps"], saved["bad_steps"]) == (1, 4, 0)
    # which weights were tested: the EMA average, said in metrics.json and in best.pt
    assert saved["evaluated"] == "best.pt (epoch 1, ema weights)"
    assert saved["weight_averaging"] == "ema"
    assert load_checkpoint(run / "checkpoints" / "best.pt")["weights"] == "ema"
    assert saved["images_per_second"] > 0 and saved["wall_seconds"] > 0
    assert set(saved["val"]) == {"epoch", "clean", "pgd2"} and saved["test_checks"]
    report = json.loads((run / "test" / "report.json").read_text())  # the full test report
    assert report["results"] == saved["test"] and (run / "test" / "report.md").is_file()
    # the report names what it tested, as evaluate.py's reports do
    assert report["metadata"] == {
        "checkpoint": str((run / "checkpoints" / "best.pt").absolute()),
        "evaluated": "best.pt (epoch 1, ema weights)", "data": "cifar10-sample",
        "split": "test"}
    assert "Evaluated: checkpoint `" in (run / "test" / "report.md").read_text()
    findings = saved["test_check_findings"]  # each check's verdict, not only the overall one
    assert {"bounds", "eps_zero", "aa_vs_pgd", "pgd_vs_cw"} <= set(findings)
    assert all(f["status"] in ("pass", "warn", "fail", "skip") and f["message"]
               for f in findings.values())


def test_exported_weights_are_the_averaged_best_model(tiny_run, sample_batch) -> None:
    trainer, _, _, _ = tiny_run
    best = load_checkpoint(trainer.run_dir / "checkpoints" / "best.pt")["model"]
    averaged = trainer.averager.module.state_dict()
    assert all(torch.equal(best[k], averaged[k]) for k in averaged)
    raw = trainer.model.state_dict()
    assert not all(torch.equal(best[k], raw[k]) for k in raw)  # EMA differs from raw weights
    plain = create("resnet_tiny", num_classes=10).eval()
    plain.load_state_dict(load_file(trainer.run_dir / "model.safetensors"))  # strict
    x, _ = sample_batch
    with torch.no_grad():
        assert torch.allclose(plain(x), trainer.averager.module.eval()(x), atol=1e-6)


def test_tensorboard_has_scalars_for_stats_validation_test_and_images(tiny_run) -> None:
    trainer, _, _, _ = tiny_run
    events = EventAccumulator(str(trainer.run_dir / "tb"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/kl", "train/acc_adv", "train/lr", "train/images_per_s",
            "val/clean", "val/pgd2", "test/clean", "test/pgd20"} <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [2, 4]  # synced every 2 steps
    # validation and test at the global step too (not the epoch), and no val/epoch curve
    assert [e.step for e in events.Scalars("val/pgd2")] == [4] == [
        e.step for e in events.Scalars("test/clean")]
    assert not any(tag.endswith("/epoch") for tag in scalars)
    assert {"images/x", "images/x_adv"} <= set(events.Tags()["images"])


def test_callbacks_see_every_event_in_loop_order(tiny_run) -> None:
    _, _, events, config_events = tiny_run
    names = [e for e, _ in events]
    assert names[0] == "train_start" and names[-1] == "train_end"
    assert names.count("step_start") == names.count("step_end") == 4
    assert [s for e, s in events if e == "log"] == [2, 4]
    assert names.index("epoch_end") > max(i for i, n in enumerate(names) if n == "step_end")
    assert config_events == names  # the callback named in the config saw the same events


def test_a_dat_run_exports_a_plain_single_bn_model(tmp_path, capsys) -> None:
    """Also: the run says what data it uses, and warns when validation ate the data."""
    cfg = load_config(None, [*TINY, "method.name=dat", "train.steps_per_epoch=2",
                             "train.test_attacks=[clean]", f"train.out_dir={tmp_path}",
                             "data.val_size=2000"])
    trainer = Trainer(cfg, progress=False)
    assert any(".aux." in k for k in trainer.model.state_dict())
    with pytest.warns(UserWarning, match="data.val_size=2000 holds out 40% of the 5,000 "
                                         "training images, and validation uses 40 of them"):
        trainer.fit()
    assert ("data: cifar10-sample, 10 classes, 3,000 training / 2,000 validation (40 used) / "
            "40 test images, 3x32x32") in capsys.readouterr().out
    # the caller's own splits: named as such, and no held-out share to warn about
    own = Trainer(load_config(None, [*TINY, "method.name=dat", "train.steps_per_epoch=1",
                                     "train.test_attacks=[clean]", f"train.out_dir={tmp_path}",
                                     "train.run_name=own", "data.val_size=0"]),
                  splits=trainer.splits, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        own.fit()
    assert "data: your splits, 10 classes, 3,000 training / 2,000 validation" in (
        capsys.readouterr().out)
    weights = load_file(trainer.run_dir / "model.safetensors")
    assert not any(".aux." in k or ".main." in k for k in weights)
    create("resnet_tiny", num_classes=10).load_state_dict(weights)  # strict


def test_quickstart_is_a_short_dat_run_on_the_sample() -> None:
    cfg = load_config("quickstart")
    assert (cfg.method.name, cfg.data.name) == ("dat", "cifar10-sample")


def _lr(o: OptimConfig, epoch: int, step: int = 0, batch: int = 128) -> float:
    return learning_rate(o, epoch, step, steps_per_epoch=10, total_epochs=150,
                         global_batch=batch)


def test_learning_rate_schedules() -> None:
    # published DAT code: 0-based epochs, lr 0.1 while epoch < 100, x0.1 from 100 and 110
    piecewise = OptimConfig()
    assert [_lr(piecewise, e, 9) for e in (0, 99, 100, 109, 110, 149)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    cosine = OptimConfig(schedule="cosine")
    assert _lr(cosine, 0) == pytest.approx(0.1)
    assert _lr(cosine, 75) == pytest.approx(0.05)
    assert _lr(cosine, 149, 9) == pytest.approx(0.0, abs=1e-5)
    warm = OptimConfig(schedule="constant", warmup_epochs=2)
    assert [_lr(warm, 0, 0), _lr(warm, 0, 9), _lr(warm, 1, 9), _lr(warm, 2)] == pytest.approx(
        [0.005, 0.05, 0.1, 0.1])
    linear = OptimConfig(lr_scaling="linear", schedule="constant")
    assert _lr(linear, 0, batch=512) == pytest.approx(0.4)


def _net(value: float) -> nn.Module:
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        for t in [*net.parameters(), net[1].running_mean]:
            t.fill_(value)
    return net


def test_ema_and_swa_follow_their_formulas() -> None:
    model = _net(0.0)
    ema = WeightAverager(model, "ema", decay=0.5, warmup=False)
    for value in (1.0, 2.0, 4.0):
        model.load_state_dict(_net(value).state_dict())
        ema.update_step(model)
    # first update copies (1), then avg <- 0.5 avg + 0.5 new: 1.5, then 2.75
    assert torch.allclose(ema.module[0].weight, torch.full((2, 2), 2.75))
    assert torch.allclose(ema.module[1].running_mean, torch.full((2,), 2.75))
    assert int(ema.module[1].num_batches_tracked) == int(model[1].num_batches_tracked)
    swa = WeightAverager(model, "swa", swa_start=1)
    for epoch, value in enumerate((7.0, 1.0, 2.0, 6.0)):  # epoch 0 is before swa_start
        model.load_state_dict(_net(value).state_dict())
        swa.update_epoch(model, epoch)
    assert swa.n_averaged == 3
    assert torch.allclose(swa.module[0].bias, torch.full((2,), 3.0))
    restored = WeightAverager(_net(0.0), "swa")
    restored.load_state_dict(swa.state_dict())
    assert restored.n_averaged == 3 and torch.equal(restored.module[0].bias, swa.module[0].bias)
    assert math.isclose(float(ema.module[0].bias[0]), 2.75)


def test_ema_warmup_follows_its_formula_and_decay_is_not_the_weight() -> None:
    """With warmup the decay after n updates is min(decay, (1 + n) / (10 + n)): 2/11, then
    3/12; without it, avg moves by 1 - decay towards the model (0.5 would not tell them apart)."""
    model = _net(0.0)
    warm, plain = WeightAverager(model, "ema"), WeightAverager(model, "ema", 0.9, warmup=False)
    for value in (11.0, 0.0, 12.0):
        model.load_state_dict(_net(value).state_dict())
        warm.update_step(model)
        plain.update_step(model)
    # warm: 11, then 11 + 9/11 (0 - 11) = 2, then 2 + 9/12 (12 - 2) = 9.5
    assert torch.allclose(warm.module[0].weight, torch.full((2, 2), 9.5))
    # plain: 11, then 11 - 0.1 * 11 = 9.9, then 9.9 + 0.1 * (12 - 9.9) = 10.11
    assert torch.allclose(plain.module[0].weight, torch.full((2, 2), 10.11))


def test_ema_and_swa_each_average_only_on_their_own_event() -> None:
    """EMA averages per step and SWA per epoch; the trainer calls both hooks on both."""
    model = _net(1.0)
    ema, swa = WeightAverager(model, "ema"), WeightAverager(model, "swa")
    assert not ema.active and not swa.active  # nothing averaged yet: use the model
    model.load_state_dict(_net(5.0).state_dict())
    ema.update_epoch(model, 0)
    swa.update_step(model)
    assert ema.n_averaged == swa.n_averaged == 0
    assert torch.equal(ema.module[0].bias, torch.ones(2))
    assert torch.equal(swa.module[0].bias, torch.ones(2))


def test_integer_buffers_are_copied_from_the_model_not_into_it() -> None:
    """num_batches_tracked goes model -> average; the trained model must keep its own."""
    model = _net(0.0)
    ema = WeightAverager(model, "ema")
    model[1].num_batches_tracked.fill_(3)
    ema.update_step(model)
    assert int(model[1].num_batches_tracked) == 3 == int(ema.module[1].num_batches_tracked)


def test_the_average_is_frozen_and_refuses_another_kind_of_checkpoint() -> None:
    """The average is for inference: in eval mode (BN uses its averaged statistics) with no
    parameter needing gradients; an SWA average loaded into an EMA run would silently
    continue with the wrong formula."""
    model = _net(0.0)  # in train mode
    ema = WeightAverager(model, "ema")
    assert not ema.module.training and model.training
    assert not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="checkpoint averages with 'swa', this run with 'ema'; "
                                         "set train.weight_averaging=swa"):
        ema.load_state_dict(WeightAverager(model, "swa").state_dict())


@pytest.fixture
def short_autoattack(monkeypatch) -> None:
    """The reference AutoAttack, cut to 5 iterations per sub-attack and 50 Square queries.

    Tests of what is built around AutoAttack use it: at full length, a point that AA cannot
    break costs about 100 s on a CPU (the AA numbers themselves are checked against
    pyautoattack in test_evaluation.py)."""
    import pyautoattack

    full = pyautoattack.AutoAttack

    def short(*args, **kwargs):
        aa = full(*args, **kwargs)
        for attack in (aa.apgd, aa.apgd_targeted):
            attack.n_iter, attack.n_iter_2, attack.n_iter_min = 5, 2, 1
        aa.fab.n_iter, aa.square.n_queries = 5, 50
        return aa

    monkeypatch.setattr(pyautoattack, "AutoAttack", short)


def test_autoattack_callback_records_reference_aa_on_validation_images(
        tmp_path, short_autoattack) -> None:
    from dat.callbacks import AutoAttackCallback, autoattack_every_10_epochs, load_callback

    assert load_callback("dat.callbacks:autoattack_every_10_epochs") is autoattack_every_10_epochs
    cfg = load_config(None, [*TINY, "train.epochs=3", "train.steps_per_epoch=2",
                             "method.name=pgd_at", "method.attack.init=uniform",
                             f"train.out_dir={tmp_path}", "train.run_name=aa"])
    trainer = Trainer(cfg, progress=False)
    trainer.add_callback(AutoAttackCallback(every=2, n=12))
    names = [type(cb).__name__ for cb in trainer.callbacks]
    # before last.pt is saved: a stop inside AutoAttack repeats the epoch, AA included
    assert names.index("AutoAttackCallback") == names.index("CheckpointCallback") - 1
    trainer.fit()
    history = json.loads((trainer.run_dir / "autoattack.json").read_text())
    assert [h["epoch"] for h in history] == [2]  # every=2: after the second epoch only
    entry = history[0]
    assert entry["n"] == 12 and 0.0 <= entry["aa"] <= entry["clean"] <= 100.0
    # AutoAttack seeds the global generators; training must not notice: the weights equal
    # a run without the callback (epoch 3's used to differ)
    plain = Trainer(load_config(None, [*TINY, "train.epochs=3", "train.steps_per_epoch=2",
                                       "method.name=pgd_at", "method.attack.init=uniform",
                                       f"train.out_dir={tmp_path}", "train.run_name=plain"]),
                    progress=False)
    plain.fit()
    for key, value in plain.model.state_dict().items():
        assert torch.equal(value, trainer.model.state_dict()[key]), key


def test_autoattack_callback_without_validation_images_says_so(capsys) -> None:
    from types import SimpleNamespace

    from dat.callbacks import AutoAttackCallback

    trainer = SimpleNamespace(dist=SimpleNamespace(is_main=True),
                              val_data=(torch.empty(0, 3, 32, 32), torch.empty(0).long()))
    AutoAttackCallback(every=1, n=8).on_epoch_end(trainer, 0)  # used to crash the run
    assert "no validation images (data.val_size=0); skipped" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["reduce-overhead", "max-autotune"])
def test_perf_compile_compiles_the_trained_model(tmp_path, monkeypatch, mode) -> None:
    """perf.compile=reduce-overhead / max-autotune reaches torch.compile, each step starts
    a new CUDA-graph generation (both modes replay CUDA graphs), the run trains through
    the compiled module (aot_eager here: no code generation on the test CPU) and saves
    the plain model's weights."""
    real_compile, modes, marks = torch.compile, [], []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))

    def aot_eager_compile(model, mode=None, dynamic=None, **kw):
        modes.append((mode, dynamic))
        return real_compile(model, backend="aot_eager", dynamic=dynamic)

    monkeypatch.setattr(torch, "compile", aot_eager_compile)
    torch._dynamo.reset()
    cfg = load_config(None, [*TINY, "method.name=dat", "train.steps_per_epoch=2",
                             f"perf.compile={mode}", "train.test_attacks=[clean]",
                             f"train.out_dir={tmp_path}", "train.run_name=compiled"])
    trainer = Trainer(cfg, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    metrics = trainer.fit()
    assert modes == [(mode, False)] and len(marks) == 2
    assert metrics["steps"] == 2 and metrics["bad_steps"] == 0  # finite, nothing rolled back
    after = trainer.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained
    saved = load_checkpoint(tmp_path / "compiled" / "checkpoints" / "last.pt")
    assert not any("_orig_mod" in k for k in saved["model"])


def test_channels_last_stays_off_where_torch_cpu_backward_crashes() -> None:
    """resnet_tiny's strided 1x1 shortcuts (8 input channels) segfault torch 2.14's CPU
    weight backward in channels_last on odd batches: auto leaves them NCHW, on refuses."""
    from dat.build import cpu_channels_last_crashes, resolve_channels_last

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    tiny, small = create("resnet_tiny"), create("resnet_small")
    assert cpu_channels_last_crashes(tiny) and not cpu_channels_last_crashes(small)
    assert not resolve_channels_last("auto", cpu, tiny)
    assert resolve_channels_last("auto", cpu, small) and resolve_channels_last("auto", cuda, tiny)
    with pytest.raises(ConfigError, match="perf.channels_last=auto or off"):
        resolve_channels_last("on", cpu, tiny)


def test_an_odd_batch_on_resnet_tiny_trains_with_two_threads(tmp_path) -> None:
    """The run that used to die in a segfault (batch 3, 2 threads, channels_last)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "model.name=resnet_tiny", "method.name=pgd_at",
         "data.batch_size=3", "train.epochs=1", "train.steps_per_epoch=2",
         "train.val_examples=10", "data.test_subset=10", "train.test_attacks=[clean]",
         "method.attack.steps=1", "train.image_every=0", f"train.out_dir={tmp_path}"],
        env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize(("capability", "auto", "warns"), [
    ((9, 0), torch.bfloat16, None),  # H100: bf16 tensor cores
    ((8, 0), torch.bfloat16, None),  # A100
    ((7, 5), None, "sm_75"),  # T4: bf16 emulated, fp32 is faster
    ((7, 0), None, "sm_70"),  # V100
])
def test_auto_precision_is_bf16_only_where_the_gpu_has_bf16_tensor_cores(
        monkeypatch, capability, auto, warns) -> None:
    from dat.build import precision_warning, resolve_precision

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_precision("auto", cuda) is auto
    assert resolve_precision("bf16", cuda) is torch.bfloat16  # asked for: as asked
    assert resolve_precision("fp32", cuda) is None and resolve_precision("auto", cpu) is None
    assert precision_warning("fp32", cuda) is None and precision_warning("auto", cpu) is None
    if warns is None:
        assert precision_warning("auto", cuda) is None and precision_warning("bf16", cuda) is None
    else:
        assert f"this GPU ({warns}) has no bf16 tensor cores: training in fp32" in (
            precision_warning("auto", cuda))
        assert "bf16 runs emulated, slower" in precision_warning("bf16", cuda)


def test_perf_auto_picks_the_measured_cpu_fast_path(tmp_path) -> None:
    """auto on a CPU: channels_last on, branches as two B batches, fp32 (BENCHMARKS.md)."""
    from dat.build import resolve_batched, resolve_channels_last

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_channels_last("auto", cpu) and resolve_channels_last("auto", cuda)
    assert not resolve_batched("auto", cpu) and resolve_batched("auto", cuda)
    assert resolve_batched("on", cpu) and not resolve_channels_last("off", cuda)
    cfg = load_config(None, [*TINY, "method.name=dat", f"train.out_dir={tmp_path}",
                             "model.name=resnet_small"])
    trainer = Trainer(cfg, progress=False)
    conv = next(m for m in trainer.model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert trainer.method.batched is False and trainer.method.autocast_dtype is None
    off = load_config(None, [*TINY, "method.name=dat", f"train.out_dir={tmp_path}",
                             "perf.channels_last=off", "perf.batched_branches=on",
                             "train.run_name=off"])
    trainer = Trainer(off, progress=False)
    conv = next(m for m in trainer.model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous() and trainer.method.batched is True


def test_step_stats_are_summed_on_the_device_by_name(tmp_path) -> None:
    """Good steps' stats add up in one vector; a stat that comes and goes keeps its name."""
    trainer = Trainer(load_config(None, [*TINY, "method.name=trades",
                                         f"train.out_dir={tmp_path}"]), progress=False)
    trainer._reset_log()
    yes, no = torch.tensor(True), torch.tensor(False)
    trainer._accumulate({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}, yes)
    trainer._accumulate({"a": torch.tensor(1.0), "b": torch.tensor(3.0)}, yes)
    trainer._accumulate({"a": torch.tensor(1.0), "c": torch.tensor(5.0)}, yes)
    trainer._accumulate({"a": torch.tensor(7.0), "c": torch.tensor(float("nan"))}, no)
    assert trainer._sum_keys == ("a", "b", "c")
    assert trainer._sum_vec.tolist() == [3.0, 5.0, 5.0] and float(trainer._good) == 3.0


def test_your_own_architecture_trains_evaluates_and_exports_from_the_cli(tmp_path,
                                                                         monkeypatch) -> None:
    """model.name=nets.py:build: a builder of your own, as evaluate.py --model takes it; the
    run stores its absolute path, so evaluation and export work from any folder."""
    from test_models import NETS

    from dat.cli import train_main
    from dat.evaluation.cli import evaluate_main
    from dat.export import main as export_main

    work = tmp_path / "work"
    work.mkdir()
    (work / "nets.py").write_text(NETS)
    monkeypatch.chdir(work)
    assert train_main(["--no-progress", *TINY, "model.name=nets.py:build", "method.name=dat",
                       "train.steps_per_epoch=2", "train.test_attacks=[clean]",
                       f"train.out_dir={tmp_path}/runs", "train.image_every=0"]) == 0
    run = next((tmp_path / "runs").iterdir())
    assert run.name.startswith("dat-nets.build-cifar10-sample-")
    assert load_config(str(run / "config.yaml")).model.name == f"{work / 'nets.py'}:build"
    monkeypatch.chdir(tmp_path)  # elsewhere: the stored absolute path still resolves
    assert evaluate_main(["--checkpoint", str(run), "--attacks", "clean", "--n-examples", "8",
                          "--no-progress", "--no-checks"]) == 0
    assert export_main(["--checkpoint", str(run), "--format", "safetensors",  # a run folder
                        "--out", str(tmp_path / "net.safetensors")]) == 0
