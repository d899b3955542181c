"""Identities of dat.spectral: round trip, lam = 0 / 1, phase kept, per-sample lam, fp32 FFTs."""

from __future__ import annotations

import math

import pytest
import torch

from dat.spectral import decompose, half_width, mix_amplitude, recombine, spectrum_norm

SIZES = [(32, 32), (31, 33), (7, 5), (8, 1)]


def _unit_phase_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|exp(i a) - exp(i b)|: phase difference that ignores 2*pi wrap-around."""
    return (torch.polar(torch.ones_like(a), a) - torch.polar(torch.ones_like(b), b)).abs()


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_is_identity(size: tuple[int, int]) -> None:
    x = torch.rand(3, 2, *size)
    amp, pha = decompose(x)
    assert amp.shape == pha.shape == (3, 2, size[0], half_width(size[1]))
    assert amp.dtype == pha.dtype == torch.float32
    assert (amp >= 0).all()
    assert (recombine(amp, pha, size=size) - x).abs().max() < 1e-5


def test_round_trip_on_real_images(sample_batch) -> None:
    x, _ = sample_batch
    amp, pha = decompose(x)
    assert (recombine(amp, pha, size=(32, 32)) - x).abs().max() < 1e-5
    # The DC term is the sum of a channel's pixels.
    assert torch.allclose(amp[..., 0, 0], x.sum(dim=(-2, -1)), rtol=1e-5)


@pytest.mark.parametrize("size", SIZES)
def test_lam_zero_returns_x_exactly(size: tuple[int, int]) -> None:
    x = torch.rand(4, 3, *size)
    other = torch.rand(4, 3, size[0], half_width(size[1])) * 50
    assert torch.equal(mix_amplitude(x, other, 0.0), x)
    assert torch.equal(mix_amplitude(x, other, torch.zeros(4), clip=False), x)


def test_lam_one_gives_the_amplitude_with_the_phase_of_x(sample_batch) -> None:
    x, _ = sample_batch
    amp_other, _ = decompose(x.roll(1, dims=0))  # a real image's amplitude: (B, C, 32, 17)
    out = mix_amplitude(x, amp_other, 1.0, clip=False)
    amp_out, pha_out = decompose(out)
    _, pha_x = decompose(x)
    assert torch.allclose(amp_out, amp_other, atol=1e-3, rtol=1e-4)
    strong = amp_other > 1e-2
    assert _unit_phase_error(pha_out, pha_x)[strong].max() < 1e-3


def test_mix_keeps_phase_of_x_where_nothing_clipped(sample_batch) -> None:
    x, _ = sample_batch
    # A random amplitude that is NOT conjugate-symmetric in its redundant columns.
    amp_g = torch.rand(x.shape[0], 3, 32, 17) * 20
    lam = torch.linspace(0.05, 1.0, x.shape[0])
    raw = mix_amplitude(x, amp_g, lam, clip=False)
    clipped = mix_amplitude(x, amp_g, lam)
    assert torch.equal(clipped, raw.clamp(0, 1))
    unclipped = ((raw >= 0) & (raw <= 1)).flatten(1).all(dim=1)  # (B,)
    assert unclipped.any(), "test needs at least one sample that did not clip"
    amp_out, pha_out = decompose(clipped[unclipped])
    _, pha_x = decompose(x[unclipped])
    strong = amp_out > 1e-2
    assert _unit_phase_error(pha_out, pha_x)[strong].max() < 1e-3


def test_mix_is_linear_in_amplitude(sample_batch) -> None:
    x, _ = sample_batch
    amp_x, pha_x = decompose(x)
    amp_g = torch.rand_like(amp_x) * 10
    out = mix_amplitude(x, amp_g, 0.3, clip=False)
    expected = recombine(0.3 * amp_g + 0.7 * amp_x, pha_x, size=(32, 32))
    assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("shape", [(6,), (6, 1, 1, 1)])
def test_per_sample_lam_equals_one_sample_at_a_time(shape: tuple[int, ...]) -> None:
    x = torch.rand(6, 3, 9, 10)
    amp_g = torch.rand(6, 3, 9, 6) * 5
    lam = torch.tensor([0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
    batched = mix_amplitude(x, amp_g, lam.view(shape))
    for i in range(6):
        single = mix_amplitude(x[i : i + 1], amp_g[i : i + 1], float(lam[i]))
        assert torch.allclose(batched[i : i + 1], single, atol=1e-6)
    assert torch.equal(batched[0], x[0])  # lam = 0 is exact per sample too


def test_amplitude_broadcasts_over_the_batch() -> None:
    x = torch.rand(5, 3, 8, 8)
    amp_g = torch.rand(3, 8, 5) * 4  # one amplitude (C, H, W//2+1) for every sample
    out = mix_amplitude(x, amp_g, 0.5)
    expected = mix_amplitude(x, amp_g.expand(5, -1, -1, -1), 0.5)
    assert torch.equal(out, expected)


def test_ffts_stay_float32_under_bf16_autocast(sample_batch) -> None:
    x, _ = sample_batch
    x16 = x.to(torch.bfloat16)
    reference = decompose(x16.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp, pha = decompose(x16)
        back = recombine(amp, pha, size=(32, 32))
        mixed = mix_amplitude(x, amp.roll(1, dims=0), 0.5)
    assert amp.dtype == pha.dtype == back.dtype == mixed.dtype == torch.float32
    assert torch.equal(amp, reference[0]) and torch.equal(pha, reference[1])
    assert (back - x16.float()).abs().max() < 1e-5
    assert torch.allclose(mixed, mix_amplitude(x, amp.roll(1, dims=0), 0.5), atol=1e-6)


def test_bf16_input_gives_bf16_output_computed_in_fp32() -> None:
    x = torch.rand(2, 3, 8, 8)
    out = mix_amplitude(x.bfloat16(), decompose(x.flip(0))[0], 0.5)
    assert out.dtype == torch.bfloat16
    expected = mix_amplitude(x.bfloat16().float(), decompose(x.flip(0))[0], 0.5)
    assert torch.equal(out, expected.bfloat16())


def _one_line_error(fn, *args, match: str, **kwargs) -> None:
    with pytest.raises(ValueError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_shapes_give_clear_errors() -> None:
    x = torch.rand(2, 3, 8, 9)
    amp, pha = decompose(x)
    _one_line_error(decompose, x[0], match=r"\(B, C, H, W\)")
    _one_line_error(recombine, amp, pha[..., :-1], size=(8, 9), match="differ in shape")
    _one_line_error(recombine, amp, pha, size=(8, 12), match="expected")
    _one_line_error(mix_amplitude, x, torch.rand(2, 3, 8, 9), 0.5, match="half spectrum")
    _one_line_error(mix_amplitude, x, amp, torch.rand(3), match="lam of shape")
    _one_line_error(mix_amplitude, x, amp, torch.rand(2, 3), match="lam of shape")


def test_energy_is_preserved_parseval() -> None:
    x = torch.rand(2, 3, 6, 7)
    amp, _ = decompose(x)
    full = torch.fft.fft2(x).abs()  # full spectrum, for Parseval
    assert math.isclose(float((full**2).sum()) / (6 * 7), float((x**2).sum()), rel_tol=1e-5)
    assert torch.allclose(amp, full[..., : half_width(7)], atol=1e-5)


@pytest.mark.parametrize("width", [7, 8])
def test_spectrum_norm_of_a_half_spectrum_is_the_full_spectrum_norm(width) -> None:
    x = torch.rand(2, 3, 6, width)
    amp, _ = decompose(x)
    full = torch.fft.fft2(x).abs().flatten(1).norm(dim=1)  # (B,)
    assert torch.allclose(spectrum_norm(amp, width), full, rtol=1e-5)
    assert not torch.allclose(amp.flatten(1).norm(dim=1), full, rtol=0.05)  # the half alone


def test_recombine_rejects_a_spectrum_of_another_height() -> None:
    amp, pha = decompose(torch.rand(2, 3, 8, 9))  # (2, 3, 8, 5)
    _one_line_error(recombine, amp, pha, size=(9, 9), match=r"expected \(9, 5\)")
    _one_line_error(recombine, amp, pha, size=(7, 9), match=r"expected \(7, 5\)")


@pytest.mark.parametrize("shape", [(2, 1), (2, 1, 1), (1, 2)])
def test_lam_must_be_a_scalar_a_b_vector_or_b111(shape: tuple[int, ...]) -> None:
    x = torch.rand(2, 3, 8, 8)
    amp, _ = decompose(x.flip(0))
    _one_line_error(mix_amplitude, x, amp, torch.full(shape, 0.5), match="lam of shape")


def test_amplitude_larger_than_the_batch_is_refused_with_the_mix_message() -> None:
    x = torch.rand(1, 3, 8, 8)
    amp = torch.rand(2, 3, 8, 5)  # broadcasts with x's (1, 3, 8, 5) spectrum, but to 2 images
    _one_line_error(mix_amplitude, x, amp, 0.5, match="half spectrum")


def test_bf16_amplitude_is_mixed_in_fp32() -> None:
    x = torch.rand(2, 3, 8, 8)
    amp16 = (decompose(x.flip(0))[0] * 3).bfloat16()
    got = mix_amplitude(x, amp16, 0.3, clip=False)
    assert got.dtype == torch.float32
    assert torch.equal(got, mix_amplitude(x, amp16.float(), 0.3, clip=False))
