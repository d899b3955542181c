"""Frequency diagnostics: spectrum swaps keep what they should, the amplitude/phase table
is consistent, the Fourier heat map is symmetric and reduces to clean error at norm 0."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dat.evaluation import (
    EvaluationError,
    amplitude_phase_table,
    evaluate,
    fourier_heatmap,
    swap_spectra,
)
from dat.evaluation.diagnostics import fourier_basis
from dat.spectral import decompose


class _Constant(nn.Module):
    """Predicts class 0 for every input (logits depend on x only through a zero weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor) -> Tensor:
        logits = torch.zeros(len(x), 10, device=x.device)
        logits[:, 0] = 1.0
        return logits + self.w * x.flatten(1).sum(1, keepdim=True)


def test_swap_keeps_adversarial_amplitude_and_clean_phase(sample_batch) -> None:
    x, _ = sample_batch
    x = 0.25 + 0.5 * x  # mid-range images: the swaps stay inside [0, 1], no clipping
    delta = 4 / 255 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).sign()
    x_adv = x + delta
    x_amp, x_pha = swap_spectra(x, x_adv)
    assert float(x_amp.min()) > 0 and float(x_amp.max()) < 1
    (amp, pha), (amp_adv, pha_adv) = decompose(x), decompose(x_adv)
    (a1, p1), (a2, p2) = decompose(x_amp), decompose(x_pha)
    torch.testing.assert_close(a1, amp_adv, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a2, amp, atol=1e-4, rtol=1e-4)
    strong = (amp > 1.0) & (amp_adv > 1.0)  # phase is well defined where amplitude is not tiny
    ones = torch.ones_like(pha)[strong]
    torch.testing.assert_close(torch.cos(p1 - pha)[strong], ones, atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.cos(p2 - pha_adv)[strong], ones, atol=1e-3, rtol=0)
    assert torch.equal(swap_spectra(x, x)[0].sub(x).abs().lt(1e-5), torch.ones_like(x).bool())


def test_amplitude_phase_table_is_consistent(make_warm_model, sample_batch) -> None:
    model = make_warm_model().eval()
    x, y = sample_batch
    table = amplitude_phase_table(model, x, y, attack="pgd20", progress=False)
    clean = evaluate(model, (x, y), attacks=["clean"], progress=False, checks=False)
    assert table["clean"] == clean["results"]["clean"]
    for key in ("adversarial", "adversarial_amplitude", "adversarial_phase"):
        assert 0.0 <= table[key] <= 100.0
    at_zero = amplitude_phase_table(model, x, y, attack="pgd20", eps=0.0, progress=False)
    assert at_zero["adversarial"] == at_zero["clean"]
    with pytest.raises(ValueError, match="per-batch attack"):
        amplitude_phase_table(model, x, y, attack="aa")


def test_fourier_basis_is_real_unit_and_symmetric() -> None:
    u, v = torch.tensor([0, 3, 5, 4]), torch.tensor([0, 2, 1, 4])
    basis = fourier_basis(u, v, 8, 8)  # (4, 8, 8)
    torch.testing.assert_close(basis.flatten(1).norm(dim=1), torch.ones(4))
    torch.testing.assert_close(fourier_basis((-u) % 8, (-v) % 8, 8, 8), basis)
    spectrum = torch.fft.fft2(basis[1].double()).abs()
    assert spectrum[3, 2] > 1 and spectrum[5, 6] > 1  # energy only at (u, v) and (-u, -v)
    assert float(spectrum.sum() - spectrum[3, 2] - spectrum[5, 6]) < 1e-6


def test_heatmap_shape_symmetry_and_norm_zero(make_warm_model, sample_batch) -> None:
    model = make_warm_model().eval()
    x, y = sample_batch
    x = F.avg_pool2d(x, 4)  # 8x8 images keep the map small (8 x 8 cells)
    err = fourier_heatmap(model, x, y, norm=2.0, progress=False)
    assert err.shape == (8, 8) and float(err.min()) >= 0 and float(err.max()) <= 100
    mirror = torch.arange(8).neg().remainder(8)  # cell i holds frequency i - 4
    assert torch.equal(err, err[mirror][:, mirror])
    clean_error = 100.0 * float((model(x).argmax(1) != y).float().mean())
    at_zero = fourier_heatmap(model, x, y, norm=0.0, progress=False)
    torch.testing.assert_close(at_zero, torch.full((8, 8), clean_error))
    constant = fourier_heatmap(_Constant(), x, y, norm=4.0, progress=False)
    torch.testing.assert_close(constant, torch.full((8, 8), 100.0 * float((y != 0).float().mean())))


def test_evaluate_writes_diagnostics(make_warm_model, sample_batch, tmp_path) -> None:
    x, y = sample_batch
    x = F.avg_pool2d(x, 4)
    report = evaluate(make_warm_model().eval(), (x, y), attacks=["clean", "fgsm"],
                      diagnostics="fgsm", heatmap=True, progress=False, checks=False,
                      out_dir=tmp_path)
    assert report["amplitude_phase"]["attack"] == "fgsm"
    assert len(report["fourier_heatmap"]["error_rate"]) == 8
    for name in ("amplitude_phase.png", "fourier_heatmap.png", "report.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert "x'_pha" in (tmp_path / "report.md").read_text()


def test_heatmap_cells_sit_on_their_frequencies_for_odd_sizes_too() -> None:
    from dat.evaluation.report import heatmap_extent

    assert heatmap_extent(32, 32) == (-16.5, 15.5, 15.5, -16.5)  # -16 .. 15
    assert heatmap_extent(5, 5) == (-2.5, 2.5, 2.5, -2.5)  # -2 .. 2 (was -3.5 .. 2.5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(diagnostics="aa"), "diagnostics need a per-batch attack"),
    (dict(diagnostics="pgd2O"), "unknown attack 'pgd2O'"),
    (dict(heatmap=True, heatmap_norm=float("nan")), "heatmap_norm=nan must be a finite"),
])
def test_bad_diagnostics_are_refused_before_any_attack(make_tiny_model, sample_batch,
                                                       monkeypatch, kwargs, match) -> None:
    import dat.evaluation.runner as runner

    def no_attack(*args, **kw):
        raise AssertionError("an attack ran before the refusal")

    monkeypatch.setattr(runner, "attack_points", no_attack)
    with pytest.raises(EvaluationError, match=match):
        evaluate(make_tiny_model(), sample_batch, attacks=["clean", "pgd20"],
                 progress=False, **kwargs)
