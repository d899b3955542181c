"""Callbacks named in ``train.callbacks``: loading errors in one line (a missing module apart
from one that fails while importing), loaded before the data and the model, and the
``train_error`` event when ``fit()`` raises."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
import torch

import dat.trainer
from dat.callbacks import Callback, ValidationCallback, load_callback, robust_accuracy
from dat.cli import train_main
from dat.config import ConfigError, load_config
from dat.trainer import Trainer

TINY = [
    "data.name=cifar10-sample", "model.name=resnet_tiny", "data.batch_size=16",
    "data.eval_batch_size=64", "data.test_subset=20", "data.train_subset=128",
    "train.epochs=1", "train.steps_per_epoch=2", "train.val_examples=20",
    "train.val_pgd_steps=1", "method.name=pgd_at", "method.attack.steps=1",
    "method.attack.init=uniform", "perf.log_every=1", "train.image_every=0",
    "train.test_attacks=[clean]",
]

HOOKS = '''
from dat.callbacks import Callback

EVENTS = []
LIMIT = 3


def record(trainer, event, payload):
    EVENTS.append((event, payload))


def two_params(trainer, event):
    pass


class NeedsArgs(Callback):
    def __init__(self, every):
        self.every = every


class Early(Callback):
    before_checkpoint = True

    def on_train_error(self, trainer, error):
        EVENTS.append(("Early.on_train_error", error))
'''


def _module(folder: Path, name: str, text: str, monkeypatch) -> None:
    (folder / f"{name}.py").write_text(text)
    monkeypatch.syspath_prepend(str(folder))


def _cfg(tmp_path, *extra):
    return load_config(None, [*TINY, f"train.out_dir={tmp_path}", *extra])


def _error_line(capsys, tmp_path, *extra: str) -> str:
    code = train_main(["--no-progress", *TINY, f"train.out_dir={tmp_path}", *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("hooks_dep", "import os\nimport not_installed_pkg_xyz\n",
     "importing 'hooks_dep' failed: No module named 'not_installed_pkg_xyz' (a module it "
     "imports, at {folder}/hooks_dep.py line 2; install it or fix that import)"),
    ("hooks_syntax", "def record(trainer, event, payload)\n    pass\n",
     "importing 'hooks_syntax' failed: SyntaxError: expected ':' ({folder}/hooks_syntax.py "
     "line 1); fix the module"),
    ("hooks_raise", "\nraise RuntimeError('no tracker token')\n",
     "importing 'hooks_raise' failed: RuntimeError: no tracker token ({folder}/hooks_raise.py "
     "line 2); fix the module"),
], ids=["missing-dependency", "syntax-error", "raises"])
def test_a_callbacks_module_that_fails_while_importing_says_why_in_one_line(
        capsys, monkeypatch, tmp_path, name, text, expected) -> None:
    _module(tmp_path, name, text, monkeypatch)
    err = _error_line(capsys, tmp_path, f"train.callbacks=[{name}:record]")
    assert err == (f"error: train.callbacks '{name}:record': "
                   + expected.format(folder=tmp_path))
    assert "PYTHONPATH" not in err  # the module was found: its folder is not the problem


def test_from_python_a_failing_callbacks_module_is_a_config_error_chained_from_its_own(
        monkeypatch, tmp_path) -> None:
    _module(tmp_path, "hooks_boom", "raise RuntimeError('no tracker token')\n", monkeypatch)
    with pytest.raises(ConfigError, match="importing 'hooks_boom' failed") as caught:
        load_callback("hooks_boom:record")
    assert isinstance(caught.value.__cause__, RuntimeError)  # for a debugger: the original
    _module(tmp_path, "hooks_needs", "import not_installed_pkg_xyz\n", monkeypatch)
    with pytest.raises(ConfigError, match="a module it imports") as caught:
        load_callback("hooks_needs:record")
    assert caught.value.__cause__.name == "not_installed_pkg_xyz"
    with pytest.raises(ConfigError, match="cannot import 'no_such_hooks_xyz'.*PYTHONPATH"
                       ) as caught:  # not there at all: where Python looks is the problem
        load_callback("no_such_hooks_xyz:record")
    assert caught.value.__cause__ is None


@pytest.mark.parametrize(("entry", "expected"), [
    ("hooks_attr:recrod", "hooks_attr has no 'recrod'; did you mean 'record'?"),
    ("hooks_attr:Early.on_train_eror", "hooks_attr.Early has no 'on_train_eror'; did you "
                                       "mean 'on_train_error'?"),
    ("hooks_attr:LIMIT", "hooks_attr.LIMIT (int) is not callable; name a function "
                         "fn(trainer, event, payload), a Callback subclass or an instance of one"),
], ids=["typo", "dotted-typo", "not-callable"])
def test_a_missing_or_uncallable_attribute_is_named_with_the_fix(
        capsys, monkeypatch, tmp_path, entry, expected) -> None:
    _module(tmp_path, "hooks_attr", HOOKS, monkeypatch)
    err = _error_line(capsys, tmp_path, f"train.callbacks=[{entry}]")
    assert err == f"error: train.callbacks {entry!r}: {expected}"


def test_a_callback_class_needing_arguments_says_how_to_give_them(
        capsys, monkeypatch, tmp_path) -> None:
    _module(tmp_path, "hooks_args", HOOKS, monkeypatch)
    err = _error_line(capsys, tmp_path, "train.callbacks=[hooks_args:NeedsArgs]")
    assert err.startswith("error: train.callbacks 'hooks_args:NeedsArgs': hooks_args.NeedsArgs() "
                          "failed (") and "'every'" in err, err
    assert "trainer.add_callback(NeedsArgs(...))" in err, err


def test_a_callback_function_with_the_wrong_parameters_fails_at_once(
        capsys, monkeypatch, tmp_path) -> None:
    """It used to fail at train_start, after the data and the model were built."""
    _module(tmp_path, "hooks_sig", HOOKS, monkeypatch)
    err = _error_line(capsys, tmp_path, "train.callbacks=[hooks_sig:two_params]")
    assert err == ("error: train.callbacks 'hooks_sig:two_params': callback two_params(trainer, "
                   "event) cannot take (trainer, event, payload); give it those three parameters")
    trainer = Trainer(_cfg(tmp_path), progress=False)
    with pytest.raises(TypeError, match="cannot take"):
        trainer.add_callback(lambda trainer, event: None)
    with pytest.raises(TypeError, match="not int"):
        trainer.add_callback(42)
    trainer.add_callback(lambda *args: None)  # any signature that takes three arguments
    with pytest.raises(TypeError, match=r"^Callback is a Callback class; add an instance"):
        trainer.add_callback(Callback)  # the class itself


def test_a_callbacks_file_loads_by_path_and_the_run_stores_it_absolute(
        capsys, monkeypatch, tmp_path) -> None:
    (tmp_path / "my_hooks.py").write_text(HOOKS)
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(_cfg(tmp_path, "train.callbacks=[my_hooks.py:record]"), progress=False)
    assert trainer.cfg.train.callbacks == [f"{Path.cwd() / 'my_hooks.py'}:record"]
    assert trainer.callbacks[-1].fn.__name__ == "record"
    err = _error_line(capsys, tmp_path, "train.callbacks=[sub/none.py:record]")
    assert f"{Path.cwd() / 'sub' / 'none.py'} does not exist; pass the path of a .py" in err


def test_config_callbacks_load_before_the_data_and_the_model_in_their_order(
        monkeypatch, tmp_path) -> None:
    """A typo used to surface only after the data had loaded and the model was built."""
    loaded: list[bool] = []  # at each data load: was the callbacks module imported yet?
    built: list[int] = []
    real_load, real_build = dat.trainer.load_dataset, dat.trainer.build_model

    def load_dataset(data_cfg):
        loaded.append("hooks_early" in sys.modules)
        return real_load(data_cfg)

    def build_model(*args):
        built.append(1)
        return real_build(*args)

    monkeypatch.setattr(dat.trainer, "load_dataset", load_dataset)
    monkeypatch.setattr(dat.trainer, "build_model", build_model)
    _module(tmp_path, "hooks_early", HOOKS, monkeypatch)
    with pytest.raises(ConfigError, match="hooks_early has no 'recrod'"):
        Trainer(_cfg(tmp_path, "train.callbacks=[hooks_early:recrod]"), progress=False)
    assert loaded == [] and built == []  # nothing was loaded or built for it
    with pytest.raises(TypeError, match="cannot take"):  # a Python callback, as early
        Trainer(_cfg(tmp_path), callbacks=(lambda trainer, event: None,), progress=False)
    assert loaded == [] and built == []
    monkeypatch.delitem(sys.modules, "hooks_early")  # imported again below

    def mine(tr, event, payload) -> None: ...

    trainer = Trainer(_cfg(tmp_path, "train.callbacks=[hooks_early:record,hooks_early:Early]"),
                      callbacks=(mine,), progress=False)
    assert loaded == [True] and built == [1]
    names = [cb.fn.__name__ if hasattr(cb, "fn") else type(cb).__name__
             for cb in trainer.callbacks]
    # as before: built-ins, then the config's, then Python's; Early before last.pt is saved
    assert names == ["ValidationCallback", "Early", "CheckpointCallback",
                     "TensorBoardCallback", "record", "mine"]


def test_train_error_reaches_every_callback_and_a_failing_one_does_not_hide_the_error(
        capsys, monkeypatch, tmp_path) -> None:
    _module(tmp_path, "hooks_error", HOOKS, monkeypatch)
    seen: list[tuple] = []

    def boom(tr, event, payload) -> None:
        if event == "step_end":
            raise RuntimeError("boom")
        if event == "train_error":  # the trainer's own clean-up has happened
            writer = [cb.writer for cb in tr.callbacks if hasattr(cb, "writer")]
            seen.append((event, payload, writer))
            raise ValueError("tracker offline")

    def after(tr, event, payload) -> None:
        if event == "train_error":
            seen.append((event, payload))

    trainer = Trainer(_cfg(tmp_path, "train.callbacks=[hooks_error:Early,hooks_error:record]"),
                      callbacks=(boom, after), progress=False)
    with pytest.raises(RuntimeError, match="boom") as caught:
        trainer.fit()
    import hooks_error

    error = caught.value
    assert hooks_error.EVENTS[-2:] == [("Early.on_train_error", error), ("train_error", error)]
    assert seen == [("train_error", error, [None]), ("train_error", error)]
    lines = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith(
        "warning: callback test_train_error_reaches_every_callback_and_a_failing_one_does_not_"
        "hide_the_error.<locals>.boom failed in train_error: ValueError: tracker offline (")
        and line.endswith("; raising the original RuntimeError") for line in lines), lines


def test_a_ctrl_c_inside_train_error_skips_the_other_callbacks_and_keeps_the_error(
        capsys, tmp_path) -> None:
    calls: list[str] = []

    def boom(tr, event, payload) -> None:
        if event == "step_end":
            raise RuntimeError("boom")
        if event == "train_error":
            calls.append("boom")
            raise KeyboardInterrupt  # the user gave up waiting for this handler

    def after(tr, event, payload) -> None:
        if event == "train_error":
            calls.append("after")

    trainer = Trainer(_cfg(tmp_path), callbacks=(boom, after), progress=False)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert calls == ["boom"]
    err = capsys.readouterr().err
    assert "failed in train_error: KeyboardInterrupt (" in err
    assert "; skipped the other callbacks; raising the original RuntimeError" in err


def test_train_error_on_ctrl_c_comes_after_the_resume_point_is_saved(tmp_path) -> None:
    seen: list[tuple] = []

    class Watch(Callback):
        def on_step_end(self, trainer, stats) -> None:
            if trainer.state.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in step 1

        def on_train_error(self, trainer, error) -> None:
            last = trainer.run_dir / "checkpoints" / "last.pt"
            seen.append((type(error), last.is_file(), trainer.state.global_step))

    trainer = Trainer(_cfg(tmp_path, "train.run_name=cut"), callbacks=(Watch(),),
                      progress=False)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert seen == [(KeyboardInterrupt, True, 1)]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ---- ValidationCallback and robust_accuracy, without a training run ----------------------
def _validating(monkeypatch, scores, **train):
    """A stand-in trainer for ValidationCallback; ``robust_accuracy`` returns ``scores``
    (clean, robust) in turn and records how it was called."""
    from types import SimpleNamespace

    import dat.callbacks
    from dat.config import Config
    from dat.run_state import TrainState

    calls, saved = [], []

    def fake_accuracy(model, x, y, eps, alpha, steps, batch_size=500, seed=0):
        calls.append({"steps": steps, "batch_size": batch_size, "seed": seed, "eps": eps})
        return scores[len(calls) - 1]

    monkeypatch.setattr(dat.callbacks, "robust_accuracy", fake_accuracy)
    cfg = Config()
    for key, value in {"epochs": len(scores), "val_every": 1, "val_pgd_steps": 3, "seed": 7,
                       **train}.items():
        setattr(cfg.train, key, value)
    cfg.method.attack.steps, cfg.data.eval_batch_size = 5, 11  # not to be confused with them
    trainer = SimpleNamespace(cfg=cfg, state=TrainState(), eval_model=lambda: None,
                              val_data=(torch.zeros(4, 3, 2, 2), torch.zeros(4)))
    trainer.save_best = lambda: saved.append(trainer.state.best_epoch)
    return trainer, calls, saved


def test_best_pt_goes_to_the_highest_pgd_accuracy_and_ties_to_higher_clean(monkeypatch) -> None:
    # (clean, pgd) per epoch: a strict rise in pgd wins; an exact tie keeps the older epoch;
    # an equal pgd with higher clean wins; higher clean alone with lower pgd never wins
    scores = [(50.0, 20.0), (40.0, 30.0), (40.0, 30.0), (45.0, 30.0), (90.0, 25.0)]
    trainer, calls, saved = _validating(monkeypatch, scores)
    cb = ValidationCallback()
    for epoch in range(len(scores)):
        cb.on_epoch_end(trainer, epoch)
    s = trainer.state
    assert saved == [1, 2, 4]  # save_best runs after the 1-based best_epoch is set
    assert (s.best_epoch, s.best_val_pgd, s.best_val_clean) == (4, 30.0, 45.0)
    assert s.last_val == {"epoch": 5, "clean": 90.0, "pgd3": 25.0}
    assert [h["epoch"] for h in s.history] == [1, 2, 3, 4, 5]
    assert s.history[0] == {"epoch": 1, "clean": 50.0, "pgd3": 20.0}
    # validation runs train.val_pgd_steps PGD steps (not the attack's training steps),
    # in data.eval_batch_size batches, seeded by train.seed
    assert calls[0] == {"steps": 3, "batch_size": 11, "seed": 7, "eps": 8 / 255}


def test_validation_runs_every_val_every_epochs_and_after_the_last(monkeypatch) -> None:
    trainer, calls, _ = _validating(monkeypatch, [(10.0, 5.0)] * 3, epochs=5, val_every=2)
    cb = ValidationCallback()
    for epoch in range(5):
        cb.on_epoch_end(trainer, epoch)
    assert [h["epoch"] for h in trainer.state.history] == [2, 4, 5]  # 5: the last epoch
    trainer, calls, _ = _validating(monkeypatch, [], epochs=2, val_every=0)
    for epoch in range(2):
        cb.on_epoch_end(trainer, epoch)
    assert calls == [] and trainer.state.history == []  # 0: never, not even after the last
    trainer, calls, _ = _validating(monkeypatch, [], epochs=1)
    trainer.val_data = (torch.zeros(0, 3, 2, 2), torch.zeros(0))  # data.val_size=0
    cb.on_epoch_end(trainer, 0)
    assert calls == [] and trainer.state.last_val == {}


def test_robust_accuracy_is_clean_then_pgd_on_the_main_branch_in_eval_mode(
        make_warm_model, sample_batch) -> None:
    """Checks the documented recipe step by step: batch i starts PGD from a draw seeded
    seed + i, on the main BN branch in eval mode, under a forked RNG."""
    import dat
    from dat.attacks import pgd

    model = make_warm_model(dual_bn=True).train()
    x, _ = sample_batch
    with torch.no_grad(), dat.models.bn_branch(model.eval(), "main"):
        y = model(x).argmax(1)  # every image correct when clean
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    clean, robust = robust_accuracy(model, x, y, 8 / 255, 2 / 255, steps=2, batch_size=6,
                                    seed=3)
    assert torch.equal(torch.get_rng_state(), rng)  # training's random stream untouched
    assert model.training  # restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())  # no BN update
    correct = 0
    with dat.models.bn_branch(model.eval(), "main"):
        for i, (xb, yb) in enumerate(zip(x.split(6), y.split(6), strict=True)):
            torch.manual_seed(3 + i)
            x_adv = pgd(model, xb, yb, 8 / 255, 2 / 255, 2, check_range=False)
            with torch.no_grad():
                correct += int((model(x_adv).argmax(1) == yb).sum())
    assert clean == 100.0 and robust == 100.0 * correct / len(y) < 100.0


def test_a_function_callback_gets_each_event_by_name_with_its_payload_unchanged() -> None:
    from dat.callbacks import FunctionCallback

    seen: list[tuple] = []
    cb = FunctionCallback(lambda trainer, event, payload: seen.append((trainer, event, payload)))
    stats, means, metrics, error = {"loss": torch.zeros(())}, {"loss": 1.5}, {"test": {}}, \
        RuntimeError("x")
    cb.on_train_start("T")
    cb.on_step_start("T")
    cb.on_step_end("T", stats)
    cb.on_log("T", means)
    cb.on_epoch_end("T", 0)  # the 0-based index, as Callback.on_epoch_end gets it
    cb.on_train_end("T", metrics)
    cb.on_train_error("T", error)
    assert seen == [("T", "train_start", None), ("T", "step_start", None),
                    ("T", "step_end", stats), ("T", "log", means), ("T", "epoch_end", 0),
                    ("T", "train_end", metrics), ("T", "train_error", error)]
    assert seen[2][2] is stats and seen[3][2] is means  # the same objects, no copies
