"""Integrity checks fire when they should (train mode, BN updates, probabilities, masked
gradients, randomness, broken projections, suspicious gaps) and pass on a normal model."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.testing import CompileCounterWithBackend

import dat
from dat.attacks import eval_mode
from dat.evaluation import checks as C
from dat.evaluation import evaluate
from dat.evaluation.suite import BoundsStats

ATTACKS = ["clean", "fgsm", "pgd20"]


def _run(model: nn.Module, batch) -> dict:
    return evaluate(model, batch, attacks=ATTACKS, progress=False)


@pytest.fixture(scope="module")
def small(sample_splits) -> tuple[nn.Module, tuple[Tensor, Tensor]]:
    """resnet_tiny trained for 3 quick epochs on 8x8 (4x4-pooled) real images, ~50% clean
    accuracy; and 64 pooled test images of all ten classes. Tests take a deep copy of the model."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = sample_splits.train.tensors()
    x = F.avg_pool2d(x, 4)  # (N, 3, 8, 8)
    model = dat.models.create("resnet_tiny", num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    for _ in range(3):
        for idx in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    x_test, y_test = sample_splits.test.subset(torch.arange(64) * 15).tensors()  # all classes
    return model.eval(), (F.avg_pool2d(x_test, 4), y_test)


def _model(small, kind: str | None = None, train: bool = False) -> nn.Module:
    model = copy.deepcopy(small[0]).train(train)
    return _Wrapped(model, kind).eval() if kind else model


def _status(report: dict, name: str) -> str:
    return report["checks"][name]["status"]


class _Wrapped(nn.Module):
    """A tiny ResNet with something planted before or after it."""

    def __init__(self, net: nn.Module, kind: str) -> None:
        super().__init__()
        self.net, self.kind = net, kind

    def forward(self, x: Tensor) -> Tensor:
        if self.kind == "quantise":  # gradient masking: round() has zero gradient
            x = torch.round(x * 4) / 4
        if self.kind == "noise":  # a randomised defence
            x = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
        if self.kind == "sneaky":  # switches its BN layers to train mode behind our back
            self.net.train()
        logits = self.net(x)
        return logits.softmax(dim=1) if self.kind == "probabilities" else logits


def test_normal_model_passes(small) -> None:
    report = _run(_model(small), small[1])
    assert report["results"]["clean"] > 30 and report["results"]["pgd20"] > 0
    assert report["checks_status"] == "pass", report["checks"]
    assert {c["status"] for c in report["checks"].values()} <= {"pass", "skip"}


def test_train_mode_model_is_evaluated_in_eval_mode_and_restored(small) -> None:
    model = _model(small, train=True)
    before = C.buffers_snapshot(model)
    report = _run(model, small[1])
    assert model.training and all(m.training for m in model.modules())
    assert _status(report, "eval_mode") == "warn"
    assert _status(report, "bn_statistics") == "pass"
    assert C.check_bn_statistics(before, C.buffers_snapshot(model)).status == "pass"
    assert report["results"] == _run(model.eval(), small[1])["results"]


def test_bf16_evaluation_keeps_eval_mode_and_bn_statistics(small) -> None:
    model = _model(small, train=True)
    report = evaluate(model, small[1], attacks=ATTACKS, precision="bf16", progress=False)
    for name in ("bn_statistics", "bounds", "eps_zero", "large_eps"):
        assert _status(report, name) == "pass", report["checks"][name]
    assert _status(report, "eval_mode") == "warn"  # handed over in train mode, nothing worse
    assert model.training


def test_model_that_switches_itself_to_train_mode_fails(small) -> None:
    report = _run(_model(small, "sneaky"), small[1])
    assert _status(report, "eval_mode") == "fail"
    assert _status(report, "bn_statistics") == "fail"
    assert report["checks_status"] == "fail"


def test_probability_outputs_fail(small) -> None:
    report = _run(_model(small, "probabilities"), small[1])
    assert _status(report, "logits") == "fail"


def test_quantised_input_gradient_masking_fails(small) -> None:
    report = _run(_model(small, "quantise"), small[1])
    assert _status(report, "zero_gradients") == "fail"
    # large_eps cannot see this model: PGD's random start at eps 0.5 alone turns the images
    # into noise, and noise lands at chance on a test set of all classes (it "failed" while
    # the fixture's 64 test images were all airplanes)
    assert report["checks_status"] == "fail"


def test_randomised_model_fails_determinism(small) -> None:
    report = _run(_model(small, "noise"), small[1])
    assert _status(report, "deterministic") == "fail"


def test_bounds_catch_a_broken_projection(sample_batch) -> None:
    x, _ = sample_batch
    good, bad = BoundsStats(8 / 255), BoundsStats(8 / 255)
    good.update((x + 8 / 255 * torch.randn_like(x).sign()).clamp(0, 1), x)
    bad.update(x + 9 / 255, x)  # outside the eps-ball (and above 1 for bright pixels)
    assert C.check_bounds({"pgd20": good}).status == "pass"
    assert C.check_bounds({"pgd20": good, "broken": bad}).status == "fail"
    nan = BoundsStats(8 / 255)
    nan.update(torch.full_like(x, float("nan")), x)
    assert nan.nonfinite == len(x) and C.check_bounds({"nan": nan}).status == "fail"


@pytest.mark.parametrize("results, n, status", [
    ({"aa": 40.0, "pgd100": 45.0, "cw": 44.0}, 10000, "pass"),
    ({"aa": 44.2, "pgd100": 45.0, "cw": 44.0}, 10000, "pass"),
    ({"aa": 44.5, "pgd100": 45.0, "cw": 44.0}, 10000, "fail"),
    ({"aa": 13.0, "cw": 12.0}, 100, "pass"),  # one example of 100: noise, not a broken AA
    ({"aa": 15.0, "cw": 12.0}, 100, "fail"),  # three examples
    ({"aa": 44.5}, 10000, "skip"),
    # AA far below every gradient attack: masked gradients (the audit's sin-shattered model)
    ({"aa": 13.0, "fgsm": 27.0, "pgd20": 27.0, "cw": 27.0}, 1000, "warn"),
    ({"aa": 50.0, "pgd20": 56.2}, 10000, "warn"),  # the paper's DAT gap, with no CW to check
    ({"aa": 50.0, "pgd20": 56.2, "cw": 51.5}, 10000, "pass"),  # a sound CW closes it
    ({"aa": 10.0, "pgd20": 13.0}, 50, "pass"),  # 1.5 examples of 50: within noise
    ({"aa": 40.0, "fgsm": 50.0}, 10000, "skip"),  # one FGSM step is no yardstick for AA
])
def test_aa_must_not_exceed_pgd_or_cw(results, n, status) -> None:
    assert C.check_aa_gap(results, n).status == status


@pytest.mark.parametrize("clean, n, status", [
    (10.5, 200, "warn"), (14.0, 1000, "pass"), (30.0, 40, "pass"), (20.0, 40, "warn")])
def test_clean_accuracy_near_chance_warns(clean, n, status) -> None:
    """Chance is 10% for 10 classes; the margin is 3 standard errors of n examples."""
    assert C.check_above_chance(clean, 10, n).status == status


def test_a_model_expecting_normalised_inputs_is_flagged(small) -> None:
    """The same weights behind a mean/std normalisation they were not trained with: clean
    accuracy falls towards chance and the report says why that may be.

    The std of 1000 all but erases the images, so every one gets the same prediction and
    accuracy is one class's share, on any CPU. A milder mismatch (std 0.05) left this
    ReLU/BN network, nearly scale-equivariant, at 39% on one machine and near chance on
    another, as the test images here are all of one class."""
    model = _model(small)
    shifted = nn.Sequential(dat.models.normalize.Normalize((0.5,) * 3, (1000.0,) * 3), model)
    report = _run(shifted.eval(), small[1])
    assert _status(report, "above_chance") == "warn", report["checks"]["above_chance"]
    assert "normalised inputs" in report["checks"]["above_chance"]["message"]
    assert _status(_run(model, small[1]), "above_chance") == "pass"


def test_bf16_probability_outputs_fail_too(small) -> None:
    report = evaluate(_model(small, "probabilities"), small[1], attacks=ATTACKS,
                      precision="bf16", progress=False)
    assert _status(report, "logits") == "fail"


@pytest.mark.parametrize("pgd20, cw, n, status", [
    (50.0, 49.0, 1000, "pass"), (50.0, 46.5, 1000, "warn"),
    (12.5, 0.0, 16, "pass"),  # two examples of 16: noise
    (37.5, 0.0, 16, "warn")])
def test_pgd_far_above_cw_warns(pgd20, cw, n, status) -> None:
    assert C.check_pgd_cw_gap({"pgd20": pgd20, "cw": cw}, n).status == status


def test_pgd_vs_cw_uses_the_strongest_pgd_run() -> None:
    """pgd100 and cw without pgd20 skipped the check ("needs pgd20 and cw")."""
    check = C.check_pgd_cw_gap({"clean": 80.0, "pgd100": 50.0, "cw": 45.0}, 1000)
    assert check.status == "warn" and check.message.startswith("PGD-100 exceeds CW by 5.00")
    check = C.check_pgd_cw_gap({"pgd20": 50.0, "pgd100": 46.0, "cw": 45.0}, 1000)
    assert check.status == "pass" and check.message.startswith("PGD-100 - CW = 1.00")
    assert C.check_pgd_cw_gap({"pgd100": 50.0}, 1000).status == "skip"


def test_eps_zero_large_eps_and_monotone_checks() -> None:
    assert C.check_eps_zero(50.0, 50.0, 100).status == "pass"
    assert C.check_eps_zero(50.0, 49.0, 100).status == "fail"
    assert C.check_large_eps(10.0, 10, 500).status == "pass"
    assert C.check_large_eps(30.0, 10, 500).status == "fail"
    eps = [0, 2 / 255, 8 / 255]
    assert C.check_monotone(eps, [50.0, 40.0, 40.0], 1000).status == "pass"
    assert C.check_monotone(eps, [50.0, 40.0, 40.2], 1000).status == "warn"
    assert C.check_monotone(eps, [50.0, 40.0, 45.0], 1000).status == "fail"


def test_large_eps_allows_two_examples_worth_above_chance() -> None:
    """As the other checks do on small n: with 200 classes chance is 0.5%, and one survivor
    of 100 examples used to fail."""
    assert C.check_large_eps(1.0, 200, 100).status == "pass"
    assert C.check_large_eps(2.5, 200, 100).status == "pass"
    assert C.check_large_eps(3.0, 200, 100).status == "fail"
    assert C.check_large_eps(10.2, 10, 1000).status == "pass"
    assert C.check_large_eps(10.3, 10, 1000).status == "fail"


def _compiled(model: nn.Module, in_place: bool, backend) -> nn.Module:
    if in_place:  # module.compile(): the module's own call is compiled, hooks included
        model.compile(backend=backend)
        return model
    return torch.compile(model, backend=backend)  # a wrapper around it


def _frames(model: nn.Module, x: Tensor, in_place: bool, monitor: C.ModeMonitor | None) -> int:
    """Frames torch.compile compiles for 3 forwards of ``model`` (watched by ``monitor``,
    as an evaluation does from the first call on) and one more after."""
    counter = CompileCounterWithBackend("eager")
    torch._dynamo.reset()
    try:
        net = _compiled(model, in_place, counter)
        with torch.no_grad():
            with monitor.watch(net) if monitor else contextlib.nullcontext():
                for _ in range(3):
                    net(x)
            net(x)
    finally:
        torch._dynamo.reset()
    return counter.frame_count


@pytest.mark.parametrize("in_place", [False, True])
def test_a_compiled_model_is_watched_without_recompiling(make_warm_model, sample_batch,
                                                         in_place) -> None:
    """The eval-mode monitor's hooks ran inside the compiled code: torch.compile guarded on
    their counter and recompiled at every forward up to its limit (36 s on 100 images),
    and once more after the evaluation, when the hooks were gone."""
    x, monitor = sample_batch[0][:4], C.ModeMonitor()
    unwatched = _frames(make_warm_model().eval(), x, in_place, None)
    assert _frames(make_warm_model().eval(), x, in_place, monitor) == unwatched
    assert monitor.forwards > 0 and monitor.training_forwards == 0


@pytest.mark.parametrize("in_place", [False, True])
def test_a_compiled_model_that_switches_to_train_mode_is_seen(small, in_place) -> None:
    """Watched from outside the compiled code, the monitor still sees the flags."""
    torch._dynamo.reset()
    try:
        net, monitor = _compiled(_model(small, "sneaky"), in_place, "eager"), C.ModeMonitor()
        with torch.no_grad(), eval_mode(net), monitor.watch(net):
            net(small[1][0][:4])
            net(small[1][0][:4])
    finally:
        torch._dynamo.reset()
    assert monitor.training_forwards > 0
    assert C.check_eval_mode(False, monitor).status == "fail"


def test_a_compiled_model_evaluates_with_every_check(make_warm_model, sample_batch) -> None:
    torch._dynamo.reset()
    try:
        report = evaluate(torch.compile(make_warm_model().eval(), backend="eager"),
                          sample_batch, attacks=["clean"], progress=False, check_examples=4)
    finally:
        torch._dynamo.reset()
    assert _status(report, "eval_mode") == "pass", report["checks"]["eval_mode"]
    assert _status(report, "bn_statistics") == "pass"


def test_overall_status_is_the_most_severe() -> None:
    checks = [C.Check("a", "pass", ""), C.Check("b", "skip", "")]
    assert C.overall_status(checks) == "pass"
    assert C.overall_status(checks + [C.Check("c", "warn", "")]) == "warn"
    assert C.overall_status(checks + [C.Check("d", "fail", ""), C.Check("e", "warn", "")]) \
        == "fail"


def test_eps_zero_fails_in_both_directions() -> None:
    """The attack path scoring higher than the clean path at eps=0 is as wrong as lower."""
    assert C.check_eps_zero(50.0, 51.0, 100).status == "fail"


@pytest.mark.parametrize("clean, n, status", [
    (13.0, 900, "warn"),  # exactly 3 standard errors (3 points) above chance: not clearly
    (13.1, 900, "pass"),
    (19.2, 100, "pass"),  # margin 300 * sqrt(0.1 * 0.9 / 100) = 9.0, the binomial variance
    (18.9, 100, "warn")])
def test_above_chance_margin_is_three_binomial_standard_errors(clean, n, status) -> None:
    assert C.check_above_chance(clean, 10, n).status == status


def test_monotone_noise_is_two_examples_on_small_n() -> None:
    eps = [0, 2 / 255, 8 / 255]
    assert C.check_monotone(eps, [50.0, 40.0, 41.5], 100).status == "warn"  # 1.5 of 2 points
    assert C.check_monotone(eps, [50.0, 40.0, 42.0], 100).status == "warn"  # exactly 2 examples
    assert C.check_monotone(eps, [50.0, 40.0, 42.5], 100).status == "fail"


def test_monotone_judges_the_largest_rise_not_the_first() -> None:
    eps = [0, 1 / 255, 2 / 255, 4 / 255, 8 / 255]
    check = C.check_monotone(eps, [50.0, 40.0, 40.2, 30.0, 35.0], 1000)
    assert check.status == "fail" and "rises by 5.00 points at eps=8/255" in check.message


@pytest.mark.parametrize("results, n, status", [
    ({"aa": 14.0, "cw": 12.0}, 100, "pass"),  # exactly two examples above CW: still noise
    ({"aa": 44.5, "pgd100": 44.0, "cw": 45.0}, 10000, "fail"),  # PGD-100 is the lower bound
    ({"aa": 10.0, "pgd20": 15.0}, 10000, "pass"),  # exactly 5 points below: not more
    ({"aa": 10.0, "pgd20": 19.0}, 20, "pass"),  # 9 points is under two examples of 20
    ({"aa": 10.0, "pgd20": 21.0}, 20, "warn")])
def test_aa_gap_boundaries_and_bounds(results, n, status) -> None:
    assert C.check_aa_gap(results, n).status == status


def test_pgd_cw_gap_threshold_is_three_points() -> None:
    assert C.check_pgd_cw_gap({"pgd20": 50.0, "cw": 47.5}, 1000).status == "pass"
    assert C.check_pgd_cw_gap({"pgd20": 50.0, "cw": 47.0}, 1000).status == "pass"
    assert C.check_pgd_cw_gap({"pgd20": 50.0, "cw": 46.9}, 1000).status == "warn"


def test_autoattack_warnings_statuses() -> None:
    assert C.check_autoattack_warnings(None).status == "skip"
    assert C.check_autoattack_warnings([]).status == "pass"
    check = C.check_autoattack_warnings(["first", "second"])
    assert check.status == "warn" and check.message.endswith("first (+1 more)")


def test_eval_mode_train_forwards_fail_even_when_handed_over_in_train_mode() -> None:
    assert C.check_eval_mode(True, C.ModeMonitor(forwards=4, training_forwards=1)).status \
        == "fail"
    assert C.check_eval_mode(True, C.ModeMonitor(forwards=4)).status == "warn"
    assert C.check_eval_mode(False, C.ModeMonitor(forwards=4)).status == "pass"


def test_bn_statistics_compares_bits_and_misses_no_buffer() -> None:
    nan = {"bn.running_mean": torch.tensor([float("nan"), 1.0])}
    assert C.check_bn_statistics(nan, {k: v.clone() for k, v in nan.items()}).status == "pass"
    zero = {"bn.running_mean": torch.tensor([0.0])}
    assert C.check_bn_statistics(zero, {"bn.running_mean": torch.tensor([-0.0])}).status \
        == "fail"
    assert C.check_bn_statistics(zero, {}).status == "fail"  # a buffer that disappeared


class _Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def test_deterministic_fails_on_small_logit_noise() -> None:
    torch.manual_seed(0)
    x = torch.rand(8, 3, 4, 4)
    noisy = _Lambda(lambda x: x.flatten(1)[:, :10] + 1e-3 * torch.randn(len(x), 10))
    assert C.check_deterministic(noisy, x).status == "fail"
    assert C.check_deterministic(_Lambda(lambda x: x.flatten(1)[:, :10]), x).status == "pass"


def test_logits_in_unit_interval_that_do_not_sum_to_one_pass() -> None:
    x = torch.rand(8, 3, 4, 4)
    assert C.check_logits(_Lambda(lambda x: x.flatten(1)[:, :10].sigmoid()), x).status \
        == "pass"
    assert C.check_logits(_Lambda(lambda x: x.flatten(1)[:, :10].softmax(1)), x).status \
        == "fail"


@pytest.mark.parametrize("zero, status", [(0, "pass"), (1, "warn"), (2, "warn"), (3, "fail")])
def test_zero_gradients_fail_only_for_a_strict_majority(zero, status) -> None:
    """ReLU before a linear layer: inputs that are all negative get exactly zero gradient."""
    torch.manual_seed(0)
    weight = torch.randn(3 * 4 * 4, 5)
    model = _Lambda(lambda x: x.flatten(1).relu() @ weight)
    x = torch.rand(4, 3, 4, 4) + 0.1
    x[:zero] = -1.0
    assert C.check_zero_gradients(model, x, torch.zeros(4, dtype=torch.long)).status == status
