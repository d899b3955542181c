"""Weights from other codebases: averaged weights beside raw ones (timm, DeiT, SWA), old
checkpoints without BatchNorm counters, wrapper prefixes, TorchScript, model instances,
a model with more outputs than the data has classes, and weights of a dat.models (or timm)
architecture evaluated by its name."""

from __future__ import annotations

import json

import pytest
import torch

import dat
import dat.evaluation.runner
from dat.data import stratified_split
from dat.evaluation.cli import build_parser, evaluate_main
from dat.evaluation.loading import CheckpointError, load_entry_point, load_state_file
from dat.export import export_model

BUILDER = "import dat\n\n\ndef build():\n    return dat.models.create('resnet_tiny', 10)\n"


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("raw_key,avg_key", [("state_dict", "state_dict_ema"),
                                             ("model", "model_ema"), ("model", "swa_model")])
def test_averaged_weights_beside_raw_ones_are_named_and_can_be_chosen(
        make_tiny_model, tmp_path, capsys, raw_key, avg_key) -> None:
    """timm's state_dict_ema, DeiT's model_ema and swa_model used to be dropped silently."""
    raw, avg = make_tiny_model(seed=0).state_dict(), make_tiny_model(seed=1).state_dict()
    torch.save({raw_key: raw, avg_key: avg, "epoch": 3}, tmp_path / "w.pt")
    assert _same(load_state_file(tmp_path / "w.pt"), raw)
    assert f"holds weights under {raw_key!r}, {avg_key!r}; using {raw_key!r}" in (
        capsys.readouterr().err)
    assert _same(load_state_file(tmp_path / "w.pt", avg_key), avg)
    with pytest.raises(CheckpointError, match="no state dict under 'nope'"):
        load_state_file(tmp_path / "w.pt", "nope")
    (tmp_path / "net.py").write_text(BUILDER)
    model = load_entry_point(f"{tmp_path / 'net.py'}:build", tmp_path / "w.pt",
                             weights_key=avg_key)
    assert _same(model.state_dict(), avg)
    torch.save({avg_key: avg}, tmp_path / "only.pt")  # used to be refused
    assert _same(load_state_file(tmp_path / "only.pt"), avg)


def test_an_swa_averaged_model_state_dict_loads(make_tiny_model, tmp_path) -> None:
    """AveragedModel.state_dict() is module.<name> keys plus n_averaged."""
    model = make_tiny_model(seed=2)
    swa = torch.optim.swa_utils.AveragedModel(model)
    torch.save(swa.state_dict(), tmp_path / "swa.pt")
    assert _same(load_state_file(tmp_path / "swa.pt"), model.state_dict())


def test_weights_without_bn_counters_load_as_torch_loads_them(make_warm_model,
                                                              tmp_path) -> None:
    warm = make_warm_model().eval()
    state = {k: v for k, v in warm.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "old.pt")
    (tmp_path / "net.py").write_text(BUILDER)
    model = load_entry_point(f"{tmp_path / 'net.py'}:build", tmp_path / "old.pt")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), warm(x))


def test_weights_of_a_wrapped_net_load_by_their_prefix(make_warm_model, tmp_path,
                                                       capsys) -> None:
    """A builder that wraps the net (nn.Sequential(Normalize, net): keys '1.*'), and
    Lightning's 'model.' keys, used to fail with every key missing and unexpected."""
    warm = make_warm_model().eval()
    torch.save(warm.state_dict(), tmp_path / "net.pt")
    (tmp_path / "net.py").write_text(
        "import dat\nfrom torch import nn\n\n\ndef wrapped():\n    return nn.Sequential("
        "dat.models.Normalize((0.5,) * 3, (1.0,) * 3), dat.models.create('resnet_tiny', 10))"
        "\n\n\n" + BUILDER)
    model = load_entry_point(f"{tmp_path / 'net.py'}:wrapped", tmp_path / "net.pt")
    assert "with the prefix '1.' added" in capsys.readouterr().err
    assert _same(model[1].state_dict(), warm.state_dict())
    torch.save({"state_dict": {f"model.{k}": v for k, v in warm.state_dict().items()},
                "hyper_parameters": {"lr": 0.1}}, tmp_path / "lightning.ckpt")
    model = load_entry_point(f"{tmp_path / 'net.py'}:build", tmp_path / "lightning.ckpt")
    assert "'model.' removed" in capsys.readouterr().err
    assert _same(model.state_dict(), warm.state_dict())


@pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning")
def test_torchscript_is_named_as_weights_and_evaluates_as_a_model(make_warm_model, tmp_path,
                                                                  sample_batch) -> None:
    warm = make_warm_model().eval()
    path = tmp_path / "ts.pt"
    torch.jit.trace(warm, sample_batch[0][:2]).save(str(path))
    with pytest.raises(CheckpointError, match="is a TorchScript archive, not a state dict"):
        load_state_file(path)
    scripted = torch.jit.load(str(path))  # used to end in a traceback (forward hooks)
    kwargs = dict(attacks=["clean", "fgsm"], progress=False, check_examples=8)
    got = dat.evaluate(scripted, sample_batch, **kwargs)
    want = dat.evaluate(warm, sample_batch, **kwargs)
    assert got["results"] == want["results"]
    assert got["checks"]["eval_mode"]["status"] == "pass"
    scripted.train()
    assert dat.evaluate(scripted, sample_batch, **kwargs)["checks"]["eval_mode"][
        "status"] == "warn"


def test_a_model_instance_named_by_model_is_used_as_it_is(make_tiny_model, tmp_path) -> None:
    """module:attribute naming an nn.Module used to be called with num_classes=..."""
    (tmp_path / "inst.py").write_text(
        "import dat\n\nnet = dat.models.create('resnet_tiny', 10)\n")
    torch.save(make_tiny_model(seed=3).state_dict(), tmp_path / "w.pt")
    model = load_entry_point(f"{tmp_path / 'inst.py'}:net", tmp_path / "w.pt", num_classes=10)
    assert _same(model.state_dict(), make_tiny_model(seed=3).state_dict())


def test_more_outputs_than_classes_is_warned(tmp_path, capsys) -> None:
    (tmp_path / "net.py").write_text(
        "import dat\n\n\ndef build():\n    return dat.models.create('resnet_tiny', 100)\n")
    assert evaluate_main(["--model", f"{tmp_path / 'net.py'}:build", "--data",
                          "cifar10-sample", "--attacks", "clean", "--n-examples", "8",
                          "--no-progress", "--no-checks", "--out", str(tmp_path / "e")]) == 0
    assert "the model outputs 100 classes but the data has 10" in capsys.readouterr().err


def test_a_weights_key_on_a_plain_state_dict_says_to_drop_it(tmp_path) -> None:
    from dat.evaluation.weights import CheckpointError, load_state_file

    torch.save(dat.models.create("resnet_tiny", 10).state_dict(), tmp_path / "net.pt")
    with pytest.raises(CheckpointError, match="is itself a state dict, with no 'ema' key; "
                                              "drop the weights key"):
        load_state_file(tmp_path / "net.pt", key="ema")


def test_weights_key_needs_weights(tmp_path, capsys) -> None:
    assert evaluate_main(["--model", "x.py:f", "--weights-key", "ema", "--out",
                          str(tmp_path / "e")]) == 2
    assert "--weights-key goes with --weights" in capsys.readouterr().err


@pytest.fixture
def evaluated(monkeypatch) -> list:
    """The models evaluate.py hands to dat.evaluate (which then runs as usual)."""
    seen, real = [], dat.evaluation.runner.evaluate

    def spy(model, *args, **kwargs):
        seen.append(model)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(dat.evaluation.runner, "evaluate", spy)
    return seen


def _same_logits(a, b, x) -> bool:
    with torch.no_grad(), dat.models.bn_branch(b, "main"):  # a no-op on a single-BN model
        return torch.equal(a.eval()(x), b.eval()(x))


def _quick_cli(*argv: str) -> list[str]:
    return [*argv, "--data", "cifar10-sample", "--attacks", "clean,fgsm", "--n-examples", "24",
            "--no-progress", "--no-checks"]


def _direct(model, sample_splits, attacks=("clean", "fgsm")) -> dict:
    """What dat.evaluate gives on the 24 examples --n-examples 24 picks."""
    _, chosen = stratified_split(sample_splits.test.labels, 24, seed=0)
    x, y = sample_splits.test.subset(chosen).tensors()
    return dat.evaluate(model, (x, y), attacks=list(attacks), progress=False,
                        checks=False)["results"]


@pytest.mark.parametrize("form", ["plain", "dual_bn_safetensors", "ddp_ema_key"])
def test_a_registry_name_evaluates_weights_as_the_model_in_memory(
        make_warm_model, sample_splits, tmp_path, capsys, evaluated, form) -> None:
    """--model took only module:function; resnet_tiny was refused ("must look like ...")."""
    warm = make_warm_model(dual_bn=form == "dual_bn_safetensors", seed=4).eval()
    path, extra = tmp_path / "net.pt", []
    if form == "plain":
        torch.save(warm.state_dict(), path)
    elif form == "dual_bn_safetensors":  # the exported main branch
        path = export_model(warm, tmp_path / "net.safetensors")
    else:  # raw weights first, the EMA ones (saved under DDP) picked by --weights-key
        torch.save({"state_dict": make_warm_model(seed=5).state_dict(), "state_dict_ema":
                    {f"module.{k}": v for k, v in warm.state_dict().items()}}, path)
        extra = ["--weights-key", "state_dict_ema"]
    out = tmp_path / "e"
    assert evaluate_main(_quick_cli("--model", "resnet_tiny", "--weights", str(path),
                                    *extra, "--out", str(out))) == 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["results"] == _direct(warm, sample_splits)
    x = sample_splits.test.tensors()[0][:8]
    assert _same_logits(evaluated[0], warm, x)
    model = load_entry_point("resnet_tiny", path, num_classes=10,
                             weights_key=extra[-1] if extra else None)  # the Python API
    assert _same_logits(model, warm, x)
    assert evaluate_main(["--model", "resnet_tiny", "--checkpoint", str(path)]) == 2
    assert "--checkpoint: not allowed with argument --model" in capsys.readouterr().err


def test_a_timm_name_loads_plain_timm_weights(sample_splits, tmp_path, capsys, monkeypatch,
                                              evaluated) -> None:
    """timm/<name> was refused by --model; a timm state dict (no 'net.' prefix, as timm
    saves it) loads into dat's TimmClassifier with a note."""
    pytest.importorskip("timm")
    model = dat.models.create("timm/resnet10t", num_classes=10)
    with torch.no_grad():  # BatchNorm statistics of real images
        model.train()(sample_splits.train.subset(torch.arange(32)).tensors()[0])
    model.eval()
    torch.save(model.net.state_dict(), tmp_path / "timm.pt")
    monkeypatch.chdir(tmp_path)  # the report goes to eval_timm_resnet10t-timm, not eval_timm/...
    assert evaluate_main(_quick_cli("--model", "timm/resnet10t", "--weights", "timm.pt")) == 0
    assert "the prefix 'net.' added" in capsys.readouterr().err
    saved = json.loads((tmp_path / "eval_timm_resnet10t-timm" / "report.json").read_text())
    assert saved["metadata"]["model"] == "timm/resnet10t"
    assert saved["metadata"]["weights"] == str(tmp_path / "timm.pt")
    assert saved["results"] == _direct(model, sample_splits)
    x = sample_splits.test.tensors()[0][:8]
    assert _same_logits(evaluated[0], model, x)
    assert _same_logits(load_entry_point("timm/resnet10t", tmp_path / "timm.pt", num_classes=10),
                        model, x)


def test_normalize_builds_a_name_with_the_inputs_its_weights_expect(
        sample_splits, tmp_path, evaluated) -> None:
    """Weights trained on raw [0, 1] images (most RobustBench models) or ImageNet's mean
    and std: a name used to give only CIFAR-10's normalisation."""
    model = dat.models.create("resnet_tiny", 10, mean=(0.0,) * 3, std=(1.0,) * 3)
    with torch.no_grad():
        model.train()(sample_splits.train.subset(torch.arange(32)).tensors()[0])
    model.eval()
    torch.save(model.state_dict(), tmp_path / "raw.pt")
    out = tmp_path / "e"
    assert evaluate_main(_quick_cli("--model", "resnet_tiny", "--weights",
                                    str(tmp_path / "raw.pt"), "--normalize", "none",
                                    "--out", str(out))) == 0
    assert json.loads((out / "report.json").read_text())["results"] == _direct(
        model, sample_splits)
    x = sample_splits.test.tensors()[0][:8]
    assert _same_logits(evaluated[0], model, x)
    loaded = load_entry_point("resnet_tiny", tmp_path / "raw.pt", num_classes=10,
                              mean=(0.0,) * 3, std=(1.0,) * 3)
    assert _same_logits(loaded, model, x)
    cifar = load_entry_point("resnet_tiny", tmp_path / "raw.pt", num_classes=10)  # the default
    assert not _same_logits(cifar, model, x)
    imagenet = build_parser().parse_args(["--model", "m", "--normalize", "imagenet"])
    assert imagenet.normalize == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    custom = build_parser().parse_args(["--model", "m", "--normalize", "0.5,0.5,0.5/.25,.25,.25"])
    assert custom.normalize == ((0.5,) * 3, (0.25,) * 3)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv,needles", [
    (["--model", "resnet19"], ["neither a dat.models name", "did you mean resnet18?",
                               "dat.models.list_models()"]),
    (["--model", "resnet50"], ["did you mean timm/resnet50?", "dat.models.list_models()"]),
    (["--model", "nets.py"], ["e.g. nets.py:build", "dat.models.list_models()"]),
    (["--model", "timm/not_a_model_xyz", "--weights", "w.pt"],
     ["timm has no model 'not_a_model_xyz'", "timm.list_models()"]),
    (["--model", "resnet18"], ["weights start random; pass --weights FILE"]),
    (["--model", "resnet18", "--weights", "w.pt", "--normalize", "125,123,114/63,62,66"],
     ["on the [0, 1] scale", "divide 0-255 values by 255"]),
    (["--model", "x.py:f", "--normalize", "none"], ["is for dat.models names"]),
    (["--checkpoint", "best.pt", "--normalize", "none"], ["--normalize goes with --model"]),
])
def test_a_model_that_is_no_name_nor_builder_gets_one_line(tmp_path, capsys, argv,
                                                           needles) -> None:
    """A name used to be read as a builder: "'resnet19' must look like module:function"."""
    assert evaluate_main([*argv, "--out", str(tmp_path / "e")]) == 2
    err = _one_line(capsys)
    assert all(n in err for n in needles), err
    assert not (tmp_path / "e").exists()


def test_a_registered_name_with_a_colon_is_a_name_before_a_builder(
        make_tiny_model, tmp_path, monkeypatch) -> None:
    """Resolved as dat.models.create resolves model.name: timm/, registry, module:function."""
    monkeypatch.setitem(dat.models.registry._REGISTRY, "lab:net",
                        dat.models.registry._REGISTRY["resnet_tiny"])
    torch.save(make_tiny_model(seed=6).state_dict(), tmp_path / "w.pt")
    model = load_entry_point("lab:net", tmp_path / "w.pt", num_classes=10)
    assert _same(model.state_dict(), make_tiny_model(seed=6).state_dict())
