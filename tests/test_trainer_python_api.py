"""Driving the trainer from Python: config edits, reuse of a config, two trainers in one
process, stopping early from a callback, TensorBoard after a failing callback."""

from __future__ import annotations

import json
import warnings

import pytest
import yaml

from dat.checkpoint import load_checkpoint
from dat.config import ConfigError, load_config
from dat.trainer import Trainer

TINY = [
    "data.name=cifar10-sample", "model.name=resnet_tiny", "data.batch_size=16",
    "data.eval_batch_size=64", "data.test_subset=20", "data.train_subset=128",
    "train.epochs=2", "train.steps_per_epoch=2", "train.val_examples=20",
    "train.val_pgd_steps=1", "method.name=pgd_at", "method.attack.steps=1",
    "method.attack.init=uniform", "perf.log_every=1", "train.image_every=0",
    "train.test_attacks=[clean]",
]


def _cfg(tmp_path, *extra):
    return load_config(None, [*TINY, f"train.out_dir={tmp_path}", *extra])


@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: setattr(c.train, "epochs", 0), "train.epochs=0 must be >= 1"),
    (lambda c: setattr(c.perf, "log_every", 0), "perf.log_every=0 must be >= 1"),
    (lambda c: setattr(c.train, "epochs", 2.5), "train.epochs"),
    (lambda c: setattr(c.train, "run_name", "../out"), "must stay inside train.out_dir"),
    (lambda c: setattr(c.train, "callbacks", "m:f"), "train.callbacks takes a list"),
])
def test_attribute_edits_are_validated_when_the_trainer_is_built(tmp_path, edit, message):
    cfg = _cfg(tmp_path)
    edit(cfg)
    with pytest.raises(ConfigError, match=message):
        Trainer(cfg, progress=False)
    assert not (tmp_path.parent / "out").exists()


def test_string_edits_are_converted_like_overrides(tmp_path):
    cfg = _cfg(tmp_path, "train.run_name=conv")
    cfg.train.epochs, cfg.method.attack.eps = "1", "8/255"
    trainer = Trainer(cfg, progress=False)
    assert trainer.cfg.train.epochs == 1 and trainer.cfg.method.attack.eps == 8 / 255


def test_overrides_as_one_string_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="must be a list"):
        load_config("quickstart", "train.epochs=2")


def test_one_config_builds_several_trainers(tmp_path):
    """A seed sweep: the caller's config keeps no run name stamped by the first trainer."""
    cfg = _cfg(tmp_path, "train.epochs=1", "train.steps_per_epoch=1")
    first = Trainer(cfg, progress=False)
    first.fit()
    assert cfg.train.run_name == "" and first.cfg.train.run_name
    cfg.train.seed = 1
    second = Trainer(cfg, progress=False)
    second.fit()
    assert second.run_dir != first.run_dir


def test_edits_after_the_trainer_was_built_are_refused_unless_the_loop_reads_them(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "train.run_name=edits"), progress=False)
    trainer.cfg.method.attack.steps = 7  # the method was built with 1
    with pytest.raises(ConfigError, match="trainer.cfg.method.attack.steps changed from 1 to 7"):
        trainer.fit()
    assert not (trainer.run_dir / "config.yaml").exists()  # nothing recorded the wrong value
    trainer.cfg.method.attack.steps = 1
    trainer.cfg.train.epochs = "1"  # read by the loop: allowed, and converted
    metrics = trainer.fit()
    assert metrics["epochs"] == 1 and trainer.cfg.train.epochs == 1
    saved = yaml.safe_load((trainer.run_dir / "config.yaml").read_text())
    assert saved["method"]["attack"]["steps"] == 1


def test_a_second_trainer_on_the_same_run_name_cannot_overwrite_the_first(tmp_path):
    one = Trainer(_cfg(tmp_path, "train.run_name=same", "train.seed=1"), progress=False)
    two = Trainer(_cfg(tmp_path, "train.run_name=same", "train.seed=2"), progress=False)
    one.fit()
    with pytest.raises(ConfigError, match="already holds a run, written after this Trainer"):
        two.fit()
    last = load_checkpoint(one.run_dir / "checkpoints" / "last.pt")
    assert last["config"]["train"]["seed"] == 1
    one.fit()  # the trainer that wrote the run may fit again


def test_a_callback_can_stop_training_early(tmp_path, capsys):
    trainer = Trainer(_cfg(tmp_path, "train.run_name=early", "train.epochs=3"), progress=False)

    def stop_after_first_epoch(tr, event, payload):
        if event == "epoch_end" and payload.number == 1:
            tr.request_stop()

    trainer.add_callback(stop_after_first_epoch)
    metrics = trainer.fit()
    assert (metrics["epochs"], metrics["steps"]) == (1, 2)
    assert json.loads((trainer.run_dir / "metrics.json").read_text())["steps"] == 2
    assert "after 2 steps (1 epoch and 0 steps of the next)" in capsys.readouterr().err
    mid = Trainer(_cfg(tmp_path, "train.run_name=mid", "train.epochs=3"), progress=False)
    mid.add_callback(lambda tr, event, payload: event == "step_end"
                     and tr.state.global_step == 3 and tr.request_stop())
    metrics = mid.fit()
    assert metrics["steps"] == 3
    assert "after 3 steps (1 epoch and 1 step of the next)" in capsys.readouterr().err
    last = load_checkpoint(mid.run_dir / "checkpoints" / "last.pt")["trainer"]
    assert (last["epoch"], last["step_in_epoch"], last["global_step"]) == (1, 1, 3)
    assert mid.fit()["steps"] == 6  # fit() again continues to train.epochs


def test_a_failing_callback_closes_the_tensorboard_writer(tmp_path):
    trainer = Trainer(_cfg(tmp_path, "train.run_name=boom"), progress=False)

    def boom(tr, event, payload):
        if event == "step_end":
            raise RuntimeError("boom")

    trainer.add_callback(boom)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    tensorboard = [cb for cb in trainer.callbacks if type(cb).__name__ == "TensorBoardCallback"]
    assert tensorboard[0].writer is None


def test_the_trainer_warns_a_baseline_run_on_dat_defaults(tmp_path) -> None:
    with pytest.warns(UserWarning, match="method.name=trades keeps DAT's defaults for "
                                         "method.beta=15.0"):
        Trainer(_cfg(tmp_path, "method.name=trades"), progress=False)


def test_a_resumed_baseline_run_is_not_warned_again(tmp_path) -> None:
    """The warning's advice (start from the preset) cannot apply to a resume, which refuses
    any change to method.*: it is given once, when the run starts."""
    with pytest.warns(UserWarning, match="keeps DAT's defaults"):
        Trainer(_cfg(tmp_path, "train.run_name=r", "train.epochs=1"), progress=False).fit()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(_cfg(tmp_path, "train.run_name=r", "train.resume=auto"), progress=False)
    assert not [w for w in caught if "keeps DAT's defaults" in str(w.message)]
