"""Model registry in the style of timm: ``@register(name)`` fills it, ``create`` builds."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

__all__ = ["create", "is_model_name", "list_models", "register"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model constructor ``fn(num_classes, **kwargs)`` under ``name``."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = fn
        return fn

    return add


def list_models() -> list[str]:
    """Names accepted by :func:`create` (``timm/<name>`` is accepted too)."""
    return sorted(_REGISTRY)


def is_model_name(name: str) -> bool:
    """Whether :func:`create` reads ``name`` as a model (``timm/<name>`` or a registered
    name) rather than a builder ``module:function``: it tries those first."""
    return name.startswith("timm/") or name in _REGISTRY


def create(name: str, num_classes: int = 10, dual_bn: bool = False, **kwargs) -> nn.Module:
    """Build model ``name`` taking [0, 1] images; ``dual_bn`` gives every BN two branches.

    ``timm/<name>`` builds any timm architecture (random init; no hub download).
    ``module:function`` or ``path/file.py:function`` calls your own builder (with
    ``num_classes`` when it takes that argument); it must return a module on [0, 1] images
    (normalisation inside). Keyword arguments that are ``None`` are dropped, so CLI
    defaults never override a model's own.
    """
    from ..entry_points import accepts, call_builder, check_built, is_spec, load_function
    from .dual_bn import convert_dual_bn

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if name.startswith("timm/"):
        from .timm_models import create_timm

        model = create_timm(name.removeprefix("timm/"), num_classes=num_classes, **kwargs)
    elif name in _REGISTRY:
        model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    elif is_spec(name):
        build = load_function(name, "model.name")
        model = call_builder(build, name, "model.name",
                             **({"num_classes": num_classes} if accepts(build, "num_classes")
                                else {}), **kwargs)
        check_built(model, f"model.name {name!r} returned")
    else:
        raise ValueError(
            f"unknown model {name!r}; choose one of {list_models()}, 'timm/<timm model name>' "
            "or your own builder as module:function / path/file.py:function"
        )
    return convert_dual_bn(model) if dual_bn else model
