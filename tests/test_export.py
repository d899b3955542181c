"""Export: plain single-BN weights that reproduce the dual model's main branch, in
safetensors (no pickle) and RobustBench-style torch files; the CLI and --model path."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dat
import dat.export
from dat.config import Config, config_to_dict
from dat.data import stratified_split
from dat.evaluation import load_checkpoint
from dat.evaluation.cli import evaluate_main
from dat.export import export_model, load_exported, main


def _save_checkpoint(model, path, name: str = "resnet_tiny") -> None:
    cfg = Config()
    cfg.model.name, cfg.data.name = name, "cifar10-sample"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "step": 7}, path)


@pytest.mark.parametrize("fmt, suffix", [("safetensors", ".safetensors"), ("robustbench", ".pt")])
def test_export_round_trips_main_branch_logits(make_warm_model, sample_batch, tmp_path, fmt,
                                               suffix) -> None:
    dual = make_warm_model(dual_bn=True).eval()
    x, _ = sample_batch
    with torch.no_grad(), dat.models.bn_branch(dual, "aux"):
        aux_logits = dual(x)
    with torch.no_grad(), dat.models.bn_branch(dual, "main"):
        main_logits = dual(x)
    assert not torch.allclose(aux_logits, main_logits)  # the branches really differ
    path = export_model(dual, tmp_path / f"model{suffix}", fmt)
    plain = load_exported(path, "resnet_tiny", 10)  # strict=True inside
    assert not dat.models.has_dual_bn(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), main_logits, rtol=0, atol=1e-6)


def test_files_load_without_pickle(make_warm_model, tmp_path) -> None:
    dual = make_warm_model(dual_bn=True)
    export_model(dual, tmp_path / "m.safetensors", "safetensors", metadata={"model": "x"})
    export_model(dual, tmp_path / "m.pt", "robustbench")
    keys = set(dat.models.create("resnet_tiny", 10).state_dict())
    tensors = load_file(str(tmp_path / "m.safetensors"))
    state = torch.load(tmp_path / "m.pt", weights_only=True)
    assert set(tensors) == keys == set(state)
    assert not any(".main." in k or ".aux." in k for k in tensors)
    with pytest.raises(ValueError, match="robustbench, safetensors"):
        export_model(dual, tmp_path / "m.onnx", "onnx")


def test_cli_exports_and_verifies(make_warm_model, tmp_path, capsys) -> None:
    dual = make_warm_model(dual_bn=True).eval()
    _save_checkpoint(dual, tmp_path / "best.pt")
    loaded = load_checkpoint(tmp_path / "best.pt")
    assert loaded.dual_bn and loaded.num_classes == 10 and loaded.config.model.name == "resnet_tiny"
    out = tmp_path / "export" / "model.safetensors"
    assert main(["--checkpoint", str(tmp_path / "best.pt"), "--format", "safetensors",
                 "--out", str(out)]) == 0
    assert "verified" in capsys.readouterr().out
    assert main(["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error:")


@pytest.mark.parametrize("where", ["under_a_file", "a_folder"])
def test_cli_names_an_unwritable_out_in_one_line(make_warm_model, tmp_path, capsys,
                                                 where) -> None:
    """--out under a file, or naming a folder: it raised a traceback from the clean-up, or
    named the hidden staging file and no fix."""
    _save_checkpoint(make_warm_model().eval(), tmp_path / "best.pt")
    (tmp_path / "plain").write_text("a file")
    (tmp_path / "x.safetensors").mkdir()
    out = tmp_path / ("plain/a.safetensors" if where == "under_a_file" else "x.safetensors")
    assert main(["--checkpoint", str(tmp_path / "best.pt"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot write {out} (") and "\n" not in err
    assert err.endswith("pass a writable path with --out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "plain", "x.safetensors"]
    assert list((tmp_path / "x.safetensors").iterdir()) == []


def test_model_entry_point_with_exported_weights(make_warm_model, sample_splits,
                                                 tmp_path) -> None:
    dual = make_warm_model(dual_bn=True).eval()
    export_model(dual, tmp_path / "net.safetensors", "safetensors")
    (tmp_path / "net.py").write_text(
        "import dat\n\n\ndef build():\n    return dat.models.create('resnet_tiny', 10)\n")
    code = evaluate_main(["--model", f"{tmp_path / 'net.py'}:build", "--weights",
                          str(tmp_path / "net.safetensors"), "--data", "cifar10-sample",
                          "--attacks", "clean", "--n-examples", "24", "--no-checks",
                          "--no-progress", "--out", str(tmp_path / "eval")])
    assert code == 0
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    _, chosen = stratified_split(sample_splits.test.labels, 24, seed=0)  # as --n-examples
    x, y = sample_splits.test.subset(chosen).tensors()
    with torch.no_grad(), dat.models.bn_branch(dual, "main"):
        expected = 100.0 * int((dual(x).argmax(1) == y).sum()) / 24
    assert report["results"]["clean"] == expected


def test_cli_writes_the_metadata_and_names_the_branch(make_warm_model, tmp_path,
                                                      capsys) -> None:
    # the safetensors header says what the weights are for whoever loads the file alone
    _save_checkpoint(make_warm_model(dual_bn=True).eval(), tmp_path / "best.pt")
    out = tmp_path / "model.safetensors"
    assert main(["--checkpoint", str(tmp_path / "best.pt"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(
        f"exported resnet_tiny (10 classes, main BN) -> {out} [safetensors]\n")
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"model": "resnet_tiny", "num_classes": "10", "bn_branch": "main",
                                "input": "RGB in [0, 1], normalisation inside the model"}


def test_cli_writes_nothing_when_the_exported_logits_differ(make_warm_model, tmp_path, capsys,
                                                           monkeypatch) -> None:
    """The reload check is what keeps a wrong export from reaching --out."""
    _save_checkpoint(make_warm_model(dual_bn=True).eval(), tmp_path / "best.pt")
    real = dat.export.export_state_dict

    def off_by_a_little(model):  # a bias 1e-3 off: small, but over the 1e-5 tolerance
        state = real(model)
        state["linear.bias"] += 1e-3
        return state

    monkeypatch.setattr(dat.export, "export_state_dict", off_by_a_little)
    out = tmp_path / "model.safetensors"
    assert main(["--checkpoint", str(tmp_path / "best.pt"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "exported logits differ from the checkpoint's" in err and str(out) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt"]  # nor a staged file


def test_loading_an_export_is_strict_and_the_suffix_must_fit_the_format(make_warm_model,
                                                                        tmp_path) -> None:
    model = make_warm_model()
    path = export_model(model, tmp_path / "m.safetensors")
    state = load_file(str(path))
    del state["linear.bias"]  # a file for another head must not load half-way
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*linear\.bias"):
        load_exported(tmp_path / "partial.safetensors", "resnet_tiny", 10)
    with pytest.raises(ValueError, match=r"--out .*m\.pt does not fit --format safetensors: "
                                         r"name it m\.safetensors or pass --format robustbench"):
        export_model(model, tmp_path / "m.pt", "safetensors")
    assert not (tmp_path / "m.pt").exists()
