"""Bad input gets one line naming the fix and exit status 2 (130 for Ctrl-C), never a
traceback or a silently wrong value: eps, YAML files, devices, entry points, weights files,
--out, example counts, export names, unsafe pickles; exported files get the usual mode."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch

import dat
import dat.evaluation.cli
import dat.evaluation.runner
import dat.export
from dat.config import Config, ConfigError, config_to_dict, load_config
from dat.entry_points import load_function
from dat.evaluation.cli import evaluate_main, parse_eps
from dat.evaluation.diagnostics import fourier_heatmap
from dat.evaluation.loading import CheckpointError, load_entry_point, load_state_file
from dat.export import export_model


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "\x1b" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _checkpoint(model, path: Path) -> Path:
    cfg = Config()
    cfg.model.name, cfg.data.name = "resnet_tiny", "cifar10-sample"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg)}, path)
    return path


@pytest.fixture
def ckpt(make_tiny_model, tmp_path) -> Path:
    return _checkpoint(make_tiny_model().eval(), tmp_path / "best.pt")


def _quick(ckpt: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(ckpt), "--attacks", "clean", "--n-examples", "8",
            "--no-progress", "--no-checks", "--out", str(tmp_path / "eval"), *extra]


@pytest.fixture
def no_attacks(monkeypatch):
    """Fail the test if evaluation starts: the error must come up front."""
    def refuse(*args, **kwargs):
        raise AssertionError("evaluation ran despite bad input")
    monkeypatch.setattr(dat.evaluation.runner, "evaluate", refuse)


# 1. eps = x/0
def test_eps_divided_by_zero_in_a_train_override_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"method.attack.eps=8/0.*divides by zero.*8/255"):
        load_config("quickstart", ["method.attack.eps=8/0"])


def test_eps_divided_by_zero_in_a_yaml_file_is_a_config_error(tmp_path) -> None:
    (tmp_path / "zero.yaml").write_text("method:\n  attack:\n    eps: 8/0\n")
    with pytest.raises(ConfigError, match="zero.yaml.*divides by zero"):
        load_config(str(tmp_path / "zero.yaml"))


def test_eps_divided_by_zero_on_the_evaluate_cli(ckpt, tmp_path, capsys, no_attacks) -> None:
    assert evaluate_main(_quick(ckpt, tmp_path, "--eps", "8/0")) == 2
    _one_line_error(capsys, "--eps", "divides by zero", "8/255")


# 2. a bare 1 means 1/255, not the whole range
def test_bare_eps_1_is_refused_and_decimals_are_kept(ckpt, tmp_path, capsys, no_attacks) -> None:
    assert evaluate_main(_quick(ckpt, tmp_path, "--eps", "1")) == 2
    _one_line_error(capsys, "1/255", "255/255")
    assert parse_eps("1.0") == 1.0 and parse_eps("0.0314") == 0.0314
    assert parse_eps("8/255") == 8 / 255 and parse_eps("0") == 0.0
    for bad in ("8", "nan", "inf", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_eps(bad)


@pytest.mark.parametrize("eps", ["-1/255", "-0.5"])
def test_a_negative_eps_is_named_not_taken_for_an_option(ckpt, tmp_path, capsys, no_attacks,
                                                         eps) -> None:
    """argparse used to answer "expected one argument" for --eps -1/255."""
    assert evaluate_main(_quick(ckpt, tmp_path, "--eps", eps)) == 2
    _one_line_error(capsys, f"eps {eps} must be a finite number >= 0")


@pytest.mark.parametrize("sweep, needle", [
    ("0,300", "--sweep radius 300 is outside 0..255"),
    ("0.031,0.1", "--sweep radius 0.031 is below 1/255: radii are in 1/255 units, so write 7.9"),
    ("0,nan", "--sweep radius nan is outside 0..255"),
])
def test_sweep_radii_outside_the_pixel_scale_are_refused(ckpt, tmp_path, capsys, no_attacks,
                                                         sweep, needle) -> None:
    """--sweep 0,300 used to run PGD at eps 300/255 and report 0%."""
    assert evaluate_main(_quick(ckpt, tmp_path, "--sweep", sweep)) == 2
    _one_line_error(capsys, needle)


def test_sweep_radii_in_brackets_as_the_readme_writes_them(ckpt, tmp_path, monkeypatch) -> None:
    """The README's synopsis shows ``[--sweep [0,1,2,4,8,16]]``; copied, it was refused."""
    seen = {}

    def record(model, data, **kwargs):
        seen.update(kwargs)
        raise SystemExit(0)
    monkeypatch.setattr(dat.evaluation.runner, "evaluate", record)
    with pytest.raises(SystemExit):
        evaluate_main(_quick(ckpt, tmp_path, "--sweep", "[0,4,8]"))
    assert seen["sweep"] == [0, 4 / 255, 8 / 255]


def test_more_examples_than_the_split_has_says_so(ckpt, tmp_path, capsys) -> None:
    """--n-examples 100000 on the 1,000-image sample used all of it without a word."""
    from dat.data import load_dataset
    from dat.evaluation.cli import _examples

    cfg = dat.load_config("quickstart").data
    cfg.test_subset = 0  # as evaluate.py reads the split: whole
    total = len(load_dataset(cfg).test)
    x, _, _ = _examples(cfg, "test", 100000)
    assert len(x) == total
    assert (f"note: --n-examples 100000 is more than the test split's {total} images; "
            f"evaluating all {total}") in capsys.readouterr().err


def test_the_api_refuses_sweep_radii_outside_0_1(make_tiny_model, sample_batch) -> None:
    with pytest.raises(dat.evaluation.EvaluationError, match=r"sweep radii .* \[0, 1\]"):
        dat.evaluate(make_tiny_model(), sample_batch, attacks=["clean"], sweep=[0, 8])


# 3. YAML files
@pytest.mark.parametrize("text, match", [
    ("train: [1, 2\nmethod: :\n", r"bad.yaml is not valid YAML \(.* at line 2"),
    ("- 1\n- 2\n", r"bad.yaml holds a list at the top level; .*mapping"),
])
def test_a_broken_or_list_yaml_file_is_one_config_error(tmp_path, text, match) -> None:
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        load_config(str(tmp_path / "bad.yaml"))
    assert "\n" not in str(info.value)


# 4. devices
@pytest.mark.parametrize("device, needle", [("cuda", "CUDA is not available; use --device cpu"),
                                            ("gpu", "use auto, cpu, cuda or cuda:N")])
def test_an_unusable_device_is_one_line(ckpt, tmp_path, capsys, monkeypatch, no_attacks, device,
                                        needle) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert evaluate_main(_quick(ckpt, tmp_path, "--device", device)) == 2
    _one_line_error(capsys, needle)


# 5. Ctrl-C
def test_ctrl_c_prints_interrupted_and_exits_130(ckpt, tmp_path, capsys, monkeypatch) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(dat.evaluation.runner, "evaluate", interrupt)
    assert evaluate_main(_quick(ckpt, tmp_path)) == 130
    _one_line_error(capsys, "interrupted", "nothing was saved")
    assert not (tmp_path / "eval").exists()  # the empty report folder is removed again


def test_ctrl_c_during_an_attack_keeps_the_finished_ones(ckpt, tmp_path, capsys,
                                                         monkeypatch) -> None:
    """A Ctrl-C in CW (after clean and FGSM finished) writes a partial report of those."""
    real = dat.evaluation.runner.attack_points

    def interrupt_cw(spec, *args, **kwargs):
        if spec.name == "cw":
            raise KeyboardInterrupt
        return real(spec, *args, **kwargs)
    monkeypatch.setattr(dat.evaluation.runner, "attack_points", interrupt_cw)
    argv = _quick(ckpt, tmp_path, "--attacks", "clean,fgsm,cw,pgd20")
    assert evaluate_main(argv) == 130
    _one_line_error(capsys, "interrupted during cw", "partial report (clean, fgsm, worst_case)",
                    str(tmp_path / "eval" / "report.json"), "same command with --resume")
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert list(report["results"]) == ["clean", "fgsm", "worst_case"]
    assert report["interrupted"].startswith("interrupted during cw;")
    assert report["checks_status"] == "skip" and report["n"] == 8
    page = (tmp_path / "eval" / "report.md").read_text()
    assert "**Partial report**: interrupted during cw" in page


def test_ctrl_c_before_an_attack_finishes_points_to_saved_progress(ckpt, tmp_path, capsys,
                                                                   monkeypatch) -> None:
    """Telling the user to evaluate again without --resume would discard saved attacks."""
    assert evaluate_main(_quick(ckpt, tmp_path, "--attacks", "clean,fgsm")) == 0
    assert (tmp_path / "eval" / "progress.json").is_file()
    capsys.readouterr()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(dat.evaluation.runner, "evaluate", interrupt)
    assert evaluate_main(_quick(ckpt, tmp_path, "--attacks", "clean,fgsm,cw", "--resume")) == 130
    _one_line_error(capsys, "attacks finished so far are in", "progress.json", "--resume")


def test_a_checkpoint_on_data_with_other_class_folders_is_refused(make_tiny_model, tmp_path,
                                                                  capsys) -> None:
    """Labels are sorted folder indices: one renamed folder shifted them all, and the
    accuracy dropped from 52% to 28% without a word."""
    classes = ["zz_airplane", *dat.data.load_dataset(
        dat.config.DataConfig(name="cifar10-sample")).classes[1:]]
    path = tmp_path / "best.pt"
    _checkpoint(make_tiny_model().eval(), path)
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "classes": classes}, path)
    assert evaluate_main(_quick(path, tmp_path)) == 2
    _one_line_error(capsys, "trained on 10 classes and the data has 10, which differ from "
                    "label 0 on (['zz_airplane', 'automobile'] vs ['airplane', 'automobile'])",
                    "--data-root", "--ignore-class-names")
    assert evaluate_main(_quick(path, tmp_path, "--ignore-class-names")) == 0  # only renamed


def test_ignore_class_names_still_needs_the_same_number_of_classes(make_tiny_model, tmp_path,
                                                                  capsys, no_attacks) -> None:
    """--ignore-class-names is for renamed folders: a 12-class checkpoint on 10-class data
    used to run (with a warning) and read labels 0..9 as its first 10 outputs."""
    path = tmp_path / "best.pt"
    _checkpoint(make_tiny_model(num_classes=12).eval(), path)
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "classes": [f"c{i}" for i in range(12)]}, path)
    for flag in ([], ["--ignore-class-names"]):
        assert evaluate_main(_quick(path, tmp_path, *flag)) == 2
        err = _one_line_error(capsys, "trained on 12 classes and the data has 10; evaluate it "
                              "on data with the 12 class folders", "--data-root")
        assert ("not another number of classes" in err) == bool(flag)
        assert "--ignore-class-names if" not in err  # not offered where it cannot help


def test_a_checkpoint_on_images_of_another_size_is_refused(make_tiny_model, tmp_path,
                                                           capsys, no_attacks) -> None:
    """A 64x64 Tiny-ImageNet model on a 32x32 copy with the same wnids: global pooling takes
    any size, so the numbers came out without a word. Checkpoints without image_shape
    (older runs) are evaluated as before."""
    path = tmp_path / "best.pt"
    _checkpoint(make_tiny_model().eval(), path)
    saved = torch.load(path, weights_only=True)
    torch.save({**saved, "image_shape": [3, 64, 64]}, path)
    assert evaluate_main(_quick(path, tmp_path)) == 2
    _one_line_error(capsys, "trained on 3x64x64 images and the data has 3x32x32",
                    "--data-root", "--model/--weights")


def test_a_run_folder_evaluates_its_best_checkpoint(make_tiny_model, tmp_path, capsys) -> None:
    run = tmp_path / "runs" / "demo"
    (run / "checkpoints").mkdir(parents=True)
    _checkpoint(make_tiny_model().eval(), run / "checkpoints" / "best.pt")
    assert evaluate_main(["--checkpoint", str(run), "--attacks", "clean", "--n-examples", "8",
                          "--no-progress", "--no-checks"]) == 0
    assert (run / "checkpoints" / "eval_best" / "report.json").is_file()
    assert evaluate_main(["--checkpoint", str(run / "checkpoints"), "--attacks", "clean",
                          "--n-examples", "8", "--no-progress", "--no-checks",
                          "--out", str(tmp_path / "e2")]) == 0  # its checkpoints/ folder too
    empty = tmp_path / "empty"
    empty.mkdir()
    assert evaluate_main(["--checkpoint", str(empty), "--out", str(tmp_path / "e")]) == 2
    _one_line_error(capsys, "is a folder without checkpoints/best.pt or last.pt")


# 6. entry points that need arguments
def test_an_entry_point_needing_arguments_is_refused(tmp_path, capsys, no_attacks) -> None:
    assert evaluate_main(["--model", "dat.models:create", "--out", str(tmp_path / "e")]) == 2
    _one_line_error(capsys, "dat.models:create", "must take no arguments", "name",
                    "--model net.py:net")
    with pytest.raises(CheckpointError, match="must take no arguments"):
        load_entry_point("dat.models:create")


def test_an_entry_point_taking_num_classes_gets_the_datas(tmp_path, capsys) -> None:
    """As model.name=file.py:function does in training: a builder that needs num_classes
    used to be refused by evaluate.py --model ("must take no arguments")."""
    (tmp_path / "net.py").write_text(
        "import dat\n\n\ndef build(num_classes):\n"
        "    return dat.models.create('resnet_tiny', num_classes)\n")
    assert evaluate_main(["--model", f"{tmp_path / 'net.py'}:build", "--data", "cifar10-sample",
                          "--attacks", "clean", "--n-examples", "8", "--no-progress",
                          "--no-checks", "--out", str(tmp_path / "e")]) == 0
    report = json.loads((tmp_path / "e" / "report.json").read_text())
    assert report["num_classes"] == 10


def test_a_model_refused_by_the_evaluation_leaves_no_report_folder(tmp_path, capsys) -> None:
    (tmp_path / "pair.py").write_text(
        "import torch\n"
        "class Pair(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        logits = x.flatten(1)[:, :10]\n"
        "        return logits, logits\n"
        "def net():\n"
        "    return Pair()\n")
    out = tmp_path / "eval"
    args = ["--model", f"{tmp_path / 'pair.py'}:net", "--data", "cifar10-sample",
            "--attacks", "clean", "--n-examples", "8", "--no-progress", "--out", str(out)]
    assert evaluate_main(args) == 2
    _one_line_error(capsys, "tuple")
    assert not out.exists()  # the folder this run created is gone again, lock file included


@pytest.mark.parametrize("source, needles", [
    ("import torch\n\ndef build(:\n    pass\n",
     ["running ", "SyntaxError: ", "bad.py line 3)", "; fix the file"]),
    ("import torch\n\nscale = 1 / 0\n\n\ndef build():\n    pass\n",
     ["running ", "ZeroDivisionError: division by zero", "bad.py line 3)", "; fix the file"]),
    ("import no_such_package_for_dat_tests\n\n\ndef build():\n    pass\n",
     ["ModuleNotFoundError: No module named 'no_such_package_for_dat_tests'", "bad.py line 1)",
      "install the missing package"]),
    ("def build():\n    weights = None\n    raise RuntimeError(f'no weights: {weights}')\n",
     ["build() raised RuntimeError: no weights: None", "bad.py line 3)", "; fix the builder"]),
], ids=["syntax_error", "error_on_import", "missing_package", "build_raises"])
def test_an_error_in_the_users_builder_file_is_one_line(source, needles, tmp_path,
                                                        capsys) -> None:
    """A syntax error in the file, or an exception while it runs or in build(), ended in
    a raw traceback, in evaluate.py --model and train.py model.name= alike."""
    from dat.cli import train_main

    (tmp_path / "bad.py").write_text(source)
    spec = f"{tmp_path / 'bad.py'}:build"
    assert evaluate_main(["--model", spec, "--data", "cifar10-sample", "--attacks", "clean",
                          "--n-examples", "8", "--no-progress", "--out",
                          str(tmp_path / "e")]) == 2
    _one_line_error(capsys, f"--model '{spec}': ", *needles)
    assert not (tmp_path / "e").exists()
    assert train_main(["--no-progress", f"model.name={spec}", "data.name=cifar10-sample",
                       f"train.out_dir={tmp_path / 'runs'}"]) == 2
    _one_line_error(capsys, f"model.name '{spec}': ", *needles)


def test_a_torch_export_program_is_refused_naming_the_original_module(tmp_path, capsys,
                                                                      sample_batch) -> None:
    """ExportedProgram.module() raises NotImplementedError on .eval(): that traceback was
    all evaluate.py said."""
    (tmp_path / "exported.py").write_text(
        "import torch\nimport dat\n\n\ndef build():\n"
        "    net = dat.models.create('resnet_tiny', 10).eval()\n"
        "    return torch.export.export(net, (torch.rand(2, 3, 32, 32),)).module()\n")
    spec = f"{tmp_path / 'exported.py'}:build"
    assert evaluate_main(["--model", spec, "--data", "cifar10-sample", "--attacks", "clean",
                          "--n-examples", "8", "--no-progress", "--out",
                          str(tmp_path / "e")]) == 2
    _one_line_error(capsys, f"--model {spec} returned a torch.export program",
                    "return the original nn.Module")
    program = load_function(spec, "--model")()
    with pytest.raises(dat.evaluation.EvaluationError,
                       match="the model is a torch.export program .* return the original"):
        dat.evaluate(program, sample_batch, attacks=["clean"], progress=False)


# 7. weights under common keys
def test_weights_under_common_keys_load(make_tiny_model, tmp_path) -> None:
    state = make_tiny_model().state_dict()
    for key in ("model_state_dict", "state_dict", "model", "net", "ema"):
        torch.save({key: state, "optimizer": {"lr": 0.1}, "epoch": 3}, tmp_path / "w.pt")
        loaded = load_state_file(tmp_path / "w.pt")
        assert loaded.keys() == state.keys()


def test_split_bn_weights_load_into_a_single_bn_builder_as_its_main_branch(
        make_warm_model, make_tiny_model, tmp_path, capsys, sample_batch) -> None:
    """A DAT model's own state dict (two BN branches) used to fail with 30 unexpected keys
    when its builder makes the plain model; it now gets both branches and runs the main."""
    dual = make_warm_model(dual_bn=True).eval()  # main BN statistics warmed, aux not
    torch.save(dual.state_dict(), tmp_path / "dual.pt")
    (tmp_path / "net.py").write_text(
        "import dat\n\n\ndef build():\n    return dat.models.create('resnet_tiny', 10)\n")
    model = load_entry_point(f"{tmp_path / 'net.py'}:build", tmp_path / "dual.pt")
    assert "got them too (convert_dual_bn) and is evaluated on the main branch" in (
        capsys.readouterr().err)
    x = sample_batch[0][:4]
    with torch.no_grad(), dat.models.bn_branch(dual, "aux"):
        aux = dual(x)
    with torch.no_grad():
        assert torch.equal(model(x), dat.models.export_main_branch(dual)(x))
        assert not torch.allclose(model(x), aux)
    other = make_tiny_model(dual_bn=True, num_classes=5).state_dict()  # not this model
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="trained for 5 classes"):
        load_entry_point(f"{tmp_path / 'net.py'}:build", tmp_path / "other.pt")


def test_weights_without_a_state_dict_list_the_keys_found(tmp_path, capsys, no_attacks) -> None:
    torch.save({"optimizer": {"lr": 0.1}, "epoch": 3}, tmp_path / "w.pt")
    (tmp_path / "net.py").write_text(
        "import dat\n\n\ndef build():\n    return dat.models.create('resnet_tiny', 10)\n")
    assert evaluate_main(["--model", f"{tmp_path / 'net.py'}:build", "--weights",
                          str(tmp_path / "w.pt"), "--out", str(tmp_path / "e")]) == 2
    _one_line_error(capsys, "holds no state dict", "['optimizer', 'epoch']", "model_state_dict")


@pytest.mark.parametrize("content", ["torn", "text"])
def test_a_torn_or_foreign_weights_file_is_named_as_such(make_tiny_model, tmp_path,
                                                        content) -> None:
    """These used to end in torch's own words: "[Errno 22] Invalid argument", "101"."""
    path = tmp_path / "w.pt"
    if content == "torn":
        torch.save(make_tiny_model().state_dict(), path)
        path.write_bytes(path.read_bytes()[:2000])
    else:
        path.write_text("epoch,accuracy\n1,0.5\n")
    with pytest.raises(CheckpointError, match=r"w.pt is not a readable torch file \(.*\): it "
                                              r"is truncated, or was not written by torch.save"):
        load_state_file(path)


def test_safetensors_under_another_suffix_load_as_safetensors(make_tiny_model, tmp_path,
                                                              capsys) -> None:
    """They were reported as "unreadable pickle data"; the header says what they are."""
    from safetensors.torch import save_file

    state = make_tiny_model(seed=2).state_dict()
    save_file(state, tmp_path / "weights.bin")
    loaded = load_state_file(tmp_path / "weights.bin")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    (tmp_path / "net.py").write_text(
        "import dat\n\n\ndef build():\n    return dat.models.create('resnet_tiny', 10)\n")
    assert evaluate_main(["--model", f"{tmp_path / 'net.py'}:build", "--weights",
                          str(tmp_path / "weights.bin"), "--data", "cifar10-sample",
                          "--attacks", "clean", "--n-examples", "8", "--no-progress",
                          "--no-checks", "--out", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    assert evaluate_main(_quick(tmp_path / "weights.bin", tmp_path)) == 2
    _one_line_error(capsys, "weights.bin is a safetensors file (weights only), not a dat "
                    "checkpoint", "--model module:function --weights")


def test_weights_under_two_keys_say_which_is_used(make_tiny_model, tmp_path, capsys) -> None:
    a, b = make_tiny_model(seed=0).state_dict(), make_tiny_model(seed=1).state_dict()
    torch.save({"model": a, "ema": b}, tmp_path / "both.pt")
    state = load_state_file(tmp_path / "both.pt")
    assert all(torch.equal(state[k], a[k]) for k in a)
    assert "holds weights under 'model', 'ema'; using 'model'" in capsys.readouterr().err


def test_a_refused_evaluation_leaves_the_other_evaluations_files_alone(
        ckpt, tmp_path, capsys, monkeypatch, lock_elsewhere) -> None:
    """This process made --out, then another evaluation took it first: the refusal must
    not clean up (delete) the other one's lock and progress."""
    out = tmp_path / "eval"
    holder = lock_elsewhere(out, "hold")
    assert holder.stdout.readline().strip() == "held"
    (out / "progress.json").write_text("{}")
    monkeypatch.setattr(dat.evaluation.cli, "_check_writable", lambda folder: True)
    assert evaluate_main(_quick(ckpt, tmp_path)) == 2
    _one_line_error(capsys, f"in use by another process (pid {holder.pid} on ",
                    "pass another --out")
    assert (out / ".lock").is_file() and (out / "progress.json").read_text() == "{}"


# 8. unwritable --out
def test_an_unwritable_out_fails_before_any_attack(ckpt, tmp_path, capsys, no_attacks) -> None:
    (tmp_path / "file").write_text("x")
    args = _quick(ckpt, tmp_path)
    args[args.index("--out") + 1] = str(tmp_path / "file" / "x")
    assert evaluate_main(args) == 2
    _one_line_error(capsys, "--out", "cannot write")


# 9. / 10. example counts
@pytest.mark.parametrize("extra, needle", [
    (["--n-examples", "0"], "--n-examples"), (["--n-examples", "-5"], "--n-examples"),
    (["--heatmap", "--heatmap-examples", "0"], "--heatmap-examples"),
])
def test_example_counts_below_one_are_refused(ckpt, tmp_path, capsys, no_attacks, extra,
                                              needle) -> None:
    assert evaluate_main(_quick(ckpt, tmp_path, *extra)) == 2
    _one_line_error(capsys, needle, ">= 1")


def test_fourier_heatmap_of_no_examples_names_the_fix(make_tiny_model) -> None:
    x, y = torch.rand(0, 3, 32, 32), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match="heatmap_examples >= 1"):
        fourier_heatmap(make_tiny_model().eval(), x, y, progress=False)


# 11. export names and leftovers
@pytest.mark.parametrize("fmt, name, needle", [
    ("robustbench", "z.safetensors", "name it z.pt or pass --format safetensors"),
    ("safetensors", "x.pt", "name it x.safetensors or pass --format robustbench"),
])
def test_export_refuses_a_mismatched_extension(ckpt, tmp_path, capsys, fmt, name,
                                               needle) -> None:
    out = tmp_path / name
    assert dat.export.main(["--checkpoint", str(ckpt), "--format", fmt, "--out", str(out)]) == 2
    _one_line_error(capsys, needle)
    assert list(tmp_path.iterdir()) == [ckpt]


def test_a_failed_export_leaves_no_file(ckpt, tmp_path, capsys, monkeypatch) -> None:
    out = tmp_path / "model.safetensors"
    monkeypatch.setattr(dat.export, "_verify", lambda loaded, path: 1.0)
    assert dat.export.main(["--checkpoint", str(ckpt), "--out", str(out)]) == 1
    _one_line_error(capsys, "differ", "nothing written")
    assert list(tmp_path.iterdir()) == [ckpt]


# 12. unsafe pickles
class _Evil:
    pass


@pytest.mark.parametrize("flag", ["--checkpoint", "--weights"])
def test_an_unsafe_pickle_is_refused_in_one_clean_line(tmp_path, capsys, no_attacks,
                                                       flag) -> None:
    torch.save({"model": _Evil(), "config": {}}, tmp_path / "evil.pt")
    argv = [flag, str(tmp_path / "evil.pt"), "--out", str(tmp_path / "e")]
    if flag == "--weights":
        (tmp_path / "net.py").write_text(
            "import dat\n\n\ndef build():\n    return dat.models.create('resnet_tiny', 10)\n")
        argv += ["--model", f"{tmp_path / 'net.py'}:build"]
    assert evaluate_main(argv) == 2
    err = _one_line_error(capsys, "refusing to load it")
    assert "This file can still be loaded" not in err


# 13. file modes
@pytest.mark.parametrize("fmt, name", [("safetensors", "m.safetensors"), ("robustbench", "m.pt")])
def test_exported_files_follow_the_umask(make_tiny_model, tmp_path, fmt, name) -> None:
    old = os.umask(0o022)
    try:
        path = export_model(make_tiny_model(), tmp_path / name, fmt)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


# ----- the Python API: attacks, DATStep, models ---------------------------------------

def _dat_step(**kw):
    from dat.generator import AmplitudeGenerator
    from dat.methods.dat import DATStep

    model = dat.models.create("resnet_tiny", dual_bn=True)
    gen = AmplitudeGenerator(10, (3, 32, 32))
    return DATStep(model, gen, torch.optim.SGD(model.parameters(), lr=0.1), **kw)


def test_labels_passed_to_trades_kl_as_eps_are_refused() -> None:
    """trades_kl(model, x) takes no labels: a batch of 32 labels used to broadcast into a
    per-column eps of up to 9 (perturbations of 41/255)."""
    from dat.attacks import pgd, trades_kl

    model = dat.models.create("resnet_tiny").eval()
    x, y = torch.rand(32, 3, 32, 32), torch.randint(1, 10, (32,))
    with pytest.raises(ValueError, match="eps must be a number"):
        trades_kl(model, x, y, steps=1)
    with pytest.raises(ValueError, match="write 8/255"):
        pgd(model, x, y, eps=8, steps=1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=8), "write 8/255"), (dict(mu=2.0), "mu=2.0 must be in"),
])
def test_dat_step_refuses_settings_that_cannot_be_meant(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        _dat_step(**kwargs)


@pytest.mark.parametrize("batch, match", [
    (lambda x, y: ((x * 255).to(torch.uint8), y), "x.float\\(\\) / 255"),  # NaN weights before
    (lambda x, y: (x, y.float()), "integer labels"),
    (lambda x, y: (x[:1], y[:1]), "at least 2 images"),
    # used to raise a bare IndexError after the generator's BN statistics had moved
    (lambda x, y: (x, y + 7), "labels range 7..10 but the model has 10 outputs; labels must"),
    (lambda x, y: (x, y - 1), "labels range -1..2 but the model has 10 outputs"),
    (lambda x, y: (x, y[:3]), "one class index per image; got torch.int64 \\(3,\\) for 4"),
])
def test_dat_step_refuses_a_batch_it_cannot_train_on(batch, match) -> None:
    step = _dat_step(steps=1)
    x, y = batch(torch.rand(4, 3, 32, 32), torch.arange(4))
    before = {**_state(step.model, "model."), **_state(step.generator, "generator.")}
    with pytest.raises(ValueError, match=match):
        step(x, y)
    after = {**_state(step.model, "model."), **_state(step.generator, "generator.")}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics


def _state(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v.clone() for k, v in module.state_dict().items()}


def test_baseline_steps_refuse_labels_the_model_has_no_output_for() -> None:
    model = dat.models.create("resnet_tiny", num_classes=10)
    step = dat.methods.PGDATStep(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=1)
    before = _state(model, "")
    with pytest.raises(ValueError, match="PGDATStep: labels range 0..10 but the model has 10"):
        step(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 10]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("attack", ["pgd", "trades_kl", "eaeg"])
def test_attacks_name_the_fix_for_images_of_the_wrong_type(attack) -> None:
    """uint8 images, or bf16 images for an fp32 model, used to fail deep inside a conv."""
    from dat import attacks

    model = dat.models.create("resnet_tiny").eval()
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    run = {"pgd": lambda x: attacks.pgd(model, x, y, steps=1),
           "trades_kl": lambda x: attacks.trades_kl(model, x, steps=1),
           "eaeg": lambda x: attacks.eaeg(model, x, y, steps=1)}[attack]
    with pytest.raises(ValueError, match=f"{attack} expects float images.*x.float\\(\\) / 255"):
        run((x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=f"{attack} got torch.bfloat16 images for a model with "
                                         "torch.float32 parameters; pass x.to\\(torch.float32\\)"):
        run(x.bfloat16())
    assert run(x.double().float()).dtype == torch.float32  # the matching dtype still runs


@pytest.mark.parametrize("attack", ["pgd", "trades_kl", "eaeg"])
def test_attacks_refuse_normalised_images_unless_told_not_to_check(attack) -> None:
    """Normalised images used to come back up to 1.17 away from x with eps 8/255 (the box
    [x - eps, x + eps] clipped to [0, 1] inverts below 0), without a word."""
    from dat import attacks

    model = dat.models.create("resnet_tiny").eval()
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    run = {"pgd": lambda x, **kw: attacks.pgd(model, x, y, steps=1, **kw),
           "trades_kl": lambda x, **kw: attacks.trades_kl(model, x, steps=1, **kw),
           "eaeg": lambda x, **kw: attacks.eaeg(model, x, y, steps=1, **kw)}[attack]
    with pytest.raises(ValueError, match=f"{attack} expects images in \\[0, 1\\].*drop "
                                         "Normalize"):
        run((x - 0.5) / 0.25)
    assert (run(x) - x).abs().max() <= 8 / 255 + 1e-6
    assert run(x, check_range=False).shape == x.shape  # a loop that checked its data


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int16])
def test_labels_of_any_integer_dtype_train_every_step_and_attack(dtype) -> None:
    """int32 labels (from numpy) used to end in torch's "expected target dtype to be Long",
    after TRADES had already moved its BN statistics; MART failed on uint8 too."""
    from dat.attacks import pgd
    from dat.methods import MARTStep, PGDATStep, TRADESStep

    x, y = torch.rand(4, 3, 32, 32), torch.arange(4).to(dtype)
    for cls in (PGDATStep, TRADESStep, MARTStep):
        model = dat.models.create("resnet_tiny")
        stats = cls(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=1)(x, y)
        assert stats["loss"] == stats["loss"], cls.__name__
    assert _dat_step(steps=1)(x, y)["loss"] > 0
    model = dat.models.create("resnet_tiny").eval()
    torch.manual_seed(0)
    x_adv = pgd(model, x, y, steps=2)
    torch.manual_seed(0)
    assert torch.equal(x_adv, pgd(model, x, y.long(), steps=2))


def test_an_optimizer_built_before_convert_dual_bn_is_refused() -> None:
    """convert_dual_bn replaces every BN: an optimizer made before it updated the old
    layers, and the model's BN weights never trained (the shipped example did this)."""
    from dat.generator import AmplitudeGenerator
    from dat.methods import DATStep, TRADESStep

    model = dat.models.create("resnet_tiny")
    early = torch.optim.SGD(model.parameters(), lr=0.1)
    dat.models.convert_dual_bn(model)
    gen = AmplitudeGenerator(10, (3, 32, 32))
    # 12 BatchNorms: 24 old tensors held, 48 new ones (main and aux) missed
    with pytest.raises(ValueError, match="DATStep: the optimizer misses 48 of the model's 62 "
                                         "trainable tensors and holds 24 tensors that are no "
                                         "longer in the model.*after dat.models.convert_dual_bn"):
        DATStep(model, gen, early)
    DATStep(model, gen, torch.optim.SGD(model.parameters(), lr=0.1))  # built after: fine
    plain = dat.models.create("resnet_tiny")
    head_only = torch.optim.SGD(plain.linear.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="TRADESStep: the optimizer misses .*requires_grad_"):
        TRADESStep(plain, head_only)
    for name, p in plain.named_parameters():
        p.requires_grad_(name.startswith("linear."))  # frozen on purpose: accepted
    TRADESStep(plain, head_only)


def test_baseline_steps_take_wrapped_optimizers_and_non_image_batches() -> None:
    """A wrapper with only zero_grad/step, and (B, C, L) signals, trained before the checks
    were added; they still do (only DATStep, a 2-D FFT, needs (B, C, H, W))."""
    from dat.methods import PGDATStep

    class Wrapped:
        def __init__(self, opt):
            self.opt = opt

        def zero_grad(self, set_to_none=True):
            self.opt.zero_grad(set_to_none=set_to_none)

        def step(self):
            self.opt.step()

    model = dat.models.create("resnet_tiny")
    before = model.linear.weight.clone()
    PGDATStep(model, Wrapped(torch.optim.SGD(model.parameters(), lr=0.1)), steps=1)(
        torch.rand(4, 3, 32, 32), torch.arange(4))
    assert not torch.equal(before, model.linear.weight)
    signal = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.BatchNorm1d(4),
                                 torch.nn.Flatten(), torch.nn.Linear(4 * 14, 3))
    step = PGDATStep(signal, torch.optim.SGD(signal.parameters(), lr=0.1), steps=1)
    assert step(torch.rand(4, 2, 16), torch.tensor([0, 1, 2, 0]))["loss"] > 0
    with pytest.raises(ValueError, match="DATStep expects a batch of images \\(B, C, H, W\\), "
                                         "got shape \\(3, 32, 32\\) \\(an unbatched image\\? "
                                         "add the batch dimension"):
        _dat_step(steps=1)(torch.rand(3, 32, 32), torch.tensor([3]))


def test_a_batch_of_one_or_an_unbatched_image_is_refused_before_bn_moves() -> None:
    from dat.methods import MARTStep, PGDATStep, TRADESStep

    for cls in (PGDATStep, TRADESStep, MARTStep):
        model = dat.models.create("timm/resnet10t")  # 1x1 feature maps at 32x32 before BN
        step = cls(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=1)
        before = _state(model, "")
        with pytest.raises(ValueError, match=f"{cls.__name__} got a batch of 1 image\\(s\\); "
                                             "BatchNorm statistics need batches of at least 2"):
            step(torch.rand(1, 3, 32, 32), torch.tensor([3]))
        with pytest.raises(ValueError, match="add the batch dimension with x\\[None\\]"):
            step(torch.rand(3, 32, 32), torch.tensor([3]))
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert step(torch.rand(2, 3, 32, 32), torch.tensor([3, 4]))["loss"] > 0  # 2 is enough


def test_a_model_that_casts_its_own_input_is_still_attacked() -> None:
    """Only a failing forward is translated: a bf16 model that casts its input runs."""
    from dat.attacks import pgd

    class CastsInput(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = dat.models.create("resnet_tiny").eval().bfloat16()

        def forward(self, x):
            return self.net(x.bfloat16()).float()

    x = torch.rand(4, 3, 32, 32)
    x_adv = pgd(CastsInput(), x, torch.arange(4), steps=1)
    assert x_adv.dtype == torch.float32 and (x_adv - x).abs().max() <= 8 / 255 + 1e-6


@pytest.mark.parametrize("scale, fix", [
    (lambda x: (x - 0.5) / 0.25, "drop Normalize from the data pipeline"),
    (lambda x: x * 255, "divide 0-255 images by 255"),
    (lambda x: torch.where(x > 0.999, torch.nan, 2 * x), "NaN or inf values"),  # NaN hid it
])
def test_normalised_or_0_255_images_are_refused_by_the_steps_and_the_mix(scale, fix) -> None:
    REFUSED = "(expects images in \\[0, 1\\].*|got images with )"  # noqa: N806
    """They used to train silently: clipped to [0, 1] by the mix, attacked at the wrong
    scale by eps 8/255."""
    from dat.methods.pgd_at import PGDATStep

    x, y = scale(torch.rand(4, 3, 32, 32)), torch.arange(4)
    step = _dat_step(steps=1)
    before = [p.clone() for p in step.model.parameters()]
    with pytest.raises(ValueError, match=f"DATStep {REFUSED}{fix}"):
        step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, step.model.parameters(), strict=True))
    with pytest.raises(ValueError, match=f"AmplitudeMix {REFUSED}{fix}"):
        dat.AmplitudeMix()(x, y)
    model = dat.models.create("resnet_tiny")
    baseline = PGDATStep(model, torch.optim.SGD(model.parameters(), lr=0.1), steps=1)
    with pytest.raises(ValueError, match=f"PGDATStep {REFUSED}{fix}"):
        baseline(x, y)
    # a first call refused for another reason (uint8, a batch of 1) does not use up the
    # check: a 0-255 float batch after it is still refused
    for first in ((torch.rand(4, 3, 32, 32) * 255).to(torch.uint8), torch.rand(1, 3, 32, 32)):
        fresh = _dat_step(steps=1)
        with pytest.raises(ValueError):
            fresh(first, y[: len(first)])
        with pytest.raises(ValueError, match=f"DATStep {REFUSED}{fix}"):
            fresh(x, y)
    # [0, 1] images pass, and only the first call pays for the check
    ok = torch.rand(4, 3, 32, 32)
    mix = dat.AmplitudeMix()
    assert mix(ok).shape == ok.shape and mix._range_checked
    assert step(ok, y)["loss"] > 0 and step._range_checked


def test_dat_step_names_the_fix_for_bf16_images() -> None:
    step = _dat_step(steps=1)
    before = [p.clone() for p in step.model.parameters()]
    with pytest.raises(ValueError, match="DATStep got torch.bfloat16 images for a model with "
                                         "torch.float32 parameters"):
        step(torch.rand(4, 3, 32, 32).bfloat16(), torch.arange(4))
    assert all(torch.equal(a, b) for a, b in zip(before, step.model.parameters(), strict=True))


@pytest.mark.parametrize("name", ["resnet_tiny", "wrn28_10", "timm/resnet10t"])
def test_grayscale_models_need_their_own_mean_and_std(name) -> None:
    with pytest.raises(ValueError, match="pass mean= and std= with 1 value"):
        dat.models.create(name, in_chans=1)
    model = dat.models.create(name, in_chans=1, mean=(0.5,), std=(0.25,)).eval()
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 10)


def test_an_exported_safetensors_as_checkpoint_names_its_model(make_tiny_model, tmp_path,
                                                              capsys) -> None:
    """python -m dat.export stores the model's name: the refusal gives the whole command."""
    path = export_model(make_tiny_model(seed=0), tmp_path / "net.safetensors", "safetensors",
                        metadata={"model": "resnet_tiny", "num_classes": 10})
    assert evaluate_main(_quick(path, tmp_path)) == 2
    _one_line_error(capsys, "exported from resnet_tiny with 10 classes",
                    f"--model resnet_tiny --weights {path} --data")


def test_weights_for_another_class_count_name_it(make_tiny_model, tmp_path, capsys) -> None:
    """Only the classifier differs: say how many classes the weights were trained for."""
    torch.save(dat.models.create("resnet_tiny", num_classes=7).state_dict(), tmp_path / "w.pt")
    assert evaluate_main(["--model", "resnet_tiny", "--weights", str(tmp_path / "w.pt"),
                          "--data", "cifar10-sample", "--attacks", "clean", "--no-progress",
                          "--out", str(tmp_path / "e")]) == 2
    _one_line_error(capsys, "the weights have 7 outputs at", "the model 10",
                    "trained for 7 classes", "--data")
    # a network of another width is not a class count: the general message stays
    torch.save(dat.models.create("resnet_small", num_classes=10).state_dict(), tmp_path / "s.pt")
    assert evaluate_main(["--model", "resnet_tiny", "--weights", str(tmp_path / "s.pt"),
                          "--data", "cifar10-sample", "--attacks", "clean", "--no-progress",
                          "--out", str(tmp_path / "e")]) == 2
    err = _one_line_error(capsys, "check the model name and number of classes")
    assert "outputs at" not in err


def test_from_python_a_builders_error_stays_chained_for_debuggers(tmp_path) -> None:
    """The CLI prints one line; a Python caller still reaches the builder's own traceback."""
    from dat.build import build_model

    (tmp_path / "bad.py").write_text(
        "def build(num_classes=10):\n    raise RuntimeError('no weights')\n")
    cfg = Config()
    cfg.model.name = f"{tmp_path / 'bad.py'}:build"
    with pytest.raises(ConfigError, match=r"build\(\) raised RuntimeError") as info:
        build_model(cfg, 10, (3, 32, 32), torch.device("cpu"))
    assert isinstance(info.value.__cause__, RuntimeError)
    assert str(info.value.__cause__) == "no weights"
