"""Two-branch BatchNorm: separate affine parameters and running statistics per branch.

DAT normalises clean/adversarial images with the ``main`` branch and recombined
images with the ``aux`` branch, because their statistics differ; evaluation and
export use ``main`` only. ``split`` routes the first half of a batch to ``main`` and
the second half to ``aux`` so that both branches run in one forward pass (exactly
equivalent to two passes, since BatchNorm statistics are per branch anyway). With
``pairs=k`` the batch is 2k equal chunks, normalised in turn by ``main``, ``aux``, ``main``
... each with its own batch statistics: k two-branch forwards in one pass.

Inside :func:`fused_split`, an eval-mode ``split`` forward is one per-channel affine map
for both halves (one kernel forward, one backward, instead of three each), for the
attacks of a batched DAT step; a timm ``BatchNormAct2d`` runs its activation after it.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "BRANCHES",
    "DualBatchNorm",
    "bn_branch",
    "convert_dual_bn",
    "export_main_branch",
    "fused_split",
    "has_dual_bn",
    "norm_act_tail",
    "set_bn_branch",
]

BRANCHES = ("main", "aux", "split")


class DualBatchNorm(nn.Module):
    """Wraps two copies of a BatchNorm layer; ``branch`` picks which one a forward uses."""

    def __init__(self, bn: _BatchNorm) -> None:
        super().__init__()
        self.main = copy.deepcopy(bn)
        self.aux = copy.deepcopy(bn)
        self.branch = "main"
        self.pairs = 1  # split: the batch is 2 * pairs chunks, main, aux, main, ...
        # (scale, shift, activation or None), set by fused_split
        self.fused: tuple[Tensor, Tensor, nn.Module | None] | None = None
        self.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        if self.branch == "main":
            return self.main(x)
        if self.branch == "aux":
            return self.aux(x)
        chunks = 2 * self.pairs
        size = x.shape[0] // chunks
        if x.shape[0] != chunks * size:
            raise ValueError(f"split BatchNorm with {self.pairs} pair(s) needs a batch divisible "
                             f"by {chunks}, got {x.shape[0]}")
        if self.fused is not None and not self.training and self.pairs == 1:
            scale, shift, act = self.fused
            out = _SplitAffine.apply(x, scale, shift)
            return out if act is None else act(out)
        # split(): one cat in backward (slices would zero-fill once each)
        return torch.cat([(self.aux if i % 2 else self.main)(part)
                          for i, part in enumerate(x.split(size))], dim=0)

    def extra_repr(self) -> str:
        pairs = f", pairs={self.pairs}" if self.branch == "split" and self.pairs != 1 else ""
        return f"branch={self.branch!r}{pairs}"


class _SplitAffine(torch.autograd.Function):
    """``x * scale + shift`` per half and channel, output in x's dtype and layout.

    ``scale`` and ``shift`` (2, C) are float32 (or float64), so a bf16 input is scaled in
    float32 and rounded once, as BatchNorm does. No gradient reaches them:
    :func:`fused_split` is for attacks, which need the input's gradient only.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        halves = x.view(2, x.shape[0] // 2, *x.shape[1:])  # (2, B, C, ...)
        shape = (2, 1, scale.shape[1]) + (1,) * (x.dim() - 2)
        scale, shift = scale.view(shape), shift.view(shape)
        # the output is a base tensor, not a view of one made here: models that apply an
        # in-place activation after BatchNorm (timm's and torchvision's nn.ReLU(inplace=True))
        # modify it, which autograd forbids on a custom Function's view output
        out = torch.empty_like(x)
        with torch.autocast(x.device.type, enabled=False):  # mixed dtypes on purpose
            torch.addcmul(shift, halves, scale, out=out.view(halves.shape))
        ctx.save_for_backward(scale)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (scale,) = ctx.saved_tensors
        halves = grad.reshape(2, grad.shape[0] // 2, *grad.shape[1:])
        out = torch.empty_like(halves)
        with torch.autocast(grad.device.type, enabled=False):
            torch.mul(halves, scale, out=out)
        return out.view(grad.shape), None, None


def norm_act_tail(bn: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(drop, act) of a BatchNorm whose forward is BN, then ``drop``, then ``act``; else None.

    That is timm's ``BatchNormAct2d`` (and its SyncBN forms), recognised by its structure
    as :mod:`dat.sync_bn` does: a BN subclass with its own forward whose only submodules are
    ``drop`` and ``act``. A plain BN, or a subclass of another form, gives None.
    """
    if not isinstance(bn, _BatchNorm) or type(bn).forward is _BatchNorm.forward:
        return None
    if set(bn._modules) != {"drop", "act"}:
        return None
    drop, act = bn._modules["drop"], bn._modules["act"]
    return (drop, act) if drop is not None and act is not None else None


def _same_stateless(a: nn.Module, b: nn.Module) -> bool:
    """Whether ``a`` and ``b`` compute the same function: same type and settings, and no
    parameters or buffers (which the two branches could have trained apart)."""
    state = [*a.parameters(), *a.buffers(), *b.parameters(), *b.buffers()]
    return not state and type(a) is type(b) and repr(a) == repr(b)


def _fusable(layer: DualBatchNorm) -> tuple[bool, nn.Module | None]:
    """(whether ``layer`` fuses, the activation to run after the map or None).

    Plain BN, or BN + activation (timm's ``BatchNormAct2d``) whose ``drop`` is an
    ``nn.Identity`` and whose activation is the same stateless module in both branches (one
    activation then serves the whole batch). Other subclasses with their own forward
    (``SyncBatchNorm`` syncs) are more than the affine map and keep their path."""
    bns = (layer.main, layer.aux)
    if not all(bn.running_var is not None and bn.weight is not None for bn in bns):
        return False, None
    if all(type(bn).forward is _BatchNorm.forward for bn in bns):
        return True, None
    tails = [norm_act_tail(bn) for bn in bns]
    if any(t is None for t in tails):
        return False, None
    (drop_main, act_main), (drop_aux, act_aux) = tails
    ok = (isinstance(drop_main, nn.Identity) and isinstance(drop_aux, nn.Identity)
          and _same_stateless(act_main, act_aux))
    return ok, None if isinstance(act_main, nn.Identity) else act_main


@contextlib.contextmanager
def fused_split(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Inside, eval-mode ``split`` forwards run one fused affine map per layer.

    The maps come from the running statistics and affine parameters as they are on entry,
    computed for all layers at once (9 operations for the whole model). Use it around
    an attack only: parameters and statistics must not change inside, and no gradient
    reaches the BN parameters. The outputs equal the unfused ones up to float rounding.
    A timm ``BatchNormAct2d`` runs its activation after the map (:func:`_fusable` says
    when). Layers without running statistics or affine parameters, and other BN
    subclasses with their own forward, keep the plain path.
    """
    found = ([(m, *_fusable(m)) for m in model.modules() if isinstance(m, DualBatchNorm)]
             if enabled else [])
    layers, acts = [m for m, ok, _ in found if ok], [act for _, ok, act in found if ok]
    if not layers:
        yield model
        return
    with torch.no_grad():
        pairs = [bn for m in layers for bn in (m.main, m.aux)]
        dtype = torch.promote_types(pairs[0].weight.dtype, torch.float32)  # bf16 -> fp32

        def flat(name: str) -> Tensor:
            return torch.cat([getattr(bn, name).to(dtype) for bn in pairs])

        weight, bias, mean, var = flat("weight"), flat("bias"), flat("running_mean"), \
            flat("running_var")
        eps = {bn.eps for bn in pairs}
        if len(eps) == 1:
            var.add_(eps.pop())
        else:  # rare: layers with different eps, one add per layer
            var = torch.cat([bn.running_var.to(dtype) + bn.eps for bn in pairs])
        scale = weight.mul_(var.rsqrt_())
        shift = bias.sub_(mean.mul_(scale))
    start = 0
    try:
        for m, act in zip(layers, acts, strict=True):
            n = 2 * m.main.num_features
            m.fused = (scale[start:start + n].view(2, -1), shift[start:start + n].view(2, -1),
                       act)
            start += n
        yield model
    finally:
        for m in layers:
            m.fused = None


def _replace_bn(module: nn.Module) -> bool:
    replaced = False
    for name, child in module.named_children():
        if isinstance(child, DualBatchNorm):
            replaced = True
        elif isinstance(child, _BatchNorm):
            setattr(module, name, DualBatchNorm(child))
            replaced = True
        else:
            replaced = _replace_bn(child) or replaced
    return replaced


def convert_dual_bn(model: nn.Module) -> nn.Module:
    """Replace every BatchNorm in ``model`` (in place) with a :class:`DualBatchNorm`.

    Both branches start as copies of the original layer (parameters, running statistics,
    ``training`` flag), so outputs are unchanged until the branches are trained apart.
    Returns ``model`` for chaining.
    """
    if isinstance(model, _BatchNorm):
        raise ValueError("convert_dual_bn expects a model that contains BatchNorm, not a bare BN")
    for name, m in model.named_modules():  # before any change: no half-converted model
        if isinstance(m, _BatchNorm) and getattr(m, "has_uninitialized_params", bool)():
            raise ValueError(f"{name} is a {type(m).__name__} that has not seen a batch yet; "
                             "run one forward (e.g. model(x[:2])) before convert_dual_bn")
    if not _replace_bn(model):
        raise ValueError(
            f"{type(model).__name__} has no BatchNorm layer, so it cannot get two BN branches; "
            "use a model with BatchNorm, or train without split BN (method.split_bn=false; "
            "in Python, DATStep(..., split_bn=False) on the unconverted model)"
        )
    return model


def has_dual_bn(model: nn.Module) -> bool:
    """True when ``model`` contains at least one :class:`DualBatchNorm`."""
    return any(isinstance(m, DualBatchNorm) for m in model.modules())


def set_bn_branch(model: nn.Module, branch: str, pairs: int = 1) -> str:
    """Route every :class:`DualBatchNorm` in ``model`` to ``branch``; return the previous one.

    ``pairs`` (for ``split``): the batch holds that many (main, aux) chunk pairs.
    """
    if branch not in BRANCHES:
        raise ValueError(f"unknown BN branch {branch!r}; use one of {BRANCHES}")
    if pairs < 1:
        raise ValueError(f"pairs={pairs} must be >= 1")
    previous, found = "main", False
    for m in model.modules():
        if isinstance(m, DualBatchNorm):
            previous, found = m.branch, True
            m.branch, m.pairs = branch, pairs
    if not found and branch != "main":  # it would silently run the only BN set
        raise ValueError(f"BN branch {branch!r} needs two BN sets, and this "
                         f"{type(model).__name__} has one; convert it with "
                         "dat.models.convert_dual_bn(model)")
    return previous


@contextlib.contextmanager
def bn_branch(model: nn.Module, branch: str, pairs: int = 1) -> Iterator[nn.Module]:
    """Context manager: forward passes inside use BN ``branch`` ("main", "aux" or "split",
    the latter with ``pairs`` (main, aux) chunk pairs per batch)."""
    first = next((m for m in model.modules() if isinstance(m, DualBatchNorm)), None)
    previous_pairs = first.pairs if first is not None else 1
    previous = set_bn_branch(model, branch, pairs)
    try:
        yield model
    finally:
        set_bn_branch(model, previous, previous_pairs)


def _main_only(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, DualBatchNorm):
            setattr(module, name, copy.deepcopy(child.main))
        else:
            _main_only(child)


def export_main_branch(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every :class:`DualBatchNorm` replaced by its main branch.

    The result is an ordinary single-BN module whose state dict loads with
    ``strict=True`` into the plain (unconverted) architecture.
    """
    plain = copy.deepcopy(model)
    if isinstance(plain, DualBatchNorm):
        return plain.main
    _main_only(plain)
    return plain
