"""The L2 threat model: dat.attacks.pgd(norm="l2") and project_l2 against torchattacks'
PGDL2 and hand-computed steps; dat.evaluate(norm="l2") and evaluate.py --norm l2.

Each test says in a comment which bug it would catch.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
import torchattacks
from pyautoattack import AutoAttack
from torch import Tensor, nn

import dat
from dat.attacks import NORMS, check_norm, pgd, project, project_l2
from dat.data import stratified_split
from dat.evaluation import EvaluationError
from dat.evaluation.cli import evaluate_main
from dat.evaluation.report import format_markdown
from dat.losses import cw_margin


def _l2(delta: Tensor) -> Tensor:
    """Per-example L2 norm (B,) of a batch of perturbations."""
    return delta.flatten(1).norm(dim=1)


def _linear(d: int, classes: int = 3, seed: int = 0, dtype=torch.float32) -> nn.Module:
    """A small flatten-linear classifier on (B, ...) images with ``d`` pixels."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, classes)).to(dtype).eval()


class _Blind(nn.Module):
    """Logits that do not depend on the image: every input gradient is exactly zero."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.arange(classes, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(1)[:, :1] * 0 + self.bias


# --------------------------------------------------------------------------- attack level


@pytest.mark.parametrize("eps, dtype, steps", [(0.25, torch.float64, 8), (1.5, torch.float64, 8),
                                               (0.5, torch.float32, 3)])
def test_l2_pgd_matches_torchattacks_pgdl2(make_warm_model, sample_batch, eps, dtype,
                                           steps) -> None:
    # Catches: a step that is not normalised per example (batch-wide norm, sign of the
    # gradient), projection and clamp in another order than PGDL2, or a wrong radius.
    # float64 for the long runs: in float32 one ReLU flip after ~8 steps moves an image
    # by 1e-4 (the summed vs PGDL2's mean loss round differently); the guard 1e-10 added
    # to the gradient norm of the mean vs summed loss leaves ~1e-9.
    model = make_warm_model().to(dtype).eval()
    x, y = sample_batch
    x = x.to(dtype)
    alpha = 2 * eps / steps  # eps/4 for 8 steps: the walk crosses the ball twice
    ours = pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=False, norm="l2")
    ref = torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=False)(x, y)
    assert ours.dtype == dtype
    assert (ours - ref).abs().max() <= 1e-6
    norms = _l2(ours - x)
    assert norms.max() <= eps + 1e-5
    assert norms.max() > 0.9 * eps  # the ball's edge is reached: the projection acted


@pytest.mark.parametrize("eps", [0.05, 0.5, 2.0, 12.0])
def test_l2_pgd_with_random_start_stays_in_the_ball_and_in_0_1(make_warm_model, sample_batch,
                                                              eps) -> None:
    # Catches: an L-inf projection under norm="l2" (an L-inf ball of radius 2 is all of
    # [0, 1]), a missing clamp to [0, 1] (radius 12 leaves it easily), or a radius > 1
    # refused as if it were in 0-255 units.
    model = make_warm_model().eval()
    x, y = sample_batch
    with torch.no_grad():  # as evaluation loops call it
        x_adv = pgd(model, x, y, eps=eps, alpha=eps / 2, steps=3, norm="l2")
    assert x_adv.shape == x.shape and not x_adv.requires_grad
    assert torch.isfinite(x_adv).all()
    assert _l2(x_adv - x).max() <= eps + 1e-5
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert _l2(x_adv - x).max() > 0.5 * eps  # it moved


def test_l2_random_start_is_a_gaussian_direction_at_a_uniform_radius() -> None:
    # Catches: an L-inf uniform start (every pixel moved by up to eps: far outside the
    # L2 ball), a start always on the sphere (radius eps) or always at the centre, and a
    # start in one fixed direction for every example.
    model = _Blind()  # no gradient: steps=0 and steps>0 both leave the start as it is
    x = torch.full((400, 3, 8, 8), 0.5)  # per-pixel moves of ~eps / sqrt(d): no clamping
    y = torch.zeros(400, dtype=torch.int64)
    eps = 1.0
    delta = pgd(model, x, y, eps=eps, alpha=0.1, steps=0, norm="l2") - x
    radii = _l2(delta)
    assert radii.max() <= eps + 1e-6
    assert radii.min() < 0.05 * eps and radii.max() > 0.95 * eps
    assert radii.mean().item() == pytest.approx(eps / 2, abs=0.05)  # U(0, eps)
    assert (radii < eps / 2).float().mean().item() == pytest.approx(0.5, abs=0.1)
    unit = delta.flatten(1) / radii[:, None]
    cosines = unit @ unit.T - torch.eye(len(unit))
    assert cosines.abs().max() < 0.5  # independent directions in d = 192 dimensions
    assert (delta.abs() > 0).float().mean() > 0.99  # Gaussian: every pixel moves
    assert unit.abs().max() < 0.5  # ... not a move along a few axes
    # the gradient-free attack keeps its start; without random start it is x itself
    assert torch.equal(pgd(model, x, y, eps=eps, alpha=0.1, steps=0, norm="l2",
                           random_start=False), x)


@pytest.mark.parametrize("loss", ["ce", "cw"])
@pytest.mark.parametrize("random_start", [True, False])
def test_l2_eps_zero_returns_the_clean_image_exactly(make_warm_model, sample_batch, loss,
                                                    random_start) -> None:
    # Catches: 0/0 in the projection (eps / ||delta|| with delta = 0 gives NaN), a random
    # start that ignores eps, or a step that is not projected back at radius 0.
    model = make_warm_model().eval()
    x, y = sample_batch
    x_adv = pgd(model, x, y, eps=0.0, alpha=0.5, steps=3, loss=loss, norm="l2",
                random_start=random_start)
    assert not torch.isnan(x_adv).any()
    assert torch.equal(x_adv, x)


def test_l2_cw_stays_in_the_ball_and_ascends_the_margin(make_warm_model, sample_batch) -> None:
    # Catches: loss="cw" ignored under norm="l2" (CE ascended instead), a descent instead
    # of an ascent, or a CW path that skips the L2 projection.
    model = make_warm_model().eval()
    x, y = sample_batch
    eps = 0.5
    gen = torch.Generator().manual_seed(1)
    start = torch.randn(x.shape, generator=gen)
    start = start * (0.5 * eps / _l2(start)).view(-1, 1, 1, 1)  # radius eps / 2
    cw = pgd(model, x, y, eps=eps, alpha=eps / 4, steps=10, loss="cw", norm="l2", start=start)
    ce = pgd(model, x, y, eps=eps, alpha=eps / 4, steps=10, loss="ce", norm="l2", start=start)
    assert _l2(cw - x).max() <= eps + 1e-5 and cw.min() >= 0 and cw.max() <= 1
    with torch.no_grad():
        at_start = cw_margin(model(project_l2(x + start, x, eps)), y)
        after = cw_margin(model(cw), y)
        after_ce = cw_margin(model(ce), y)
    assert after.mean() > at_start.mean()
    assert (after >= at_start - 1e-4).float().mean() >= 0.9
    assert not torch.allclose(cw, ce)  # another objective, another path
    assert after.mean() >= after_ce.mean() - 1e-4  # the margin attack is best at the margin


@pytest.mark.parametrize("alpha, eps", [(0.3, 1.0), (2.0, 0.7)])
def test_one_l2_step_is_the_normalised_gradient_step(make_warm_model, sample_batch, alpha,
                                                     eps) -> None:
    # Catches: a signed (L-inf) step, the gradient of the mean loss left unnormalised,
    # a step length other than alpha, or (alpha > eps) a missing projection onto the
    # ball before the clamp to [0, 1].
    model = make_warm_model().eval()
    x, y = sample_batch
    x_req = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(x_req), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x_req)
    unit = g / _l2(g).view(-1, 1, 1, 1)
    want = x + alpha * unit
    if alpha > eps:  # onto the sphere of radius eps, then [0, 1]
        want = x + eps * unit
    want = want.clamp(0, 1)
    got = pgd(model, x, y, eps=eps, alpha=alpha, steps=1, random_start=False, norm="l2")
    assert (got - want).abs().max() <= 1e-6
    assert _l2(got - x).max() > 0.5 * min(alpha, eps)


def test_l2_attack_treats_each_example_on_its_own(make_warm_model, sample_batch) -> None:
    # Catches: a gradient norm or projection over the whole batch instead of per example
    # (a batch of 16 would then take steps 4 times shorter per image).
    model = make_warm_model().eval()
    x, y = sample_batch
    kw = dict(eps=0.5, alpha=0.2, steps=4, random_start=False, norm="l2")
    whole = pgd(model, x, y, **kw)
    parts = torch.cat([pgd(model, x[:5], y[:5], **kw), pgd(model, x[5:], y[5:], **kw)])
    assert (whole - parts).abs().max() <= 1e-6


def test_start_outside_the_l2_ball_is_projected_onto_it() -> None:
    # Catches: start= added without projection under norm="l2" (or projected onto the
    # L-inf box, which leaves its L2 length far above eps).
    d = 3 * 8 * 8
    model = _Blind()
    x = torch.full((4, 3, 8, 8), 0.5)
    y = torch.zeros(4, dtype=torch.int64)
    eps = 0.4
    gen = torch.Generator().manual_seed(2)
    direction = torch.randn(x.shape, generator=gen)
    direction = direction / _l2(direction).view(-1, 1, 1, 1)
    scale = torch.tensor([3.0, 1.5, 0.5, 0.25]).view(-1, 1, 1, 1) * eps  # two outside
    start = direction * scale
    assert (start.abs().max() < 0.4).item()  # [0, 1] never binds around 0.5
    got = pgd(model, x, y, eps=eps, alpha=0.1, steps=0, norm="l2", start=start)
    radii = _l2(got - x)
    assert radii[:2].tolist() == pytest.approx([eps, eps], abs=1e-6)
    assert radii[2:].tolist() == pytest.approx([0.5 * eps, 0.25 * eps], abs=1e-6)
    cos = ((got - x).flatten(1) * direction.flatten(1)).sum(1) / radii
    assert cos.tolist() == pytest.approx([1.0] * 4, abs=1e-5)  # shrunk, not turned
    assert torch.allclose(got[2:], x[2:] + start[2:], atol=1e-7)  # inside: as given
    # the same start after gradient steps stays projected too
    steps = pgd(_linear(d), x, y, eps=eps, alpha=0.1, steps=2, norm="l2", start=start)
    assert _l2(steps - x).max() <= eps + 1e-5


@pytest.mark.parametrize("kwargs, match", [
    (dict(norm="l3"), "'linf' or 'l2'"),
    (dict(norm="L2"), "'linf' or 'l2'"),
    (dict(norm="l2", eps=-1.0), "eps=-1"),
    (dict(norm="l2", eps=float("nan")), "eps=nan"),
    (dict(norm="l2", eps=float("inf")), "eps=inf"),
    (dict(norm="l2", alpha=-0.1), "alpha=-0.1"),
    (dict(norm="l2", alpha=float("nan")), "alpha=nan"),
    (dict(norm="l2", compile_mode="default"), "compile_mode='off'"),
    (dict(norm="linf", eps=2.0), "2/255"),  # L-inf radii are still refused above 1
])
def test_bad_l2_arguments_raise_value_error(make_tiny_model, sample_batch, kwargs,
                                            match) -> None:
    # Catches: an unknown norm silently run as L-inf, a NaN / inf / negative radius
    # accepted under L2 (NaN compares False with everything, so a plain `eps > 1` test
    # lets it through), and compiled L-inf steps run under an L2 attack.
    x, y = sample_batch
    args = {"eps": 0.5, "alpha": 0.1, "steps": 1, **kwargs}
    with pytest.raises(ValueError, match=match) as err:
        pgd(make_tiny_model().eval(), x[:2], y[:2], **args)
    assert "\n" not in str(err.value)


def test_check_norm_and_norms() -> None:
    # Catches: a new norm list that drops L-inf or a check that lets unknown names pass.
    assert NORMS == ("linf", "l2")
    check_norm("linf")
    check_norm("l2")
    for bad in ("l1", "Linf", "inf", ""):
        with pytest.raises(ValueError, match="'linf' or 'l2'"):
            check_norm(bad)


def test_l2_radius_above_one_is_allowed(make_warm_model, sample_batch) -> None:
    # Catches: the L-inf range check ([0, 1], "write 2/255") applied to L2 radii, which
    # grow with the image size (the whole 32x32 RGB cube has diameter 55).
    model = make_warm_model().eval()
    x, y = sample_batch
    x_adv = pgd(model, x, y, eps=3.0, alpha=1.5, steps=2, norm="l2", random_start=False)
    assert 1.0 < _l2(x_adv - x).max() <= 3.0 + 1e-5


def test_linf_pgd_is_unchanged_by_the_norm_argument(make_warm_model, sample_batch) -> None:
    # Catches: the new norm argument changing the default L-inf path (another random
    # draw, another projection) or norm="linf" taking a different path than the default.
    model = make_warm_model().eval()
    x, y = sample_batch
    eps, alpha = 8 / 255, 2 / 255
    runs = []
    for kw in ({}, {"norm": "linf"}):
        torch.manual_seed(5)
        runs.append(pgd(model, x, y, eps, alpha, steps=3, **kw))
    assert torch.equal(runs[0], runs[1])
    # ... and both are the textbook L-inf loop from a U(-eps, eps) start drawn the same way
    torch.manual_seed(5)
    x_adv = project(x + torch.empty_like(x).uniform_(-eps, eps), x, eps)
    for _ in range(3):
        x_adv = x_adv.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        x_adv = project(x_adv.detach() + alpha * g.sign(), x, eps)
    assert torch.equal(runs[0], x_adv)
    assert (runs[0] - x).abs().max() == pytest.approx(eps)  # L-inf: the box edge


def test_l2_attack_leaves_the_model_as_it_found_it(make_warm_model, sample_batch) -> None:
    # Catches: an L2 loop that attacks in train mode (BatchNorm statistics move), forgets
    # to restore the mode, or accumulates parameter gradients.
    model = make_warm_model().train()
    model.layer1.eval()  # a sub-module the user froze must stay frozen
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x, y = sample_batch
    pgd(model, x, y, eps=0.5, alpha=0.2, steps=2, norm="l2")
    assert model.training and not model.layer1.training
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert all(p.grad is None for p in model.parameters())


def test_project_l2_leaves_points_inside_alone() -> None:
    # Catches: a projection that rescales every perturbation to radius eps (onto the
    # sphere instead of into the ball).
    x = torch.full((3, 2, 4, 4), 0.5)
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(x.shape, generator=gen)
    delta = delta * (torch.tensor([0.1, 0.2, 0.29]) / _l2(delta)).view(-1, 1, 1, 1)
    out = project_l2(x + delta, x, 0.3)
    assert torch.equal(out, x + delta)


def test_project_l2_shrinks_points_outside_to_radius_eps() -> None:
    # Catches: clipping each pixel instead of scaling the whole perturbation, a wrong
    # factor (eps * norm, norm / eps), or one factor for the whole batch.
    x = torch.full((4, 3, 8, 8), 0.5)
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(x.shape, generator=gen)
    delta = delta * (torch.tensor([0.5, 1.0, 2.0, 0.1]) / _l2(delta)).view(-1, 1, 1, 1)
    assert delta.abs().max() < 0.5  # clamping to [0, 1] does not act around 0.5
    eps = 0.25
    out = project_l2(x + delta, x, eps)
    radii = _l2(out - x)
    assert radii[:3].tolist() == pytest.approx([eps] * 3, rel=1e-6)
    assert radii[3].item() == pytest.approx(0.1, rel=1e-6)  # inside: untouched
    scaled = delta[:3] * (eps / _l2(delta[:3])).view(-1, 1, 1, 1)
    assert torch.allclose(out[:3] - x[:3], scaled, atol=1e-7)  # same direction


def test_project_l2_handles_zero_perturbation_and_clamps() -> None:
    # Catches: NaN from 0 / 0 when x_adv == x (eps / ||0||), and a projection that
    # leaves [0, 1] after shrinking.
    x = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    for eps in (0.0, 0.5):
        out = project_l2(x.clone(), x, eps)
        assert torch.equal(out, x)
    out = project_l2(x, x, 0.0)
    assert not torch.isnan(out).any()
    big = x + 5.0 * torch.ones_like(x)  # far outside [0, 1] and the ball
    out = project_l2(big, x, 1.0)
    assert out.min() >= 0 and out.max() <= 1 and _l2(out - x).max() <= 1.0 + 1e-6
    # a zero eps collapses any perturbation onto x
    assert torch.equal(project_l2(big, x, 0.0), x)


# ----------------------------------------------------------------------- evaluation level


def _small(split, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Real CIFAR-10 sample images pooled to 3x8x8 (tiny and fast to attack)."""
    x, y = split.tensors() if idx is None else split.subset(idx).tensors()
    return F.avg_pool2d(x, 4).contiguous(), y


class _Scaled(nn.Module):
    """A linear classifier on 3x8x8 images, scaled to [-2, 2] inside."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1) * 4 - 2)


@pytest.fixture(scope="module")
def linear8(sample_splits) -> tuple[nn.Module, Tensor, Tensor]:
    """A linear model trained for two epochs on the pooled sample (~30% clean accuracy,
    under 1 s) and 40 pooled test images, 4 per class."""
    torch.manual_seed(0)
    x, y = _small(sample_splits.train)
    model = _Scaled()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for idx in torch.randperm(len(y)).split(128):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    _, chosen = stratified_split(sample_splits.test.labels, 40, seed=0)
    x_test, y_test = _small(sample_splits.test, chosen)
    return model.eval(), x_test, y_test


def _attacked(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The points an evaluation attacks: those the model classifies correctly."""
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    return x[correct], y[correct]


def _accuracy(model: nn.Module, x_adv: Tensor, y: Tensor, n: int) -> float:
    """Accuracy (%) over ``n`` points of which the correct ones were attacked to ``x_adv``."""
    with torch.no_grad():
        return 100.0 * float((model(x_adv).argmax(1) == y).sum()) / n


_EXACT = dict(progress=False, fold_bn=False, channels_last=False)  # attack the model as given


def test_l2_suite_runs_the_fast_gradient_method_pgd_and_cw_in_l2(linear8) -> None:
    # Catches: L-inf attacks run under norm="l2" (torchattacks' FGSM at eps=0.1 would flip
    # every point), a step other than eps (fgsm) or eps/4 (pgd, cw), a random start in
    # fgsm or none in pgd<N>, CW run on cross-entropy, bounds measured in L-inf (far below
    # the L2 length of the perturbation), or settings that do not say "l2". At eps=0.1
    # each of these wrong variants gives another accuracy or another smallest pixel value
    # (bounds' min_value) than the attack the brief names.
    model, x, y = linear8
    eps = 0.1
    report = dat.evaluate(model, (x, y), attacks=["clean", "fgsm", "pgd5", "cw"], eps=eps,
                          norm="l2", **_EXACT)
    res, info, bounds = report["results"], report["attacks"], report["bounds"]
    assert report["norm"] == "l2" and report["eps"] == eps and report["eps_255"] is None
    xc, yc = _attacked(model, x, y)
    assert res["clean"] == 100.0 * len(yc) / len(y) == 30.0
    fgsm = pgd(model, xc, yc, eps=eps, alpha=eps, steps=1, random_start=False, norm="l2")
    torch.manual_seed(0)  # the evaluation's seed, drawn again before each attack
    pgd5 = pgd(model, xc, yc, eps=eps, alpha=eps / 4, steps=5, norm="l2")
    assert res["fgsm"] == _accuracy(model, fgsm, yc, len(y))
    assert res["pgd5"] == _accuracy(model, pgd5, yc, len(y))
    assert 0 < res["fgsm"] < res["clean"] and 0 < res["pgd5"] < res["clean"]
    for name, x_adv in (("fgsm", fgsm), ("pgd5", pgd5)):
        assert bounds[name]["min_value"] == pytest.approx(float(x_adv.min()), abs=1e-7)
        assert bounds[name]["max_perturbation"] == pytest.approx(float(_l2(x_adv - xc).max()),
                                                                 rel=1e-5)
    cw_runs = []
    for start in (True, False):  # the brief leaves the CW start open: one of the two
        torch.manual_seed(0)
        cw_runs.append(pgd(model, xc, yc, eps=eps, alpha=eps / 4, steps=100, loss="cw",
                           norm="l2", random_start=start))
    assert any(res["cw"] == _accuracy(model, a, yc, len(y))
               and bounds["cw"]["min_value"] == pytest.approx(float(a.min()), abs=1e-6)
               for a in cw_runs), (res["cw"], bounds["cw"])
    for name in ("fgsm", "pgd5", "cw"):
        assert info[name]["norm"] == "l2" and info[name]["eps"] == eps, info[name]
        assert bounds[name]["norm"] == "l2" and bounds[name]["count"] == len(yc)
        assert bounds[name]["max_perturbation"] <= eps * (1 + 1e-5)
        assert bounds[name]["min_value"] >= 0 and bounds[name]["max_value"] <= 1
    assert info["pgd5"]["alpha"] == pytest.approx(eps / 4) and info["pgd5"]["steps"] == 5
    assert info["cw"]["alpha"] == pytest.approx(eps / 4) and info["cw"]["steps"] == 100
    assert bounds["fgsm"]["max_perturbation"] > 0.9 * eps  # L2, not the L-inf size
    assert report["checks"]["bounds"]["status"] == "pass", report["checks"]["bounds"]
    assert res["worst_case"] <= min(res["fgsm"], res["pgd5"], res["cw"])


def test_linf_evaluation_reports_as_before(linear8) -> None:
    # Catches: the L-inf path changed by the threat model argument (another default eps,
    # eps_255 dropped, perturbations measured in L2, torchattacks' FGSM replaced).
    model, x, y = linear8
    kw = dict(attacks=["clean", "fgsm"], checks=False, **_EXACT)
    default = dat.evaluate(model, (x, y), **kw)
    linf = dat.evaluate(model, (x, y), norm="linf", **kw)
    assert default["results"] == linf["results"]
    for report in (default, linf):
        assert report["norm"] == "linf" and report["eps"] == 8 / 255
        assert report["eps_255"] == pytest.approx(8.0)
        assert report["attacks"]["fgsm"]["implementation"] == "torchattacks.FGSM"
        assert report["bounds"]["fgsm"]["norm"] == "linf"
        assert report["bounds"]["fgsm"]["max_perturbation"] == pytest.approx(8 / 255, abs=1e-6)
    xc, yc = _attacked(model, x, y)
    fgsm = torchattacks.FGSM(model, eps=8 / 255)(xc, yc)
    assert linf["results"]["fgsm"] == _accuracy(model, fgsm, yc, len(y))
    page = format_markdown(linf)
    assert "L-inf eps = 8/255" in page and "L2 eps" not in page


def test_default_l2_radius_is_0_5_and_the_report_names_it(linear8) -> None:
    # Catches: eps=None left at the L-inf 8/255 under norm="l2" (an L2 radius 16 times
    # too small), eps_255 still filled in, or the Markdown page calling it L-inf.
    model, x, y = linear8
    report = dat.evaluate(model, (x, y), attacks=["clean", "fgsm"], norm="l2", checks=False,
                          **_EXACT)
    assert report["norm"] == "l2" and report["eps"] == 0.5 and report["eps_255"] is None
    assert report["attacks"]["fgsm"]["eps"] == 0.5
    assert 0.45 < report["bounds"]["fgsm"]["max_perturbation"] <= 0.5 * (1 + 1e-5)
    page = format_markdown(report)
    assert "L2 eps = 0.5" in page and "L-inf eps" not in page and "/255" not in page
    explicit = dat.evaluate(model, (x, y), attacks=["clean", "fgsm"], norm="l2", eps=0.5,
                            checks=False, **_EXACT)
    assert explicit["results"] == report["results"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(norm="l2", eps=-0.5), "eps=-0.5"),
    (dict(norm="l2", eps=float("nan")), "eps=nan"),
    (dict(norm="l2", eps=float("inf")), "eps=inf"),
    (dict(norm="l3"), "l3"),
    (dict(norm="linf", eps=2.0), "2/255"),  # L-inf radii above 1 are still refused
])
def test_invalid_l2_radius_or_norm_is_refused_in_one_line(linear8, kwargs, match) -> None:
    # Catches: a NaN or infinite L2 radius let through (NaN fails every comparison, so a
    # check written as `eps < 0 or eps > 1` misses it), an unknown norm run as L-inf, or
    # a plain ValueError / traceback instead of EvaluationError.
    model, x, y = linear8
    with pytest.raises(EvaluationError, match=match) as err:
        dat.evaluate(model, (x, y), attacks=["clean", "fgsm"], progress=False, **kwargs)
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)


def test_l2_sweep_and_integrity_checks(linear8) -> None:
    # Catches: the L-inf radii (0..16/255) swept under norm="l2", a large_eps check run at
    # the L-inf 0.5 instead of 0.5 * sqrt(C*H*W), sweep radii above 1 refused under L2,
    # and checks (eps_zero, monotone sweep, bounds) that fail on a sound L2 evaluation.
    model, x, y = linear8
    report = dat.evaluate(model, (x, y), attacks=["clean", "pgd10"], norm="l2", sweep=True,
                          **_EXACT)
    sweep, res = report["sweep"], report["results"]
    assert sweep["eps"] == [0, 0.125, 0.25, 0.5, 1.0, 2.0]
    assert sweep["accuracy"][0] == res["clean"]
    assert all(a >= b for a, b in zip(sweep["accuracy"], sweep["accuracy"][1:], strict=False))
    assert sweep["accuracy"][-1] < res["clean"]
    for name in ("bounds", "eps_zero", "sweep_monotone", "large_eps"):
        assert report["checks"][name]["status"] == "pass", report["checks"][name]
    radius = 0.5 * math.sqrt(x[0].numel())  # 0.5 on each of the 192 pixels: 6.93
    big = [b for b in report["bounds"].values() if b["eps"] == pytest.approx(radius)]
    assert len(big) == 1, report["bounds"]
    assert big[0]["norm"] == "l2"
    assert 2.0 < big[0]["max_perturbation"] <= radius * (1 + 1e-5)  # far beyond 0.5
    for b in report["bounds"].values():
        assert b["norm"] == "l2" and b["max_perturbation"] <= b["eps"] * (1 + 1e-5) + 1e-6
    # explicit radii above 1 are L2 lengths, not 0-255 values
    custom = dat.evaluate(model, (x, y), attacks=["clean"], norm="l2", sweep=[0, 1.5, 3.0],
                          checks=False, **_EXACT)
    assert custom["sweep"]["eps"] == [0, 1.5, 3.0]
    assert custom["sweep"]["accuracy"][0] == custom["results"]["clean"]
    assert custom["sweep"]["accuracy"][-1] <= custom["sweep"]["accuracy"][1]
    # an L2 radius above 1 as the evaluation's eps is fine too
    two = dat.evaluate(model, (x, y), attacks=["clean", "fgsm"], norm="l2", eps=2.0,
                       checks=False, **_EXACT)
    assert two["eps"] == 2.0 and 1.0 < two["bounds"]["fgsm"]["max_perturbation"] <= 2.0 + 1e-5


def test_l2_autoattack_is_pyautoattacks_l2_version(linear8) -> None:
    # Catches: AutoAttack run with norm="Linf" under norm="l2" (the same eps in L-inf
    # flips every point at APGD-CE and moves images by ~3.7 in L2), the wrong radius, or
    # bounds measured in L-inf.
    model, x, y = linear8
    eps = 0.27  # APGD-CE leaves 2 of 40 points, APGD-T takes them: Square never runs
    report = dat.evaluate(model, (x, y), attacks=["clean", "aa"], norm="l2", eps=eps, seed=3,
                          **_EXACT)
    info, bounds = report["attacks"]["aa"], report["bounds"]["aa"]
    assert info["norm"] == "L2" and info["eps"] == eps
    aa = AutoAttack(model, norm="L2", eps=eps, version="standard", device="cpu", seed=3)
    x_adv, y_adv = aa.run_standard_evaluation(x, y, batch_size=500)
    assert report["results"]["aa"] == 100.0 * int((y_adv == y).sum()) / len(y)
    assert info["breakdown"]["apgd-ce"] > report["results"]["aa"]  # a cascade, not one step
    assert bounds["norm"] == "l2" and bounds["count"] == 12
    assert bounds["max_perturbation"] == pytest.approx(float(_l2(x_adv - x).max()), rel=1e-5)
    assert 0.5 * eps < bounds["max_perturbation"] <= eps * (1 + 1e-5)
    assert report["checks"]["bounds"]["status"] == "pass", report["checks"]["bounds"]


def test_resume_refuses_the_progress_of_the_other_threat_model(linear8, tmp_path) -> None:
    # Catches: a fingerprint without the norm, so a resumed L2 run would reuse the L-inf
    # attacks saved in progress.json (and the other way round), or a refusal that does
    # not say why; also a resume that stops working within one threat model.
    model, x, y = linear8
    kw = dict(attacks=["clean", "fgsm"], checks=False, out_dir=tmp_path, **_EXACT)
    linf = dat.evaluate(model, (x, y), **kw)
    with pytest.raises(EvaluationError, match=r"holds an evaluation with other .*norm") as err:
        dat.evaluate(model, (x, y), norm="l2", eps=0.1, resume=True, **kw)
    assert "\n" not in str(err.value)
    auto = dat.evaluate(model, (x, y), norm="l2", eps=0.1, resume="auto", **kw)  # over
    assert auto["reused"] == [] and auto["results"] != linf["results"]
    again = dat.evaluate(model, (x, y), norm="l2", eps=0.1, resume=True, **kw)
    assert again["reused"] == ["fgsm"] and again["results"] == auto["results"]
    assert again["bounds"]["fgsm"] == auto["bounds"]["fgsm"]
    with pytest.raises(EvaluationError, match=r"holds an evaluation with other .*norm"):
        dat.evaluate(model, (x, y), resume=True, **kw)  # back to L-inf: refused as well
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["norm"] == "l2" and saved["eps"] == 0.1


def test_cli_evaluates_under_l2_and_refuses_fractions(make_warm_model, sample_splits,
                                                      tmp_path, capsys) -> None:
    # Catches: --norm not passed through to dat.evaluate, --eps 0.5 refused or read as
    # 0.5/255 under l2, --sweep radii divided by 255 under l2, a Markdown page that still
    # says "L-inf eps", and 8/255 silently accepted as an L2 radius.
    model = make_warm_model().eval()
    torch.save(model.state_dict(), tmp_path / "net.pt")
    base = ["--model", "resnet_tiny", "--weights", str(tmp_path / "net.pt"), "--data",
            "cifar10-sample", "--n-examples", "8", "--no-progress", "--no-checks"]
    out = tmp_path / "eval"
    assert evaluate_main([*base, "--norm", "l2", "--eps", "0.5", "--attacks", "clean,fgsm",
                          "--sweep", "0,0.25,0.5,1", "--out", str(out)]) == 0
    saved = json.loads((out / "report.json").read_text())
    assert saved["norm"] == "l2" and saved["eps"] == 0.5 and saved["eps_255"] is None
    assert saved["sweep"]["eps"] == [0, 0.25, 0.5, 1.0]
    assert saved["attacks"]["fgsm"]["norm"] == "l2"
    _, chosen = stratified_split(sample_splits.test.labels, 8, seed=0)  # as --n-examples
    xs, ys = sample_splits.test.subset(chosen).tensors()
    direct = dat.evaluate(model, (xs, ys), attacks=["clean", "fgsm"], norm="l2", eps=0.5,
                          sweep=[0, 0.25, 0.5, 1.0], progress=False, checks=False)
    assert saved["results"] == direct["results"]
    assert saved["sweep"]["accuracy"] == direct["sweep"]["accuracy"]
    page = (out / "report.md").read_text()
    assert "L2 eps = 0.5" in page and "L-inf eps" not in page
    assert "L2 eps = 0.5" in capsys.readouterr().out
    # a bare 1 is a valid L2 radius (under L-inf it is refused as ambiguous)
    assert evaluate_main([*base, "--norm", "l2", "--eps", "1", "--attacks", "clean",
                          "--out", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "report.json").read_text())["eps"] == 1.0
    capsys.readouterr()
    # refusals: one line starting with "error:", exit code 2, nothing evaluated
    for bad in (["--norm", "l2", "--eps", "8/255"], ["--norm", "l2", "--eps", "-0.5"],
                ["--norm", "l2", "--eps", "inf"], ["--norm", "l3"]):
        refused = tmp_path / "refused"
        assert evaluate_main([*base, *bad, "--attacks", "clean", "--out", str(refused)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and "Traceback" not in err, bad
        assert bad[-1] in err  # names what it refused
        assert not (refused / "report.json").exists()
    # --norm linf keeps reading fractions, and its page names L-inf
    assert evaluate_main([*base, "--norm", "linf", "--eps", "8/255", "--attacks", "clean",
                          "--out", str(tmp_path / "linf")]) == 0
    linf_page = (tmp_path / "linf" / "report.md").read_text()
    assert "L-inf eps = 8/255" in linf_page
    assert json.loads((tmp_path / "linf" / "report.json").read_text())["norm"] == "linf"
    capsys.readouterr()


def test_markdown_settings_column_names_the_norm_of_l2_attacks_and_of_autoattack() -> None:
    # Catches: a results table whose settings column leaves the threat model out (the AA
    # row had an empty column), or that writes an L2 step as x/255.
    report = {"n": 10, "norm": "l2", "eps": 0.5, "eps_255": None, "precision": "fp32",
              "seed": 0, "device": "cpu", "seconds": 1.0,
              "results": {"clean": 50.0, "pgd20": 40.0, "aa": 30.0},
              "attacks": {"pgd20": {"implementation": "dat.attacks.pgd(norm='l2')",
                                    "version": "0", "norm": "l2", "steps": 20,
                                    "alpha": 0.125, "loss": "ce"},
                          "aa": {"implementation": "pyautoattack.AutoAttack", "version": "0",
                                 "norm": "L2"}}}
    page = format_markdown(report)
    assert "| pgd20 | 40.00 | - | dat.attacks.pgd(norm='l2') 0 | norm=l2, steps=20, " \
           "alpha=0.125, loss=ce |" in page
    assert "| aa | 30.00 | - | pyautoattack.AutoAttack 0 | norm=L2 |" in page
    assert "/255" not in page
