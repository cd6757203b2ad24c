"""The registry of compression methods: each module of this package registers its `Method` with `register`."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

from lmms_eval_models.methods.base import Method

_METHODS: dict[str, Method] = {}
# Modules of the package that hold the machinery, not a method.
_INFRASTRUCTURE = frozenset({"base", "registry", "settings"})


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: add one instance of the method to the registry under `cls.name`."""
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice: {type(_METHODS[cls.name]).__module__} and "
                         f"{cls.__module__}")
    _METHODS[cls.name] = cls()
    return cls


def discover() -> None:
    """Import every method module of the package (a new method is a new file; nothing else lists it)."""
    package = __name__.rsplit(".", 1)[0]
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module.name not in _INFRASTRUCTURE and not module.name.startswith("_"):
            importlib.import_module(f"{package}.{module.name}")


def all_methods() -> tuple[Method, ...]:
    """Every registered method, in listing order."""
    return tuple(sorted(_METHODS.values(), key=lambda method: (method.order, method.name)))


def method_names() -> tuple[str, ...]:
    return tuple(method.name for method in all_methods())


def get_method(name: object) -> Method:
    """The registered method `name`, or ValueError naming the allowed ones."""
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"method={name!r} is invalid: allowed {', '.join(method_names())}")
    return _METHODS[name]
