"""Every preset loads; DAT presets are documented, minimal, and build a working step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import dat
from dat.config import Config, config_to_dict, load_config
from dat.methods import DATStep, build_dat

CONFIGS = Path(__file__).resolve().parent.parent / "dat" / "configs"
ALL = sorted(CONFIGS.glob("*.yaml"))
DAT_PRESETS = [p for p in ALL if p.name.startswith(("dat_", "aag_"))]


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_preset_loads(path):
    assert isinstance(load_config(str(path)), Config)


def test_the_paper_rows_have_presets():
    names = {p.stem for p in DAT_PRESETS}
    assert {"dat_cifar10_resnet18", "dat_cifar100_resnet18", "dat_tinyimagenet_resnet18",
            "dat_cifar10_wrn34_10", "dat_cifar100_wrn34_10", "dat_nojs", "dat_nomix",
            "dat_nosplitbn", "dat_noaag", "dat_baseline_eaeg", "dat_single_ae", "dat_awp",
            "dat_awp_swa", "aag_pgd_at", "aag_trades", "dat_brightness"} <= names


def test_each_presets_final_test_runs_the_attack_its_paper_number_uses():
    """The paper reports PGD-100 for WRN-34-10 on CIFAR-10; the default final test ran
    PGD-20 only, so metrics.json had nothing to compare with it."""
    for path in DAT_PRESETS:
        first = path.read_text().splitlines()[0]
        attacks = load_config(str(path)).train.test_attacks
        for named, attack in (("PGD-100", "pgd100"), ("PGD-20", "pgd20"), ("AA", "aa")):
            if f" {named} " in first or f" {named})" in first:
                assert attack in attacks, f"{path.name}: {named} quoted, {attacks} tested"


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("path", DAT_PRESETS, ids=[p.stem for p in DAT_PRESETS])
def test_dat_preset_is_documented_and_lists_only_changes(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "paper" in first  # what it is + the paper's numbers
    defaults = config_to_dict(Config())
    for key, value in _leaves(yaml.safe_load(path.read_text()) or {}):
        default = defaults
        for part in key.split("."):
            default = default[part]
        assert value != default, f"{path.name}: {key} repeats the default"


@pytest.mark.parametrize("path", DAT_PRESETS, ids=[p.stem for p in DAT_PRESETS])
def test_dat_preset_builds_a_step_that_trains(path):
    """One step of each preset's variant on a tiny model (the trainer's dual-BN rule)."""
    torch.manual_seed(0)
    cfg = load_config(str(path), ["model.name=resnet_tiny", "method.attack.steps=1",
                                  "train.image_every=0"])
    model = dat.models.create("resnet_tiny", dual_bn=cfg.method.split_bn)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    images = (torch.rand(64, 3, 32, 32) * 255).to(torch.uint8)
    step = build_dat(cfg, model, opt, num_classes=10, image_shape=(3, 32, 32),
                     train_images=images)
    assert isinstance(step, DATStep) and step.outer == cfg.method.outer
    x, y = images[:8].float() / 255, torch.arange(8)
    stats = step(x, y)
    assert all(v == v for v in stats.values()) and "loss" in stats


def test_list_presets_names_each_with_its_first_sentence(capsys) -> None:
    from dat.cli import train_main

    assert train_main(["--list-presets"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == [p.stem for p in ALL]
    awp = next(line for line in out if line.startswith("dat_awp "))
    assert "82.63 / 58.87 / 52.54" in awp and "\n" not in awp


def test_print_config_prints_the_resolved_config_and_trains_nothing(capsys, monkeypatch,
                                                                   tmp_path) -> None:
    from dat.cli import train_main
    from dat.trainer import Trainer

    def refuse(*args, **kwargs):
        raise AssertionError("--print-config must not train")
    monkeypatch.setattr(Trainer, "__init__", refuse)
    argv = ["--print-config", "--config", "dat_awp", "train.epochs=3", "method.attack.eps=4/255"]
    assert train_main(argv) == 0
    (tmp_path / "printed.yaml").write_text(capsys.readouterr().out)
    assert load_config(str(tmp_path / "printed.yaml")) == load_config(
        "dat_awp", ["train.epochs=3", "method.attack.eps=4/255"])
    # options may come after key=value overrides
    assert train_main(["train.epochs=3", "--config", "dat_awp", "method.attack.eps=4/255",
                       "--print-config"]) == 0
    assert capsys.readouterr().out == (tmp_path / "printed.yaml").read_text()
    assert train_main(["--print-config", "method.attack.eps=8"]) == 2  # still validated
    assert "write method.attack.eps=8/255" in capsys.readouterr().err
    # the final test's attacks too, as a run checks them before it trains
    assert train_main(["--print-config", "train.test_attacks=[clean,pgd7x]"]) == 2
    assert "train.test_attacks: unknown attack 'pgd7x'" in capsys.readouterr().err


BASELINE_PRESETS = [p for p in ALL if p.stem.startswith(("pgd_at_", "trades_", "mart_"))]


@pytest.mark.parametrize("path", BASELINE_PRESETS, ids=[p.stem for p in BASELINE_PRESETS])
def test_baseline_preset_builds_its_method_and_trains(path):
    from dat.methods import BaselineStep, create

    torch.manual_seed(0)
    cfg = load_config(str(path), ["model.name=resnet_tiny", "method.attack.steps=1"])
    model = dat.models.create("resnet_tiny")
    step = create(cfg, model, torch.optim.SGD(model.parameters(), lr=0.1), num_classes=10,
                  image_shape=(3, 32, 32))
    assert isinstance(step, BaselineStep) and path.stem.startswith(cfg.method.name)
    assert (step.awp is not None) == ("_awp_" in path.stem)
    images = (torch.rand(8, 3, 32, 32) * 255).to(torch.uint8)
    stats = step(images.float() / 255, torch.arange(8))
    assert all(v == v for v in stats.values()) and "loss" in stats


AWP_PROBE = '''
SEEN = []

def probe(trainer, event, payload):
    if event == "step_end":
        SEEN.append((trainer.state.epoch, trainer.method.awp_on))
'''


def test_trades_awp_from_the_cli_switches_awp_on_after_its_warmup(tmp_path, monkeypatch):
    from dat.cli import train_main

    (tmp_path / "awp_probe.py").write_text(AWP_PROBE)
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["--no-progress", "--config", "trades_awp_cifar10_resnet18",
            "data.name=cifar10-sample", "model.name=resnet_tiny", "data.batch_size=16",
            "train.epochs=2", "train.steps_per_epoch=2", "method.awp_warmup=1",
            "method.attack.steps=1", "train.val_examples=20", "train.val_pgd_steps=1",
            "data.test_subset=20", "train.test_attacks=[clean]", "train.image_every=0",
            f"train.out_dir={tmp_path}/runs", "train.run_name=awp",
            "train.callbacks=[awp_probe:probe]"]
    assert train_main(argv) == 0
    import awp_probe

    assert awp_probe.SEEN == [(0, False), (0, False), (1, True), (1, True)]
    saved = load_config(str(tmp_path / "runs" / "awp" / "config.yaml"))
    assert (saved.method.name, saved.method.awp_gamma) == ("trades", 0.005)
