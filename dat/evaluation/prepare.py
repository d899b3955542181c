"""The model the attacks run: a probe that names what cannot be evaluated, a BN-folded copy
checked against the original's logits, a wrapper for bf16 autocast / channels_last, and
an optional ``torch.compile`` of the result."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from ..attacks import _compiler_supported, compiler_failure, is_compiled
from ..models.folding import FoldError, fold_batchnorm, max_logit_gap, summarize_unfolded
from .suite import EvaluationError

__all__ = ["COMPILE_MODES", "FOLD_CHECK_EXAMPLES", "FOLD_TOLERANCE", "FastForward",
           "channels_last_failure", "check_compile_mode", "compile_for_attacks",
           "compile_errors", "exact_matmuls",
           "fold_for_attacks", "has_hooks", "model_device", "probe"]

FOLD_CHECK_EXAMPLES = 64  # inputs on which the BN-folded model must match the original
FOLD_TOLERANCE = 1e-4  # relative logit gap, fp32 without TF32: rounding gives ~1e-6
# torch.compile modes for the evaluated forward. No CUDA graphs: the attacks run on many
# batch sizes (only still-correct points), a graph replay overwrites the outputs of the
# call before, and AutoAttack's code has not been checked for keeping such outputs.
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs")


class _ToChannelsLast(torch.autograd.Function):
    """``x`` in channels_last layout, with the gradient handed back in x's own layout."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.contiguous(memory_format=torch.channels_last)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


class FastForward(nn.Module):
    """Runs the wrapped model under bf16 autocast and/or on channels_last images.

    Attacks still see NCHW float32 tensors: the layout change happens inside the forward
    (oneDNN's channels_last convolutions make PGD 1.6x faster on a CPU, BENCHMARKS.md),
    and logits come back as float32.
    """

    def __init__(self, model: nn.Module, bf16: bool, channels_last: bool) -> None:
        super().__init__()
        self.model, self.bf16, self.channels_last = model, bf16, channels_last

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            x = _ToChannelsLast.apply(x)
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            return self.model(x).float()


def channels_last_failure(model: nn.Module, x: Tensor) -> str | None:
    """None when a forward and an input-gradient backward run on channels_last images, else
    torch's first error line (a model that ``.view``s a feature map fails there)."""
    x = x.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = FastForward(model, bf16=False, channels_last=True)(x)
            torch.autograd.grad(out.float().sum(), x)  # leaves the parameters' .grad alone
    except RuntimeError as err:
        return next((line for line in str(err).splitlines() if line.strip()),
                    type(err).__name__)[:160]
    return None


def has_hooks(model: nn.Module) -> bool:
    """Whether a module carries forward hooks, which a folded copy would not run."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@contextlib.contextmanager
def exact_matmuls(device: torch.device) -> Iterator[None]:
    """TF32 off inside, on CUDA (its 1e-3 rounding would hide a slightly wrong fold), through
    whichever of torch's two TF32 APIs the user set (reading one after the other raises)."""
    if device.type != "cuda":
        yield
        return
    try:  # the legacy flags
        flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

        def restore() -> None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    except RuntimeError:  # the user set the per-operation fp32_precision API
        matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
        flags = matmul.fp32_precision, conv.fp32_precision
        matmul.fp32_precision = conv.fp32_precision = "ieee"

        def restore() -> None:
            matmul.fp32_precision, conv.fp32_precision = flags
    try:
        yield
    finally:
        restore()


def probe(model: nn.Module, x: Tensor) -> None:
    """One forward on two images: an EvaluationError naming the fix when the model cannot
    be evaluated as "images in [0, 1] -> (N, classes) logits" (its own error chained)."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    try:
        with torch.no_grad():
            out = model(x)
    except torch.cuda.OutOfMemoryError:
        raise  # not the model's fault: lower batch_size
    except (RuntimeError, AssertionError, ValueError) as err:  # timm's ViT: AssertionError
        if isinstance(err, RuntimeError) and weight is not None and weight.dtype != x.dtype:
            low = weight.dtype in (torch.float16, torch.bfloat16)
            raise EvaluationError(
                f"the model's parameters are {weight.dtype}; evaluate it in float32 "
                "(model.float())" + (" and pass precision='bf16' (--precision bf16) for "
                                     "attacks under bf16 autocast" if low else "")) from err
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise EvaluationError(
            f"the model fails on images of shape {tuple(x.shape[1:])} ({first[:160]}); "
            "evaluate it on data of the size and channels it was built for") from err
    if not torch.is_tensor(out):
        raise EvaluationError(
            f"the model returns a {type(out).__name__}, not a logits tensor; wrap it so that "
            "forward returns the (N, classes) logits (e.g. out['logits'] or out[0])")
    if out.dim() != 2 or out.shape[0] != len(x) or out.shape[1] < 2:
        raise EvaluationError(
            f"the model returns shape {tuple(out.shape)} for {len(x)} images; it must return "
            "(N, classes) logits with at least 2 classes")


def fold_for_attacks(model: nn.Module, enabled: bool, x: Tensor,
                     hooked: bool) -> tuple[nn.Module, dict]:
    """The model the attacks run: a BN-folded copy when enabled, possible and verified.

    ``hooked``: the model carries forward hooks (checked before the evaluation adds its own).
    """
    if not enabled:
        return model, {"folded": 0}
    if is_compiled(model):
        return model, {"folded": 0, "note": "a compiled model is evaluated as given"}
    if hooked:
        return model, {"folded": 0, "note": "the model has forward hooks, which a folded copy "
                                            "would not run; evaluated unfolded"}
    unfolded: dict[str, str] = {}
    try:
        folded, n = fold_batchnorm(model, unfolded=unfolded)
    except FoldError as err:
        return model, {"folded": 0, "note": f"{err}; evaluated unfolded"}
    except Exception as err:  # anything else a user's model raises while being traced
        return model, {"folded": 0, "note": f"folding failed ({type(err).__name__}: "
                                            f"{str(err)[:100]}); evaluated unfolded"}
    if n == 0:
        note = (f"none of the model's {len(unfolded)} BatchNorm layers folds: "
                f"{summarize_unfolded(unfolded)}" if unfolded
                else "the model has no BatchNorm layer")
        return model, {"folded": 0, "note": note}
    with exact_matmuls(x.device):
        gap = max_logit_gap(model, folded, x)
    if not gap <= FOLD_TOLERANCE:  # also catches NaN
        return model, {"folded": 0, "note": f"folded logits differ by {gap:.1e} (relative); "
                                            "evaluated unfolded"}
    return folded, {"folded": n, "max_logit_gap": gap}


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter or buffer lives (CPU for a model with neither)."""
    tensor = next(iter(list(model.parameters()) + list(model.buffers())), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def check_compile_mode(mode: str) -> None:
    """One-line EvaluationError for a compile mode the evaluation does not run."""
    if mode in ("reduce-overhead", "max-autotune"):
        raise EvaluationError(
            f"compile mode {mode!r} replays CUDA graphs, which the evaluation does not use "
            "(its attacks run on many batch sizes); use default or max-autotune-no-cudagraphs")
    if mode not in COMPILE_MODES:
        raise EvaluationError(f"compile mode {mode!r}; use one of {', '.join(COMPILE_MODES)}")
    if mode != "off" and not _compiler_supported():
        raise EvaluationError(f"compiling the evaluation needs torch >= 2.11 (this is "
                              f"{torch.__version__}); upgrade torch or use compile mode off")


def compile_for_attacks(net: nn.Module, mode: str) -> nn.Module:
    """``net`` under ``torch.compile`` (``mode``), or ``net`` itself for "off".

    Batch sizes vary (the last batch, the points still correct after an attack): torch
    recompiles once with a dynamic batch dimension and then reuses that graph. The caller
    freezes the parameters, so the backward computes only the input gradient.
    """
    check_compile_mode(mode)
    if mode == "off":
        return net
    return torch.compile(net, mode=None if mode == "default" else mode)


@contextlib.contextmanager
def compile_errors(mode: str) -> Iterator[None]:
    """Turn a compiler failure (torch._dynamo / _inductor) into one line naming the fix."""
    try:
        yield
    except Exception as err:
        reason = compiler_failure(err) if mode != "off" else None
        if reason is None:
            raise
        raise EvaluationError(f"the model does not compile ({reason[:160]}); evaluate it with "
                              "compile_mode='off' (--compile off)") from err
