"""dat.evaluate: exact attack success on a model with known margins, AutoAttack parity with
pyautoattack, a monotone eps sweep on a briefly trained model, reports, CLI, input errors."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pyautoattack import AutoAttack
from torch import Tensor, nn

import dat
from dat.attacks import pgd
from dat.config import Config, config_to_dict
from dat.data import augment_batch, stratified_split
from dat.evaluation import EvaluationError, evaluate, make_attack
from dat.evaluation.cli import evaluate_main
from dat.evaluation.report import format_markdown
from dat.evaluation.runner import collect_examples
from dat.evaluation.suite import ALPHA, BoundsStats, attack_points, sweep_alpha
from dat.models.folding import fold_batchnorm

EPS = 0.05  # L-inf radius of the margin test, [0, 1] scale


class _SignedScore(nn.Module):
    """Two-class linear model: logits (z, -z) with z = w . (x - 0.5), w in {-1, +1}^d."""

    def __init__(self, w: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())  # (C, H, W)

    def forward(self, x: Tensor) -> Tensor:
        z = ((x - 0.5) * self.w).flatten(1).sum(1)  # (B,)
        return torch.stack([z, -z], dim=1)


def _margin_data(n: int = 40) -> tuple[_SignedScore, Tensor, Tensor, Tensor]:
    """Images near 0.5 (far from 0 and 1) whose L-inf distance to the boundary is known."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randint(0, 2, (3, 8, 8), generator=gen).float() * 2 - 1
    model = _SignedScore(w).eval()
    margins = torch.linspace(0.2 * EPS, 2.0 * EPS, n)
    margins = margins[(margins - EPS).abs() > 0.05 * EPS]  # no ties at the boundary
    y = torch.arange(len(margins)) % 2
    x0 = 0.5 + 0.04 * (torch.rand(len(margins), 3, 8, 8, generator=gen) - 0.5)
    z0 = ((x0 - 0.5) * w).flatten(1).sum(1) / w.numel()  # L-inf distance of x0, signed
    sign = 1.0 - 2.0 * y.float()  # class 0 needs z > 0, class 1 needs z < 0
    shift = margins - sign * z0  # move along sign(w) until |z| / ||w||_1 = margin
    x = x0 + (sign * shift)[:, None, None, None] * w
    return model, x, y, margins


@pytest.mark.parametrize("attack", ["fgsm", "pgd20", "cw"])
def test_attack_succeeds_exactly_below_margin(attack: str) -> None:
    model, x, y, margins = _margin_data()
    assert float(x.min()) > 0.3 and float(x.max()) < 0.7  # box constraints never bind
    correct = model(x).argmax(1) == y
    assert correct.all()
    still = attack_points(make_attack(attack, EPS), model, x, y, correct, batch_size=16,
                          device=torch.device("cpu"), progress=False)
    assert torch.equal(still, margins > EPS)
    report = evaluate(model, (x, y), attacks=["clean", attack], eps=EPS, progress=False)
    assert report["results"][attack] == pytest.approx(100.0 * float((margins > EPS).float().mean()))
    assert report["checks"]["bounds"]["status"] == "pass"


class _Blind(nn.Module):
    """Logits that do not depend on the image: every input gradient is exactly zero."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.0, 0.0]))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, :2] * 0 + self.bias


@pytest.mark.parametrize("attack", ["pgd20", "cw"])
def test_pgd_and_cw_start_uniformly_in_the_eps_ball(attack: str) -> None:
    """Both report random_start 'uniform': with no gradient to follow, the attack stays
    at its start x + U(-eps, eps), which must fill the ball on both sides."""
    x = torch.full((4, 3, 8, 8), 0.5)
    delta = make_attack(attack, EPS).fn(_Blind(), x, torch.zeros(4, dtype=torch.int64)) - x
    assert delta.abs().max() <= EPS + 1e-6
    assert delta.min() < -0.9 * EPS and delta.max() > 0.9 * EPS


def test_cw_is_pgd_on_the_margin_loss() -> None:
    """The suite's cw is dat.attacks.pgd(loss='cw') (checked against the margin's closed
    form in test_attacks) with 100 steps of 2/255, and not the cross-entropy PGD, which ends
    elsewhere on this four-class model."""
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4)).eval()
    with torch.no_grad():
        model[1].weight.copy_(0.3 * torch.randn(4, 12, generator=gen))
    x = 0.3 + 0.4 * torch.rand(6, 1, 3, 4, generator=gen)
    y = torch.randint(0, 4, (6,), generator=gen)
    runs = {}
    for name, loss in (("suite", None), ("cw", "cw"), ("ce", "ce")):
        torch.manual_seed(0)  # the same uniform start
        runs[name] = (make_attack("cw", EPS).fn(model, x, y) if loss is None else
                      pgd(model, x, y, eps=EPS, alpha=2 / 255, steps=100, loss=loss))
    assert torch.equal(runs["suite"], runs["cw"])
    assert not torch.equal(runs["cw"], runs["ce"])


def test_bounds_check_counts_examples_beyond_eps_or_outside_0_1() -> None:
    x = torch.full((4, 1, 2, 2), 0.5)
    x_adv = x.clone()
    x_adv[0, 0, 0, 0] += 1.5 * EPS  # beyond the ball
    x_adv[1, 0, 0, 0] += EPS  # on its edge: fine
    x_adv[2, 0, 1, 1] -= 0.5 * EPS  # inside: fine
    stats = BoundsStats(EPS)
    stats.update(x_adv, x)
    near_one = torch.full((2, 1, 2, 2), 0.99)
    stats.update(near_one + torch.tensor([0.0, 0.02]).view(2, 1, 1, 1), near_one)  # 1.01 > 1
    assert (stats.count, stats.outside) == (6, 2)
    assert stats.max_perturbation == pytest.approx(1.5 * EPS)
    assert stats.max_value == pytest.approx(1.01)


def test_bounds_check_counts_pixels_below_0_as_outside() -> None:
    """An attack that forgets to clamp leaves the image box on both sides: a pixel pushed
    below 0 (within eps) counts as outside, as one above 1 does."""
    x = torch.full((2, 1, 2, 2), 0.01)
    x_adv = x.clone()
    x_adv[0, 0, 0, 0] = -0.5 * EPS + 0.01  # inside the ball, below 0
    stats = BoundsStats(EPS)
    stats.update(x_adv, x)
    assert (stats.count, stats.outside) == (2, 1)
    assert stats.min_value == pytest.approx(-0.5 * EPS + 0.01)


def test_sweep_step_is_2_over_255_or_madrys_2_5_eps_over_steps() -> None:
    assert sweep_alpha(8 / 255, 20) == ALPHA == 2 / 255  # 2.5 * eps / 20 is smaller
    assert sweep_alpha(0.5, 20) == pytest.approx(2.5 * 0.5 / 20)  # large radius: cross it


def _downsampled(splits, part: str, n: int | None = None) -> tuple[Tensor, Tensor]:
    x, y = getattr(splits, part).tensors()
    n = n or len(y)
    return F.avg_pool2d(x[:n], 4).contiguous(), y[:n]  # (n, 3, 8, 8): real images, tiny


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_aa_on_fewer_than_10_classes_runs_the_cascade_fitted_to_them(sample_splits,
                                                                      classes) -> None:
    """The standard 9 target classes do not exist there: pyautoattack crashed with an
    IndexError once a point survived APGD-CE (at the end of a training run's final test).
    The result equals pyautoattack called directly with every other class as a target."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x_train, y_train = _downsampled(sample_splits, "train")
    keep = y_train < classes
    x_train, y_train = x_train[keep], y_train[keep]
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, classes))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for idx in torch.randperm(len(y_train)).split(128):
        loss = F.cross_entropy(model(x_train[idx] * 4 - 2), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = _downsampled(sample_splits, "test")
    pick = torch.nonzero(y < classes).flatten()[::8][:16]  # spread over the classes
    x, y = x[pick], y[pick]
    eps = 1 / 255  # small: points survive APGD-CE, so the targeted attacks run
    report = evaluate(model, (x, y), attacks=["clean", "aa"], eps=eps, seed=3, progress=False)
    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", device="cpu", seed=3)
    aa.apgd_targeted.n_target_classes = aa.fab.n_target_classes = classes - 1
    aa.attacks_to_run = [a for a in aa.attacks_to_run if a != "apgd-t" or classes >= 4]
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=500)
    info = report["attacks"]["aa"]
    assert report["results"]["aa"] == 100.0 * int((y_adv == y).sum()) / len(y)
    assert 0 < report["results"]["aa"] <= report["results"]["clean"]
    assert list(info["breakdown"])[1:] == info["attacks"] == aa.attacks_to_run
    assert ("apgd-t" in info["attacks"]) == (classes >= 4)
    assert info["target_classes"] == classes - 1
    targets = f"{classes - 1} target class" + ("es" if classes > 2 else " ")
    assert f"{classes} classes: {targets}" in format_markdown(report)


def test_aa_equals_pyautoattack_called_directly(sample_splits, tmp_path, monkeypatch) -> None:
    torch.set_num_threads(1)
    x_train, y_train = _downsampled(sample_splits, "train")
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for idx in torch.randperm(len(y_train)).split(128):
        loss = F.cross_entropy(model(x_train[idx] * 4 - 2), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y = _downsampled(sample_splits, "test", 16)
    eps = 1 / 255
    report = evaluate(model, (x, y), attacks=["clean", "aa"], eps=eps, seed=3, progress=False,
                      out_dir=tmp_path)
    aa = AutoAttack(model, norm="Linf", eps=eps, version="standard", device="cpu", seed=3)
    _, y_adv = aa.run_standard_evaluation(x, y, batch_size=500)
    direct = 100.0 * int((y_adv == y).sum()) / len(y)
    breakdown = report["attacks"]["aa"]["breakdown"]
    assert report["results"]["aa"] == direct
    assert 0 < direct < report["results"]["clean"]  # a real cascade: some flipped, some not
    assert list(breakdown) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert breakdown["square"] == direct and breakdown["clean"] == report["results"]["clean"]
    assert report["attacks"]["aa"]["implementation"].startswith("pyautoattack")
    # the bounds check counts the points AA attacked: the clean-correct ones
    assert report["bounds"]["aa"]["count"] == round(report["results"]["clean"] * len(y) / 100)
    assert report["bounds"]["aa"]["count"] < len(y)
    # a resumed evaluation reuses the saved AA run: result, breakdown, bounds and warnings
    from dat.evaluation import runner

    def no_rerun(*args, **kwargs):
        raise AssertionError("AutoAttack ran again despite resume=True")
    monkeypatch.setattr(runner, "run_autoattack", no_rerun)
    again = evaluate(model, (x, y), attacks=["clean", "aa"], eps=eps, seed=3, progress=False,
                     out_dir=tmp_path, resume=True)
    assert again["results"] == report["results"] and again["reused"][0] == "aa"
    assert again["attacks"]["aa"]["breakdown"] == breakdown
    assert again["bounds"]["aa"] == report["bounds"]["aa"]
    assert again["checks"]["autoattack_checks"] == report["checks"]["autoattack_checks"]


@pytest.fixture(scope="module")
def trained(sample_splits) -> nn.Module:
    """resnet_tiny after two quick epochs of cross-entropy training (~10 s on one core)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = sample_splits.train.tensors()
    model = dat.models.create("resnet_tiny", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for idx in torch.randperm(len(y), generator=gen).split(128):
            loss = F.cross_entropy(model(augment_batch(x[idx], 4, True, gen)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def test_sweep_is_monotone_and_starts_at_clean(trained, sample_splits, tmp_path) -> None:
    x, y = sample_splits.test.tensors()
    report = evaluate(trained, (x[:100], y[:100]), attacks=["clean", "pgd20", "cw"],
                      sweep=True, progress=False, out_dir=tmp_path)
    acc, res = report["sweep"]["accuracy"], report["results"]
    assert res["clean"] > 20  # trained: well above chance
    assert acc[0] == res["clean"]
    assert all(a >= b for a, b in zip(acc, acc[1:], strict=False))
    assert acc[report["sweep"]["eps"].index(8 / 255)] == res["pgd20"]  # same seed, same run
    assert res["worst_case"] <= min(res["pgd20"], res["cw"]) <= res["clean"]
    for name in ("eps_zero", "sweep_monotone", "large_eps", "bn_statistics", "eval_mode"):
        assert report["checks"][name]["status"] == "pass", report["checks"][name]
    saved = json.loads((tmp_path / "report.json").read_text(), parse_constant=_no_constants)
    assert saved["results"] == res
    for name in ("report.md", "attacks.png", "accuracy_vs_eps.png"):
        assert (tmp_path / name).stat().st_size > 0


def _no_constants(name: str) -> None:
    raise AssertionError(f"report.json holds {name}, which is not valid JSON")


def test_dual_bn_model_is_evaluated_on_its_main_branch(make_warm_model, sample_batch) -> None:
    dual = make_warm_model(dual_bn=True).eval()
    plain = dat.models.export_main_branch(dual)
    kwargs = dict(attacks=["clean", "pgd20"], progress=False, checks=False)
    assert evaluate(dual, sample_batch, **kwargs)["results"] == \
        evaluate(plain, sample_batch, **kwargs)["results"]


def test_loader_and_batches_give_the_same_result(trained, sample_splits) -> None:
    x, y = sample_splits.test.subset(torch.arange(40)).tensors()
    loader = dat.data.make_loader(sample_splits.test.subset(torch.arange(40)),
                                  Config().data, "cpu", train=False)
    kwargs = dict(attacks=["clean", "fgsm"], progress=False, checks=False, batch_size=16)
    assert evaluate(trained, loader, **kwargs)["results"] == \
        evaluate(trained, (x, y), **kwargs)["results"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=8.0), "8/255"),
    (dict(attacks=["pgd"]), "unknown attack"),
    (dict(attacks=["pgd0"]), "pgd<N> with N >= 1"),  # a random start alone: no attack
    (dict(precision="fp16"), "fp32 or bf16"),
])
def test_bad_arguments_name_the_fix(make_tiny_model, sample_batch, kwargs, match) -> None:
    with pytest.raises(EvaluationError, match=match):
        evaluate(make_tiny_model(), sample_batch, progress=False, **kwargs)


def test_unnormalised_images_are_rejected(make_tiny_model, sample_batch) -> None:
    x, y = sample_batch
    with pytest.raises(EvaluationError, match="Normalize"):
        evaluate(make_tiny_model(), (x * 255, y), progress=False)


def _checkpoint(model: nn.Module, path) -> None:
    cfg = Config()
    cfg.model.name, cfg.data.name = "resnet_tiny", "cifar10-sample"
    torch.save({"model": model.state_dict(), "config": config_to_dict(cfg), "epoch": 1}, path)


def test_cli_evaluates_a_checkpoint(make_warm_model, sample_splits, tmp_path, capsys) -> None:
    dual = make_warm_model(dual_bn=True).eval()
    _checkpoint(dual, tmp_path / "best.pt")
    code = evaluate_main(["--checkpoint", str(tmp_path / "best.pt"), "--attacks", "clean,fgsm",
                          "--n-examples", "32", "--out", str(tmp_path / "eval"),
                          "--no-progress", "--no-checks"])
    assert code == 0
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    _, chosen = stratified_split(sample_splits.test.labels, 32, seed=0)  # as --n-examples
    x, y = sample_splits.test.subset(chosen).tensors()
    direct = evaluate(dual, (x, y), attacks=["clean", "fgsm"], progress=False, checks=False)
    assert saved["results"] == direct["results"]
    assert saved["class_names"] == sample_splits.classes  # label the per-class table
    out = capsys.readouterr().out
    assert "| fgsm |" in out and "| attack | airplane | automobile |" in out


def test_cli_report_names_what_it_evaluated(make_warm_model, tmp_path, capsys) -> None:
    """report.json said nothing of the checkpoint or data; after a move, or with two weights
    files of one architecture, the report could not be traced back."""
    _checkpoint(make_warm_model().eval(), tmp_path / "best.pt")
    assert evaluate_main(["--checkpoint", str(tmp_path / "best.pt"), "--attacks", "clean",
                          "--n-examples", "8", "--out", str(tmp_path / "eval"),
                          "--no-progress", "--no-checks"]) == 0
    saved = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert saved["metadata"] == {"checkpoint": str(tmp_path / "best.pt"),
                                 "data": "cifar10-sample", "split": "test"}
    page = (tmp_path / "eval" / "report.md").read_text()
    assert f"Evaluated: checkpoint `{tmp_path / 'best.pt'}`; data `cifar10-sample`" in page
    capsys.readouterr()


def test_metadata_must_be_a_dict_of_json_values(make_tiny_model, sample_batch) -> None:
    report = evaluate(make_tiny_model().eval(), sample_batch, attacks=["clean"],
                      progress=False, checks=False, metadata={"run": "a", "epoch": (3,)})
    assert report["metadata"] == {"run": "a", "epoch": [3]}
    assert evaluate(make_tiny_model().eval(), sample_batch, attacks=["clean"], progress=False,
                    checks=False)["metadata"] is None
    for bad, words in [("runs/x", "metadata is a str; pass a dict"),
                       ({"path": Path("x")}, "metadata must hold JSON values")]:
        with pytest.raises(EvaluationError, match=words) as err:
            evaluate(make_tiny_model(), sample_batch, progress=False, metadata=bad)
        assert "\n" not in str(err.value)


def test_wilson_interval_matches_known_values() -> None:
    from dat.evaluation.statistics import wilson_interval

    # Wilson (1927) / Newcombe (1998): 30 of 100 -> [21.9, 39.6]; 0 of 10 -> [0, 27.8]
    assert [round(v, 1) for v in wilson_interval(30, 100)] == [21.9, 39.6]
    assert [round(v, 1) for v in wilson_interval(0, 10)] == [0.0, 27.8]
    assert [round(v, 1) for v in wilson_interval(10, 10)] == [72.2, 100.0]
    low, high = wilson_interval(500, 1000)  # about +-3.1 points at 1,000 examples
    assert 3.0 < 50 - low < 3.2 and 3.0 < high - 50 < 3.2


def test_wilson_interval_of_no_examples_is_everything() -> None:
    from dat.evaluation.statistics import wilson_interval
    assert wilson_interval(0, 0) == (0.0, 100.0)


def test_wilson_interval_never_leaves_0_to_100() -> None:
    """Rounding put the lower end of 0 of 7 at -2.8e-15 and the upper of 100 of 100 above 100."""
    from dat.evaluation.statistics import wilson_interval
    for n in range(1, 300):
        for correct in (0, n):
            low, high = wilson_interval(correct, n)
            assert 0.0 <= low <= high <= 100.0, (correct, n, low, high)


def test_per_class_accuracy_is_none_for_a_class_without_examples() -> None:
    from dat.evaluation.statistics import per_class_accuracy
    y = torch.tensor([0, 0, 2, 2])
    mask = torch.tensor([True, False, True, True])
    assert per_class_accuracy(mask, y, 4) == [50.0, None, 100.0, None]


def test_reports_give_intervals_and_per_class_accuracy(make_warm_model, sample_batch) -> None:
    x, y = sample_batch  # 16 images, labels 0..9
    report = evaluate(make_warm_model().eval(), (x, y), attacks=["clean", "fgsm"],
                      progress=False, checks=False)
    n = len(y)
    for name, acc in report["results"].items():
        low, high = report["ci95"][name]
        assert low <= acc <= high
        counts = torch.bincount(y, minlength=10)
        per_class = report["per_class"][name]
        # the per-class accuracies weighted by class size give the overall accuracy
        total = sum(a * int(c) for a, c in zip(per_class, counts, strict=True) if a is not None)
        assert abs(total / n - acc) < 1e-9
    assert report["per_class"]["worst_case"] == report["per_class"]["fgsm"]
    page = format_markdown(report)
    assert "| 95% interval |" in page and "## Accuracy per class (%)" in page


def test_cli_reports_a_bad_checkpoint_in_one_line(tmp_path, capsys) -> None:
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert evaluate_main(["--checkpoint", str(tmp_path / "junk.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "Traceback" not in err


def test_channels_last_forward_matches_and_leaves_the_model_alone(trained, sample_splits):
    from dat.evaluation.prepare import FastForward

    x, y = sample_splits.test.tensors()
    x = x[:16].clone().requires_grad_(True)
    fast = FastForward(trained, bf16=False, channels_last=True).eval()
    logits = fast(x)
    (grad,) = torch.autograd.grad(F.cross_entropy(logits, y[:16]), x)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = trained(x_ref)
    (grad_ref,) = torch.autograd.grad(F.cross_entropy(ref, y[:16]), x_ref)
    assert torch.allclose(logits, ref, atol=1e-5)
    assert torch.allclose(grad, grad_ref, atol=1e-6)
    assert grad.is_contiguous()  # attacks keep working on NCHW tensors
    assert all(p.is_contiguous() for p in trained.parameters())  # the model is not converted


def test_channels_last_is_on_by_default_on_cpu_and_switchable(trained, sample_splits, tmp_path):
    x, y = sample_splits.test.tensors()
    kwargs = dict(attacks=["clean", "pgd20"], progress=False, checks=False)
    on = evaluate(trained, (x[:60], y[:60]), channels_last=True, **kwargs)
    off = evaluate(trained, (x[:60], y[:60]), channels_last=False, **kwargs)
    assert on["channels_last"] is True and off["channels_last"] is False
    # auto: on for a CPU, except for models whose channels_last backward crashes torch's
    # CPU kernels (resnet_tiny's 8-channel strided shortcuts; dat.build)
    auto = evaluate(trained, (x[:8], y[:8]), attacks=["clean"], progress=False, checks=False)
    small = dat.models.create("resnet_small", num_classes=10).eval()
    auto_small = evaluate(small, (x[:8], y[:8]), attacks=["clean"], progress=False,
                          checks=False)
    assert auto["channels_last"] is False and auto_small["channels_last"] is True
    assert on["results"]["clean"] == off["results"]["clean"]
    # same attack, same seed; only convolution rounding differs: at most one image in 60
    assert abs(on["results"]["pgd20"] - off["results"]["pgd20"]) <= 100 / 60 + 1e-9
    _checkpoint(trained, tmp_path / "best.pt")
    code = evaluate_main(["--checkpoint", str(tmp_path / "best.pt"), "--attacks", "clean",
                          "--n-examples", "20", "--out", str(tmp_path / "eval"), "--no-progress",
                          "--no-checks", "--channels-last", "off"])
    assert code == 0
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["channels_last"] is False


class _ViewsItsFeatures(torch.nn.Module):
    """Flattens a feature map with .view, which channels_last memory cannot serve."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.fc = torch.nn.Linear(16 * 32 * 32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(x)).relu()
        return self.fc(h.view(len(h), -1))


def test_a_model_that_cannot_take_channels_last_images_is_evaluated_in_nchw(sample_splits):
    x, y = sample_splits.test.tensors()
    model = _ViewsItsFeatures().eval()
    auto = evaluate(model, (x[:8], y[:8]), attacks=["clean", "fgsm"], progress=False,
                    checks=False)  # auto used to crash here with "view size is not compatible"
    nchw = evaluate(model, (x[:8], y[:8]), attacks=["clean", "fgsm"], progress=False,
                    checks=False, channels_last=False)
    assert auto["channels_last"] is False and auto["results"] == nchw["results"]
    with pytest.raises(EvaluationError, match=r"fails on channels_last images \(view size.*"
                                              r"channels_last=False \(--channels-last off\)"):
        evaluate(model, (x[:8], y[:8]), attacks=["clean"], progress=False, channels_last=True)


def test_no_clean_correct_point_means_no_forward_of_an_empty_batch(sample_batch) -> None:
    x, y = sample_batch
    calls = []
    model = _ViewsItsFeatures().eval()
    model.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    still = attack_points(make_attack("pgd20", 8 / 255), model, x[:4], y[:4],
                          torch.zeros(4, dtype=torch.bool), 2, torch.device("cpu"),
                          progress=False)
    assert calls == [] and not still.any()


def test_bn_folding_is_on_by_default_on_cpu_and_switchable(trained, sample_splits, tmp_path):
    x, y = sample_splits.test.tensors()
    kwargs = dict(attacks=["clean", "pgd20"], progress=False)
    on = evaluate(trained, (x[:60], y[:60]), **kwargs)
    off = evaluate(trained, (x[:60], y[:60]), fold_bn=False, **kwargs)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in trained.modules())
    assert on["fold_bn"]["folded"] == n_bn and on["fold_bn"]["max_logit_gap"] < 1e-5
    assert off["fold_bn"] == {"folded": 0}
    assert on["checks_status"] == off["checks_status"] == "pass", on["checks"]
    assert on["results"]["clean"] == off["results"]["clean"]
    # same attack, same seed; only rounding differs: at most one image in 60
    assert abs(on["results"]["pgd20"] - off["results"]["pgd20"]) <= 100 / 60 + 1e-9
    assert sum(isinstance(m, nn.BatchNorm2d) for m in trained.modules()) == n_bn  # untouched
    _checkpoint(trained, tmp_path / "best.pt")
    code = evaluate_main(["--checkpoint", str(tmp_path / "best.pt"), "--attacks", "clean",
                          "--n-examples", "20", "--out", str(tmp_path / "eval"), "--no-progress",
                          "--no-checks", "--fold-bn", "off"])
    assert code == 0
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["fold_bn"]["folded"] == 0
    assert f"{n_bn} BatchNorm layers folded" in format_markdown(on)
    assert "folded" not in format_markdown(off)


class _PreHooked(nn.Module):
    """A model whose forward pre-hook on the top module rescales the input: a trace would
    drop the hook, so a folded copy computes something else."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def test_a_model_with_hooks_is_not_folded(trained, sample_splits):
    x, y = sample_splits.test.tensors()
    model = _PreHooked(trained).eval()
    kwargs = dict(attacks=["clean", "pgd20"], progress=False, checks=False)
    report = evaluate(model, (x[:40], y[:40]), fold_bn=True, **kwargs)
    assert report["fold_bn"]["folded"] == 0 and "hooks" in report["fold_bn"]["note"]
    with torch.no_grad():
        clean = 100.0 * float((model(x[:40]).argmax(1) == y[:40]).float().mean())
    assert report["results"]["clean"] == pytest.approx(clean)
    assert not model._forward_hooks and len(model._forward_pre_hooks) == 1  # left as given


def test_a_fold_that_changes_the_logits_is_not_used(trained, sample_splits, monkeypatch):
    """A folded copy 0.1% off (far above rounding, well inside the old 1e-2 tolerance)
    is refused and the model is attacked as given."""
    import dat.evaluation.prepare as prepare

    def slightly_wrong(model, **kwargs):
        folded, n = fold_batchnorm(model, **kwargs)
        with torch.no_grad():
            next(folded.parameters()).mul_(1.001)
        return folded, n

    monkeypatch.setattr(prepare, "fold_batchnorm", slightly_wrong)
    x, y = sample_splits.test.tensors()
    report = evaluate(trained, (x[:40], y[:40]), fold_bn=True, attacks=["clean"],
                      progress=False, checks=False)
    assert report["fold_bn"]["folded"] == 0 and "differ" in report["fold_bn"]["note"]


def test_labels_beyond_the_models_classes_fail_up_front(trained, sample_splits):
    x, y = sample_splits.test.tensors()
    idx = stratified_split(y, 40, 0)[1]  # every class (the test split is sorted by class)
    with pytest.raises(EvaluationError, match="labels reach 9 but the model outputs 5"):
        evaluate(nn.Sequential(trained, nn.Linear(10, 5)).eval(), (x[idx], y[idx]),
                 attacks=["clean", "aa"], progress=False)


def test_n_examples_of_a_class_sorted_tuple_is_stratified(sample_splits):
    x, y = sample_splits.test.tensors()
    order = y.argsort(stable=True)  # sorted by class: the first 20 are all class 0
    xs, ys = collect_examples((x[order], y[order]), 20)
    assert ys.bincount(minlength=10).tolist() == [2] * 10
    assert torch.equal(xs, x[order][stratified_split(y[order], 20, 0)[1]])
    # an imbalanced set keeps its class mix: 90% / 10% of 8 is 7.2 / 0.8, so 7 and 1
    # (the largest remainder), exactly n in the original order
    few = torch.tensor([0] * 9 + [1])
    _, ys = collect_examples((x[:10], few), 8)
    assert ys.tolist() == [0] * 7 + [1]
    with pytest.raises(EvaluationError, match="matching the images"):
        collect_examples((x[:10], torch.zeros(12, dtype=torch.int64)), 4)
    dataset = torch.utils.data.TensorDataset(x[:10], y[:10])  # used to fail inside torch.cat
    with pytest.raises(EvaluationError, match=r"TensorDataset \(single samples\); pass "
                                              r"DataLoader\(data, batch_size=500\)"):
        collect_examples(dataset)
    xs, _ = collect_examples(torch.utils.data.DataLoader(dataset, batch_size=4))
    assert torch.equal(xs, x[:10])

    class Batches(torch.utils.data.IterableDataset):  # yields whole batches: accepted
        def __iter__(self):
            yield x[:6], y[:6]
            yield x[6:10], y[6:10]

    xs, _ = collect_examples(Batches())
    assert torch.equal(xs, x[:10])


def test_ctrl_c_in_the_sweep_returns_and_writes_the_finished_attacks(trained, sample_splits,
                                                                    tmp_path, monkeypatch):
    from dat.evaluation import EvaluationInterrupted, runner

    real, calls = runner.attack_points, []

    def interrupt_second_radius(spec, *args, **kwargs):
        calls.append(spec.name)
        if len(calls) == 3:  # pgd20, then the sweep's first radius, then Ctrl-C
            raise KeyboardInterrupt
        return real(spec, *args, **kwargs)
    monkeypatch.setattr(runner, "attack_points", interrupt_second_radius)
    x, y = sample_splits.test.tensors()
    before = {k: v.clone() for k, v in trained.state_dict().items()}
    trained.train()
    with pytest.raises(EvaluationInterrupted) as stop:
        evaluate(trained, (x[:40], y[:40]), attacks=["clean", "pgd20"], sweep=[0, 1 / 255],
                 progress=False, out_dir=tmp_path / "eval")
    report = stop.value.report
    assert report["interrupted"].startswith("interrupted during the eps sweep (eps 1/255);")
    assert set(report["results"]) == {"clean", "pgd20", "worst_case"}
    assert report["results"]["pgd20"] <= report["results"]["clean"]
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["results"] == \
        report["results"]
    assert trained.training  # the model's mode and BN statistics are restored
    trained.eval()  # module-scoped fixture: leave it as found
    assert all(torch.equal(v, before[k]) for k, v in trained.state_dict().items())


def _counting_attacks(monkeypatch, interrupt_at: str | None = None) -> list[str]:
    """Record the attacks that run; raise Ctrl-C when ``interrupt_at`` starts."""
    from dat.evaluation import runner

    real, ran = attack_points, []  # suite's own: a second call must not wrap the first

    def counted(spec, *args, **kwargs):
        if spec.name == interrupt_at:
            raise KeyboardInterrupt
        ran.append(spec.name)
        return real(spec, *args, **kwargs)
    monkeypatch.setattr(runner, "attack_points", counted)
    return ran


def test_an_interrupted_evaluation_resumes_to_the_uninterrupted_numbers(
        trained, sample_splits, tmp_path, monkeypatch) -> None:
    from dat.evaluation import EvaluationInterrupted

    x, y = sample_splits.test.tensors()
    data = (x[:60], y[:60])
    kw = dict(attacks=["clean", "fgsm", "pgd20", "cw"], progress=False, checks=False)
    whole = evaluate(trained, data, out_dir=tmp_path / "whole", **kw)
    _counting_attacks(monkeypatch, interrupt_at="cw")
    with pytest.raises(EvaluationInterrupted):
        evaluate(trained, data, out_dir=tmp_path / "cut", **kw)
    ran = _counting_attacks(monkeypatch)
    resumed = evaluate(trained, data, out_dir=tmp_path / "cut", resume=True, **kw)
    assert ran == ["cw"] and resumed["reused"] == ["fgsm", "pgd20"]
    assert resumed["results"] == whole["results"]
    assert resumed["bounds"] == whole["bounds"]
    # adding an attack to a finished evaluation runs only that one
    ran.clear()
    more = evaluate(trained, data, out_dir=tmp_path / "cut", resume=True,
                    **{**kw, "attacks": kw["attacks"] + ["pgd5"]})
    assert ran == ["pgd5"] and more["results"]["pgd20"] == whole["results"]["pgd20"]
    # without resume, everything runs again
    ran.clear()
    evaluate(trained, data, out_dir=tmp_path / "cut", **kw)
    assert ran == ["fgsm", "pgd20", "cw"]


def test_resume_refuses_the_progress_of_another_evaluation(trained, sample_splits,
                                                          tmp_path) -> None:
    x, y = sample_splits.test.tensors()
    kw = dict(attacks=["clean", "fgsm"], progress=False, checks=False, out_dir=tmp_path)
    evaluate(trained, (x[:20], y[:20]), **kw)
    other = copy.deepcopy(trained)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    with pytest.raises(EvaluationError, match="holds an evaluation with other model; pass "
                                              "another --out"):
        evaluate(other, (x[:20], y[:20]), resume=True, **kw)
    with pytest.raises(EvaluationError, match="other examples, seed"):
        evaluate(trained, (x[1:21], y[1:21]), resume=True, seed=1, **kw)
    with pytest.raises(EvaluationError, match=r"with other precision; pass") as refused:
        evaluate(trained, (x[:20], y[:20]), resume=True, precision="bf16", **kw)
    assert "model code" not in str(refused.value)  # bf16 moves the logits: no other cause
    assert evaluate(other, (x[:20], y[:20]), resume="auto", **kw)["reused"] == []  # over
    with pytest.raises(EvaluationError, match="resume=True needs out_dir"):
        evaluate(trained, (x[:20], y[:20]), attacks=["clean"], resume=True, progress=False)
    (tmp_path / "progress.json").write_text("{not json")
    with pytest.raises(EvaluationError, match="cannot be read .*delete it or run without"):
        evaluate(trained, (x[:20], y[:20]), resume=True, **kw)


class _ExtraState(nn.Module):
    """A model with non-tensor extra state in its state_dict."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def get_extra_state(self) -> dict:
        return {"classes": ["airplane", "automobile"], "version": 2}

    def set_extra_state(self, state) -> None:
        pass


def test_the_fingerprint_sees_what_state_dict_leaves_out(trained, sample_splits,
                                                         tmp_path) -> None:
    """A changed Normalize mean (a non-persistent buffer) is another model; a batch size
    lowered after running out of memory is not; non-tensor extra state is hashed too."""
    x, y = sample_splits.test.tensors()
    data = (x[:30], y[:30])
    kw = dict(attacks=["clean", "fgsm"], progress=False, checks=False, out_dir=tmp_path)
    first = evaluate(trained, data, batch_size=30, **kw)
    renormalised = copy.deepcopy(trained)
    norm = next(m for m in renormalised.modules() if isinstance(m, dat.models.Normalize))
    norm.mean.add_(0.01)
    with pytest.raises(EvaluationError, match="other model"):
        evaluate(renormalised, data, resume=True, **kw)
    again = evaluate(trained, data, batch_size=7, resume=True, **kw)
    assert again["reused"] == ["fgsm"] and again["results"] == first["results"]
    assert again["attacks"]["fgsm"]["batch_size"] == 30  # the batch size it ran with
    extra = evaluate(_ExtraState(trained).eval(), data, **kw)  # used to fail in the digest
    assert extra["results"] == first["results"]


class _Wrapped(nn.Module):
    def __init__(self, net: nn.Module, output) -> None:
        super().__init__()
        self.net, self.output = net, output

    def forward(self, x: Tensor):
        return self.output(self.net(x))


@pytest.mark.parametrize("build, match", [
    (lambda m: _Wrapped(m, lambda z: (z, z.mean())), "returns a tuple, not a logits tensor"),
    (lambda m: _Wrapped(m, lambda z: {"logits": z}), "returns a dict.*out\\['logits'\\]"),
    (lambda m: _Wrapped(m, lambda z: z[:, 0]), "returns shape \\(2,\\) for 2 images"),
    (lambda m: m.half(), "parameters are torch.float16; evaluate it in float32 "
                         "\\(model.float\\(\\)\\) and pass precision='bf16'"),
    (lambda m: m.double(), "parameters are torch.float64; evaluate it in float32 "
                           "\\(model.float\\(\\)\\)$"),  # no bf16 advice for fp64
    (lambda m: nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10)),
     "fails on images of shape \\(3, 32, 32\\) \\(mat1 and mat2"),
    (lambda m: dat.models.create("timm/vit_tiny_patch16_224", num_classes=10),  # asserts
     "fails on images of shape \\(3, 32, 32\\) \\(Input height \\(32\\) doesn't match"),
])
def test_a_model_that_cannot_be_evaluated_is_named_before_any_attack(make_tiny_model,
                                                                      sample_batch, build,
                                                                      match) -> None:
    """Tuples, dicts, 1-d outputs, fp16 weights and the wrong input size used to fail deep
    inside torchattacks or a convolution."""
    x, y = sample_batch
    with pytest.raises(EvaluationError, match=match):
        evaluate(build(make_tiny_model()).eval(), (x[:8], y[:8]), attacks=["clean", "pgd20"],
                 progress=False)


class _Detached(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.detach())  # no input gradient at all


def test_a_forward_without_input_gradient_gets_a_verdict_not_a_traceback(trained, sample_splits):
    x, y = sample_splits.test.tensors()
    model = _Detached(trained).eval()
    with pytest.raises(EvaluationError, match="fgsm: the model's output has no gradient"):
        evaluate(model, (x[:40], y[:40]), attacks=["clean", "fgsm"], progress=False)
    report = evaluate(model, (x[:40], y[:40]), attacks=["clean"], progress=False)
    assert report["checks"]["zero_gradients"]["status"] == "fail"


@pytest.mark.parametrize("setup, read", [
    ("", "torch.backends.cudnn.allow_tf32"),
    ("torch.backends.cuda.matmul.fp32_precision = 'tf32'",  # legacy reads now raise
     "torch.backends.cuda.matmul.fp32_precision"),
])
def test_the_fold_check_turns_tf32_off_and_back_through_the_users_api(setup, read):
    """Reading torch's legacy TF32 flags after the per-operation API was set raises: the
    fold check must use whichever API the user set, and restore it."""
    import subprocess
    import sys

    code = (f"import torch\n{setup}\nfrom dat.evaluation.prepare import exact_matmuls\n"
            f"before = {read}\nwith exact_matmuls(torch.device('cuda')):\n"
            f"    inside = {read}\nprint(before, inside, {read})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-500:]
    before, inside, after = out.stdout.split()
    assert inside in ("False", "ieee") and after == before != inside


def test_mcnemar_exact_matches_the_binomial_tail() -> None:
    from dat.evaluation.compare import mcnemar_exact

    assert mcnemar_exact(0, 5) == 2 / 32  # all 5 discordant points favour one model
    assert mcnemar_exact(1, 9) == 2 * (1 + 10) / 1024
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9) and mcnemar_exact(4, 4) == 1.0
    assert mcnemar_exact(0, 0) == 1.0


def test_two_evaluations_of_the_same_examples_are_compared_pairwise(
        trained, make_warm_model, sample_splits, tmp_path, capsys) -> None:
    from dat.evaluation.compare import compare, compare_main

    x, y = sample_splits.test.tensors()
    kw = dict(progress=False, checks=False)
    ra = evaluate(trained, (x[:50], y[:50]), attacks=["clean", "fgsm", "pgd5"],
                  out_dir=tmp_path / "a", **kw)
    rb = evaluate(make_warm_model().eval(), (x[:50], y[:50]), attacks=["clean", "fgsm", "cw"],
                  eps=8 / 255, out_dir=tmp_path / "b", **kw)
    result = compare(tmp_path / "a", tmp_path / "b")
    rows = {r["attack"]: r for r in result["rows"]}
    assert set(rows) == {"clean", "fgsm"}
    assert result["not_compared"] == ["pgd5 (only in A)", "cw (only in B)"]
    for name, r in rows.items():
        assert (r["a"], r["b"]) == (ra["results"][name], rb["results"][name])
        assert abs(r["difference"] - (r["only_a"] - r["only_b"]) * 100 / 50) < 1e-9
        assert r["ci95"][0] <= r["difference"] <= r["ci95"][1] and 0 < r["p_value"] <= 1
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "| fgsm |" in capsys.readouterr().out
    evaluate(trained, (x[1:51], y[1:51]), attacks=["clean", "fgsm"], out_dir=tmp_path / "c", **kw)
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the two evaluations used other examples") and "\n" not in err
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2
    # a folder reused for another model holds that model's evaluation only, even when no
    # attack ran (clean only, no checks): compare used to read the older model's attacks
    evaluate(make_warm_model(seed=3).eval(), (x[:50], y[:50]), attacks=["clean"],
             out_dir=tmp_path / "b", **kw)
    result = compare(tmp_path / "a", tmp_path / "b")
    assert [r["attack"] for r in result["rows"]] == ["clean"] and result["n"] == 50
    # the example count comes from the fingerprint, not from a check's subset
    evaluate(trained, (x[:50], y[:50]), attacks=["clean"], progress=False, check_examples=16,
             out_dir=tmp_path / "d")
    assert compare(tmp_path / "d", tmp_path / "b")["n"] == 50
    # the same model, examples and settings in two folders: nothing to compare
    evaluate(trained, (x[:50], y[:50]), attacks=["clean", "fgsm"], out_dir=tmp_path / "e", **kw)
    with pytest.raises(EvaluationError, match="same model on the same examples with the same"):
        compare(tmp_path / "a", tmp_path / "e")
    # at another radius too: the refusal names the attacks' settings, not "the same settings"
    evaluate(trained, (x[:50], y[:50]), attacks=["clean", "fgsm"], eps=4 / 255,
             out_dir=tmp_path / "e4", **kw)
    with pytest.raises(EvaluationError, match="attacks' own, such as eps"):
        compare(tmp_path / "a", tmp_path / "e4")
    # other settings are compared, and said: bf16 against fp32 of the same model
    evaluate(trained, (x[:50], y[:50]), attacks=["clean", "fgsm"], precision="bf16",
             out_dir=tmp_path / "f", **kw)
    capsys.readouterr()
    json_out = tmp_path / "new" / "folder" / "c.json"  # its folder is made
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "f"), "--json", str(json_out)]) == 0
    assert "differ in precision (fp32 vs bf16)" in capsys.readouterr().out
    assert json.loads(json_out.read_text())["settings_differ"] == {"precision": ["fp32", "bf16"]}


def test_the_paired_interval_stays_honest_with_few_discordant_points() -> None:
    from dat.evaluation.compare import mcnemar_exact, paired_interval

    low, high = paired_interval(0, 5, 1000)  # p = 0.0625: the interval must include 0
    assert low < 0 < high and mcnemar_exact(0, 5) > 0.05
    low, high = paired_interval(0, 0, 1000)  # no discordant point: not [0, 0]
    assert low < 0 < high and abs(low + high) < 1e-12
    # many discordant points: close to the plain paired Wald interval
    b, c, n = 300, 200, 10000
    d, se = (b - c) / n, ((b + c) / n - ((b - c) / n) ** 2) ** 0.5 / n ** 0.5
    low, high = paired_interval(b, c, n)
    wald = (100 * (d - 1.959964 * se), 100 * (d + 1.959964 * se))
    assert abs(low - wald[0]) < 0.01 and abs(high - wald[1]) < 0.01
    assert 0 < mcnemar_exact(4000, 4100) < 1  # exact, in milliseconds


def test_class_names_head_the_per_class_table(make_warm_model, sample_batch) -> None:
    x, y = sample_batch
    names = [f"c{i}" for i in range(9)] + ["a|b"]
    report = evaluate(make_warm_model().eval(), (x, y), attacks=["clean"], progress=False,
                      checks=False, class_names=names)
    assert report["class_names"] == names
    assert "| attack | c0 | c1 |" in format_markdown(report) and "a\\|b" in format_markdown(report)
    with pytest.raises(EvaluationError, match="9 class_names for a model with 10 outputs"):
        evaluate(make_warm_model().eval(), (x, y), attacks=["clean"], progress=False,
                 checks=False, class_names=names[:9])


def test_compare_subtracts_b_from_a_and_pairs_only_same_settings(tmp_path,
                                                                 monkeypatch) -> None:
    """A - B is A's accuracy minus B's; worst_case over the shared attacks is each model's
    own per-point worst case (every attack failed), as evaluate() reports it; an attack run
    at another radius is not paired. The margin model's robust points are known exactly."""
    from dat.evaluation import report as report_module
    from dat.evaluation.compare import compare

    monkeypatch.setattr(report_module, "_plots", lambda report, out: {})  # PNGs: not tested
    model, x, y, margins = _margin_data()
    wrong = _SignedScore(-model.w.detach()).eval()  # misclassifies every point
    kw = dict(attacks=["clean", "fgsm", "pgd5"], eps=EPS, progress=False, checks=False)
    ra = evaluate(model, (x, y), out_dir=tmp_path / "a", **kw)
    evaluate(wrong, (x, y), out_dir=tmp_path / "b", **kw)
    rows = {r["attack"]: r for r in compare(tmp_path / "a", tmp_path / "b")["rows"]}
    assert rows["clean"]["difference"] == 100.0 and rows["clean"]["only_b"] == 0
    worst = rows["worst_case (fgsm, pgd5)"]
    robust = 100.0 * float((margins > EPS).float().mean())
    assert worst["a"] == ra["results"]["worst_case"] == pytest.approx(robust) and robust < 100
    assert worst["b"] == 0 and worst["difference"] == pytest.approx(robust)
    evaluate(wrong, (x, y), out_dir=tmp_path / "half", **{**kw, "eps": EPS / 2})
    result = compare(tmp_path / "a", tmp_path / "half")
    assert [r["attack"] for r in result["rows"]] == ["clean"]
    assert result["not_compared"] == ["fgsm (other alpha, eps)", "pgd5 (other eps)"]


class _RecordsDtype(nn.Module):
    """A linear model on 3x8x8 images that records the dtype of every logits tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 10)
        self.seen: set[torch.dtype] = set()

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc(x.flatten(1))
        self.seen.add(out.dtype)
        return out


@pytest.mark.parametrize("kwargs", [{}, dict(channels_last=True), dict(precision="bf16"),
                                    dict(precision="bf16", channels_last=False)])
def test_fp32_is_the_default_and_bf16_runs_under_autocast(sample_batch, kwargs) -> None:
    """Numbers are fp32 unless bf16 is asked for (a channels_last forward included), and
    precision='bf16' does run the attacked forward under bf16 autocast."""
    x, y = sample_batch
    model = _RecordsDtype().eval()
    report = evaluate(model, (F.avg_pool2d(x, 4), y), attacks=["clean", "fgsm"],
                      progress=False, checks=False, **kwargs)
    bf16 = kwargs.get("precision") == "bf16"
    assert report["precision"] == ("bf16" if bf16 else "fp32")
    assert (torch.bfloat16 in model.seen) == bf16 and torch.float16 not in model.seen


def test_check_and_sweep_attacks_get_their_radius_step_and_examples() -> None:
    """The sweep and the large-eps check take Madry's 2.5 eps / steps step at large radii
    (2/255 would not cross the ball in 20 steps); the integrity checks attack the first
    check_examples points (all of them when there are fewer), and eps_zero compares PGD at
    eps 0 with the clean accuracy of those same points."""
    model, x, y, _ = _margin_data()
    y = y.clone()
    y[5:15] = 1 - y[5:15]  # misclassified: the clean accuracy of the first 5 is 100%
    correct = len(y) - 10
    for check_examples, attacked in ((len(x) + 5, correct), (5, 5)):
        report = evaluate(model, (x, y), attacks=["clean"], sweep=[0.25], progress=False,
                          check_examples=check_examples)
        sweep = report["attacks"]["sweep@63.8/255"]
        assert (sweep["eps"], sweep["steps"]) == (0.25, 20)
        assert sweep["alpha"] == pytest.approx(2.5 * 0.25 / 20)
        big = report["attacks"]["check@eps=0.5"]
        assert (big["eps"], big["alpha"]) == (0.5, pytest.approx(2.5 * 0.5 / 20))
        assert report["bounds"]["sweep@63.8/255"]["count"] == correct
        assert report["bounds"]["check@eps=0"]["count"] == attacked
        assert report["bounds"]["check@eps=0.5"]["count"] == attacked
        assert report["checks"]["eps_zero"]["status"] == "pass", report["checks"]["eps_zero"]


def test_every_batch_is_attacked_up_to_the_last_point() -> None:
    """Whatever the batch size, every clean-correct point is attacked, the last one too:
    the reversed margin data end on a point that falls below its margin."""
    model, x, y, margins = _margin_data()
    x, y, margins = x.flip(0), y.flip(0), margins.flip(0)
    correct = torch.ones(len(y), dtype=torch.bool)
    for batch_size in (1, 7, len(y)):
        bounds = BoundsStats(EPS)
        still = attack_points(make_attack("fgsm", EPS), model, x, y, correct, batch_size,
                              torch.device("cpu"), progress=False, bounds=bounds)
        assert torch.equal(still, margins > EPS) and bounds.count == len(y)


def test_each_attack_draws_its_random_start_from_the_seed_whatever_ran_before() -> None:
    """attack_points re-seeds before attacking: an attack's numbers do not depend on the
    attacks that ran before it. With no gradient PGD stays at its random start."""
    x, y = torch.full((4, 3, 8, 8), 0.5), torch.zeros(4, dtype=torch.int64)
    runs = []
    for _ in range(2):
        bounds = BoundsStats(EPS)
        attack_points(make_attack("pgd20", EPS), _Blind(), x, y, torch.ones(4, dtype=torch.bool),
                      2, torch.device("cpu"), seed=5, progress=False, bounds=bounds)
        torch.rand(100)  # another attack's draws
        runs.append(bounds.to_dict())
    assert runs[0] == runs[1]


def test_suite_pgd_is_torchattacks_pgd_with_the_given_eps_step_and_steps() -> None:
    """pgd<N> runs N steps of the step it is given (the sweep's 2.5 eps / steps), not
    2/255 or a capped step count."""
    import torchattacks

    model, x, y, _ = _margin_data()
    for name, eps, alpha, steps in (("pgd25", 0.3, 0.01, 25), ("pgd3", 0.1, 0.05, 3)):
        torch.manual_seed(0)
        ours = make_attack(name, eps, alpha).fn(model, x, y)
        torch.manual_seed(0)
        ref = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)(x, y)
        assert torch.equal(ours, ref), name


def test_autoattack_gets_the_evaluations_radius_seed_norm_and_targets(sample_batch,
                                                                    monkeypatch) -> None:
    """What evaluate() hands pyautoattack, checked without running the cascade: eps,
    seed, norm, version, batch size, and nine classes' 8 target classes (the standard 9
    would index past the last class). The fake flips one clean-correct point."""
    seen = {}

    def fake(self, x, y, *, batch_size=250, state_path=None):
        seen.update(eps=self.epsilon, seed=self.seed, norm=self.norm, version=self.version,
                    attacks=list(self.attacks_to_run), batch_size=batch_size,
                    targets=(self.apgd_targeted.n_target_classes, self.fab.n_target_classes))
        with torch.no_grad():
            pred = self.model(x).argmax(1)
        first = int((pred == y).nonzero()[0])
        pred[first] = (y[first] + 1) % 9
        return x.clone(), pred

    monkeypatch.setattr(AutoAttack, "run_standard_evaluation", fake)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 9)).eval()
    x = F.avg_pool2d(sample_batch[0], 4)
    with torch.no_grad():
        pred = model(x).argmax(1)
    y = torch.where(torch.arange(len(x)) % 2 == 0, pred, (pred + 1) % 9)  # half correct
    for norm, eps, aa_norm in (("linf", 3 / 255, "Linf"), ("l2", 0.3, "L2")):
        report = evaluate(model, (x, y), attacks=["clean", "aa"], eps=eps, norm=norm, seed=7,
                          batch_size=5, progress=False, checks=False)
        assert seen == dict(eps=eps, seed=7, norm=aa_norm, version="standard",
                            attacks=["apgd-ce", "apgd-t", "fab-t", "square"], batch_size=5,
                            targets=(8, 8))
        res, n = report["results"], len(y)
        assert res["clean"] == 50 and res["aa"] == pytest.approx(res["clean"] - 100 / n)
        assert res["worst_case"] == res["aa"]
        assert report["bounds"]["aa"]["count"] == round(res["clean"] * n / 100)  # attacked


def test_markdown_tables_keep_each_number_in_its_cell() -> None:
    """The page a person reads: each interval low to high, the sweep's accuracies under
    their own radii (8/255 and 0.5 = 128/255), AA's breakdown from clean on, worst_case
    named as the per-example result, the per-class table up to 20 classes, each check."""
    classes = 20
    report = {"n": 100, "norm": "linf", "eps": 8 / 255, "precision": "fp32", "seed": 0,
              "device": "cpu", "seconds": 1.0, "num_classes": classes,
              "results": {"clean": 80.0, "pgd20": 45.5, "aa": 41.25, "worst_case": 40.0},
              "ci95": {"clean": [71.1, 86.7], "pgd20": [35.9, 55.4], "aa": [31.9, 51.2],
                       "worst_case": [30.9, 49.8]},
              "attacks": {"pgd20": {"implementation": "torchattacks.PGD", "version": "3",
                                    "steps": 20, "alpha": 2 / 255, "loss": "ce"},
                          "aa": {"implementation": "pyautoattack.AutoAttack", "version": "0",
                                 "breakdown": {"clean": 80.0, "apgd-ce": 45.0, "apgd-t": 42.0,
                                               "fab-t": 42.0, "square": 41.25}}},
              "per_class": {"clean": [5.0 * c for c in range(classes)]},
              "sweep": {"attack": "pgd20", "alpha_rule": "max(2/255, 2.5*eps/steps)",
                        "norm": "linf", "eps": [0, 8 / 255, 0.5], "accuracy": [80.0, 45.5, 0.0]},
              "checks": {"bounds": {"name": "bounds", "status": "pass", "message": "in bounds"}},
              "checks_status": "pass"}
    page = format_markdown(report)
    assert "100 examples, L-inf eps = 8/255, precision fp32, seed 0, device cpu" in page
    for line in ("| clean | 80.00 | 71.1 - 86.7 | - |  |",
                 "| pgd20 | 45.50 | 35.9 - 55.4 | torchattacks.PGD 3 | steps=20, alpha=2/255, "
                 "loss=ce |",
                 "| aa | 41.25 | 31.9 - 51.2 | pyautoattack.AutoAttack 0 |  |",
                 "| worst_case | 40.00 | 30.9 - 49.8 | per example: any attack succeeds |  |",
                 "| clean 80.00 | apgd-ce 45.00 | apgd-t 42.00 | fab-t 42.00 | square 41.25 |",
                 "| eps | 0/255 | 8/255 | 128/255 |", "| acc (%) | 80.00 | 45.50 | 0.00 |",
                 "| attack | " + " | ".join(map(str, range(classes))) + " |",
                 "| clean | " + " | ".join(f"{5.0 * c:.1f}" for c in range(classes)) + " |",
                 "## Integrity checks: PASS", "| check | status | finding |",
                 "| bounds | PASS | in bounds |"):
        assert line in page.splitlines(), line
