"""Weights from other codebases: averaged weights beside raw ones (timm, DeiT, SWA), old
checkpoints without BatchNorm counters, wrapper prefixes, TorchScript, model instances,
and a model with more outputs than the data has classes."""

from __future__ import annotations

import pytest
import torch

import dat
from dat.evaluation.cli import evaluate_main
from dat.evaluation.loading import CheckpointError, load_entry_point, load_state_file

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


def test_weights_key_needs_weights(tmp_path, capsys) -> None:
    assert evaluate_main(["--model", "x.py:f", "--weights-key", "ema", "--out",
                          str(tmp_path / "e")]) == 2
    assert "--weights-key goes with --weights" in capsys.readouterr().err
