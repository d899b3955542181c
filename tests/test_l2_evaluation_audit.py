"""Evaluation under the L2 threat model as a user meets it: messages, plots, TensorBoard,
compare, default folders and inputs that must be read or refused in one line.

Each test says in a comment which bug it catches.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dat
from dat.attacks import pgd
from dat.data import stratified_split
from dat.evaluation import EvaluationError
from dat.evaluation import checks as C
from dat.evaluation import report as R
from dat.evaluation.cli import evaluate_main
from dat.evaluation.compare import compare, format_comparison

_EXACT = dict(progress=False, fold_bn=False, channels_last=False)


class _Linear8(nn.Module):
    """A linear classifier on 3x8x8 images, scaled to [-2, 2] inside."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1) * 4 - 2)


def _train(x: Tensor, y: Tensor, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = _Linear8()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for idx in torch.randperm(len(y)).split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def pooled(sample_splits) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """Two linear models (seeds 0 and 1) trained briefly on the sample pooled to 3x8x8,
    and 40 pooled test images, 4 per class."""
    x, y = sample_splits.train.tensors()
    x = F.avg_pool2d(x, 4).contiguous()
    a, b = _train(x, y, 0), _train(x, y, 1)
    _, chosen = stratified_split(sample_splits.test.labels, 40, seed=0)
    xt, yt = sample_splits.test.subset(chosen).tensors()
    return a, b, F.avg_pool2d(xt, 4).contiguous(), yt


def test_sweep_rise_under_l2_is_written_as_an_l2_radius(pooled, monkeypatch) -> None:
    # Catches: the sweep_monotone check writing an L2 radius as x/255 ("at eps=128/255"
    # for an L2 radius of 0.5), in the check itself or because evaluate() does not pass
    # the norm on.
    found = C.check_monotone([0, 0.25, 0.5], [50.0, 40.0, 45.0], 1000, "l2")
    assert found.status == "fail" and "eps=0.5;" in found.message
    assert "/255" not in found.message
    linf = C.check_monotone([0, 4 / 255, 8 / 255], [50.0, 40.0, 45.0], 1000)
    assert "eps=8/255;" in linf.message  # L-inf as before
    calls = []
    real = C.check_monotone

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(C, "check_monotone", spy)
    model, _, x, y = pooled
    dat.evaluate(model, (x, y), attacks=["clean"], norm="l2", sweep=[0, 0.25], **_EXACT)
    (args, kwargs), = calls
    assert "l2" in args or kwargs.get("norm") == "l2", calls


def test_large_eps_check_names_the_l2_radius(pooled) -> None:
    # Catches: "PGD at eps=6.928" in an L2 report whose eps is 0.5, with nothing saying
    # that this is an L2 length (0.5 on every pixel) rather than an L-inf radius.
    model, _, x, y = pooled
    report = dat.evaluate(model, (x, y), attacks=["clean"], norm="l2", **_EXACT)
    message = report["checks"]["large_eps"]["message"]
    assert "L2 eps=6.928 (0.5 on every pixel)" in message, message
    linf = dat.evaluate(model, (x, y), attacks=["clean"], **_EXACT)
    assert linf["checks"]["large_eps"]["message"].startswith("PGD at eps=0.5 gives")


def test_compare_names_the_linf_threat_model_of_a_linf_evaluation(pooled, tmp_path) -> None:
    # Catches: "differ in norm (l2 vs None)": an L-inf fingerprint stores no norm (so
    # that older progress files still resume), and compare printed the missing key.
    a, b, x, y = pooled
    kw = dict(attacks=["clean", "fgsm"], checks=False, **_EXACT)
    dat.evaluate(a, (x, y), norm="l2", out_dir=tmp_path / "a_l2", **kw)
    dat.evaluate(b, (x, y), out_dir=tmp_path / "b_linf", **kw)
    dat.evaluate(b, (x, y), norm="l2", out_dir=tmp_path / "b_l2", **kw)
    mixed = compare(tmp_path / "a_l2", tmp_path / "b_linf")
    assert mixed["settings_differ"] == {"norm": ["l2", "linf"]}
    text = format_comparison(mixed)
    assert "norm (l2 vs linf)" in text and "None" not in text
    both = compare(tmp_path / "a_l2", tmp_path / "b_l2")  # two L2 evaluations: paired
    assert both["settings_differ"] == {}
    assert [r["attack"] for r in both["rows"]] == ["clean", "fgsm"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=128.0), r"L2 eps 128 exceeds 13\.86.*128/255 is 0\.502"),
    (dict(eps=1e9), r"L2 eps 1e\+09 exceeds 13\.86"),
    (dict(sweep=[0, 0.5, 300.0]), r"L2 sweep radius 300 exceeds 13\.86"),
])
def test_l2_radius_beyond_the_image_diagonal_is_refused(pooled, kwargs, match) -> None:
    # Catches: an L2 radius longer than the distance from a black to a white image
    # (sqrt(3*8*8) = 13.86 here) evaluated as if meaningful, typically 128 meant as
    # 128/255 (the L2 standard, 0.502), which silently gives 0% robust accuracy.
    model, _, x, y = pooled
    with pytest.raises(EvaluationError, match=match) as err:
        dat.evaluate(model, (x, y), attacks=["clean", "fgsm"], norm="l2", **_EXACT, **kwargs)
    assert "\n" not in str(err.value)
    # up to the diagonal is allowed: 13.8 holds almost every image, but is a length
    ok = dat.evaluate(model, (x, y), attacks=["clean", "fgsm"], norm="l2", eps=13.8,
                      sweep=[0, 13.8], checks=False, **_EXACT)
    assert ok["results"]["fgsm"] == 0.0


def _cli_base(tmp_path, model) -> list[str]:
    torch.save(model.state_dict(), tmp_path / "net.pt")
    return ["--model", "resnet_tiny", "--weights", str(tmp_path / "net.pt"), "--data",
            "cifar10-sample", "--n-examples", "4", "--no-progress", "--no-checks",
            "--attacks", "clean"]


def test_cli_refuses_a_0_255_l2_radius_and_gives_the_decimal_of_a_fraction(
        make_tiny_model, tmp_path, capsys) -> None:
    # Catches: --norm l2 --eps 128 (128/255 in 0-255 units) run at an L2 radius of 128;
    # and a refused 128/255 whose message calls it an L-inf radius without giving the
    # decimal (0.502) to write instead.
    base = _cli_base(tmp_path, make_tiny_model())
    out = tmp_path / "refused"
    assert evaluate_main([*base, "--norm", "l2", "--eps", "128", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "128/255 is 0.502" in err, err
    assert not (out / "report.json").exists()
    assert evaluate_main([*base, "--norm", "l2", "--eps", "128/255", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "128/255 = 0.502" in err and "\n" not in err, err


def test_norm_is_read_in_any_case(make_tiny_model, pooled, tmp_path, capsys) -> None:
    # Catches: --norm L2 / norm="L2" (as papers, AutoAttack and RobustBench write it)
    # refused, or accepted but recorded as "L2" so that resume and compare see another
    # threat model than "l2".
    model, _, x, y = pooled
    upper = dat.evaluate(model, (x, y), attacks=["clean", "fgsm"], norm="L2", checks=False,
                         **_EXACT)
    lower = dat.evaluate(model, (x, y), attacks=["clean", "fgsm"], norm="l2", checks=False,
                         **_EXACT)
    assert upper["norm"] == "l2" and upper["results"] == lower["results"]
    assert dat.evaluate(model, (x, y), attacks=["clean"], norm="Linf", checks=False,
                        **_EXACT)["norm"] == "linf"
    base = _cli_base(tmp_path, make_tiny_model())
    assert evaluate_main([*base, "--norm", "L2", "--out", str(tmp_path / "e")]) == 0
    assert json.loads((tmp_path / "e" / "report.json").read_text())["norm"] == "l2"
    capsys.readouterr()


def test_default_out_folder_is_one_per_threat_model(make_tiny_model, tmp_path, monkeypatch,
                                                    capsys) -> None:
    # Catches: evaluate.py --norm l2 writing into the same default folder as the L-inf
    # evaluation of the same weights (eval_best/), silently replacing its report (and
    # refusing --resume there as "another threat model").
    base = _cli_base(tmp_path, make_tiny_model())
    monkeypatch.chdir(tmp_path)
    assert evaluate_main(base) == 0
    assert evaluate_main([*base, "--norm", "l2"]) == 0
    linf = json.loads((tmp_path / "eval_resnet_tiny-net" / "report.json").read_text())
    l2 = json.loads((tmp_path / "eval_resnet_tiny-net_l2" / "report.json").read_text())
    assert linf["norm"] == "linf" and l2["norm"] == "l2"
    assert evaluate_main([*base, "--norm", "l2", "--resume"]) == 0  # its own folder
    capsys.readouterr()


def test_eps_as_a_tensor_is_read_and_as_text_refused_in_one_line(pooled) -> None:
    # Catches: dat.evaluate(eps=torch.tensor(8 / 255)), which evaluated before the L2
    # threat model, refused as "must be a number"; a sweep radius as text failing with
    # a TypeError traceback from a comparison instead of a one-line EvaluationError.
    model, _, x, y = pooled
    kw = dict(attacks=["clean", "fgsm"], checks=False, **_EXACT)
    for norm, eps in (("linf", 8 / 255), ("l2", 0.5)):
        as_tensor = dat.evaluate(model, (x, y), eps=torch.tensor(eps), norm=norm, **kw)
        assert as_tensor["results"] == dat.evaluate(model, (x, y), eps=eps, norm=norm,
                                                    **kw)["results"]
        assert isinstance(as_tensor["eps"], float)
    swept = dat.evaluate(model, (x, y), norm="l2", sweep=[0, torch.tensor(0.25)], **kw)
    assert swept["sweep"]["eps"] == [0, 0.25]
    for bad in (dict(eps="0.5", norm="l2"), dict(sweep=[0, "0.5"], norm="l2"),
                dict(sweep=["8/255"]), dict(eps=torch.tensor([0.5, 0.25]), norm="l2")):
        with pytest.raises(EvaluationError, match="must be a number") as err:
            dat.evaluate(model, (x, y), **kw, **bad)
        assert "\n" not in str(err.value)


def test_l2_tensorboard_tags_and_amplitude_phase_plot_say_l2(tmp_path, monkeypatch) -> None:
    # Catches: an L2 evaluation's TensorBoard scalars under the same tags as the L-inf
    # ones (eval/pgd20), and an amplitude/phase plot that does not say which threat model
    # or radius it shows.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def report(norm: str) -> dict:
        return {"norm": norm, "eps": 0.5 if norm == "l2" else 8 / 255, "n": 4,
                "results": {"clean": 50.0, "aa": 25.0},
                "attacks": {"aa": {"breakdown": {"apgd-ce": 25.0}}},
                "amplitude_phase": {"attack": "pgd20", "norm": norm,
                                    "eps": 0.5 if norm == "l2" else 8 / 255, "clean": 50.0,
                                    "adversarial": 25.0, "adversarial_amplitude": 30.0,
                                    "adversarial_phase": 40.0}}

    tags = {}
    for norm in ("linf", "l2"):
        R.log_tensorboard(report(norm), tmp_path / norm)
        events = EventAccumulator(str(tmp_path / norm))
        events.Reload()
        tags[norm] = sorted(events.Tags()["scalars"])
    assert tags["linf"] == ["eval/aa", "eval/clean", "eval_aa/apgd-ce"]
    assert tags["l2"] == ["eval_l2/aa", "eval_l2/clean", "eval_l2_aa/apgd-ce"]
    titles = {}

    def save(fig, path, plt) -> str:
        titles[path.name] = fig.axes[0].get_title()
        plt.close(fig)
        return str(path)

    monkeypatch.setattr(R, "_save", save)
    R._plots(report("l2"), tmp_path)
    assert titles["amplitude_phase.png"] == "amplitude / phase (pgd20, L2 eps 0.5)"
    assert titles["attacks.png"] == "L2 eps = 0.5"
    R._plots(report("linf"), tmp_path)
    assert titles["amplitude_phase.png"] == "amplitude / phase (pgd20)"  # as before


def test_l2_pgd_defaults_are_l2_sized(make_tiny_model, sample_batch) -> None:
    # Catches: dat.attacks.pgd(norm="l2") and amplitude_phase_table(norm="l2") without
    # eps/alpha run at the L-inf 8/255 and 2/255 (an L2 radius 16 times smaller than the
    # standard 0.5), the habit the CLI refuses; L-inf defaults unchanged.
    model = make_tiny_model().eval()
    x, y = sample_batch[0][:4], sample_batch[1][:4]
    kw = dict(steps=3, random_start=False)
    default = pgd(model, x, y, norm="l2", **kw)
    assert torch.equal(default, pgd(model, x, y, eps=0.5, alpha=0.125, norm="l2", **kw))
    assert (default - x).flatten(1).norm(dim=1).max() > 8 / 255 * 2
    halved = pgd(model, x, y, eps=0.25, norm="l2", **kw)  # alpha eps/4 follows eps
    assert torch.equal(halved, pgd(model, x, y, eps=0.25, alpha=0.0625, norm="l2", **kw))
    assert torch.equal(pgd(model, x, y, **kw), pgd(model, x, y, eps=8 / 255, alpha=2 / 255,
                                                   **kw))
    table = dat.evaluation.amplitude_phase_table(model, x, y, attack="fgsm", norm="l2",
                                                progress=False)
    assert table["eps"] == 0.5 and table["norm"] == "l2"
    assert dat.evaluation.amplitude_phase_table(model, x, y, attack="fgsm",
                                                progress=False)["eps"] == 8 / 255
