"""The model registry: one decorator to register a builder, one function to build by name."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from torch import nn

ModelBuilder = Callable[..., "nn.Module"]
BUILTIN_FAMILIES = ("deconvnet", "deeplabv3", "fcn", "mobilenetv3", "segnet", "unet")  # architectures/ modules that register on import

_BUILDERS: dict[str, ModelBuilder] = {}
_PAPERS: dict[str, str] = {}


def register_model(name: str | None = None, *, paper: str = "") -> Callable[[ModelBuilder], ModelBuilder]:
    """Register a builder under `name` (default: the function's name)."""

    def wrapper(fn: ModelBuilder) -> ModelBuilder:
        key = name or fn.__name__
        if key in _BUILDERS:
            raise ValueError(f"A model named {key!r} is already registered.")
        _BUILDERS[key] = fn
        _PAPERS[key] = paper
        return fn

    return wrapper


def _load_builtin_families() -> None:
    for family in BUILTIN_FAMILIES:
        importlib.import_module(f"segmill.models.architectures.{family}")


def list_models() -> list[str]:
    """Names of every registered architecture, sorted."""
    _load_builtin_families()
    return sorted(_BUILDERS)


def get_model_builder(name: str) -> ModelBuilder:
    _load_builtin_families()
    try:
        return _BUILDERS[name]
    except KeyError:
        raise ValueError(
            f"Unknown model {name!r}; choose one of: {', '.join(list_models())}."
        ) from None


def model_paper(name: str) -> str:
    """The paper a registered architecture comes from (for the docs' model table)."""
    get_model_builder(name)
    return _PAPERS[name]


def get_model(name: str, **kwargs) -> "nn.Module":
    """Build a registered model; keyword arguments go to its builder (e.g. `num_classes=21`)."""
    return get_model_builder(name)(**kwargs)
