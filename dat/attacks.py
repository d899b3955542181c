"""Training-time inner maximisation: PGD (Madry), TRADES-KL and DAT's EAEG.

Every attack is L-inf in [0, 1] pixel space (``pgd`` also takes ``norm="l2"``, for
evaluation), runs the model in eval mode (a compiled
model also with its parameters frozen; both restored afterwards), never accumulates
parameter gradients, and
uses the BN branch the caller routes (``branch=...`` or an enclosing ``bn_branch``). Losses are
summed over the batch, so a sample's step does not depend on what else is in the
batch: attacking ``cat([x, x_hat])`` with split BN equals two separate attacks (bit for
bit on CPU and in fp64 on CUDA; with TF32/bf16 convolutions rounding flips the sign of
some small gradients, so the two differ in a fraction of pixels by multiples of alpha).
With ``compile_mode`` set, each attack step runs as one compiled graph (:func:`compiled_step`).
"""

from __future__ import annotations

import contextlib
import functools
import numbers
import re
import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import COMPILE_MODES, CUDA_GRAPH_MODES, ConfigError
from .losses import cw_margin, kl_divergence
from .models.dual_bn import bn_branch

__all__ = [
    "ATTACK_COMPILE_MODES",
    "DEFAULT_EPS",
    "NORMS",
    "as_class_indices",
    "check_compile_mode",
    "check_images",
    "check_norm",
    "check_radius",
    "check_unit_range",
    "compiled_step",
    "compiler_failure",
    "eaeg",
    "eager_module",
    "eval_logits",
    "eval_mode",
    "explain_dtype_mismatch",
    "frozen_parameters",
    "is_compiled",
    "pgd",
    "project",
    "project_l2",
    "trades_kl",
    "train_mode",
    "uses_cuda_graphs",
]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode inside the block and restore every module's flag after.

    Flags are restored per module, so a sub-module the user froze in eval mode (e.g. a
    frozen BatchNorm) stays frozen after an attack.
    """
    with _flags_restored(model):
        model.eval()
        yield model


@contextlib.contextmanager
def train_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Train mode inside the block, with every module's flag restored after.

    A model in eval mode is switched to train mode as a whole; a model already in train
    mode keeps the sub-modules its user put in eval mode (e.g. frozen BatchNorm layers,
    whose running statistics must not move).
    """
    with _flags_restored(model):
        if not model.training:
            model.train()
        yield model


@contextlib.contextmanager
def _flags_restored(model: nn.Module) -> Iterator[None]:
    """Every module's train/eval flag, as on entry, restored when the block ends."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[nn.Module]:
    """Parameters stop requiring gradients inside the block, and are restored after.

    An attack needs gradients w.r.t. its input only. Eager autograd skips weight gradients
    by itself, but a ``torch.compile``d model's backward graph computes them all: frozen,
    the compiled EAEG runs 27% faster on a CPU (``bench/compiled_attack.py``), with
    identical results. The attacks freeze compiled models only (see :func:`is_compiled`).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p in params:
            p.requires_grad_(True)


def is_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a sub-module went through ``torch.compile``.

    Only then do the attacks freeze the parameters: an eager model keeps them trainable
    because autocast caches its low-precision weight copies for leaves that require grad,
    so a frozen eager model under bf16 would re-cast every weight at every attack step
    (110 extra kernels per ResNet-18 DAT step, ``bench/trainer_ops.py``).
    """
    dynamo = sys.modules.get("torch._dynamo.eval_frame")  # absent: nothing was compiled
    if dynamo is None:
        return False
    return any(isinstance(m, dynamo.OptimizedModule)
               or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def uses_cuda_graphs(model: nn.Module) -> bool:
    """Whether ``model`` or a sub-module is ``torch.compile``d to replay CUDA graphs (modes
    ``reduce-overhead`` and ``max-autotune``, the ``cudagraphs`` backend).

    Such a graph's outputs and saved activations live in memory that later replays reuse,
    and a forward whose backward never runs makes the following replays overwrite them
    (an H100 run of ``perf.compile=reduce-overhead`` failed so, BENCHMARKS.md). Read from
    torch's compile wrapper; where that cannot be read (``Module.compile()``, another torch
    layout) the answer is True, the safe side.
    """
    for m in model.modules():
        if getattr(m, "_compiled_call_impl", None) is not None:
            return True
        context = getattr(m, "dynamo_ctx", None)
        if context is not None and _cuda_graphs_flag(context) is not False:
            return True
    return False


def _cuda_graphs_flag(context: object) -> bool | None:
    """The CUDA-graph switch of a ``torch.compile`` wrapper's backend (None: unreadable)."""
    convert = getattr(getattr(context, "callback", None), "_torchdynamo_orig_backend", None)
    backend = getattr(convert, "_torchdynamo_orig_backend", None)
    options = getattr(backend, "config", None)
    if isinstance(options, dict):  # inductor: its options over the global default
        from torch._inductor import config as inductor_config

        return bool(options.get("triton.cudagraphs", inductor_config.triton.cudagraphs))
    name = getattr(backend, "compiler_name", None)
    return name == "cudagraphs" if isinstance(name, str) else None


def eager_module(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper (``model`` itself otherwise): for a
    one-off forward (a probe, a label check) that would compile a graph of its own, and
    for compiled attack steps, which trace the plain module."""
    return getattr(model, "_orig_mod", model)


def _frozen_if_compiled(model: nn.Module):
    return frozen_parameters(model) if is_compiled(model) else contextlib.nullcontext(model)


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project onto the L-inf ball of radius ``eps`` around ``x`` and onto [0, 1]."""
    x_adv = torch.min(torch.max(x_adv, x - eps), x + eps)
    return x_adv.clamp(0.0, 1.0)


NORMS = ("linf", "l2")  # threat models: L-inf (training and evaluation) and L2 (evaluation)
DEFAULT_EPS = {"linf": 8 / 255, "l2": 0.5}  # the standard CIFAR radius of each norm
_DIVISION_GUARD = 1e-10  # added to gradient norms, as torchattacks' PGDL2 adds it


def check_norm(norm: str) -> None:
    """One-line ValueError for a threat model other than ``linf`` or ``l2``."""
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: use 'linf' or 'l2'")


def _per_example(values: Tensor, like: Tensor) -> Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def project_l2(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project onto the L2 ball of radius ``eps`` around each example of ``x``, then onto
    [0, 1] (clipping only shortens the perturbation, so the result stays in the ball)."""
    delta = x_adv - x
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)  # (B,); zero: nothing to shrink
    delta = delta * _per_example((eps / norms).clamp(max=1.0), delta)
    return (x + delta).clamp(0.0, 1.0)


def _l2_start(x: Tensor, eps: float) -> Tensor:
    """A random start in the L2 ball: a Gaussian direction at a radius uniform in [0, eps]
    (torchattacks' PGDL2 draws it so), clipped to [0, 1]."""
    delta = torch.randn_like(x)
    norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12)
    radius = torch.rand(len(x), device=x.device, dtype=x.dtype) * eps
    return (x + delta * _per_example(radius / norms, delta)).clamp(0.0, 1.0)


def _ascend_l2(model, x, x_adv, eps, alpha, steps, branch, *, y, label_smoothing, loss):
    """PGD steps of length ``alpha`` along the L2-normalised gradient, projected onto the
    L2 ball and [0, 1] after each (the order torchattacks' PGDL2 uses)."""
    with eval_mode(model), _branch(model, branch), _frozen_if_compiled(model), \
            torch.enable_grad():
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            objective = _objective(model(x_adv), y, None, 1.0, label_smoothing, loss)
            (grad,) = torch.autograd.grad(objective, x_adv)
            grad_norms = grad.flatten(1).norm(dim=1) + _DIVISION_GUARD
            step = x_adv.detach() + alpha * grad / _per_example(grad_norms, grad)
            x_adv = project_l2(step, x, eps)
    return x_adv.detach()


def _branch(model: nn.Module, branch: str | None):
    return bn_branch(model, branch) if branch else contextlib.nullcontext()


def _objective(logits: Tensor, y: Tensor | None, target: Tensor | None, beta: float,
               label_smoothing: float, loss: str) -> Tensor:
    """The summed attack loss: CW margin, CE, or ``beta * KL(p(target) || p) [+ CE]``."""
    if loss == "cw":
        return cw_margin(logits, y).sum()
    ce = None if y is None else F.cross_entropy(logits.float(), y, reduction="sum",
                                                label_smoothing=label_smoothing)
    if target is None:
        return ce
    kl = beta * kl_divergence(target, logits, reduction="sum")
    return kl if ce is None else kl + ce


def eval_logits(model: nn.Module, x: Tensor, branch: str | None = None,
                as_attack: bool = True) -> Tensor:
    """Eval-mode logits of ``x``, detached (an attack's KL target, the AAG's input).

    Of a compiled model with ``as_attack``, the forward runs as an attack step runs it:
    gradients on, parameters frozen, an input that requires grad. It then reuses the
    graph of the attack on ``x`` that follows instead of compiling an inference graph of
    its own (tens of seconds on a GPU). Not for a model that replays CUDA graphs
    (:func:`uses_cuda_graphs`): a forward whose backward never runs would let the attack's
    replays overwrite its memory, so there, as for anything else, the forward runs under
    ``no_grad`` (and its logits are copied out of the graph's memory).
    """
    compiled = is_compiled(model)
    with eval_mode(model), _branch(model, branch):
        if not (as_attack and compiled) or uses_cuda_graphs(model):
            with torch.no_grad():
                logits = model(x)
            return logits.clone() if compiled else logits
        with frozen_parameters(model), torch.enable_grad():
            return model(x.detach().requires_grad_(True)).detach()


def _ascent_step(model: nn.Module, x_adv: Tensor, low: Tensor, high: Tensor,
                 y: Tensor | None, target: Tensor | None, beta: float, label_smoothing: float,
                 loss: str, alpha: float) -> Tensor:
    """One signed-gradient step, clamped to the box [low, high] (eps-ball within [0, 1])."""
    x_adv = x_adv.detach().requires_grad_(True)
    objective = _objective(model(x_adv), y, target, beta, label_smoothing, loss)
    (grad,) = torch.autograd.grad(objective, x_adv)
    # sign, add and clamp: the same values as project() (min/max only select, and
    # alpha * sign is exact)
    return torch.clamp(x_adv.detach().add(grad.sign(), alpha=alpha), low, high)


def _functional_ascent_step(model: nn.Module, x_adv: Tensor, low: Tensor, high: Tensor,
                            y: Tensor | None, target: Tensor | None, beta: float,
                            label_smoothing: float, loss: str, alpha: float) -> Tensor:
    """:func:`_ascent_step` with the gradient from ``torch.func.grad``, for the compiler.

    A function transform needs no leaf that requires grad (torch 2.11's dynamo rejects
    ``requires_grad_()`` inside a graph) and works under ``no_grad``, so the compiled step
    is an inference graph: no backward graph, and with ``reduce-overhead`` one CUDA graph.
    """
    def objective(z: Tensor) -> Tensor:
        return _objective(model(z), y, target, beta, label_smoothing, loss)

    grad = torch.func.grad(objective)(x_adv)
    return torch.clamp(x_adv.add(grad.sign(), alpha=alpha), low, high)


def _ascend(model, x, x_adv, eps, alpha, steps, branch, *, y=None, target=None, beta=1.0,
            label_smoothing=0.0, loss="ce", compile_mode="off") -> Tensor:
    low, high = (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)  # the box, once
    step = _ascent_step if compile_mode == "off" else compiled_step(compile_mode)
    frozen = frozen_parameters if compile_mode != "off" else _frozen_if_compiled
    # enable_grad: callers often attack inside torch.no_grad() (evaluation loops).
    with eval_mode(model), _branch(model, branch), frozen(model), torch.enable_grad():
        net = model if compile_mode == "off" else eager_module(model)
        for _ in range(steps):
            x_adv = step(net, x_adv, low, high, y, target, beta, label_smoothing, loss, alpha)
    return x_adv.detach()


ATTACK_COMPILE_MODES = COMPILE_MODES  # off, default, reduce-overhead, max-autotune


def _compiler_supported() -> bool:
    """Whether this torch is one the compiled attack steps were checked on (>= 2.11)."""
    return torch.torch_version.TorchVersion(torch.__version__) >= "2.11"


def check_compile_mode(mode: str) -> None:
    """Fail now, in one line, if the attacks cannot be compiled in ``mode`` here."""
    if mode not in ATTACK_COMPILE_MODES:
        raise ValueError(f"attack compile mode {mode!r}: use one of {ATTACK_COMPILE_MODES}")
    if mode != "off" and not _compiler_supported():
        raise ValueError(f"compiled attacks need torch >= 2.11 (this is {torch.__version__}): "
                         "upgrade torch or set the attack compile mode to off")


def compiler_failure(err: BaseException) -> str | None:
    """The first line of ``err`` when torch's compiler raised it (dynamo, inductor, fx),
    for a one-line message naming the switch that turns compiling off; None otherwise."""
    if not type(err).__module__.startswith(("torch._dynamo", "torch._inductor", "torch.fx")):
        return None
    return next((line.strip() for line in str(err).splitlines() if line.strip()),
                type(err).__name__)


@functools.cache
def compiled_step(mode: str) -> Callable[..., Tensor]:
    """One attack step as a single ``torch.compile`` graph: forward, input gradient, sign,
    add and clamp.

    The input gradient comes from ``torch.func.grad``, which dynamo traces into the graph,
    and the step runs under ``no_grad``, so it compiles to one inference graph: with
    ``mode="reduce-overhead"`` a whole step replays as one CUDA graph instead of hundreds
    of kernel launches. An attack of K steps calls the graph K times, so the step count
    costs no compile time; a new input shape, dtype, BN branch, loss or step size compiles
    a new graph. The model's parameters are frozen while it runs. Checked on torch 2.11
    (the GPU image's) and 2.14; older versions are refused.
    """
    check_compile_mode(mode)
    if mode == "off":
        return _ascent_step
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    step = torch.compile(_functional_ascent_step, mode=None if mode == "default" else mode,
                         dynamic=False, fullgraph=True)

    def run(model: nn.Module, *args) -> Tensor:
        try:
            with torch.no_grad():  # an inference graph; torch.func.grad still differentiates
                out = step(model, *args)
        except Exception as err:
            reason = compiler_failure(err)
            if reason is None:
                raise  # not a compiler failure
            raise ConfigError(
                f"the attack step of {type(model).__name__} does not compile as one graph "
                f"({reason[:160]}); use perf.compile_attacks=off (compile_mode='off' in the "
                "Python API)") from err
        # a CUDA graph's output is overwritten by its next replay: keep a copy
        return out.clone() if mode in CUDA_GRAPH_MODES else out

    return run


def check_radius(eps: float, alpha: float, steps: int, norm: str = "linf") -> None:
    """One-line ValueError for a radius or step that cannot be meant (tensors, 0-255 units;
    an L2 radius may exceed 1, as the norm grows with the image size)."""
    check_norm(norm)
    for name, value in (("eps", eps), ("alpha", alpha)):
        if torch.is_tensor(value) or not isinstance(value, numbers.Real):  # numpy floats too
            raise ValueError(f"{name} must be a number, got {type(value).__name__} (labels go "
                             "to pgd/eaeg as y; trades_kl takes none: trades_kl(model, x))")
        if norm == "l2":
            if not 0 <= value < float("inf"):  # also NaN
                raise ValueError(f"{name}={value:g} must be a finite L2 length >= 0")
            continue
        if not 0 <= value <= 1:
            raise ValueError(f"{name}={value:g} is outside [0, 1]; images are in [0, 1], so "
                             f"write {value:g}/255" if value > 1 else f"{name}={value:g} < 0")
    if int(steps) != steps or steps < 0:
        raise ValueError(f"steps={steps} must be an integer >= 0")


def check_images(x: Tensor, who: str = "the attack") -> None:
    """One-line ValueError for images that are not a float tensor (uint8, lists)."""
    if not torch.is_tensor(x) or not x.is_floating_point():
        kind = x.dtype if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{who} expects float images in [0, 1], got {kind}; convert uint8 "
                         "images with x.float() / 255")


def as_class_indices(y: Tensor) -> Tensor:
    """Integer labels of any integer dtype (uint8, int32 from numpy) as int64, which the
    losses index with; other values pass through unchanged for the callers' checks."""
    if torch.is_tensor(y) and not y.is_floating_point() and y.dtype not in (torch.long,
                                                                            torch.bool):
        return y.long()
    return y


_DTYPE_ERROR = re.compile(r"type|Half|Float|Double|Long")  # torch's dtype mismatch texts
UNIT_RANGE_TOL = 1e-4  # float noise of augmentations around [0, 1]


def check_unit_range(x: Tensor, who: str) -> None:
    """One-line ValueError for images outside [0, 1]: normalised (mean/std) or 0-255 ones,
    which would be clipped or attacked at the wrong scale. One host sync: callers in a
    training loop check their first batch only."""
    x = x.detach()
    low, high = torch.aminmax(x)
    low, high, finite = torch.stack([low.float(), high.float(),
                                     torch.isfinite(x).all().float()]).tolist()
    if not finite:
        raise ValueError(f"{who} got images with NaN or inf values; check the data pipeline "
                         "(a division by zero in a custom transform?)")
    if low < -UNIT_RANGE_TOL or high > 1 + UNIT_RANGE_TOL:
        raise ValueError(
            f"{who} expects images in [0, 1], found values in [{low:.3f}, {high:.3f}]; "
            + ("divide 0-255 images by 255" if low >= 0 else
               "drop Normalize from the data pipeline: the model normalises inside "
               "(dat.models.create(..., mean=, std=) or dat.models.Normalize)"))


@contextlib.contextmanager
def explain_dtype_mismatch(model: nn.Module, x: Tensor, who: str) -> Iterator[None]:
    """Turn the error of a forward on images of another float dtype than the model's
    parameters (raised deep inside a convolution) into a one-line ValueError naming the fix.

    Only an actual failure is translated: a model that casts its own input still runs.
    """
    try:
        yield
    except RuntimeError as err:
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
        if weight is None or weight.dtype == x.dtype or not _DTYPE_ERROR.search(str(err)):
            raise
        raise ValueError(
            f"{who} got {x.dtype} images for a model with {weight.dtype} parameters; pass "
            f"x.to({weight.dtype}) (for bf16 compute keep the images float32 and run under "
            "torch.autocast, which also keeps the eps-ball exact)") from err


def _gaussian_start(x: Tensor, std: float, eps: float, noise: Tensor | None) -> Tensor:
    noise = torch.randn_like(x) if noise is None else noise
    # Projected too: 0.001 * N(0, I) can leave a small eps-ball (eps = 0 or 1/255).
    return project(x + std * noise, x, eps).detach()


def pgd(
    model: nn.Module, x: Tensor, y: Tensor, eps: float | None = None,
    alpha: float | None = None, steps: int = 10, random_start: bool = True, loss: str = "ce",
    label_smoothing: float = 0.0, branch: str | None = None, start: Tensor | None = None,
    compile_mode: str = "off", check_range: bool = True, norm: str = "linf",
) -> Tensor:
    """Madry et al. PGD: ascend CE (or the CW margin, ``loss="cw"``) from a uniform start.

    ``eps`` and ``alpha`` default to 8/255 and 2/255 (L-inf).
    ``norm="l2"``: the L2 threat model (radius ``eps``, steps of length ``alpha`` along
    the normalised gradient, a start at a uniform radius in a Gaussian direction), as
    torchattacks' PGDL2; not compiled. Its defaults are eps 0.5 and alpha eps/4, as
    ``dat.evaluate(norm="l2")`` runs it (8/255 would be an L2 radius 16 times too small).
    ``start`` overrides the random start (an initial perturbation, projected onto the
    eps-ball: [-eps, eps] per pixel, or the L2 ball).
    ``compile_mode`` (off | default | reduce-overhead | max-autotune) runs each step as
    one compiled graph (:func:`compiled_step`). ``check_range`` refuses images outside
    [0, 1] (normalised ones would leave the eps-ball); it waits for the device once, so
    loops that checked their data already pass False.
    """
    if loss not in ("ce", "cw"):
        raise ValueError(f"unknown PGD loss {loss!r}; use 'ce' or 'cw'")
    check_norm(norm)
    if eps is None:
        eps = DEFAULT_EPS[norm]
    if alpha is None:
        alpha = eps / 4 if norm == "l2" and isinstance(eps, numbers.Real) else 2 / 255
    check_radius(eps, alpha, steps, norm)
    if norm == "l2" and compile_mode != "off":
        raise ValueError("compiled attack steps are L-inf only; use compile_mode='off' with "
                         "norm='l2'")
    check_images(x, "pgd")
    if check_range:
        check_unit_range(x, "pgd")
    x, y = x.detach(), as_class_indices(y)
    if norm == "l2":
        if start is not None:
            x_adv = project_l2(x + start, x, eps)
        else:
            x_adv = _l2_start(x, eps) if random_start else x.clone()
        with explain_dtype_mismatch(model, x, "pgd"):
            return _ascend_l2(model, x, x_adv, eps, alpha, steps, branch, y=y,
                              label_smoothing=label_smoothing, loss=loss)
    if start is not None:
        x_adv = project(x + start, x, eps)
    elif random_start:
        x_adv = project(x + torch.empty_like(x).uniform_(-eps, eps), x, eps)
    else:
        x_adv = x.clone()

    with explain_dtype_mismatch(model, x, "pgd"):
        return _ascend(model, x, x_adv, eps, alpha, steps, branch, y=y,
                       label_smoothing=label_smoothing, loss=loss, compile_mode=compile_mode)


def trades_kl(
    model: nn.Module, x: Tensor, eps: float = 8 / 255, alpha: float = 2 / 255,
    steps: int = 10, init_std: float = 0.001, target_logits: Tensor | None = None,
    branch: str | None = None, noise: Tensor | None = None, compile_mode: str = "off",
    check_range: bool = True,
) -> Tensor:
    """TRADES inner maximisation: ascend KL(p(x) || p(x')) from a 0.001 Gaussian start.

    The target p(x) is computed once (eval mode) unless ``target_logits`` is given.
    ``compile_mode`` and ``check_range`` as in :func:`pgd`.
    """
    return eaeg(model, x, None, eps, alpha, steps, beta=1.0, init_std=init_std,
                target_logits=target_logits, branch=branch, noise=noise,
                compile_mode=compile_mode, check_range=check_range)


def eaeg(
    model: nn.Module, x: Tensor, y: Tensor | None, eps: float = 8 / 255,
    alpha: float = 2 / 255, steps: int = 5, beta: float = 15.0,
    label_smoothing: float = 0.0, init_std: float = 0.001,
    target_logits: Tensor | None = None, branch: str | None = None,
    noise: Tensor | None = None, compile_mode: str = "off", check_range: bool = True,
) -> Tensor:
    """DAT's efficient adversarial example generation (EAEG).

    Ascends ``CE(f(x'), y) + beta * KL(p(x) || p(x'))`` for ``steps`` signed-gradient
    steps from ``x + init_std * N(0, I)``. The KL target p(x) does not change during
    the attack, so it is computed once (the published code recomputes it every step).
    With ``y=None`` the CE term is dropped (TRADES). ``noise`` injects the start draw.
    ``compile_mode`` and ``check_range`` as in :func:`pgd`.
    """
    check_radius(eps, alpha, steps)
    who = "eaeg" if y is not None else "trades_kl"
    check_images(x, who)
    if check_range:
        check_unit_range(x, who)
    x, y = x.detach(), as_class_indices(y)
    with explain_dtype_mismatch(model, x, who):
        if target_logits is None:  # compiled attack steps trace the plain module instead
            target_logits = eval_logits(model, x, branch, as_attack=compile_mode == "off")
        target_logits = target_logits.detach()
        x_adv = _gaussian_start(x, init_std, eps, noise)
        return _ascend(model, x, x_adv, eps, alpha, steps, branch, y=y, target=target_logits,
                       beta=beta, label_smoothing=label_smoothing, compile_mode=compile_mode)
