"""Resume safety: a resume continues the same experiment or refuses in one line; Ctrl-C
leaves a resumable run (or says how to start over); summary and callback numbering."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dat.checkpoint import load_checkpoint
from dat.cli import _summary, train_main
from dat.config import load_config
from dat.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
TINY = [
    "data.name=cifar10-sample", "model.name=resnet_tiny", "data.batch_size=16",
    "data.eval_batch_size=64", "data.test_subset=20", "train.epochs=2",
    "train.steps_per_epoch=2", "train.val_examples=20", "train.val_pgd_steps=2",
    "train.test_attacks=[clean]", "train.image_every=0", "perf.log_every=1",
    "method.attack.steps=1",
]

SIGINT_CALLBACK = '''
import os, signal

def ctrl_c(trainer, event, payload):
    """Ctrl-C in the middle of step 1, as a user at the keyboard would."""
    if event == "step_end" and trainer.state.global_step == 1:
        os.kill(os.getpid(), signal.SIGINT)
'''


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, list]:
    """A finished 2-epoch DAT run ``demo`` and the ``epoch_end`` payloads it emitted."""
    out = tmp_path_factory.mktemp("runs")
    payloads: list = []
    cfg = load_config(None, [*TINY, "method.name=dat", f"train.out_dir={out}",
                             "train.run_name=demo"])
    trainer = Trainer(cfg, progress=False, callbacks=(
        lambda tr, event, payload: payloads.append(payload) if event == "epoch_end" else None,))
    trainer.fit()
    return out, payloads


def _copy(finished: tuple[Path, list], tmp_path: Path) -> Path:
    shutil.copytree(finished[0] / "demo", tmp_path / "demo")
    return tmp_path


def _error(capsys, argv: list[str]) -> str:
    code = train_main(["--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def _resume(out: Path, *overrides: str) -> list[str]:
    return ["--resume", "auto", f"train.out_dir={out}", "train.run_name=demo", *overrides]


@pytest.mark.parametrize(("overrides", "expected"), [
    (["data.name=cifar10", "data.root=/nowhere/cifar10-jpg", "train.epochs=3"],
     "does not match this run's data (data.name: trained with cifar10-sample, this run sets "
     "cifar10)"),
    (["data.split_seed=1"], "data.split_seed: trained with 0, this run sets 1"),
    (["method.beta=3"], "method, optimiser or weight averaging (method.beta"),
    (["method.attack.eps=4/255"], "(method.attack.eps"),
    (["train.val_examples=10"], "training or validation settings (train.val_examples"),
    (["optim.momentum=0.5"], "(optim.momentum"),
])
def test_resume_refuses_another_experiment(capsys, finished, overrides, expected) -> None:
    out = finished[0]
    before = (out / "demo" / "metrics.json").read_text()
    err = _error(capsys, _resume(out, *overrides))
    assert expected in err
    assert "resume without that override, or start a new run with another train.run_name" in err
    assert (out / "demo" / "metrics.json").read_text() == before  # nothing rewritten
    assert "cifar10-sample" in (out / "demo" / "config.yaml").read_text()


def test_resume_into_another_run_name_is_refused(capsys, finished) -> None:
    """--resume PATH train.run_name=NEW continued in PATH's own folder, overwriting that
    run's best.pt and metrics.json, and never made NEW."""
    out = finished[0]
    before = (out / "demo" / "metrics.json").read_text()
    err = _error(capsys, ["--resume", str(out / "demo" / "checkpoints" / "last.pt"),
                          "train.epochs=3", "train.run_name=copy"])
    assert f"--resume continues the run in {out / 'demo'}, not in train.run_name=copy" in err
    assert f"cp -r {out / 'demo'} {out / 'copy'}" in err
    assert (out / "demo" / "metrics.json").read_text() == before
    assert not (out / "copy").exists()
    err = _error(capsys, ["--resume", str(out / "demo"), "train.epochs=3",
                          f"train.out_dir={out / 'elsewhere'}"])
    assert f"not in train.out_dir={out / 'elsewhere'}; drop train.out_dir" in err
    assert f"cp -r {out / 'demo'} {out / 'elsewhere' / 'demo'}" in err
    # its own name and folder are no change
    assert train_main(["--print-config", "--resume", str(out / "demo"),
                       "train.run_name=demo", f"train.out_dir={out}"]) == 0
    capsys.readouterr()


def test_a_repeated_run_folder_override_is_judged_by_the_value_that_takes_effect(
        capsys, finished) -> None:
    """A later key=value overrides an earlier one (as in a script that appends its own
    train.out_dir to a base list): --resume was refused over the earlier, unused value."""
    out = finished[0]
    assert train_main(["--print-config", "--resume", "auto", f"train.out_dir={out / 'old'}",
                       f"train.out_dir={out}", "train.run_name=other",
                       "train.run_name=demo"]) == 0
    assert "run_name: demo\n" in capsys.readouterr().out
    # the value that takes effect is still checked
    err = _error(capsys, ["--resume", str(out / "demo"), f"train.out_dir={out}",
                          f"train.out_dir={out / 'elsewhere'}"])
    assert f"not in train.out_dir={out / 'elsewhere'}; drop train.out_dir" in err


def test_a_mid_epoch_resume_with_the_dataloader_path_is_bit_identical(tmp_path) -> None:
    """data.loader=dataloader: stop after step 3 (mid-epoch 2, an exact resume point, as
    Ctrl-C saves), resume, and end with the uninterrupted run's weights and generator."""
    def cfg(name: str, *more: str):
        return load_config(None, [*TINY, "data.loader=dataloader", "data.num_workers=0",
                                  "train.epochs=2", f"train.out_dir={tmp_path}",
                                  f"train.run_name={name}", *more])

    Trainer(cfg("full"), progress=False).fit()
    cut = Trainer(cfg("cut"), progress=False)
    cut.add_callback(lambda tr, event, payload: event == "step_end"
                     and tr.state.global_step == 3 and tr.request_stop())
    cut.fit()
    Trainer(cfg("cut", "train.resume=auto"), progress=False).fit()
    a, b = (load_checkpoint(tmp_path / n / "checkpoints" / "last.pt") for n in ("full", "cut"))
    assert a["trainer"]["global_step"] == b["trainer"]["global_step"] == 4
    for key in ("model", "method"):
        flat_a, flat_b = ({k: v for k, v in _tensors(s[key])} for s in (a, b))
        assert flat_a.keys() == flat_b.keys()
        assert all(torch.equal(flat_a[k], flat_b[k]) for k in flat_a), key


def _tensors(tree, prefix: str = ""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, f"{prefix}{k}.")
    elif isinstance(tree, list | tuple):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{prefix}{i}.")
    elif torch.is_tensor(tree):
        yield prefix, tree


def test_print_config_with_resume_checks_the_resume_first(capsys, finished) -> None:
    err = _error(capsys, ["--print-config", *_resume(finished[0], "method.beta=3")])
    assert "(method.beta" in err and "resume without that override" in err
    assert train_main(["--print-config", *_resume(finished[0], "train.epochs=3")]) == 0
    printed = capsys.readouterr().out
    assert "epochs: 3" in printed and "name: dat" in printed
    # by folder: the run name is the folder the resumed run writes into, as training stamps it
    assert train_main(["--print-config", "--resume", str(finished[0] / "demo")]) == 0
    assert "run_name: demo\n" in capsys.readouterr().out


def test_resume_dat_as_trades_reports_the_method_change(capsys, finished) -> None:
    err = _error(capsys, _resume(finished[0], "method.name=trades"))
    assert "method.name: trained with dat, this run sets trades" in err
    assert "architecture" not in err


def test_resume_may_extend_epochs_and_change_speed_settings(capsys, finished, tmp_path) -> None:
    out = _copy(finished, tmp_path)
    assert train_main(["--no-progress", *_resume(out, "train.epochs=3", "perf.log_every=2",
                                                 "data.eval_batch_size=32")]) == 0
    metrics = json.loads((out / "demo" / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and load_config(str(out / "demo/config.yaml")).train.epochs == 3
    assert [h["epoch"] for h in metrics["val_history"]] == [1, 2, 3]


def test_resume_with_fewer_epochs_is_refused(capsys, finished) -> None:
    out = finished[0]
    err = _error(capsys, _resume(out, "train.epochs=1"))
    assert "already completed 2 epochs, but this run sets train.epochs=1" in err
    assert "resume with train.epochs=2" in err
    assert load_config(str(out / "demo" / "config.yaml")).train.epochs == 2  # not rewritten


def test_resume_of_a_finished_run_says_nothing_is_left_to_train(
        capsys, finished, tmp_path) -> None:
    out = _copy(finished, tmp_path)
    assert train_main(["--no-progress", *_resume(out)]) == 0
    printed = capsys.readouterr().out
    assert "already completed all 2 epochs; nothing to train, re-running the final test" in printed
    assert json.loads((out / "demo" / "metrics.json").read_text())["epochs"] == 2


def test_resume_of_a_finished_one_epoch_run_counts_its_one_epoch(capsys, tmp_path) -> None:
    one = [o for o in TINY if not o.startswith("train.epochs=")]
    run = [f"train.out_dir={tmp_path}", "train.run_name=one"]
    assert train_main(["--no-progress", *one, "train.epochs=1", "method.name=pgd_at", *run]) == 0
    capsys.readouterr()
    assert train_main(["--no-progress", "--resume", "auto", *run]) == 0
    printed = capsys.readouterr().out
    assert "already completed its one epoch; nothing to train" in printed


def _tiny_cfg(out: Path, *extra: str):
    return load_config(None, [*TINY, "method.name=trades", f"train.out_dir={out}", *extra])


def _state_equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_state_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_state_equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def test_ctrl_c_mid_step_saves_an_exact_resume_point(tmp_path) -> None:
    Trainer(_tiny_cfg(tmp_path, "train.run_name=straight"), progress=False).fit()

    def ctrl_c(tr, event, payload) -> None:
        if event == "step_end" and tr.state.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    trainer = Trainer(_tiny_cfg(tmp_path, "train.run_name=cut"), progress=False,
                      callbacks=(ctrl_c,))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    mid = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (mid["trainer"]["global_step"], mid["trainer"]["step_in_epoch"]) == (1, 1)
    # the interrupted session's time is kept, so images/s after the resume stays honest
    assert mid["trainer"]["wall_seconds"] > 0 and mid["trainer"]["step_seconds"] > 0
    Trainer(_tiny_cfg(tmp_path, "train.run_name=cut", "train.resume=auto"),
            progress=False).fit()
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    for key in ("model", "optimizer", "method"):
        assert _state_equal(a[key], b[key]), key
    assert a["trainer"]["history"] == b["trainer"]["history"]


def test_ctrl_c_before_any_checkpoint_prints_a_start_over_command(
        capsys, monkeypatch, tmp_path) -> None:
    def interrupted(self):
        raise KeyboardInterrupt

    argv = ["--no-progress", *TINY, "method.name=pgd_at", "train.epochs=1",
            f"train.out_dir={tmp_path}", "train.run_name=early"]
    with monkeypatch.context() as m:
        m.setattr(Trainer, "fit", interrupted)
        assert train_main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--resume" not in err and "nothing to resume" in err
    command = shlex.split(err.split("start over: ", 1)[1])
    assert command[:2] == ["python", "train.py"]
    assert train_main(command[2:]) == 0  # the printed command works


def test_ctrl_c_closes_the_bar_and_prints_a_working_resume_command(tmp_path) -> None:
    (tmp_path / "sigint_cb.py").write_text(SIGINT_CALLBACK)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    args = [*TINY, "method.name=pgd_at", "train.out_dir=runs", "train.run_name=bar",
            "train.callbacks=[sigint_cb:ctrl_c]"]
    cut = subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert cut.returncode == 130, cut.stderr[-2000:]
    pieces = [p.strip() for p in cut.stderr.replace("\r", "\n").split("\n") if p.strip()]
    assert pieces[-1].startswith("interrupted; continue from the last checkpoint: ")
    command = shlex.split(pieces[-1].split(": ", 1)[1])
    resumed = subprocess.run([sys.executable, str(REPO / "train.py"), "--no-progress",
                              *command[2:], "train.callbacks=[]"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "in epoch 1 (1-based, as in metrics.json), after 1 of its" in resumed.stdout


SIGTERM_CALLBACK = SIGINT_CALLBACK.replace("signal.SIGINT", "signal.SIGTERM")


def test_a_schedulers_sigterm_saves_an_exact_resume_point_and_exits_143(tmp_path) -> None:
    """SIGTERM (SLURM and others, before their kill -9) used to end the run at once."""
    (tmp_path / "sigterm_cb.py").write_text(SIGTERM_CALLBACK)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    args = [*TINY, "method.name=pgd_at", "train.out_dir=runs", "train.run_name=term",
            "train.callbacks=[sigterm_cb:ctrl_c]"]
    cut = subprocess.run([sys.executable, str(REPO / "train.py"), "--no-progress", *args],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert cut.returncode == 143, cut.stderr[-2000:]
    assert cut.stderr.strip().splitlines()[-1].startswith(
        "interrupted; continue from the last checkpoint: ")
    saved = load_checkpoint(tmp_path / "runs" / "term" / "checkpoints" / "last.pt")
    assert (saved["trainer"]["global_step"], saved["trainer"]["step_in_epoch"]) == (1, 1)


def test_summary_labels_the_throughput_as_training() -> None:
    line = _summary({"test": {"clean": 28.4, "pgd20": 18.2}, "test_examples": 500,
                     "evaluated": "best.pt (epoch 4)", "images_per_second": 93.24})
    assert line == ("test (500 images, best.pt (epoch 4)): clean 28.40%, pgd20 18.20%; "
                    "training 93.2 images/s")
    empty = _summary({"test": {}, "test_examples": 0, "evaluated": "best.pt (epoch 4)",
                      "images_per_second": 93.24})  # train.test_attacks=[]
    assert empty.startswith("test (0 images, best.pt (epoch 4)): no test attacks; training")


def test_epoch_end_checkpoints_keep_the_time_spent(finished) -> None:
    """wall_seconds used to be counted only when fit() ended: a run killed later resumed
    with the time of its earlier sessions only."""
    out, _ = finished
    saved = load_checkpoint(out / "demo" / "checkpoints" / "last.pt")["trainer"]
    metrics = json.loads((out / "demo" / "metrics.json").read_text())
    assert 0 < saved["wall_seconds"] <= metrics["wall_seconds"] + 0.01


def test_epoch_end_payload_has_the_1_based_epoch_number(finished) -> None:
    out, payloads = finished
    assert payloads == [0, 1]  # the documented 0-based index, unchanged for old callbacks
    history = json.loads((out / "demo" / "metrics.json").read_text())["val_history"]
    assert [p.number for p in payloads] == [h["epoch"] for h in history] == [1, 2]


def test_a_mid_epoch_checkpoint_cannot_be_cut_to_its_completed_epochs() -> None:
    """Epoch 1 done and 3 steps into epoch 2: train.epochs=1 would drop those steps."""
    from dat.checkpoint import CheckpointError, check_compatible
    from dat.config import config_to_dict

    cfg = config_to_dict(load_config(None, ["train.epochs=1"]))
    state = {"config": config_to_dict(load_config(None, ["train.epochs=3"])),
             "trainer": {"epoch": 1, "step_in_epoch": 3}}
    with pytest.raises(CheckpointError, match="already started 2 epochs"):
        check_compatible(state, cfg["model"]["name"], None, cfg)


def test_a_stored_config_this_version_cannot_validate_compares_new_keys_at_default() -> None:
    """An old checkpoint lacking today's keys (and holding a value no longer valid in a key
    that may change) is compared with the defaults filled in, not refused for every new key."""
    from dat.checkpoint import check_compatible
    from dat.config import config_to_dict

    cfg = config_to_dict(load_config(None, []))
    old = config_to_dict(load_config(None, []))
    del old["method"]["generator_update"], old["train"]["ema_warmup"]  # added later
    old["perf"]["precision"] = "fp16"  # no longer valid: the stored config does not validate
    check_compatible({"config": old, "trainer": {"epoch": 0}}, cfg["model"]["name"], None, cfg)


def test_a_second_ctrl_c_in_a_step_stops_at_once_without_saving(tmp_path) -> None:
    def ctrl_c_twice(tr, event, payload) -> None:
        if event == "step_start" and tr.state.global_step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # deferred to the end of the step
            os.kill(os.getpid(), signal.SIGINT)  # the user insists: stop now

    trainer = Trainer(_tiny_cfg(tmp_path, "train.run_name=twice"), progress=False,
                      callbacks=(ctrl_c_twice,))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.state.global_step == 1  # the second step never finished
    assert not (tmp_path / "twice" / "checkpoints" / "last.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_in_the_final_test_resumes_only_the_unfinished_attacks(tmp_path,
                                                                      monkeypatch) -> None:
    """The final test saves each finished attack; ``--resume`` after a Ctrl-C there runs
    only the rest, and the numbers equal an uninterrupted run's."""
    from dat.evaluation import runner
    from dat.evaluation.suite import attack_points

    attacks = "train.test_attacks=[clean,fgsm,cw]"
    straight = Trainer(_tiny_cfg(tmp_path, "train.run_name=straight", attacks),
                       progress=False).fit()
    ran: list[str] = []
    cut = {"at": "cw"}

    def cut_at_cw(spec, *args, **kwargs):
        if spec.name == cut["at"]:
            raise KeyboardInterrupt
        ran.append(spec.name)
        return attack_points(spec, *args, **kwargs)
    monkeypatch.setattr(runner, "attack_points", cut_at_cw)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_tiny_cfg(tmp_path, "train.run_name=cut", attacks), progress=False).fit()
    assert ran == ["fgsm"]
    ran.clear()
    cut["at"] = None
    resumed = Trainer(_tiny_cfg(tmp_path, "train.run_name=cut", attacks, "train.resume=auto"),
                      progress=False).fit()
    assert ran[0] == "cw" and "fgsm" not in ran  # fgsm came from progress.json
    assert resumed["test"] == straight["test"]


def test_a_resume_restores_the_weight_average_counters_and_random_states(
        tmp_path, sample_splits) -> None:
    """The EMA copy, which no other resume test reaches (their runs average nothing), and,
    checked directly rather than through bit-identical weights, every TrainState counter
    and the Python, NumPy and torch RNG states right after Trainer(cfg) resumed. best.pt
    is written after last.pt here (a kill between the two at an epoch's end): the best
    scores must come from best.pt, the file they describe."""
    import random
    from dataclasses import asdict

    import numpy as np

    run = ["train.run_name=ema", "train.weight_averaging=ema"]
    first = Trainer(_tiny_cfg(tmp_path, *run), progress=False, splits=sample_splits)
    with torch.no_grad():
        for p in first.model.parameters():
            p.add_(1.0)  # the average now differs from a freshly built one
    first.averager.update_step(first.model)
    random.random(), np.random.rand(), torch.rand(1)  # as training draws: the states move on
    s = first.state
    s.epoch, s.global_step, s.images_seen, s.bad_steps = 1, 2, 32, 1
    s.step_seconds, s.wall_seconds, s.history = 1.5, 2.5, [{"epoch": 1, "clean": 50.0}]
    first.save_last()
    counters = asdict(s)  # what last.pt holds
    s.last_val = {"epoch": 1, "clean": 50.0, "pgd2": 12.5}
    s.best_val_pgd, s.best_val_clean, s.best_epoch = 12.5, 50.0, 1
    first.save_best()
    del first
    saved = load_checkpoint(tmp_path / "ema" / "checkpoints" / "last.pt")
    random.seed(1), np.random.seed(1), torch.manual_seed(1)  # anything but the saved states
    resumed = Trainer(_tiny_cfg(tmp_path, *run, "train.resume=auto"), progress=False,
                      splits=sample_splits)
    assert _state_equal(resumed.averager.state_dict(), saved["averaging"])
    assert resumed.averager.n_averaged == 1
    best = {"best_val_pgd": 12.5, "best_val_clean": 50.0, "best_epoch": 1}
    assert counters["best_epoch"] == 0  # so the next line also checks best.pt was read
    assert asdict(resumed.state) == {**counters, **best}
    rng = saved["rng"]
    assert random.getstate()[1] == tuple(rng["python"][1])
    assert np.random.get_state()[2] == rng["numpy"]["pos"]
    assert torch.equal(torch.get_rng_state(), rng["torch"])


def test_older_copies_hold_older_steps_when_a_step_save_meets_an_epoch_end(tmp_path) -> None:
    """train.checkpoint_every dividing the epoch saves last.pt at an epoch's last step, and
    the epoch end saves it again at that same step (now with the validation and the epoch
    count). The second save replaces last.pt: rotating would spend last.1.pt on a copy of
    the same step and push the previous epoch's end out of the kept copies."""
    Trainer(_tiny_cfg(tmp_path, "train.run_name=r", "train.checkpoint_every=2",
                      "train.keep_checkpoints=2"), progress=False).fit()
    folder = tmp_path / "r" / "checkpoints"
    kept = {n: load_checkpoint(folder / n)["trainer"] for n in ("last.pt", "last.1.pt")}
    assert (kept["last.pt"]["global_step"], kept["last.pt"]["epoch"]) == (4, 2)
    assert (kept["last.1.pt"]["global_step"], kept["last.1.pt"]["epoch"]) == (2, 1)
    assert not (folder / "last.2.pt").exists()  # only two distinct steps were saved
