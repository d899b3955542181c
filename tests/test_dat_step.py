"""DATStep: equals the plain reference, batched == unbatched, the AAG ascends, BN branches
stay apart, every variant runs, state round-trips, and a short run on real data learns."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from reference_dat import reference_dat_step

import dat
from dat.attacks import eaeg, eval_mode, pgd, trades_kl
from dat.config import DataConfig
from dat.data import load_dataset, make_loader
from dat.generator import AmplitudeGenerator, mean_amplitude
from dat.methods.awp import AWP
from dat.methods.dat import DATDraws, DATStep, generator_health
from dat.mixing import flip_crop
from dat.models import bn_branch
from dat.spectral import decompose, mix_amplitude

B = 16  # batch size of the equivalence tests


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions, and fair to the shared CPUs
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def splits():
    return load_dataset(DataConfig(name="cifar10-sample"))


@pytest.fixture(scope="module")
def batch(splits):
    """A class-balanced batch: (x augmented by a flip, y, x_raw)."""
    x, y = splits.train.tensors()
    idx = torch.cat([(y == c).nonzero().flatten()[:2] for c in range(8)])
    x_raw, y = x[idx], y[idx]
    return x_raw.flip(-1).roll(2, dims=-2), y, x_raw


def _sgd(params, lr=0.1):
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)


def _players(seed=0, dtype=torch.float32, **gen_kw):
    torch.manual_seed(seed)
    model = dat.models.create("resnet_tiny", dual_bn=True).to(dtype)
    gen = AmplitudeGenerator(10, (3, 32, 32), **gen_kw).to(dtype)
    return model, gen, _sgd(model.parameters()), _sgd(gen.parameters())


def _clone(model, gen, opt, gopt):
    """Deep copies with the same optimiser state (momentum buffers included)."""
    m2, g2 = copy.deepcopy(model), copy.deepcopy(gen)
    o2, go2 = _sgd(m2.parameters()), _sgd(g2.parameters())
    o2.load_state_dict(copy.deepcopy(opt.state_dict()))  # load_state_dict may alias
    go2.load_state_dict(copy.deepcopy(gopt.state_dict()))
    return m2, g2, o2, go2


def _draws(seed, dtype=torch.float32):
    d = DATDraws.sample(B, (3, 32, 32), generator=torch.Generator().manual_seed(100 + seed))
    d.noise_x, d.noise_xh, d.z = d.noise_x.to(dtype), d.noise_xh.to(dtype), d.z.to(dtype)
    return d


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in
               zip(a.state_dict().values(), b.state_dict().values(), strict=True)
               if p.is_floating_point())


@pytest.mark.parametrize("batched", [True, False])
def test_fast_step_equals_reference_fp32(batch, batched):
    """fp32: each of 3 steps, started from the same state, matches the reference."""
    x, y, x_raw = batch
    model, gen, opt, gopt = _players()
    step = DATStep(model, gen, opt, gopt, batched=batched)
    for i in range(3):
        ref = _clone(model, gen, opt, gopt)
        fast = step(x, y, x_raw, draws=_draws(i))
        slow = reference_dat_step(*ref, x, y, x_raw, _draws(i))
        assert fast["loss"] == pytest.approx(slow["loss"], abs=1e-5)
        assert fast["gen_loss"] == pytest.approx(slow["gen_loss"], abs=1e-5)
        assert _max_diff(model, ref[0]) < 1e-5 and _max_diff(gen, ref[1]) < 1e-5


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("update", ["alternating", "reversal"])
def test_fast_step_equals_reference_over_three_steps(batch, update, batched):
    """3 chained steps agree. In float64: sign(grad) in the attacks turns 1-ulp fp32
    differences (batched vs separate weight-gradient sums) into 2/255 pixel changes, so
    a chained fp32 comparison would test rounding luck rather than the procedure."""
    x, y, x_raw = (t.double() if t.is_floating_point() else t for t in batch)
    model, gen, opt, gopt = _players(dtype=torch.float64)
    ref = _clone(model, gen, opt, gopt)
    step = DATStep(model, gen, opt, gopt, generator_update=update, batched=batched)
    for i in range(3):
        fast = step(x, y, x_raw, draws=_draws(i, torch.float64))
        slow = reference_dat_step(*ref, x, y, x_raw, _draws(i, torch.float64),
                                  generator_update=update)
        assert fast["loss"] == pytest.approx(slow["loss"], abs=1e-5)
        assert fast["gen_loss"] == pytest.approx(slow["gen_loss"], abs=1e-5)
    assert _max_diff(model, ref[0]) < 1e-5 and _max_diff(gen, ref[1]) < 1e-5
    assert _max_diff(model, _players(dtype=torch.float64)[0]) > 1e-3  # it did train


def test_batched_equals_unbatched(batch):
    x, y, x_raw = batch
    runs = []
    for batched in (True, False):
        model, gen, opt, gopt = _players()
        step = DATStep(model, gen, opt, gopt, batched=batched, keep_images=B)
        stats = step(x, y, x_raw, draws=_draws(0))
        runs.append((model, gen, stats, step.last_images()))
    (m1, g1, s1, im1), (m2, g2, s2, im2) = runs
    for key in ("x_adv", "x_hat", "x_hat_adv"):  # attacks are per sample: bit-identical
        assert torch.equal(im1[key], im2[key])
    assert s1 == pytest.approx(s2, abs=1e-5)
    assert _max_diff(m1, m2) < 1e-5 and _max_diff(g1, g2) < 1e-5


def _recombined(step, gen, x_raw, d):
    """x_hat built by hand from the public pieces, with the step's model and draws."""
    with torch.no_grad(), eval_mode(step.model), bn_branch(step.model, "main"):
        logits = step.model(x_raw)
    return flip_crop(mix_amplitude(x_raw, gen(logits, z=d.z), d.lam), d.flip, d.offsets, 3)


def test_generator_step_raises_the_loss(splits, batch):
    """Model frozen (lr 0, BN momentum 0): one AAG step raises L_DAT on the same batch."""
    x, y, x_raw = batch
    model, gen, _, gopt = _players(amplitude_scale="dataset",
                                   mean_amp=mean_amplitude(splits.train.images))
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 0.0
    before = copy.deepcopy(gen.state_dict())
    step = DATStep(model, gen, torch.optim.SGD(model.parameters(), lr=0.0), gopt,
                   keep_images=B)
    d = _draws(0)
    gen_loss = step.run(x, y, x_raw, draws=d)["gen_loss"]
    im = step.last_images()
    after = copy.deepcopy(gen.state_dict())
    losses = []
    for state in (before, after):
        gen.load_state_dict(state)
        x_hat = _recombined(step, gen, x_raw, d)
        losses.append(step.loss(x, im["x_adv"], x_hat, im["x_hat_adv"], y)[0].item())
    assert losses[0] == pytest.approx(gen_loss.item(), abs=1e-5)  # same batch, same loss
    assert losses[1] > losses[0] + 1e-4


def _bn_buffers(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k}


@pytest.mark.parametrize("update", ["reversal", "alternating"])
def test_bn_branches_only_see_their_images(batch, update):
    """main BN stats move only through x and x', aux only through x_hat and x_hat'."""
    x, y, x_raw = batch
    model, gen, opt, gopt = _players()
    by_hand = copy.deepcopy(model).train()
    step = DATStep(model, gen, opt, gopt, generator_update=update, keep_images=B)
    step.run(x, y, x_raw, draws=_draws(0))
    im = step.last_images()
    passes = 2 if update == "alternating" else 1  # alternating: loss again after the step
    with torch.no_grad():
        for p in range(passes):
            if p == 1:  # the second pass runs with the updated weights
                for q, q_new in zip(by_hand.parameters(), model.parameters(), strict=True):
                    q.copy_(q_new)
            with bn_branch(by_hand, "main"):
                by_hand(im["x"]), by_hand(im["x_adv"])
            with bn_branch(by_hand, "aux"):
                by_hand(im["x_hat"]), by_hand(im["x_hat_adv"])
    got, want = _bn_buffers(model), _bn_buffers(by_hand)
    start = _bn_buffers(_players()[0])
    for k in got:
        assert torch.allclose(got[k], want[k], atol=1e-6), k
        if k.endswith("running_var"):
            assert not torch.allclose(got[k], start[k])  # both branches really moved


def test_draws_cover_their_ranges():
    """lam ~ U(0, mu), crop corners in {0, ..., 2 * padding} (both ends), fair flips,
    U(-1, 1) or N(0, 1) attack starts, z ~ N(0, I); DATStep draws with its own settings."""
    gen = torch.Generator().manual_seed(0)
    d = DATDraws.sample(4000, (1, 2, 2), mu=0.4, padding=3, init="uniform", generator=gen)
    assert sorted(d.offsets.unique().tolist()) == list(range(7))
    assert 0.45 < d.flip.float().mean() < 0.55
    assert d.lam.min() >= 0 and 0.39 < d.lam.max() < 0.4
    assert d.lam.mean().item() == pytest.approx(0.2, abs=0.01)
    for noise in (d.noise_x, d.noise_xh):
        assert noise.abs().max() <= 1 and noise.min() < -0.99 and noise.max() > 0.99
        assert abs(noise.mean().item()) < 0.02
    assert d.z.shape == (4000, 100) and d.z.std().item() == pytest.approx(1.0, abs=0.02)
    g = DATDraws.sample(4000, (1, 2, 2), init="gaussian", generator=gen)
    assert g.noise_x.std().item() == pytest.approx(1.0, abs=0.03) and g.noise_x.min() < -3
    model = dat.models.create("resnet_tiny")
    step = DATStep(model, None, _sgd(model.parameters()), split_bn=False, mu=0.25,
                   amplitude_source="random_image", recombined_padding=1, attack_init="uniform")
    torch.manual_seed(0)
    s = step.sample_draws(torch.zeros(1000, 1, 2, 2))
    assert s.lam.max() < 0.25 and sorted(s.offsets.unique().tolist()) == [0, 1, 2]
    assert s.noise_x.abs().max() <= 1 and s.noise_x.min() < -0.99


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("outer", ["dat", "trades", "pgd_at"])
def test_each_attack_has_its_branch_noise_target_and_loss(batch, outer, batched):
    """x' and x_hat' are the outer method's attack (METHOD.md section 3 for DAT; TRADES'
    KL ascent; PGD-AT's CE with the step's smoothing from eps * U(-1, 1)) of x with the
    main BN branch and noise_x, and of x_hat with the auxiliary branch and noise_xh, on the
    model before the step; the KL target of x_hat is its logits in the auxiliary branch.
    The branches are first trained apart so that using the wrong one shows."""
    x, y = batch[0][:8], batch[1][:8]
    model, gen, opt, gopt = _players()
    with torch.no_grad():
        for _ in range(10):  # running statistics: main of x, aux of darker images
            model.train()(x)
            with bn_branch(model, "aux"):
                model(x * 0.5)
    before = copy.deepcopy(model)
    with torch.no_grad(), eval_mode(before):
        main_logits = before(x)
        with bn_branch(before, "aux"):
            assert (before(x) - main_logits).abs().max() > 0.1 * main_logits.abs().max()
    kw = {"dat": {}, "trades": dict(outer="trades", beta=6.0, label_smoothing=0.0),
          "pgd_at": dict(outer="pgd_at", attack_init="uniform", label_smoothing=0.5)}[outer]
    step = DATStep(model, gen, opt, gopt, batched=batched, keep_images=8, **kw)
    d = DATDraws.sample(8, (3, 32, 32), init=step.attack_init,
                        generator=torch.Generator().manual_seed(5))
    step.run(x, y, draws=d)  # x_raw = x: the clean logits double as x's KL target
    im = step.last_images()
    for key, image, noise, branch in (("x_adv", x, d.noise_x, "main"),
                                      ("x_hat_adv", im["x_hat"], d.noise_xh, "aux")):
        common = dict(eps=8 / 255, alpha=2 / 255, steps=5, branch=branch)
        if outer == "pgd_at":
            want = pgd(before, image, y, start=8 / 255 * noise, label_smoothing=0.5, **common)
        elif outer == "trades":
            want = trades_kl(before, image, noise=noise, **common)
        else:
            want = eaeg(before, image, y, beta=15.0, label_smoothing=0.5, noise=noise, **common)
        assert ((im[key] - want).abs() > 1e-6).float().mean() < 1e-3, key


VARIANTS = {
    "full": {},
    "no_js": {"omega": 0.0},
    "no_mix": {"mix": "replace"},
    "no_split_bn": {"split_bn": False},
    "no_aag": {"amplitude_source": "random_image"},
    "baseline": {"recombined_branch": False},
    "single_ae": {"second_attack": False},
    "awp": {"awp_gamma": 0.005},
    "aag_pgd_at": {"outer": "pgd_at", "attack_init": "uniform", "label_smoothing": 0.0},
    "aag_trades": {"outer": "trades", "beta": 6.0, "label_smoothing": 0.0},
    "brightness": {"amplitude_source": "brightness"},
    "reversal": {"generator_update": "reversal"},
    "unbatched_no_split": {"split_bn": False, "batched": False},
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_every_variant_trains(batch, name):
    x, y, x_raw = batch
    kw = VARIANTS[name]
    model, gen, opt, gopt = _players()
    start_model, start_gen = copy.deepcopy(model), copy.deepcopy(gen)
    step = DATStep(model, gen, opt, gopt, keep_images=B, **kw)
    d = _draws(0)
    stats = step(x, y, x_raw, draws=d)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    assert _max_diff(model, start_model) > 0
    uses_gen = kw.get("amplitude_source", "generator") == "generator" and name != "baseline"
    assert (_max_diff(gen, start_gen) > 0) == uses_gen
    assert ("gen_loss" in stats) == uses_gen
    assert ("js" in stats) == (name != "baseline")
    im = step.last_images()
    if name == "baseline":
        assert im is None
        return
    lam = torch.ones(B) if name == "no_mix" else d.lam
    assert stats["lam_mean"] == pytest.approx(lam.mean().item(), abs=1e-6)
    if name == "brightness":
        want = flip_crop((1 - lam.view(-1, 1, 1, 1)) * x_raw, d.flip, d.offsets, 3)
        assert torch.allclose(im["x_hat"], want, atol=1e-6)
    if name == "no_aag":
        amp = decompose(x_raw)[0][d.partner]
        want = flip_crop(mix_amplitude(x_raw, amp, lam), d.flip, d.offsets, 3)
        assert torch.allclose(im["x_hat"], want, atol=1e-6)
        assert not torch.equal(d.partner, torch.arange(B))
    if name == "single_ae":  # x_hat' is A_G mixed into x', not a second attack
        amp = torch.expm1(torch.fft.ifftshift(im["log_amp_g"], dim=-2))
        want = mix_amplitude(im["x_adv"], amp, lam)
        assert torch.allclose(im["x_hat_adv"], want, atol=1e-4)
    else:  # x_hat' stays in the eps-ball around x_hat and in [0, 1]
        assert (im["x_hat_adv"] - im["x_hat"]).abs().max() <= 8 / 255 + 1e-6
    assert im["x_hat_adv"].min() >= 0 and im["x_hat_adv"].max() <= 1


def test_awp_changes_the_update(batch):
    x, y, x_raw = batch
    finals = []
    for gamma in (0.0, 0.005):
        model, gen, opt, gopt = _players()
        DATStep(model, gen, opt, gopt, awp_gamma=gamma)(x, y, x_raw, draws=_draws(0))
        finals.append(model)
    assert _max_diff(*finals) > 1e-6


def test_awp_warmup_switches_on_at_the_epoch(batch):
    model, gen, opt, gopt = _players()
    step = DATStep(model, gen, opt, gopt, awp_gamma=0.005, awp_warmup=2)
    seen = []
    for epoch in range(4):
        step.on_epoch_start(epoch)
        seen.append(step.awp_on)
    assert seen == [False, False, True, True]


def test_state_dict_round_trip(batch):
    x, y, x_raw = batch
    model, gen, opt, gopt = _players()
    step = DATStep(model, gen, opt, gopt)
    step(x, y, x_raw, draws=_draws(0))
    buffer = io.BytesIO()
    torch.save(step.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    _, gen2, _, gopt2 = _players(seed=1)
    step2 = DATStep(model, gen2, opt, gopt2)
    step2.load_state_dict(state)
    assert _max_diff(gen, gen2) == 0
    mom = [gopt2.state[p]["momentum_buffer"] for p in gen2.parameters()]
    assert all(torch.equal(a, gopt.state[p]["momentum_buffer"])
               for a, p in zip(mom, gen.parameters(), strict=True))


def test_last_images_shapes(batch):
    x, y, x_raw = batch
    model, gen, opt, gopt = _players()
    step = DATStep(model, gen, opt, gopt, keep_images=4)
    assert step.last_images() is None
    step(x, y, x_raw)
    im = step.last_images()
    assert set(im) == {"x", "x_hat", "x_adv", "x_hat_adv", "log_amp_x", "log_amp_g",
                       "log_amp_mix"}
    assert im["x_hat"].shape == (4, 3, 32, 32) and im["log_amp_g"].shape == (4, 3, 32, 17)


def test_bf16_autocast_keeps_spectra_fp32(batch):
    x, y, x_raw = batch
    model, gen, opt, gopt = _players()
    step = DATStep(model, gen, opt, gopt, autocast_dtype=torch.bfloat16, keep_images=2,
                   steps=2)
    stats = step.run(x[:8], y[:8], x_raw[:8])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in stats.values())
    assert step.last_images()["x_hat"].dtype == torch.float32


def test_model_without_dual_bn_is_refused_with_the_fix():
    model = dat.models.create("resnet_tiny")
    gen = AmplitudeGenerator(10)
    with pytest.raises(ValueError, match="convert_dual_bn"):
        DATStep(model, gen, _sgd(model.parameters()))
    with pytest.raises(ValueError, match="use one of"):
        DATStep(model, gen, _sgd(model.parameters()), split_bn=False, outer="mart")
    assert isinstance(DATStep(model, None, _sgd(model.parameters()), split_bn=False,
                              amplitude_source="random_image").model, torch.nn.Module)


def _accuracy(model, x, y):
    with eval_mode(model), torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    x_adv = pgd(model, x, y, steps=20)  # PGD-20, eps 8/255, alpha 2/255
    with eval_mode(model), torch.no_grad():
        robust = (model(x_adv).argmax(1) == y).float().mean().item()
    return clean, robust


def test_short_dat_run_learns_on_real_data(splits):
    """120 DAT steps of batch 32 (about one pass over the 4,000-image sample, ~1 CPU
    minute). Label smoothing 0 (no masking of PGD) and lr 0.05 suit this short budget.
    Measured (500 test images): untrained 10.0 / 5.4 %, trained 23.6 / 15.6 % (clean /
    PGD-20)."""
    torch.manual_seed(0)
    model = dat.models.create("resnet_tiny", dual_bn=True)
    gen = AmplitudeGenerator(10, (3, 32, 32))
    step = DATStep(model, gen, _sgd(model.parameters(), lr=0.05), label_smoothing=0.0)
    x_test, y_test = splits.test.tensors()
    x_test, y_test = x_test[::2], y_test[::2]  # 500 images, all classes
    untrained = _accuracy(model, x_test, y_test)
    loader = make_loader(splits.train, DataConfig(name="cifar10-sample", batch_size=32),
                         "cpu", train=True)
    for i, b in enumerate(loader):
        if i == 120:
            break
        stats = step(b.x, b.y, b.x_raw)
        assert all(v == v for v in stats.values())  # no NaN
    clean, robust = _accuracy(model, x_test, y_test)
    assert untrained[0] < 0.13 and untrained[1] < 0.08
    assert clean > 0.19 and robust > 0.12


def test_awp_moves_each_layer_by_gamma_uphill_and_restores(batch):
    x, y, _ = batch
    model = dat.models.create("resnet_tiny").eval()
    awp = AWP(model, gamma=0.01)
    start = [p.detach().clone() for p in model.parameters()]

    def loss_fn(m):
        return torch.nn.functional.cross_entropy(m(x), y)

    clean_loss = loss_fn(model).item()
    with awp.perturbed(loss_fn):
        for p, p0 in zip(model.parameters(), start, strict=True):
            if p.dim() > 1:  # conv / linear weights: ||v_l|| = gamma * ||w_l||
                assert ((p - p0).norm() / p0.norm()).item() == pytest.approx(0.01, rel=1e-4)
            else:  # biases and BN affine parameters stay put
                assert torch.equal(p, p0)
        assert loss_fn(model).item() > clean_loss  # the perturbation goes uphill
    for p, p0 in zip(model.parameters(), start, strict=True):
        assert torch.allclose(p, p0, atol=1e-7)


@pytest.mark.parametrize("batched", [True, False])
def test_compiled_model_gives_the_eager_step(batch, batched):
    """perf.compile: a step through torch.compile matches eager and stays compiled.

    The aot_eager backend runs the same Dynamo capture and AOT autograd graphs that
    inductor compiles, without generating code (seconds instead of a minute on a CPU).
    """
    from torch._dynamo.utils import counters

    from dat.build import compile_model

    torch._dynamo.reset()
    counters.clear()
    x, y, x_raw = batch
    model, gen, opt, gopt = _players()
    ref = _clone(model, gen, opt, gopt)
    compiled = compile_model(model, "default", backend="aot_eager")
    step = DATStep(compiled, gen, opt, gopt, batched=batched, generator_update="reversal")
    eager = DATStep(*ref, batched=batched, generator_update="reversal")
    fast, slow = step(x, y, x_raw, draws=_draws(0)), eager(x, y, x_raw, draws=_draws(0))
    assert fast["loss"] == pytest.approx(slow["loss"], abs=1e-5)
    assert _max_diff(model, ref[0]) < 1e-5 and _max_diff(gen, ref[1]) < 1e-5
    step(x, y, x_raw, draws=_draws(1))  # a second step reuses the graphs
    graphs = counters["stats"]["unique_graphs"]
    assert 0 < graphs <= 8, graphs  # train/eval x branch x grad mode, not one per call
    assert not counters["graph_break"], dict(counters["graph_break"])


@pytest.mark.parametrize("batched", [True, False])
def test_bf16_attack_steps_do_not_recast_the_weights(batch, batched):
    """Under bf16 autocast the forwards that need no weight gradient (clean logits and
    attacks) share one autocast region, so each weight is cast to bf16 once for all of
    them, not once per attack step: four more attack steps add only the casts of their
    inputs, logits and input gradients. On a GPU each cast is a kernel launch."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCasts(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            CountCasts.n += func.overloadpacket.__name__ == "_to_copy"
            return func(*args, **(kwargs or {}))

    x, y, x_raw = batch
    counts = []
    for steps in (2, 6):
        model, gen, opt, gopt = _players()
        step = DATStep(model, gen, opt, gopt, autocast_dtype=torch.bfloat16,
                       batched=batched, steps=steps)
        CountCasts.n = 0
        with CountCasts():
            step.run(x, y, x_raw)
        counts.append(CountCasts.n)
    # per attack step: the input to bf16, the logits to fp32 for each loss term, and the
    # same casts back in the backward, about 7; re-cast weights add 14 more (resnet_tiny)
    attacks = 1 if batched else 2
    assert counts[1] - counts[0] <= 4 * 8 * attacks, counts


def test_fused_split_bn_attack_matches_and_runs_fewer_kernels(batch):
    """The batched attack with fused split BN gives the same step (float64, where rounding
    cannot flip a sign) with 4 fewer operations per BN layer and attack step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            Count.n += not func.is_view and not name.startswith("empty")
            return func(*args, **(kwargs or {}))

    x, y, x_raw = (t.double() if t.is_floating_point() else t for t in batch)
    runs = []
    for fused in (False, True):
        model, gen, opt, gopt = _players(dtype=torch.float64)
        step = DATStep(model, gen, opt, gopt, batched=True, fused_split_bn=fused,
                       keep_images=B)
        Count.n = 0
        with Count():
            stats = step(x, y, x_raw, draws=_draws(0, torch.float64))
        runs.append((model, stats, step.last_images(), Count.n))
    (m1, s1, im1, n1), (m2, s2, im2, n2) = runs
    for key in ("x_adv", "x_hat_adv"):
        assert torch.equal(im1[key], im2[key])
    assert s1 == pytest.approx(s2, abs=1e-10) and _max_diff(m1, m2) < 1e-10
    layers = sum(isinstance(m, dat.models.DualBatchNorm) for m in m1.modules())
    assert n1 - n2 >= 4 * layers * 5 - 20, (n1, n2, layers)


def test_bn_layers_frozen_by_the_user_stay_frozen(batch):
    """A model in train mode with BN layers the user put in eval mode: the step keeps them
    in eval mode (their running statistics do not move) and restores every module's flag,
    as the attacks do. It used to switch them all to train mode and leave them there."""
    x, y, x_raw = batch
    for update, awp in (("alternating", 0.0), ("reversal", 0.01)):
        model, gen, opt, gopt = _players()
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in bns:
            m.eval()
        before = _bn_buffers(model)
        DATStep(model, gen, opt, gopt, generator_update=update, awp_gamma=awp, steps=2)(
            x[:8], y[:8], x_raw[:8])
        assert model.training and not any(m.training for m in bns)
        after = _bn_buffers(model)
        assert all(torch.equal(before[k], after[k]) for k in before)
    model, gen, opt, gopt = _players()
    model.eval()  # a model in eval mode is trained in train mode and handed back in eval mode
    DATStep(model, gen, opt, gopt, steps=2)(x[:8], y[:8], x_raw[:8])
    assert not any(m.training for m in model.modules())


def test_a_generator_optimizer_that_cannot_train_the_aag_is_refused():
    """It used to be accepted: the AAG never learned, and the model's own optimizer passed
    as the AAG's stepped the model twice per batch."""
    model, gen, opt, gopt = _players()
    with pytest.raises(ValueError, match="generator_optimizer is the model's optimizer"):
        DATStep(model, gen, opt, opt)
    other = copy.deepcopy(gen)
    with pytest.raises(ValueError, match="misses 16 of the generator's 16 trainable"):
        DATStep(model, gen, opt, _sgd(other.parameters()))
    both = _sgd(list(model.parameters()) + list(gen.parameters()))
    with pytest.raises(ValueError, match="also holds the generator's parameters"):
        DATStep(model, gen, both)
    assert DATStep(model, gen, opt, gopt).generator_optimizer is gopt
    assert DATStep(model, gen, opt).generator_optimizer is not None


@pytest.mark.parametrize("update", ["alternating", "reversal"])
def test_a_frozen_generator_runs_and_stays_put(batch, update):
    """All AAG parameters frozen: the step runs (alternating used to end in a raw
    'inputs argument to grad() cannot be empty') and the AAG's weights do not move."""
    x, y, x_raw = batch
    model, gen, opt, gopt = _players()
    for p in gen.parameters():
        p.requires_grad_(False)
    start = [p.clone() for p in gen.parameters()]
    stats = DATStep(model, gen, opt, gopt, generator_update=update, steps=2)(
        x[:8], y[:8], x_raw[:8])
    assert "gen_loss" in stats
    assert all(torch.equal(a, b) for a, b in zip(start, gen.parameters(), strict=True))


@pytest.mark.parametrize("shape", [(3, 64, 64), (1, 32, 32)])
def test_a_generator_built_for_other_images_is_refused_before_any_change(batch, shape):
    """A 64x64 generator (the README's (3, 32, 32) example on Tiny-ImageNet, the other way
    round) fails in one line naming the fix; a 1-channel one would silently broadcast one
    amplitude over the three channels. Nothing changes, not even the AAG's BN statistics."""
    x, y, x_raw = batch
    model, _, opt, _ = _players()
    gen = AmplitudeGenerator(10, shape)
    before = copy.deepcopy(gen.state_dict())
    step = DATStep(model, gen, opt)
    with pytest.raises(ValueError, match=r"built for .* images but the batch holds 3x32x32; "
                                         r"build it with .*image_shape=\(3, 32, 32\)"):
        step(x, y, x_raw=x_raw)
    assert all(torch.equal(v, gen.state_dict()[k]) for k, v in before.items())


def test_split_bn_on_a_model_without_batchnorm_names_split_bn_false():
    """convert_dual_bn cannot help a model without BatchNorm (a ViT, a GroupNorm net): the
    message used to suggest it."""
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4),
                                torch.nn.Flatten(), torch.nn.LazyLinear(10))
    model(torch.rand(2, 3, 32, 32))
    gen = AmplitudeGenerator(10, (3, 32, 32))
    with pytest.raises(ValueError, match=r"has none .*pass split_bn=False") as err:
        DATStep(model, gen, _sgd(model.parameters()))
    assert "convert_dual_bn" not in str(err.value)


def test_single_ae_mixes_the_amplitude_into_the_augmented_image_x_adv_comes_from(batch):
    """single AE: x_hat is A_G mixed into the augmented x (not into x_raw), so x_hat and
    x_hat' (A_G mixed into x') show the same crop and flip of the same image."""
    x, y, x_raw = batch
    assert not torch.equal(x, x_raw)  # the batch's x is augmented
    model, gen, opt, gopt = _players()
    step = DATStep(model, gen, opt, gopt, second_attack=False, keep_images=B)
    d = _draws(0)
    step.run(x, y, x_raw, draws=d)
    im = step.last_images()
    amp = torch.expm1(torch.fft.ifftshift(im["log_amp_g"], dim=-2))
    assert torch.allclose(im["x_hat"], mix_amplitude(x, amp, d.lam), atol=1e-4)


def test_the_models_and_generators_modes_on_entry_do_not_change_the_step(batch):
    """A model and an AAG left in eval mode (after an evaluation, a checkpoint load) are
    trained as in train mode, batch statistics included, and get their flags back."""
    x, y, x_raw = batch
    results = []
    for mode in ("train", "eval"):
        model, gen, opt, gopt = _players()
        model.train(mode == "train")
        gen.train(mode == "train")
        stats = DATStep(model, gen, opt, gopt).run(x, y, x_raw, draws=_draws(0))
        results.append((model, gen, stats["loss"].item()))
        assert all(m.training == (mode == "train") for m in model.modules())
    (m_train, g_train, loss_train), (m_eval, g_eval, loss_eval) = results
    assert loss_eval == pytest.approx(loss_train, abs=1e-6)
    assert _max_diff(m_eval, m_train) < 1e-6 and _max_diff(g_eval, g_train) < 1e-6


@pytest.mark.parametrize("update", ["alternating", "reversal"])
def test_without_split_bn_a_dual_bn_model_trains_its_main_branch_only(batch, update):
    """split_bn=False: x_hat and x_hat' go through the main BN set like x and x'; the
    auxiliary set of a dual-BN model sees no image and gets no update."""
    x, y, x_raw = batch
    model, gen, opt, gopt = _players()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    DATStep(model, gen, opt, gopt, split_bn=False, generator_update=update, steps=1)(
        x[:8], y[:8], x_raw[:8])
    after = model.state_dict()
    aux = [k for k in before if ".aux." in k]
    assert aux and all(torch.equal(before[k], after[k]) for k in aux)
    assert not torch.equal(before["layer1.0.bn1.main.running_var"],
                           after["layer1.0.bn1.main.running_var"])


def test_generator_health_spread_is_across_the_batch_not_within_a_sample():
    """gen_batch_std: 0 when every sample gets the same (non-flat) amplitude, large when
    samples differ even if each is flat."""
    same = torch.rand(1, 3, 4, 3).expand(8, -1, -1, -1)
    flat_but_different = torch.linspace(0.1, 0.9, 8).view(8, 1, 1, 1).expand(-1, 3, 4, 3)
    assert generator_health(same)["gen_batch_std"] < 1e-6
    assert generator_health(flat_but_different)["gen_batch_std"] > 0.1
    assert generator_health(torch.full((4, 3, 4, 3), 0.995))["gen_saturated"] == 1.0
