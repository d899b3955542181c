"""Typed configuration: defaults, overrides, YAML presets, validation messages, round trips."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import dat.config as config_module
from dat.config import (
    Config,
    ConfigError,
    checked_config,
    config_from_dict,
    config_to_dict,
    config_to_yaml,
    load_config,
)


def test_defaults_are_the_paper_setting() -> None:
    cfg = load_config()
    assert isinstance(cfg, Config)
    attack = cfg.method.attack
    assert (attack.eps, attack.alpha, attack.steps) == (8 / 255, 2 / 255, 5)
    assert (cfg.method.name, cfg.method.beta, cfg.method.omega) == ("dat", 15.0, 2.0)
    assert (cfg.model.name, cfg.data.name, cfg.optim.milestones) == ("resnet18", "cifar10",
                                                                      [100, 110])


def test_overrides_accept_fractions_and_types() -> None:
    cfg = load_config(overrides=["method.attack.eps=4/255", "method.attack.alpha=1/255",
                                 "train.epochs=2", "optim.milestones=[1,2]",
                                 "model.name=timm/resnet10t", "data.root="])
    assert cfg.method.attack.eps == 4 / 255 and cfg.method.attack.alpha == 1 / 255
    assert cfg.train.epochs == 2 and cfg.optim.milestones == [1, 2]
    assert cfg.model.name == "timm/resnet10t" and cfg.data.root == ""


BAD_OVERRIDES = [
    (["method.attack.eps=8"], r"looks like 0-255 units.*eps=8/255"),
    (["method.attack.alpha=2"], r"alpha=2 looks like 0-255 units"),
    (["method.attack.alpha=16/255"], r"use a step size <= eps"),
    (["method.attack.steps=0"], r"steps=0 must be >= 1"),
    (["model.name=resnet19"], r"model.name='resnet19' is unknown; use one of"),
    (["model.name=timm/not_a_model_xyz"], r"timm has no model 'not_a_model_xyz'"),
    (["data.name=cifar11"], r"data.name='cifar11' is not valid; use one of"),
    (["method.name=dta"], r"method.name='dta' is not valid; use one of"),
    (["method.attack.epz=1"], r"Key 'epz' not in 'AttackConfig'"),
    (["nonsense.key=1"], r"Key 'nonsense' not in 'Config'"),
    (["train.epochs"], r"is not key=value"),
    (["train.epochs=abc"], r"train.epochs"),
    (["method.attack.eps=abc/255"], r"method.attack.eps"),
    (["method.generator.amplitude_scale=huge"], r"use one of official, dataset"),
    (["train.device=gpu"], r"use auto, cpu, cuda or cuda:N"),
    (["perf.compile=fast"], r"perf.compile='fast' is not valid; use one of off, default"),
    (["perf.batched_branches=maybe"], r"use one of auto, on, off"),
    (["perf.fused_split_bn=always"], r"perf.fused_split_bn='always' is not valid; use one of"),
    # the boundaries of the ranges: each value here is the first one outside
    (["method.label_smoothing=1"], r"method.label_smoothing=1.0 must be in \[0, 1\)"),
    (["optim.lr=0"], r"optim.lr=0.0 must be > 0"),
    (["train.epochs=0"], r"train.epochs=0 must be >= 1"),
    (["train.callbacks=[on_event]"], r"entry 'on_event' is not 'module:function'"),
]


@pytest.mark.parametrize("overrides, match", BAD_OVERRIDES, ids=[o[0][0] for o in BAD_OVERRIDES])
def test_bad_values_give_one_line_errors_naming_the_fix(overrides, match) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        load_config(overrides=overrides)
    assert "\n" not in str(info.value)


def test_override_values_keep_everything_after_the_first_equals_sign() -> None:
    """Only the first '=' splits key from value: a path with '=' in it stays whole."""
    cfg = load_config(overrides=["data.root=/data/split=1", "train.run_name=lr=0.1"])
    assert (cfg.data.root, cfg.train.run_name) == ("/data/split=1", "lr=0.1")


def test_overrides_given_as_one_string_are_refused() -> None:
    """load_config(None, "train.epochs=2") would read each character as an override."""
    with pytest.raises(ConfigError, match=re.escape(
            "overrides='train.epochs=2' must be a list of 'key=value' strings, "
            "e.g. ['train.epochs=2']")):
        load_config(None, "train.epochs=2")


def test_eps_0_is_clean_training_whatever_the_step_size() -> None:
    """alpha <= eps is required only for eps > 0: eps=0 (no perturbation) keeps the
    default alpha instead of asking for alpha=0, which is refused."""
    assert load_config(overrides=["method.attack.eps=0"]).method.attack.eps == 0
    with pytest.raises(ConfigError, match="method.attack.alpha > 0"):
        load_config(overrides=["method.attack.eps=0", "method.attack.alpha=0"])


@pytest.mark.parametrize(("override", "words"), [
    ("model=resnet_tiny", "model is a section, not a value; set one of its keys, e.g. "
                          "model.name=... on the command line or 'model: {name: ...}' in YAML"),
    ("method.attack=5", "method.attack is a section, not a value; set one of its keys, e.g. "
                        "method.attack.eps=..."),
])
def test_a_section_given_one_value_names_its_keys(override, words) -> None:
    with pytest.raises(ConfigError, match=re.escape(words)) as info:
        load_config(overrides=[override])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("attribute", "words"), [
    ("train.epoch", "train.epoch is not a config key; did you mean train.epochs?"),
    ("trainn", "trainn is not a config key; did you mean train?"),
    ("method.attack.eps_255", "method.attack.eps_255 is not a config key; did you mean "
                              "method.attack.eps?"),
])
def test_a_misspelled_attribute_set_in_python_is_refused(attribute, words) -> None:
    """asdict() dropped it, so the run silently trained with the default of the key meant."""
    cfg = load_config("quickstart")
    *path, name = attribute.split(".")
    section = cfg
    for part in path:
        section = getattr(section, part)
    setattr(section, name, 3)
    with pytest.raises(ConfigError, match=re.escape(words)):
        checked_config(cfg, "Trainer(cfg)")


def test_perf_switches_that_were_booleans_still_load(tmp_path: Path) -> None:
    """Run folders written before perf.compile / perf.batched_branches took modes resume."""
    (tmp_path / "old.yaml").write_text("perf:\n  compile: true\n  batched_branches: false\n")
    cfg = load_config(str(tmp_path / "old.yaml"))
    assert (cfg.perf.compile, cfg.perf.batched_branches) == ("default", "off")
    cfg = load_config(overrides=["perf.compile=false", "perf.batched_branches=true"])
    assert (cfg.perf.compile, cfg.perf.batched_branches) == ("off", "on")
    # YAML 1.1 reads bare on/off as booleans; they must still mean on/off
    (tmp_path / "onoff.yaml").write_text(
        "perf:\n  channels_last: off\n  batched_branches: on\n  fused_split_bn: off\n")
    cfg = load_config(str(tmp_path / "onoff.yaml"))
    assert (cfg.perf.channels_last, cfg.perf.batched_branches) == ("off", "on")
    assert cfg.perf.fused_split_bn == "off"
    cfg = load_config(overrides=["perf.channels_last=on", "perf.batched_branches=off"])
    assert (cfg.perf.channels_last, cfg.perf.batched_branches) == ("on", "off")


def test_yaml_accepts_fractions_and_rejects_unknown_keys(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("method:\n  attack:\n    eps: 8/255\n    alpha: 2/255\n    steps: 10\n"
                    "data:\n  name: cifar10-sample\n")
    cfg = load_config(str(good), overrides=["method.attack.steps=3"])
    assert cfg.method.attack.eps == 8 / 255 and cfg.method.attack.alpha == 2 / 255
    assert cfg.method.attack.steps == 3 and cfg.data.name == "cifar10-sample"
    bad = tmp_path / "bad.yaml"
    bad.write_text("method:\n  atack:\n    eps: 8/255\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*Key 'atack'") as info:
        load_config(str(bad))
    assert "\n" not in str(info.value)
    big = tmp_path / "big.yaml"
    big.write_text("method:\n  attack:\n    eps: 8\n")
    with pytest.raises(ConfigError, match="8/255"):
        load_config(str(big))


def test_presets_load_by_name_or_path(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "quick.yaml").write_text("train:\n  epochs: 2\n")
    monkeypatch.setattr(config_module, "CONFIG_DIR", tmp_path)
    for ref in ("quick", "quick.yaml", str(tmp_path / "quick.yaml")):
        assert load_config(ref).train.epochs == 2
    with pytest.raises(ConfigError, match=r"'slow' not found.*\['quick'\]"):
        load_config("slow")


def test_every_shipped_preset_loads() -> None:
    presets = sorted(config_module.CONFIG_DIR.glob("*.yaml"))
    for path in presets:  # the presets in dat/configs/ (none yet is fine; each must validate)
        assert isinstance(load_config(path.stem), Config), path
        assert load_config(str(path)) == load_config(path.stem)


def test_dict_round_trip() -> None:
    cfg = load_config(overrides=["method.attack.eps=4/255", "optim.milestones=[5]",
                                 "train.callbacks=[a:b]", "method.generator.hidden=[8,16]"])
    data = config_to_dict(cfg)
    assert json.loads(json.dumps(data)) == data  # plain primitives (checkpoint-safe)
    assert config_from_dict(data) == cfg
    assert config_from_dict(config_to_dict(Config())) == Config()


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(overrides=["method.name=trades", "method.beta=6", "train.seed=3"])
    path = tmp_path / "resolved.yaml"
    path.write_text(config_to_yaml(cfg))
    assert load_config(str(path)) == cfg


def test_invalid_stored_config_is_rejected() -> None:
    data = config_to_dict(Config())
    data["method"]["attack"]["steps"] = 0
    with pytest.raises(ConfigError, match="steps"):
        config_from_dict(data)
    data = config_to_dict(Config())
    data["extra"] = 1
    with pytest.raises(ConfigError, match="extra"):
        config_from_dict(data)


def test_model_name_is_read_in_the_order_create_reads_it(monkeypatch) -> None:
    """A registered name comes before module:function, as in dat.models.create: one with a
    colon but no builder's form used to be refused ("must look like module:function")."""
    from dat.models import registry

    monkeypatch.setitem(registry._REGISTRY, "lab:net-v2", registry._REGISTRY["resnet_tiny"])
    assert load_config(None, ["model.name=lab:net-v2"]).model.name == "lab:net-v2"
    with pytest.raises(ConfigError, match="must look like module:function"):
        load_config(None, ["model.name=lab:net-v3"])
