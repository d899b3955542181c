"""Fold eval-mode BatchNorm into the convolution that feeds it, for faster evaluation.

In eval mode a BatchNorm layer is a fixed per-channel affine map. When it is the only
reader of a convolution's output, the map folds into that convolution's weight and bias:
one kernel fewer in every forward and in every attack's backward (PGD-20 on a CPU is 1.1x
to 1.5x faster on ResNets, BENCHMARKS.md; slower on timm's efficientnet_b0 at 32x32, whose
1x1-map depthwise convolutions slow down with a bias). The folded model equals the original
up to float rounding. A BN placed before its convolution (the first BN of a pre-activation
block, as in WRN-34-10) does not fold: zero padding would then pad the normalised input,
not the raw one. timm's ``BatchNormAct2d`` (BN, then ``drop``, then ``act``) folds its BN
part and keeps ``drop`` and ``act`` after the convolution.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .dual_bn import export_main_branch, has_dual_bn, norm_act_tail

__all__ = ["FoldError", "fold_batchnorm", "max_logit_gap", "summarize_unfolded"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)  # exactly these: a subclass may change its forward

# why a BN layer was left unfolded (the values of fold_batchnorm's ``unfolded``)
NO_CONV = "not after a convolution (e.g. BN before its convolution)"
OTHER_CONV = "after another kind of convolution (a subclass of nn.ConvNd, or a transposed one)"
SHARED = "after a convolution whose output other layers read too"
REPEATED = "called more than once, or after a convolution that is"
SUBCLASS = "a BN subclass with its own forward, not BN + drop + act"
NO_STATS = "without running statistics"
NOT_CALLED = "not called as a module in the model's forward"


class FoldError(ValueError):
    """The model cannot be folded (it does not trace with ``torch.fx``, or its forward
    has side effects a trace would drop)."""


class _Tracer(fx.Tracer):
    """``torch.fx``'s tracer with every BatchNorm as one call, subclasses too: otherwise a
    BN subclass with its own forward (timm's ``BatchNormAct2d``) is traced into
    ``F.batch_norm`` and activation nodes that no longer name the layer."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, module_qualified_name)


def _plain_bn(bn: nn.Module) -> bool:
    return isinstance(bn, _BatchNorm) and type(bn).forward is _BatchNorm.forward


def _set_module(root: nn.Module, target: str, module: nn.Module) -> None:
    parent, _, name = target.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _tail(drop: nn.Module, act: nn.Module) -> nn.Module | None:
    """What stays of a folded BN + drop + act: ``drop`` then ``act``, Identities left out."""
    kept = [m for m in (drop, act) if not isinstance(m, nn.Identity)]
    return None if not kept else kept[0] if len(kept) == 1 else nn.Sequential(*kept)


def fold_batchnorm(model: nn.Module,
                   unfolded: dict[str, str] | None = None) -> tuple[nn.Module, int]:
    """An eval-mode copy of ``model`` with every conv -> BN pair folded, and how many.

    A pair folds when the BN layer reads the convolution's output and nothing else does,
    and neither module is called twice. Plain BN folds, and so does BN + activation
    (:func:`dat.models.dual_bn.norm_act_tail`: timm's ``BatchNormAct2d``), whose ``drop``
    and ``act`` stay as a module after the convolution. Dual-BN models fold their main
    branch. ``model`` is not changed. Raises :class:`FoldError` when ``torch.fx`` cannot
    trace the model. ``unfolded``, when given, receives each BN layer left unfolded, by
    name, with the reason (this module's ``NO_CONV``, ``SUBCLASS``, ... strings, the latter
    with the class name; :func:`summarize_unfolded` counts them).

    A trace keeps tensor operations only: hooks on non-leaf modules and other Python side
    effects are dropped, so callers must compare the copy's outputs with the model's
    (:func:`max_logit_gap`) before using it, as :func:`dat.evaluate` does.
    """
    plain = export_main_branch(model) if has_dual_bn(model) else copy.deepcopy(model)
    plain.eval()
    bn_names = [name for name, m in plain.named_modules() if isinstance(m, _BatchNorm)]
    tracer = _Tracer()
    try:
        graph = tracer.trace(plain)
    except Exception as err:  # fx raises many types (TraceError, TypeError, ...)
        raise FoldError(f"{type(model).__name__} does not trace with torch.fx "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:120]})") from err
    if any(m.training for m in plain.modules()):  # Python side effects: not traced
        raise FoldError(f"{type(model).__name__}'s forward switched a module to train mode "
                        "while being traced")
    graph_module = fx.GraphModule(tracer.root, graph, type(plain).__name__)
    modules = dict(graph_module.named_modules())
    calls = Counter(node.target for node in graph_module.graph.nodes
                    if node.op == "call_module")
    why: dict[str, str] = {name: NOT_CALLED for name in bn_names if name not in calls}
    folded = 0
    for node in list(graph_module.graph.nodes):
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        bn, source = modules[node.target], node.args[0] if node.args else None
        tail = norm_act_tail(bn)
        conv = (modules[source.target] if isinstance(source, fx.Node)
                and source.op == "call_module" else None)
        if not _plain_bn(bn) and tail is None:
            why[node.target] = f"{SUBCLASS} ({type(bn).__name__})"
        elif bn.running_mean is None or bn.running_var is None:
            why[node.target] = NO_STATS
        elif not isinstance(conv, _ConvNd):
            why[node.target] = NO_CONV
        elif type(conv) not in _CONVS:
            why[node.target] = OTHER_CONV
        elif calls[source.target] != 1 or calls[node.target] != 1 or len(node.args) != 1 \
                or node.kwargs:
            why[node.target] = REPEATED
        elif len(source.users) != 1:
            why[node.target] = SHARED
        else:
            fused = fuse_conv_bn_eval(conv, bn)
            _set_module(graph_module, source.target, fused)
            modules[source.target] = fused
            kept = _tail(*tail) if tail is not None else None
            if kept is None:
                node.replace_all_uses_with(source)
                graph_module.graph.erase_node(node)
            else:  # the node now calls drop + act on the folded convolution's output
                _set_module(graph_module, node.target, kept)
                modules[node.target] = kept
            folded += 1
    graph_module.graph.lint()
    graph_module.recompile()
    graph_module.delete_all_unused_submodules()
    if unfolded is not None:
        unfolded.update(why)
    return graph_module.eval(), folded


def summarize_unfolded(unfolded: dict[str, str]) -> str:
    """One line for :func:`fold_batchnorm`'s ``unfolded``: how many BN layers per reason,
    the most common first, e.g. ``"12 not after a convolution (...); 3 a BN subclass ..."``."""
    return "; ".join(f"{n} {why}" for why, n in Counter(unfolded.values()).most_common())


@torch.no_grad()
def max_logit_gap(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """Largest absolute logit difference between ``a`` and ``b`` on ``x``, relative to
    the largest absolute logit of ``a``."""
    ref = a(x).float()
    return float((b(x).float() - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
