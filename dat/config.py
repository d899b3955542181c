"""Typed run configuration: dataclasses with commented defaults, YAML presets, overrides.

The defaults are the paper's full DAT setting (ResNet-18, CIFAR-10, official amplitude
scale). Presets in ``dat/configs/`` change only what differs. Values like ``8/255`` are
accepted wherever a float is expected, in YAML and on the command line.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

__all__ = [
    "AttackConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "GeneratorConfig",
    "MethodConfig",
    "ModelConfig",
    "OptimConfig",
    "PerfConfig",
    "TrainConfig",
    "checked_config",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "find_preset",
    "load_config",
    "validate",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # shipped in the wheel
METHODS = ("pgd_at", "trades", "mart", "dat")
DATASETS = ("cifar10", "cifar100", "imagefolder", "cifar10-sample")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


@dataclass
class DataConfig:
    name: str = "cifar10"  # cifar10 | cifar100 | imagefolder | cifar10-sample
    root: str = "data"  # torchvision binary folder, or ImageFolder tree with train/ + test/
    val_size: int = 1000  # images held out from train (stratified) for model selection
    split_seed: int = 0  # fixes the validation split, independent of train.seed
    batch_size: int = 128  # per process
    eval_batch_size: int = 500
    loader: str = "auto"  # auto | resident | dataloader; resident = uint8 tensors on device
    num_workers: int = 2  # DataLoader path only
    crop_padding: int = 4  # random crop padding (pixels) of the clean branch
    flip: bool = True  # random horizontal flip of the clean branch
    train_subset: int = 0  # use only N training images (0 = all); quick runs and tests
    test_subset: int = 0  # evaluate on only N test images (0 = all)


@dataclass
class ModelConfig:
    name: str = "resnet18"  # see dat.models.list_models(), or timm/<name>
    sync_bn: bool = False  # SyncBatchNorm across DDP ranks (both BN branches)


@dataclass
class AttackConfig:
    """Training-time inner maximisation (L-inf, [0, 1] pixel scale)."""

    eps: float = 8 / 255  # L-inf radius
    alpha: float = 2 / 255  # step size
    steps: int = 5  # K: 5 for DAT's EAEG, 10 for PGD-AT / TRADES
    init: str = "gaussian"  # gaussian (0.001 * N(0, I), TRADES/EAEG) | uniform (PGD-AT)


@dataclass
class GeneratorConfig:
    """The Adversarial Amplitude Generator (AAG) and its optimiser."""

    noise_dim: int = 100
    hidden: list[int] = field(default_factory=lambda: [128, 256, 512, 1024])
    amplitude_scale: str = "official"  # official (sigmoid as is) | dataset (x 2 mean |FFT|)
    lr: float = 0.1  # SGD, fixed (no schedule)
    momentum: float = 0.9
    weight_decay: float = 5e-4


@dataclass
class MethodConfig:
    name: str = "dat"  # pgd_at | trades | mart | dat
    beta: float = 15.0  # KL weight (TRADES: 6, DAT: 15, MART: 6)
    omega: float = 2.0  # DAT: weight of the JS consistency term
    label_smoothing: float = 0.5  # CE label smoothing in attack and loss (published DAT: 0.5)
    attack: AttackConfig = field(default_factory=AttackConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    generator_update: str = "alternating"  # alternating (published) | reversal (one backward)
    mu: float = 1.0  # lam ~ U(0, mu) per sample
    amplitude_source: str = "generator"  # generator | random_image (no AAG) | brightness
    mix: str = "mix"  # mix (lam * A_G + (1 - lam) * A(x)) | replace (lam = 1, no mix-up)
    split_bn: bool = True  # recombined images use the auxiliary BN branch
    second_attack: bool = True  # false: single AE (mix A_G into x' instead of attacking x_hat)
    outer: str = "dat"  # loss of each branch: dat (EAEG + TRADES form) | pgd_at | trades
    recombined_padding: int = 3  # random crop padding of x_hat (published: 3)
    recombined_branch: bool = True  # false: baseline (EAEG adversarial training only)
    awp_gamma: float = 0.0  # weight perturbation size, every method (0 = off; paper: 0.005)
    awp_warmup: int = 0  # epochs before AWP starts


@dataclass
class OptimConfig:
    lr: float = 0.1  # at reference_batch_size
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "piecewise"  # piecewise | cosine | constant
    milestones: list[int] = field(default_factory=lambda: [100, 110])  # epochs
    gamma: float = 0.1  # lr factor at each milestone
    warmup_epochs: int = 0
    lr_scaling: str = "none"  # none | linear (lr x global_batch / reference_batch_size)
    reference_batch_size: int = 128


COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # graphs replayed as CUDA graphs


@dataclass
class PerfConfig:
    """Fast-path switches; each can be turned off to compare with the plain path."""

    precision: str = "auto"  # auto (bf16 on GPUs with bf16 tensor cores, else fp32) | bf16 | fp32
    channels_last: str = "auto"  # auto (CUDA and CPU; not where CPU backward crashes) | on | off
    batched_branches: str = "auto"  # auto (on for CUDA) | on | off: x and x_hat as one 2B batch
    fused_split_bn: str = "auto"  # auto (off: slower on an H100) | on | off: split BN as one
    # affine map in the batched attack (equal up to float rounding)
    compile: str = "off"  # off | default | reduce-overhead (CUDA graphs) | max-autotune
    compile_attacks: str = "off"  # the same modes: each training-attack step as one graph
    log_every: int = 50  # steps between host syncs for logging


@dataclass
class TrainConfig:
    epochs: int = 150
    seed: int = 0
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N
    out_dir: str = "runs"  # a run writes out_dir/run_name/
    run_name: str = ""  # empty: <method>-<model>-<dataset>-<timestamp>
    resume: str = ""  # checkpoint path, or "auto" (run_name's last.pt)
    steps_per_epoch: int = 0  # cap steps per epoch (0 = full epoch); quick runs
    val_every: int = 1  # epochs between validation PGD runs (0 = never)
    val_pgd_steps: int = 20  # PGD steps for checkpoint selection (the published code: 20)
    val_examples: int = 1000  # validation images used for selection
    # final test of best.pt; AA and a margin attack next to PGD (docs/method.md, section 14)
    test_attacks: list[str] = field(default_factory=lambda: ["clean", "pgd20", "cw", "aa"])
    image_every: int = 500  # steps between TensorBoard image grids (0 = never)
    weight_averaging: str = "none"  # none | ema | swa
    ema_decay: float = 0.999
    swa_start: int = 100  # epoch from which SWA averages
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
    keep_checkpoints: int = 2  # last.pt plus this many older good ones for fallback
    callbacks: list[str] = field(default_factory=list)  # "module:function" entries
    checkpoint_every: int = 0  # steps between mid-epoch saves of last.pt (0 = epoch ends only)
    ema_warmup: bool = True  # EMA decay min(ema_decay, (1 + n) / (10 + n)) over n updates


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_FRACTION = re.compile(r"^\s*(-?\d+(?:\.\d*)?)\s*/\s*(\d+(?:\.\d*)?)\s*$")


def _fractions_to_floats(value: Any) -> Any:
    """Turn strings like ``"8/255"`` into floats, recursively; ``"8/0"`` is a ConfigError."""
    if isinstance(value, str):
        m = _FRACTION.match(value)
        if m and float(m.group(2)) == 0:
            raise ConfigError(f"{value.strip()} divides by zero; write e.g. 8/255")
        return float(m.group(1)) / float(m.group(2)) if m else value
    if isinstance(value, dict):
        return {k: _fractions_to_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fractions_to_floats(v) for v in value]
    return value


def find_preset(name_or_path: str) -> Path:
    """Resolve a YAML path, or a preset name in ``dat/configs/`` (with or without ``.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / name_or_path, CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(f"config {name_or_path!r} not found; give a YAML path or a preset: {known}")


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=2)")
    key, raw = item.split("=", 1)
    value = OmegaConf.from_dotlist([f"v={raw}"]).v if raw != "" else ""
    try:
        return key.strip(), _fractions_to_floats(value)
    except ConfigError as err:
        raise ConfigError(f"override {item!r}: {err}") from None


def _load_yaml(file: Path) -> dict:
    """The YAML mapping in ``file`` (empty file: ``{}``); one-line ConfigError otherwise."""
    try:
        loaded = OmegaConf.to_container(OmegaConf.load(file))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{file} is not valid YAML ({problem}{where}); fix the syntax "
                          "there") from None
    except (OmegaConfBaseException, UnicodeDecodeError, OSError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"cannot read {file} as a YAML config ({first}); it must be UTF-8 "
                          "text mapping sections to values, e.g. 'train: {epochs: 2}'") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{file} holds a {type(loaded).__name__} at the top level; a config "
                          "file must be a mapping of sections, e.g. 'train: {epochs: 2}'")
    try:
        return _fractions_to_floats(loaded)
    except ConfigError as err:
        raise ConfigError(f"in {file}: {err}") from None


def _merge(base: Any, update: Any, where: str) -> Any:
    try:
        return OmegaConf.merge(base, update)
    except OmegaConfBaseException as err:
        first = str(err).splitlines()[0]
        key = getattr(err, "full_key", None)
        if key and "is not a ListConfig" in first:
            raise ConfigError(f"{where}: {key} takes a list; write {key}=[...] on the "
                              f"command line or '{key.rpartition('.')[2]}: [...]' in YAML"
                              ) from None
        section = re.search(r"is not a subclass of (\w+)", first)
        if section and section.group(1) in _section_paths():
            path, example = _section_paths()[section.group(1)]
            raise ConfigError(f"{where}: {path} is a section, not a value; set one of its keys, "
                              f"e.g. {path}.{example}=... on the command line or "
                              f"'{path.rpartition('.')[2]}: {{{example}: ...}}' in YAML"
                              ) from None
        hint = f" at {key}" if key else ""
        raise ConfigError(f"{where}{hint}: {first} (see dat/config.py for valid keys)") from None


def _section_paths(cls: type | None = None, prefix: str = "") -> dict[str, tuple[str, str]]:
    """Section class name -> (dotted path, its first key), e.g. 'ModelConfig' -> ('model',
    'name'), for the message when a whole section is given a single value."""
    found: dict[str, tuple[str, str]] = {}
    for f in fields(cls or Config):
        sub = f.default_factory if is_dataclass(f.default_factory) else None
        if sub is not None:
            found[sub.__name__] = (prefix + f.name, fields(sub)[0].name)
            found.update(_section_paths(sub, f"{prefix}{f.name}."))
    return found


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file or preset ``path``, then ``key=value`` overrides; validated."""
    if isinstance(overrides, str):  # each character would be read as an override
        raise ConfigError(f"overrides={overrides!r} must be a list of 'key=value' strings, "
                          f"e.g. [{overrides!r}]")
    cfg = OmegaConf.structured(Config)
    if path:
        file = find_preset(path)
        cfg = _merge(cfg, _load_yaml(file), f"in {file}")
    for item in overrides or []:
        key, value = _parse_override(item)
        update = OmegaConf.create({})
        try:
            OmegaConf.update(update, key, value, force_add=True)
        except OmegaConfBaseException as err:
            raise ConfigError(f"override {item!r}: {str(err).splitlines()[0]}") from None
        cfg = _merge(cfg, update, f"override {item!r}")
    config: Config = OmegaConf.to_object(cfg)
    validate(config)
    return config


def checked_config(cfg: Config, where: str = "the config") -> Config:
    """A validated copy of ``cfg``, e.g. after attribute edits (``cfg.train.epochs = 3``):
    types are checked and converted as :func:`load_config` converts them (``"3"`` -> 3,
    ``"8/255"`` -> 0.0314), then :func:`validate` runs; one-line :class:`ConfigError`."""
    from dataclasses import asdict

    if not isinstance(cfg, Config):
        raise ConfigError(f"{where} is a {type(cfg).__name__}, not a dat.config.Config; build "
                          "one with dat.load_config(...), e.g. dat.load_config('quickstart')")
    _check_no_unknown_attributes(cfg, "", where)
    try:
        data = _fractions_to_floats(asdict(cfg))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    except TypeError as err:  # a section replaced by something that is not a dataclass
        raise ConfigError(f"{where}: {err}; assign single values, e.g. cfg.train.epochs = 3"
                          ) from None
    return _to_config(data, where)


def _check_no_unknown_attributes(section: Any, prefix: str, where: str) -> None:
    """Refuse an attribute that is not a config key (``cfg.train.epoch = 3``): asdict()
    would drop it, and the run would silently use the default of the key meant."""
    import difflib

    names = [f.name for f in fields(section)]
    for key, value in vars(section).items():
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"{where}: {prefix}{key} is not a config key{hint} "
                              "(see dat/config.py for valid keys)")
        if is_dataclass(value) and not isinstance(value, type):
            _check_no_unknown_attributes(value, f"{prefix}{key}.", where)


def config_to_dict(cfg: Config) -> dict:
    """Plain nested dict of primitives (safe to store in checkpoints)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def config_from_dict(data: dict) -> Config:
    """Inverse of :func:`config_to_dict`, validated as a stored config (a run saved before
    a rule was added still loads: see :func:`validate`)."""
    return _to_config(data, "stored config", stored=True)


def _to_config(data: dict, where: str, stored: bool = False) -> Config:
    """``data`` merged over the defaults (types checked and converted), then validated."""
    config: Config = OmegaConf.to_object(_merge(OmegaConf.structured(Config), data, where))
    validate(config, stored=stored)
    return config


def config_to_yaml(cfg: Config) -> str:
    """The resolved configuration as YAML (saved with every run)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _choice(value: str, allowed: tuple[str, ...], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not valid; use one of {', '.join(allowed)}")


def _check_attack(a: AttackConfig, key: str) -> None:
    if a.eps > 1:
        raise ConfigError(
            f"{key}.eps={a.eps:g} looks like 0-255 units; images are in [0, 1], "
            f"so write {key}.eps={a.eps:g}/255"
        )
    if a.alpha > 1:
        raise ConfigError(f"{key}.alpha={a.alpha:g} looks like 0-255 units; write {a.alpha:g}/255")
    if a.eps < 0 or a.alpha <= 0:
        raise ConfigError(f"{key}.eps must be >= 0 and {key}.alpha > 0")
    if a.alpha > a.eps > 0:
        raise ConfigError(
            f"{key}.alpha={a.alpha:.4g} is larger than {key}.eps={a.eps:.4g}; "
            "use a step size <= eps (e.g. eps=8/255, alpha=2/255)"
        )
    if a.steps < 1:
        raise ConfigError(f"{key}.steps={a.steps} must be >= 1")
    _choice(a.init, ("gaussian", "uniform"), f"{key}.init")


def _check_model_name(name: str, known: list[str]) -> None:
    """``name`` in the order :func:`dat.models.create` reads it: timm/, registered, builder."""
    from .entry_points import check_spec, is_spec
    from .models.timm_models import check_timm_name

    if name.startswith("timm/"):
        try:
            check_timm_name(name.removeprefix("timm/"))
        except ValueError as err:
            raise ConfigError(f"model.name={name!r}: {err}") from None
    elif name in known:
        return
    elif is_spec(name):  # your own builder: its form and file now, the import at build time
        try:
            check_spec(name, "model.name")
        except ValueError as err:
            raise ConfigError(str(err)) from None
    else:
        raise ConfigError(f"model.name={name!r} is unknown; use one of {known}, timm/<name>, or "
                          "your own builder as module:function or path/file.py:function")


def validate(cfg: Config, stored: bool = False) -> None:
    """Raise :class:`ConfigError` with a one-line message naming the fix.

    ``stored``: the config of a saved run or checkpoint, which skips the ranges and
    run-name rules of :func:`_check_numbers` (added 2026-11-27), so older runs still
    resume and evaluate.
    """
    from .models import list_models

    for section in fields(cfg):  # first: a NaN passes every comparison below
        _check_finite(getattr(cfg, section.name), section.name)
    _choice(cfg.data.name, DATASETS, "data.name")
    _choice(cfg.data.loader, ("auto", "resident", "dataloader"), "data.loader")
    if cfg.data.batch_size < 1 or cfg.data.eval_batch_size < 1:
        raise ConfigError("data.batch_size and data.eval_batch_size must be >= 1")
    if cfg.data.val_size < 0:
        raise ConfigError("data.val_size must be >= 0")
    _check_model_name(cfg.model.name, list_models())
    m = cfg.method
    _choice(m.name, METHODS, "method.name")
    _check_attack(m.attack, "method.attack")
    _choice(m.generator.amplitude_scale, ("official", "dataset"),
            "method.generator.amplitude_scale")
    _choice(m.generator_update, ("alternating", "reversal"), "method.generator_update")
    _choice(m.amplitude_source, ("generator", "random_image", "brightness"),
            "method.amplitude_source")
    _choice(m.mix, ("mix", "replace"), "method.mix")
    _choice(m.outer, ("dat", "pgd_at", "trades"), "method.outer")
    if not 0 <= m.label_smoothing < 1:
        raise ConfigError(f"method.label_smoothing={m.label_smoothing} must be in [0, 1)")
    if not 0 <= m.mu <= 1:
        raise ConfigError(f"method.mu={m.mu} must be in [0, 1]")
    if m.beta < 0 or m.omega < 0 or m.awp_gamma < 0:
        raise ConfigError("method.beta, method.omega and method.awp_gamma must be >= 0")
    o = cfg.optim
    _choice(o.schedule, ("piecewise", "cosine", "constant"), "optim.schedule")
    _choice(o.lr_scaling, ("none", "linear"), "optim.lr_scaling")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr={o.lr} must be > 0")
    _choice(cfg.perf.precision, ("auto", "bf16", "fp32"), "perf.precision")
    for key in ("channels_last", "batched_branches", "fused_split_bn"):
        # YAML reads a bare on/off as a boolean (and batched_branches was one before
        # 2026-11-27), so both arrive here as 'True' / 'False'
        value = getattr(cfg.perf, key)
        setattr(cfg.perf, key, {"true": "on", "false": "off"}.get(str(value).lower(), value))
        _choice(getattr(cfg.perf, key), ("auto", "on", "off"), f"perf.{key}")
    for key in ("compile", "compile_attacks"):  # compile was also a bool before 2026-11-27
        value = getattr(cfg.perf, key)
        setattr(cfg.perf, key, {"true": "default", "false": "off"}.get(str(value).lower(), value))
        _choice(getattr(cfg.perf, key), COMPILE_MODES, f"perf.{key}")
    if cfg.perf.compile_attacks != "off":
        from .attacks import check_compile_mode

        try:
            check_compile_mode(cfg.perf.compile_attacks)
        except ValueError:
            import torch

            raise ConfigError(
                f"perf.compile_attacks={cfg.perf.compile_attacks} needs torch >= 2.11 (this is "
                f"{torch.__version__}); upgrade torch or use perf.compile_attacks=off") from None
    t = cfg.train
    if t.epochs < 1:
        raise ConfigError(f"train.epochs={t.epochs} must be >= 1")
    _choice(t.weight_averaging, ("none", "ema", "swa"), "train.weight_averaging")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        raise ConfigError(f"train.device={t.device!r}; use auto, cpu, cuda or cuda:N")
    _check_train_loop(t, cfg.perf.log_every)
    if not stored:
        _check_numbers(cfg)


# (key, allowed, what to write): numeric ranges validate() checks besides its own
_RANGES: tuple[tuple[str, Callable[[float], bool], str], ...] = (
    ("data.num_workers", lambda v: v >= 0, ">= 0"),
    ("data.crop_padding", lambda v: v >= 0, ">= 0 (0 = no crop)"),
    ("data.split_seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    ("data.train_subset", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("data.test_subset", lambda v: v >= 0, ">= 0 (0 = all)"),
    ("method.generator.noise_dim", lambda v: v >= 1, ">= 1"),
    ("method.generator.lr", lambda v: v > 0, "> 0"),
    ("method.generator.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("method.generator.weight_decay", lambda v: v >= 0, ">= 0"),
    ("method.recombined_padding", lambda v: v >= 0, ">= 0"),
    ("method.awp_warmup", lambda v: v >= 0, ">= 0"),
    ("method.awp_gamma", lambda v: v < 1,
     "< 1: a fraction of each layer's weight norm (AWP recipes: 0.005 or 0.01)"),
    ("optim.momentum", lambda v: 0 <= v < 1, "in [0, 1), e.g. 0.9"),
    ("optim.weight_decay", lambda v: v >= 0, ">= 0"),
    ("optim.gamma", lambda v: v > 0, "> 0, e.g. 0.1"),
    ("optim.warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("optim.reference_batch_size", lambda v: v >= 1, ">= 1"),
    ("train.seed", lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    ("train.swa_start", lambda v: v >= 0, ">= 0"),
)


def _check_numbers(cfg: Config) -> None:
    """The ranges of :data:`_RANGES`; list entries; DAT's batch size; a run name that
    stays inside ``train.out_dir``."""
    tree = OmegaConf.structured(cfg)
    for key, allowed, what in _RANGES:
        value = OmegaConf.select(tree, key)
        if not allowed(value):
            raise ConfigError(f"{key}={value} must be {what}")
    for key, values, low in (("method.generator.hidden", cfg.method.generator.hidden, 1),
                             ("optim.milestones", cfg.optim.milestones, 0)):
        if any(v < low for v in values):
            raise ConfigError(f"{key}={list(values)}: every entry must be >= {low}")
    m = cfg.method
    if (m.name == "dat" and m.recombined_branch and m.amplitude_source == "generator"
            and cfg.data.batch_size < 2):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be >= 2 for DAT: the "
                          "amplitude generator has BatchNorm1d")
    name = Path(cfg.train.run_name)
    if name.is_absolute() or ".." in name.parts:  # nested names (ablations/nojs) are fine
        raise ConfigError(f"train.run_name={cfg.train.run_name!r} must stay inside "
                          "train.out_dir (no absolute path, no '..'); put the parent folder "
                          "in train.out_dir")


def _check_finite(section: Any, where: str) -> None:
    """No NaN or inf in any float of ``section`` (a config dataclass), recursively."""
    for f in fields(section):
        value = getattr(section, f.name)
        if is_dataclass(value):
            _check_finite(value, f"{where}.{f.name}")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{where}.{f.name}={value} must be a finite number")


def _check_train_loop(t: TrainConfig, log_every: int) -> None:
    """Counts and intervals of the training loop (trainer, checkpoints, callbacks)."""
    if log_every < 1:
        raise ConfigError(f"perf.log_every={log_every} must be >= 1")
    for key in ("steps_per_epoch", "val_every", "image_every", "checkpoint_every",
                "keep_checkpoints"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 0 (0 = off / all)")
    for key in ("val_pgd_steps", "val_examples", "max_bad_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 1")
    if not 0 < t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay={t.ema_decay} must be in (0, 1), e.g. 0.999")
    for entry in t.callbacks:  # the form only: Trainer(cfg) loads them (evaluation never)
        module_name, _, attr = entry.rpartition(":")
        if not module_name or not all(part.isidentifier() for part in attr.split(".")):
            raise ConfigError(f"train.callbacks entry {entry!r} is not 'module:function' or "
                              "'path/file.py:function' (e.g. mypkg.hooks:on_event)")
