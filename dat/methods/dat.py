"""DAT (Li et al., NeurIPS 2024): adversarial training with generative amplitude mix-up.

One :class:`DATStep` call does the whole per-batch procedure of docs/method.md, section 2:
attack x (main BN) -> the AAG's amplitude mixed into the un-augmented image, then flip +
crop -> attack x_hat (auxiliary BN) -> model step on
``L_DAT = (L_AT(x) + L_AT(x_hat)) / 2 + omega * JS(f(x), f(x_hat))`` -> AAG step that
MAXIMISES L_DAT. Every variant of docs/method.md, section 11 is a constructor switch, and all
random draws can be injected (:class:`DATDraws`) so the fused path can be checked
against the plain reference in tests/reference_dat.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..attacks import (
    as_class_indices,
    check_compile_mode,
    check_radius,
    eaeg,
    eval_logits,
    explain_dtype_mismatch,
    is_compiled,
    pgd,
)
from ..losses import js_divergence, trades_loss
from ..mixing import flip_crop
from ..models.dual_bn import bn_branch, fused_split, has_dual_bn
from ..spectral import decompose, mix_amplitude, spectrum_norm
from .awp import AWP, check_awp_gamma
from .base import MethodStep, check_generator_optimizer, check_optimizer, train_mode
from .dat_parts import DATDraws, _GradReverse, generator_health

__all__ = ["DATDraws", "DATStep", "generator_health"]

_CHOICES = {
    "outer": ("dat", "pgd_at", "trades"), "mix": ("mix", "replace"),
    "amplitude_source": ("generator", "random_image", "brightness"),
    "generator_update": ("alternating", "reversal"), "attack_init": ("gaussian", "uniform"),
}


def _check_choices(**values: str) -> None:
    for key, value in values.items():
        if value not in _CHOICES[key]:
            raise ValueError(f"DATStep({key}={value!r}): use one of {_CHOICES[key]}")


@dataclass
class _Views:
    """The four images of a step; ``xh`` stays attached to the AAG's graph."""

    x: Tensor  # (B, C, H, W) augmented clean image
    x_adv: Tensor  # its adversarial example x'
    xh: Tensor | None = None  # recombined image x_hat (None: baseline)
    xh_adv: Tensor | None = None  # its adversarial example x_hat'


class DATStep(MethodStep):
    """One DAT training step: ``stats = step(x, y, x_raw)`` (see the module docstring).

    Args (keyword-only after the optimisers; defaults = full DAT as published):
        model: classifier on [0, 1] images; with ``split_bn`` it must have dual BN
            (:func:`dat.models.convert_dual_bn`).
        generator: the AAG (None when ``amplitude_source`` is not ``generator``).
        optimizer: the model's optimiser. generator_optimizer: the AAG's (None: SGD lr
            0.1, momentum 0.9, weight decay 5e-4, as published).
        beta (15), omega (2), label_smoothing (0.5, published): loss weights.
        eps (8/255), alpha (2/255), steps (5), attack_init, init_std: the inner attacks.
        mu (1): lam ~ U(0, mu). mix: ``mix`` | ``replace`` (lam = 1).
        amplitude_source: ``generator`` | ``random_image`` | ``brightness`` ((1-lam) x).
        split_bn, second_attack, recombined_branch, outer (``dat`` | ``pgd_at`` |
            ``trades``), recombined_padding (3): variants of docs/method.md, section 11.
        generator_update: ``alternating`` (published) | ``reversal`` (one backward).
        awp_gamma, awp_warmup (epochs): adversarial weight perturbation (0 = off).
        batched: attack x and x_hat as one 2B batch with split BN, and run the loss's
            four forwards as one 4B batch (None: on for CUDA inputs, where it saves
            launches; off on CPU, where it costs time).
        fused_split_bn: in the batched attack, run each split BN as one fused affine map
            (:func:`dat.models.fused_split`; equal up to float rounding, 4 operations fewer
            per BN layer and attack step). Off by default: an H100 ran it slower.
        autocast_dtype: e.g. ``torch.bfloat16`` for model forwards (FFTs stay fp32).
        compile_attacks: ``off`` | ``default`` | ``reduce-overhead`` | ``max-autotune``:
            run each attack step as one compiled graph (:func:`dat.attacks.compiled_step`;
            with ``reduce-overhead``, one CUDA graph). Off by default: timed on an H100
            (with the model compiled too, 3x the eager step), but no full run has used it
            on a GPU yet.
        keep_images: keep this many samples' images for :meth:`last_images` (0 = off).
    """

    images_only = True  # the amplitude mix-up is a 2-D FFT

    def __init__(
        self, model: nn.Module, generator: nn.Module | None, optimizer: torch.optim.Optimizer,
        generator_optimizer: torch.optim.Optimizer | None = None, *, beta: float = 15.0,
        omega: float = 2.0, label_smoothing: float = 0.5, eps: float = 8 / 255,
        alpha: float = 2 / 255, steps: int = 5, attack_init: str = "gaussian",
        init_std: float = 0.001, mu: float = 1.0, mix: str = "mix",
        amplitude_source: str = "generator", split_bn: bool = True, second_attack: bool = True,
        recombined_branch: bool = True, outer: str = "dat", recombined_padding: int = 3,
        generator_update: str = "alternating", awp_gamma: float = 0.0, awp_warmup: int = 0,
        batched: bool | None = None, autocast_dtype: torch.dtype | None = None,
        keep_images: int = 0, fused_split_bn: bool = False, compile_attacks: str = "off",
    ) -> None:
        _check_choices(outer=outer, mix=mix, amplitude_source=amplitude_source,
                       generator_update=generator_update, attack_init=attack_init)
        check_compile_mode(compile_attacks)
        check_radius(eps, alpha, steps)
        if not 0 <= mu <= 1:
            raise ValueError(f"mu={mu} must be in [0, 1] (lam ~ U(0, mu))")
        check_awp_gamma(awp_gamma)
        if awp_warmup < 0:
            raise ValueError(f"awp_warmup={awp_warmup} must be >= 0 (epochs before AWP starts)")
        check_optimizer(model, optimizer, "DATStep")
        self.model, self.optimizer = model, optimizer
        self.beta, self.omega, self.label_smoothing = beta, omega, label_smoothing
        self.eps, self.alpha, self.steps = eps, alpha, steps
        self.attack_init, self.init_std, self.mu, self.mix = attack_init, init_std, mu, mix
        self.source, self.split_bn, self.outer = amplitude_source, split_bn, outer
        self.second_attack, self.recombined = second_attack, recombined_branch
        self.padding, self.generator_update = recombined_padding, generator_update
        self.batched, self.autocast_dtype, self.keep_images = batched, autocast_dtype, keep_images
        self.fused_split_bn, self.compile_attacks = fused_split_bn, compile_attacks
        self._batch_now = bool(batched)  # batched as resolved for the current step
        self.uses_generator = recombined_branch and amplitude_source == "generator"
        self.generator = generator if self.uses_generator else None
        self.generator_optimizer = self._generator_optimizer(generator_optimizer)
        self.awp = AWP(model, awp_gamma) if awp_gamma > 0 else None
        self.awp_warmup, self.awp_on = awp_warmup, awp_gamma > 0 and awp_warmup <= 0
        self.xh_branch = "aux" if split_bn else "main"
        if self.uses_generator and outer == "pgd_at" and omega <= 0:
            raise ValueError("outer='pgd_at' reaches the AAG only through omega * JS; set "
                             "omega > 0 or amplitude_source='random_image'")
        self._images: dict[str, Tensor] | None = None
        self._check_model()

    def _generator_optimizer(self, opt: torch.optim.Optimizer | None):
        if not self.uses_generator:
            return None
        if self.generator is None:
            raise ValueError("amplitude_source='generator' needs an AmplitudeGenerator; pass one "
                             "or use amplitude_source='random_image'")
        if opt is None:
            opt = torch.optim.SGD(self.generator.parameters(), lr=0.1, momentum=0.9,
                                  weight_decay=5e-4)
        check_generator_optimizer(self.generator, opt, self.optimizer)
        return opt

    def _check_model(self) -> None:
        if self.split_bn and self.recombined and not has_dual_bn(self.model):
            if not any(isinstance(m, _BatchNorm) for m in self.model.modules()):
                raise ValueError(f"split_bn=True needs BatchNorm layers, and this "
                                 f"{type(self.model).__name__} has none (LayerNorm, GroupNorm, "
                                 "...); pass split_bn=False (method.split_bn=false)")
            raise ValueError("split_bn=True needs a model with two BN branches: wrap it with "
                             "dat.models.convert_dual_bn(model) or pass split_bn=False")
        if self.split_bn and self.recombined and any(
                getattr(m, "grad_checkpointing", False) is True for m in self.model.modules()):
            # torch.utils.checkpoint recomputes the forward during backward, after the
            # loss's bn_branch(...) blocks have ended: x_hat's layers would be recomputed
            # with the main BN branch, giving wrong gradients (or a CheckpointError batched)
            raise ValueError("DATStep with split BN cannot train a model with gradient "
                             "checkpointing on (the backward recomputes the layers with the "
                             "wrong BN branch); call model.set_grad_checkpointing(False) "
                             "(timm) or pass split_bn=False")

    def check_first_batch(self, *images: Tensor | None, labels: Tensor | None = None) -> None:
        if not getattr(self, "_range_checked", False):
            self._check_model()  # checkpointing may have been switched on after __init__
        super().check_first_batch(*images, labels=labels)

    # ----- public API -------------------------------------------------------------------
    def sample_draws(self, x: Tensor) -> DATDraws:
        """Fresh :class:`DATDraws` for the batch ``x`` (B, C, H, W), on its device."""
        noise_dim = getattr(self.generator, "noise_dim", 100)
        return DATDraws.sample(len(x), tuple(x.shape[1:]), noise_dim=noise_dim, mu=self.mu,
                               padding=self.padding, init=self.attack_init, device=x.device)

    def run(self, x: Tensor, y: Tensor, x_raw: Tensor | None = None,
            draws: DATDraws | None = None) -> dict[str, Tensor]:
        """One step on a batch; ``x_raw`` is the un-augmented batch (default ``x``).

        ``draws`` injects every random draw (:class:`DATDraws`); sampled when None.
        """
        raw_is_x = x_raw is None
        x_raw = x if x_raw is None else x_raw
        if x.shape != x_raw.shape or x.dim() != 4 or y.dim() != 1 or len(y) != len(x):
            raise ValueError(f"DATStep expects x, x_raw (B, C, H, W) and y (B,); got "
                             f"{tuple(x.shape)}, {tuple(x_raw.shape)}, {tuple(y.shape)}")
        if not (x.is_floating_point() and x_raw.is_floating_point()) or y.is_floating_point():
            raise ValueError(f"DATStep expects float images in [0, 1] and integer labels; got "
                             f"{x.dtype} / {y.dtype}: convert uint8 images with x.float() / 255 "
                             "and labels with y.long()")
        shape = getattr(self.generator, "image_shape", None) if self.uses_generator else None
        if shape is not None and tuple(shape) != tuple(x.shape[1:]):
            c, h, w = x.shape[1:]
            raise ValueError(f"the AmplitudeGenerator was built for {'x'.join(map(str, shape))} "
                             f"images but the batch holds {c}x{h}x{w}; build it with "
                             f"AmplitudeGenerator(num_classes, image_shape=({c}, {h}, {w}))")
        if self.uses_generator and len(x) < 2:
            raise ValueError("DATStep with the AAG needs batches of at least 2 images (the "
                             "generator's BatchNorm1d); drop or merge a last batch of 1")
        draws = self.sample_draws(x) if draws is None else draws
        self._batch_now = x.device.type == "cuda" if self.batched is None else self.batched
        if self.generator is not None:
            self.generator.train()
        # train mode, keeping sub-modules the user froze in eval mode; flags restored after
        with train_mode(self.model):
            # One autocast region for the forwards that need no weight gradient (clean
            # logits, attacks): autocast casts each weight to bf16 once for all of them.
            with explain_dtype_mismatch(self.model, x, "DATStep"):
                with self._amp():
                    views, stats = self._views(x.detach(), y, x_raw.detach(), draws, raw_is_x)
                stats.update(self._update(views, y))
        return {k: v.detach() for k, v in stats.items()}

    def __call__(self, x: Tensor, y: Tensor, x_raw: Tensor | None = None,
                 draws: DATDraws | None = None) -> dict[str, float]:
        y = as_class_indices(y)
        return self._checked_floats(lambda: self.run(x, y, x_raw, draws), y, x, x_raw)

    def loss(self, x: Tensor, x_adv: Tensor, x_hat: Tensor | None, x_hat_adv: Tensor | None,
             y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """L_DAT of the model in its current mode on given images, and its parts.

        ``x_hat=None`` gives the baseline's L_AT(x). Gradients flow to the model and to
        whatever ``x_hat`` is attached to; nothing is updated.
        """
        return self._loss(self.model, _Views(x, x_adv, x_hat, x_hat_adv), x_hat, y)

    def last_images(self) -> dict[str, Tensor] | None:
        """Images of the last step for grids (``keep_images`` samples), or None if off.

        Keys: x, x_hat, x_adv, x_hat_adv (B, C, H, W) in [0, 1]; log_amp_x, log_amp_g,
        log_amp_mix: log(1 + amplitude), half spectra with the zero frequency row centred.
        """
        return self._images

    def on_epoch_start(self, epoch: int) -> None:
        self.awp_on = self.awp is not None and epoch >= self.awp_warmup

    def state_dict(self) -> dict[str, Any]:
        if self.generator is None:
            return {}
        return {"generator": self.generator.state_dict(),
                "generator_optimizer": self.generator_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.generator is None:
            return super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])

    # ----- the procedure ----------------------------------------------------------------
    def _amp(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next(self.model.parameters()).device.type
        return torch.autocast(device_type=device, dtype=self.autocast_dtype)

    def _eval_logits(self, x: Tensor, branch: str) -> Tensor:
        # as an attack step, where an attack on x in that branch follows (a compiled model
        # then reuses that attack's graph): two separate attacks, through the model's graph
        as_attack = not self._batch_now and self.compile_attacks == "off"
        with self._amp():
            return eval_logits(self.model, x, branch, as_attack=as_attack)

    def _attack(self, x: Tensor, y: Tensor, noise: Tensor, branch: str,
                target: Tensor | None = None) -> Tensor:
        """The inner maximisation of ``outer`` (losses summed per sample, so batchable)."""
        std = self.init_std if self.attack_init == "gaussian" else self.eps
        common = dict(eps=self.eps, alpha=self.alpha, steps=self.steps, branch=branch,
                      compile_mode=self.compile_attacks, check_range=False)  # checked once
        with self._amp():
            if self.outer == "pgd_at":
                return pgd(self.model, x, y, loss="ce", label_smoothing=self.label_smoothing,
                           start=std * noise, **common)
            if self.outer == "trades":
                return eaeg(self.model, x, None, beta=1.0, init_std=std, noise=noise,
                            target_logits=target, **common)
            return eaeg(self.model, x, y, beta=self.beta, label_smoothing=self.label_smoothing,
                        init_std=std, noise=noise, target_logits=target, **common)

    def _attack_pair(self, x, xh, y, d: DATDraws, target_x: Tensor | None):
        """(x', x_hat'): two attacks, or one 2B attack with per-half BN when batched."""
        if not self._batch_now:
            return (self._attack(x, y, d.noise_x, "main", target_x),
                    self._attack(xh, y, d.noise_xh, self.xh_branch))
        target = None
        if target_x is not None and self.outer != "pgd_at":
            target = torch.cat([target_x, self._eval_logits(xh, self.xh_branch)])
        branch = "split" if self.split_bn else "main"
        fuse = (self.fused_split_bn and self.split_bn and self.compile_attacks == "off"
                and not is_compiled(self.model))  # a compiler fuses the affine maps itself
        with fused_split(self.model, enabled=fuse):
            adv = self._attack(torch.cat([x, xh]), torch.cat([y, y]),
                               torch.cat([d.noise_x, d.noise_xh]), branch, target)
        return adv.chunk(2)

    def _amplitude(self, x_raw: Tensor, amp_x: Tensor, d: DATDraws, logits: Tensor | None):
        """The amplitude mixed in: A_G, another image's A(x), or zero (brightness)."""
        if self.source == "generator":
            return self.generator(logits, z=d.z)  # (B, C, H, W//2+1)
        if self.source == "random_image":
            return amp_x[d.partner]
        return torch.zeros_like(amp_x)

    def _views(self, x, y, x_raw, d: DATDraws, raw_is_x: bool):
        need_logits = self.uses_generator or (raw_is_x and self.outer != "pgd_at")
        logits = self._eval_logits(x_raw, "main") if need_logits else None  # (B, classes)
        target_x = logits if raw_is_x else None  # the KL target of x, reused when x_raw is x
        if not self.recombined:
            return _Views(x, self._attack(x, y, d.noise_x, "main", target_x)), {}
        lam = torch.ones_like(d.lam) if self.mix == "replace" else d.lam  # (B,)
        amp_x, _ = decompose(x_raw)  # (B, C, H, W//2+1)
        amp = self._amplitude(x_raw, amp_x, d, logits)
        if self.second_attack:
            xh = flip_crop(self._mix(x_raw, amp, lam), d.flip, d.offsets, self.padding)
            x_adv, xh_adv = self._attack_pair(x, xh.detach(), y, d, target_x)
        else:  # single AE: x_hat' = A_G mixed into x' (aligned with x_hat = A_G mixed into x)
            x_adv = self._attack(x, y, d.noise_x, "main", target_x)
            xh = self._mix(x, amp, lam)
            xh_adv = self._mix(x_adv, amp.detach(), lam)
        self._keep(x, xh, x_adv, xh_adv, amp_x, amp, lam)
        stats = self._mix_stats(amp_x, amp, lam, x_raw.shape[-1])
        return _Views(x, x_adv, xh, xh_adv.detach()), stats

    def _mix(self, x: Tensor, amp: Tensor, lam: Tensor) -> Tensor:
        if self.source == "brightness":
            return (1 - lam.view(-1, 1, 1, 1)) * x  # the control: darkening, no spectrum
        return mix_amplitude(x, amp, lam)

    # ----- losses and updates -----------------------------------------------------------
    def _forward(self, model: nn.Module, v: _Views, xh: Tensor | None):
        """Train-mode logits (f(x), f(x'), f(x_hat), f(x_hat')); None where not needed."""
        # PGD-AT trains on adversarial images only; its recombined branch still needs the
        # clean pair for JS(f(x), f(x_hat)), the only path from the loss to the AAG.
        clean = self.outer != "pgd_at" or xh is not None
        with self._amp():
            if xh is not None and self._batch_now and self.split_bn:
                # one 4B pass: x, x_hat, x', x_hat' with BN main, aux, main, aux, each chunk
                # its own batch statistics (as two split passes, one weight gradient each)
                with bn_branch(model, "split", pairs=2):
                    fx, fxh, fxa, fxha = model(torch.cat([v.x, xh, v.x_adv, v.xh_adv])).chunk(4)
                return fx, fxa, fxh, fxha
            with bn_branch(model, "main"):
                fx, fxa = model(v.x) if clean else None, model(v.x_adv)
            if xh is None:
                return fx, fxa, None, None
            with bn_branch(model, self.xh_branch):
                fxh, fxha = model(xh) if clean else None, model(v.xh_adv)
        return fx, fxa, fxh, fxha

    def _branch_loss(self, clean, adv, y, tag: str, parts: dict) -> Tensor:
        if self.outer == "pgd_at":
            parts[f"ce_{tag}"] = F.cross_entropy(adv.float(), y,
                                                 label_smoothing=self.label_smoothing)
            return parts[f"ce_{tag}"]
        total, parts[f"ce_{tag}"], parts[f"kl_{tag}"] = trades_loss(
            clean, adv, y, self.beta, self.label_smoothing)
        return total

    def _loss(self, model: nn.Module, v: _Views, xh: Tensor | None, y: Tensor):
        """L_DAT of ``model`` (or L_AT alone for the baseline), its parts and accuracies."""
        fx, fxa, fxh, fxha = self._forward(model, v, xh)
        parts: dict[str, Tensor] = {}
        loss = self._branch_loss(fx, fxa, y, "x", parts)
        with torch.no_grad():
            if fx is not None:
                parts["acc_clean"] = (fx.argmax(1) == y).float().mean()
            parts["acc_adv"] = (fxa.argmax(1) == y).float().mean()
        if xh is not None:
            loss_xh = self._branch_loss(fxh, fxha, y, "xh", parts)
            parts["js"] = js_divergence(fx, fxh)
            loss = (loss + loss_xh) / 2 + self.omega * parts["js"]
        return loss, parts

    def _model_step(self, v: _Views, xh: Tensor | None, y: Tensor):
        self.optimizer.zero_grad(set_to_none=True)
        if self.awp is not None and self.awp_on:
            xh_fixed = None if xh is None else xh.detach()
            with self.awp.perturbed(lambda m: self._loss(m, v, xh_fixed, y)[0]):
                loss, parts = self._loss(self.model, v, xh, y)
                loss.backward()
                self.optimizer.step()
        else:
            loss, parts = self._loss(self.model, v, xh, y)
            loss.backward()
            self.optimizer.step()
        parts["loss"] = loss
        return parts

    def _update(self, v: _Views, y: Tensor) -> dict[str, Tensor]:
        if self.generator is None:
            return self._model_step(v, v.xh, y)
        gen_params = [p for p in self.generator.parameters() if p.requires_grad]
        if self.generator_update == "reversal":  # model descends, AAG ascends, one backward
            self.generator_optimizer.zero_grad(set_to_none=True)
            parts = self._model_step(v, _GradReverse.apply(v.xh), y)
            self.generator_optimizer.step()
            parts["gen_loss"] = parts["loss"]
            return parts
        parts = self._model_step(v, v.xh.detach(), y)
        gen_loss, _ = self._loss(self.model, v, v.xh, y)  # updated model, x_hat attached
        if gen_params:  # a fully frozen AAG: same forwards (and BN statistics), no step
            grads = torch.autograd.grad(-gen_loss, gen_params)
            for p, g in zip(gen_params, grads, strict=True):
                p.grad = g
            self.generator_optimizer.step()
        parts["gen_loss"] = gen_loss
        return parts

    # ----- logging helpers --------------------------------------------------------------
    def _mix_stats(self, amp_x: Tensor, amp: Tensor, lam: Tensor,
                   width: int) -> dict[str, Tensor]:
        with torch.no_grad():  # energy ratio ||A_G|| / ||A(x)|| over the full spectrum
            ratio = spectrum_norm(amp, width) / spectrum_norm(amp_x, width).clamp_min(1e-12)
            stats = {"lam_mean": lam.mean(), "energy_ratio": ratio.mean(),
                     "amp_mean": amp.mean(), "amp_std": amp.std()}
            if self.source == "generator":
                stats.update(generator_health(amp / self.generator.scale))
            return stats

    def _keep(self, x, xh, x_adv, xh_adv, amp_x, amp, lam) -> None:
        n = self.keep_images
        if n <= 0:
            return
        with torch.no_grad():
            lam4 = lam[:n].view(-1, 1, 1, 1)
            spectra = {"log_amp_x": amp_x[:n], "log_amp_g": amp[:n],
                       "log_amp_mix": lam4 * amp[:n] + (1 - lam4) * amp_x[:n]}
            images = {"x": x[:n], "x_hat": xh[:n], "x_adv": x_adv[:n], "x_hat_adv": xh_adv[:n]}
            self._images = {k: t.detach().float().clone() for k, t in images.items()}
            for k, a in spectra.items():
                self._images[k] = torch.fft.fftshift(a.float().log1p(), dim=-2)
