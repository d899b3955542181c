"""The AAG (shapes, architecture, scales, mean amplitude) and the AmplitudeMix transform."""

from __future__ import annotations

import pytest
import torch
from reference_dat import ref_flip_crop
from torch import nn

import dat
from dat.config import DataConfig, load_config
from dat.data import load_dataset
from dat.generator import AmplitudeGenerator, mean_amplitude
from dat.methods import build_dat
from dat.mixing import AmplitudeMix, flip_crop, partner_index
from dat.spectral import decompose, mix_amplitude


@pytest.fixture(scope="module")
def sample_images():
    return load_dataset(DataConfig(name="cifar10-sample")).train.images  # uint8


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 9, 7), (3, 31, 29)])
def test_generator_output_is_a_nonnegative_half_spectrum(shape):
    torch.manual_seed(0)
    gen = AmplitudeGenerator(10, shape)
    logits = torch.randn(4, 10)
    amp = gen(logits)
    assert amp.shape == (4, shape[0], shape[1], shape[2] // 2 + 1)
    assert (amp >= 0).all() and (amp <= 1).all()  # official: the sigmoid output as is
    assert not torch.equal(amp, gen(logits))  # samples its own noise each call
    z = torch.randn(4, 100)
    assert torch.equal(gen(logits, z=z), gen(logits, z=z))  # given noise: deterministic
    x = torch.rand(4, *shape)
    assert mix_amplitude(x, amp, 0.5).shape == x.shape  # fits the spectral core


def test_generator_architecture_follows_the_published_mlp():
    gen = AmplitudeGenerator(10, (3, 32, 32))
    linears = [m for m in gen.net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (110, 128), (128, 256), (256, 512), (512, 1024), (1024, 3 * 32 * 17)]
    norms = [m for m in gen.net if isinstance(m, nn.BatchNorm1d)]
    assert [m.num_features for m in norms] == [256, 512, 1024]
    assert all(m.eps == 1e-5 for m in norms)  # normal eps, not the published 0.8
    acts = [m for m in gen.net if isinstance(m, nn.LeakyReLU)]
    assert len(acts) == 4 and all(m.negative_slope == 0.2 for m in acts)
    # the published initialisation: Xavier-normal weights (std sqrt(2 / (fan_in + fan_out)))
    # and zero biases; PyTorch's default would give uniform weights and non-zero biases
    for m in linears:
        assert torch.count_nonzero(m.bias) == 0
        xavier = (2 / (m.in_features + m.out_features)) ** 0.5
        assert m.weight.std().item() == pytest.approx(xavier, rel=0.1)
        assert m.weight.abs().max().item() > 3 * xavier  # normal tails, not U(-a, a)


def test_mean_amplitude_batches_and_dtypes(sample_images):
    images = sample_images[:300]
    whole = mean_amplitude(images, batch_size=300)
    assert whole.shape == (3, 32, 17)
    assert torch.allclose(mean_amplitude(images, batch_size=7), whole, rtol=1e-5)
    assert torch.allclose(mean_amplitude(images.float() / 255), whole, rtol=1e-5)
    # the DC term of each channel is the pixel sum, because pixels are non-negative
    dc = (images.double() / 255).sum(dim=(2, 3)).mean(dim=0)
    assert torch.allclose(whole[:, 0, 0].double(), dc, rtol=1e-5)
    assert whole[:, 0, 0].min() > 200  # the scale METHOD.md section 9 warns about


def test_dataset_scale_is_twice_the_mean_amplitude(sample_images):
    mean_amp = mean_amplitude(sample_images)
    torch.manual_seed(0)
    gen = AmplitudeGenerator(10, (3, 32, 32), amplitude_scale="dataset", mean_amp=mean_amp)
    logits, z = torch.randn(8, 10), torch.randn(8, 100)
    amp = gen(logits, z=z)
    assert torch.allclose(amp, gen.unit(logits, z=z) * 2 * mean_amp, rtol=1e-6)
    assert (amp <= 2 * mean_amp).all() and torch.equal(gen.state_dict()["scale"], 2 * mean_amp)
    x = sample_images[:8].float() / 255
    ratio = amp.flatten(1).norm(dim=1) / decompose(x)[0].flatten(1).norm(dim=1)
    assert 0.3 < ratio.mean() < 3  # natural-image scale (official is ~0.02)


def test_generator_errors_name_the_fix():
    with pytest.raises(ValueError, match="mean_amp"):
        AmplitudeGenerator(10, amplitude_scale="dataset")
    with pytest.raises(ValueError, match="official"):
        AmplitudeGenerator(10, amplitude_scale="natural")
    with pytest.raises(ValueError, match=r"\(B, 10\)"):
        AmplitudeGenerator(10)(torch.randn(4, 100))


def test_build_dat_wires_the_generator_and_its_optimiser(sample_images):
    cfg = load_config(overrides=["method.generator.amplitude_scale=dataset"])
    model = dat.models.create("resnet_tiny", dual_bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = build_dat(cfg, model, opt, num_classes=10, image_shape=(3, 32, 32),
                     train_images=sample_images[:200])
    group = step.generator_optimizer.param_groups[0]
    assert isinstance(step.generator_optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 5e-4)
    want = 2 * mean_amplitude(sample_images[:200])
    assert torch.allclose(step.generator.scale, want)
    assert step.beta == 15.0 and step.omega == 2.0 and step.label_smoothing == 0.5
    with pytest.raises(ValueError, match="train_images"):
        build_dat(cfg, model, opt, num_classes=10, image_shape=(3, 32, 32))


def test_flip_crop_matches_a_per_image_loop():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 9, generator=gen)
    flip = torch.tensor([True, False, True, False, True, False])
    offsets = torch.randint(0, 7, (6, 2), generator=gen)
    assert torch.equal(flip_crop(x, flip, offsets, 3), ref_flip_crop(x, flip, offsets, 3))
    still = torch.full((6, 2), 3)
    assert torch.equal(flip_crop(x, torch.zeros(6, dtype=torch.bool), still, 3), x)
    assert torch.equal(flip_crop(x, torch.ones(6, dtype=torch.bool), still, 3), x.flip(-1))


def test_partner_is_always_another_image():
    for seed in range(20):
        idx = partner_index(5, torch.Generator().manual_seed(seed))
        assert sorted(idx.tolist()) == list(range(5)) and (idx != torch.arange(5)).all()


def test_amplitude_mix_keeps_phase_and_labels(sample_images):
    x, y = sample_images[:8].float() / 255, torch.arange(8)
    x_mixed, y_out = AmplitudeMix(mu=1.0, generator=torch.Generator().manual_seed(0))(x, y)
    assert torch.equal(y_out, y) and x_mixed.shape == x.shape
    assert x_mixed.min() >= 0 and x_mixed.max() <= 1 and not torch.equal(x_mixed, x)
    # the same draws, by hand: partner first, then lam
    gen = torch.Generator().manual_seed(0)
    partner = partner_index(8, gen)
    lam = torch.rand(8, generator=gen)
    want = mix_amplitude(x, decompose(x)[0][partner], lam)
    assert torch.allclose(x_mixed, want, atol=1e-6)
    assert torch.equal(AmplitudeMix(mu=0.0)(x), x)  # mu = 0: no mixing at all


def test_amplitude_mix_draws_lam_from_zero_to_mu(sample_images):
    """lam ~ U(0, mu) per sample for any mu, not only the end points 0 and 1."""
    x = sample_images[:8].float() / 255
    got = AmplitudeMix(mu=0.4, generator=torch.Generator().manual_seed(1))(x)
    gen = torch.Generator().manual_seed(1)
    partner = partner_index(8, gen)
    lam = torch.rand(8, generator=gen) * 0.4  # (8,) in [0, 0.4)
    assert torch.allclose(got, mix_amplitude(x, decompose(x)[0][partner], lam), atol=1e-6)


def test_amplitude_mix_says_once_that_a_batch_of_one_is_not_mixed(sample_images):
    x = sample_images[:1].float() / 255
    mix = AmplitudeMix(mu=1.0)
    with pytest.warns(UserWarning, match="batch of one image.*returned unchanged") as said:
        out = mix(x)
        mix(x)
    assert torch.allclose(out, x, atol=1e-6) and len(said) == 1


def test_amplitude_mix_rejects_bad_input():
    with pytest.raises(ValueError, match="float"):
        AmplitudeMix()(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="mu"):
        AmplitudeMix(mu=2.0)
    assert "mu=0.5" in repr(AmplitudeMix(mu=0.5))


def test_mean_amplitude_rejects_an_empty_batch():
    with pytest.raises(ValueError, match="non-empty"):
        mean_amplitude(torch.zeros(0, 3, 8, 8))


def test_generator_does_not_backpropagate_into_the_logits():
    gen = AmplitudeGenerator(10, (3, 8, 8))
    logits = torch.randn(4, 10, requires_grad=True)
    gen(logits).sum().backward()
    assert logits.grad is None  # the AAG's loss must not train the classifier
    assert all(p.grad is not None for p in gen.parameters())


@pytest.mark.parametrize("bad", [(3, 1, 1), (3, 8, 8), (8, 5)])
def test_mean_amplitude_of_another_shape_is_refused(bad):
    gen = AmplitudeGenerator(10, (3, 8, 8))
    with pytest.raises(ValueError, match=r"expected \(3, 8, 5\)"):
        gen.set_mean_amplitude(torch.ones(bad))
    with pytest.raises(ValueError, match=r"\(C, H, W//2\+1\)"):
        AmplitudeGenerator(10, (3, 8, 8), amplitude_scale="dataset", mean_amp=torch.ones(bad))
    assert torch.equal(gen.scale, torch.ones(3, 8, 5))  # unchanged by the refused call


@pytest.mark.parametrize("z_shape", [(4, 50), (3, 100), (4, 100, 1)])
def test_noise_of_a_wrong_shape_is_refused(z_shape):
    gen = AmplitudeGenerator(10, (3, 8, 8))
    with pytest.raises(ValueError, match=r"z must be \(B, 100\)"):
        gen(torch.randn(4, 10), z=torch.randn(z_shape))


def test_generator_image_shape_must_have_three_dims():
    with pytest.raises(ValueError, match="image_shape must be"):
        AmplitudeGenerator(10, (1, 3, 8, 8))


def test_generator_runs_in_fp32_under_bf16_autocast():
    gen = AmplitudeGenerator(10, (3, 8, 8)).eval()
    logits, z = torch.randn(4, 10), torch.randn(4, 100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = gen.unit(logits.bfloat16(), z=z)
    assert got.dtype == torch.float32
    assert torch.allclose(got, gen.unit(logits.bfloat16().float(), z=z), atol=1e-6)


@pytest.mark.parametrize("batch_size", [3, 5])
def test_partner_shift_takes_every_nonzero_value(batch_size):
    shifts = {int(partner_index(batch_size, torch.Generator().manual_seed(seed))[0])
              for seed in range(60)}
    assert shifts == set(range(1, batch_size))


def test_amplitude_mix_default_mu_is_one(sample_images):
    x = sample_images[:8].float() / 255
    default = AmplitudeMix(generator=torch.Generator().manual_seed(2))(x)
    explicit = AmplitudeMix(mu=1.0, generator=torch.Generator().manual_seed(2))(x)
    assert torch.equal(default, explicit)


def test_build_dat_passes_every_method_setting_to_the_step():
    """Each method.* value reaches the DATStep (none left at its default)."""
    cfg = load_config(overrides=[
        "method.attack.eps=0.02", "method.attack.alpha=0.004", "method.attack.steps=3",
        "method.attack.init=uniform", "method.recombined_padding=2", "method.mu=0.5",
        "method.mix=replace", "method.second_attack=false", "method.beta=6",
        "method.omega=1", "method.label_smoothing=0.1", "method.generator_update=reversal",
        "method.awp_gamma=0.01", "method.awp_warmup=3", "method.generator.lr=0.05",
        "method.generator.momentum=0.5", "method.generator.weight_decay=0.001"])
    model = dat.models.create("resnet_tiny", dual_bn=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = build_dat(cfg, model, opt, num_classes=10, image_shape=(3, 32, 32))
    assert (step.eps, step.alpha, step.steps, step.attack_init) == (0.02, 0.004, 3, "uniform")
    assert (step.padding, step.mu, step.mix, step.second_attack) == (2, 0.5, "replace", False)
    assert (step.beta, step.omega, step.label_smoothing) == (6.0, 1.0, 0.1)
    assert step.generator_update == "reversal" and step.awp_warmup == 3
    assert step.awp is not None and step.awp.gamma == 0.01
    group = step.generator_optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.5, 0.001)
    assert step.sample_draws(torch.zeros(400, 3, 4, 4)).offsets.max() == 4  # padding 2
