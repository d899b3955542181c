"""Plain reference of one DAT training step: the published per-batch procedure, unfused.

Written to be checked line by line against METHOD.md sections 1-4, independently of
dat.spectral, dat.attacks and DATStep: the KL target recomputed at every attack step (as
published), the two attacks run one after the other, four separate forward passes for
the loss, and the alternating generator update (model step, then the loss recomputed
with the updated model and x_hat attached to the AAG). It takes the same injected draws
(dat.methods.dat.DATDraws) as the fast DATStep, so it is the oracle for correctness
tests and the baseline for the speed benchmark (no pytest imports here).

It shares only the loss primitives (dat.losses.kl_divergence / js_divergence, checked
against hand-worked numbers in tests/test_dat_formulas.py) and their fp32 heads: the
attacks step by sign(grad), which turns a 1-ulp difference in a loss into a 2/255 pixel
change, so an oracle that rounds differently could never match to 1e-5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dat.losses import js_divergence, kl_divergence
from dat.models import bn_branch

__all__ = ["ref_attack", "ref_dat_loss", "ref_flip_crop", "ref_recombine",
           "reference_dat_step"]


def ref_attack(model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, branch: str, *,
               beta: float, label_smoothing: float, eps: float, alpha: float, steps: int,
               init_std: float) -> Tensor:
    """EAEG as published: Gaussian start, K signed steps on CE + beta * KL, eval mode."""
    model.eval()
    with bn_branch(model, branch):
        x_adv = (x + init_std * noise).clamp(0, 1)
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            with torch.no_grad():
                target = model(x)  # recomputed every step (the published code does)
            out = model(x_adv)
            ce = F.cross_entropy(out.float(), y, label_smoothing=label_smoothing,
                                 reduction="sum")
            loss = ce + beta * kl_divergence(target, out, reduction="sum")
            (grad,) = torch.autograd.grad(loss, x_adv)
            x_adv = x_adv.detach() + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)
    model.train()
    return x_adv.detach()


def ref_recombine(x: Tensor, amp_g: Tensor, lam: Tensor) -> Tensor:
    """x_hat = clip(IDFT(lam * A_G + (1 - lam) * A(x), P(x)), 0, 1) on half spectra.

    The spectral arithmetic is float32, as METHOD.md prescribes for every FFT.
    """
    spectrum = torch.fft.rfft2(x.float())
    amp, pha = spectrum.abs(), spectrum.angle()
    lam = lam.float().view(-1, 1, 1, 1)
    mixed = lam * amp_g.float() + (1 - lam) * amp
    out = torch.fft.irfft2(mixed * torch.exp(1j * pha), s=x.shape[-2:])
    return out.clamp(0, 1).to(x.dtype)


def ref_flip_crop(x: Tensor, flip: Tensor, offsets: Tensor, padding: int) -> Tensor:
    """Per image: flip if drawn, zero-pad, cut the (H, W) window at the drawn corner."""
    h, w = x.shape[-2:]
    out = []
    for i in range(len(x)):
        img = x[i].flip(-1) if bool(flip[i]) else x[i]
        img = F.pad(img, (padding, padding, padding, padding))
        dy, dx = int(offsets[i, 0]), int(offsets[i, 1])
        out.append(img[:, dy:dy + h, dx:dx + w])
    return torch.stack(out)


def ref_dat_loss(model: nn.Module, x: Tensor, x_adv: Tensor, xh: Tensor, xh_adv: Tensor,
                 y: Tensor, *, beta: float, omega: float, label_smoothing: float) -> Tensor:
    """L_DAT = (L_AT(x) + L_AT(x_hat)) / 2 + omega * JS(f(x), f(x_hat)), train mode."""
    model.train()
    with bn_branch(model, "main"):
        fx, fxa = model(x), model(x_adv)
    with bn_branch(model, "aux"):
        fxh, fxha = model(xh), model(xh_adv)
    ls = label_smoothing
    l_x = F.cross_entropy(fx.float(), y, label_smoothing=ls) + beta * kl_divergence(fx, fxa)
    l_xh = F.cross_entropy(fxh.float(), y, label_smoothing=ls) + beta * kl_divergence(fxh, fxha)
    return (l_x + l_xh) / 2 + omega * js_divergence(fx, fxh)


def reference_dat_step(model, generator, optimizer, generator_optimizer, x, y, x_raw, draws, *,
                       beta=15.0, omega=2.0, label_smoothing=0.5, eps=8 / 255, alpha=2 / 255,
                       steps=5, init_std=0.001, padding=3, generator_update="alternating"):
    """One DAT step in the published order; returns {"loss", "gen_loss"} as floats."""
    hp = dict(beta=beta, label_smoothing=label_smoothing)
    atk = dict(eps=eps, alpha=alpha, steps=steps, init_std=init_std, **hp)
    # (1) attack the clean (augmented) image with the main BN branch
    x_adv = ref_attack(model, x, y, draws.noise_x, "main", **atk)
    # (2) generate A_G from logits on the un-augmented image, recombine, flip + crop
    model.eval()
    with torch.no_grad(), bn_branch(model, "main"):
        logits = model(x_raw)
    model.train()
    amp_g = generator(logits, z=draws.z)
    xh = ref_flip_crop(ref_recombine(x_raw, amp_g, draws.lam), draws.flip, draws.offsets,
                       padding)
    # (3) attack the recombined image with the auxiliary BN branch
    xh_adv = ref_attack(model, xh.detach(), y, draws.noise_xh, "aux", **atk)
    if generator_update == "reversal":  # both players from one loss on the current model
        loss = ref_dat_loss(model, x, x_adv, xh, xh_adv, y, omega=omega, **hp)
        optimizer.zero_grad()
        generator_optimizer.zero_grad()
        params, gparams = list(model.parameters()), list(generator.parameters())
        grads = torch.autograd.grad(loss, params + gparams)
        for p, g in zip(params, grads[:len(params)], strict=True):
            p.grad = g  # the model descends L_DAT
        for p, g in zip(gparams, grads[len(params):], strict=True):
            p.grad = -g  # the AAG ascends it
        optimizer.step()
        generator_optimizer.step()
        return {"loss": loss.item(), "gen_loss": loss.item()}
    # (4) model step on L_DAT with x_hat detached
    loss = ref_dat_loss(model, x, x_adv, xh.detach(), xh_adv, y, omega=omega, **hp)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    # (5) L_DAT again with the UPDATED model, x_hat attached; the AAG ascends it
    gen_loss = ref_dat_loss(model, x, x_adv, xh, xh_adv, y, omega=omega, **hp)
    generator_optimizer.zero_grad()
    (-gen_loss).backward()
    generator_optimizer.step()
    return {"loss": loss.item(), "gen_loss": gen_loss.item()}
