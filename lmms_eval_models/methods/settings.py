"""One settings object over every method's own options: the model_args keys of all methods, validated together.

Each method declares its keys as a frozen `Options` dataclass with the paper's defaults; `compose_settings` joins
them into one frozen dataclass (`MethodSettings`) so that a model class validates every method's keys for every
run (a typo fails on the vanilla run too) and a method reads only its own (`options_for`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from flashvid_core.values import parse_text
from lmms_eval_models.methods.base import Method


class _ComposedSettings:
    """Behaviour of the composed settings class; its fields come from the methods' Options."""

    _options: dict[str, type]  # method name -> its Options class, set by compose_settings

    def __post_init__(self) -> None:
        # Each method's Options validates (and normalises, e.g. int -> float) its own fields.
        for options_class in self._options.values():
            names = [field.name for field in dataclasses.fields(options_class)]
            checked = options_class(**{name: getattr(self, name) for name in names})
            for name in names:
                object.__setattr__(self, name, getattr(checked, name))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Any:
        """Build from keyword options, typed or as strings (lmms-eval model_args: "2", "0.6", "mean").

        An unknown key raises ValueError naming it and the allowed keys; a string that does not parse raises
        ValueError naming the key and the expected type.
        """
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ValueError(f"unknown baseline option(s) {unknown}: allowed keys are {', '.join(fields)}")
        parsed: dict[str, Any] = {}
        for name, value in options.items():
            kind = type(fields[name].default)
            parsed[name] = parse_text(name, value, kind) if kind in (int, float) else value
        return cls(**parsed)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def options_for(self, method: str) -> Any:
        """The method's own Options with these values (None for a method without options)."""
        options_class = self._options.get(method)
        if options_class is None:
            return None
        return options_class(**{field.name: getattr(self, field.name) for field in dataclasses.fields(options_class)})


def compose_settings(methods: Sequence[Method]) -> type:
    """The frozen dataclass whose fields are every method's Options fields, in listing order."""
    fields: dict[str, dataclasses.Field] = {}
    options: dict[str, type] = {}
    for method in methods:
        if method.Options is None:
            continue
        options[method.name] = method.Options
        for field in dataclasses.fields(method.Options):
            if field.name in fields and fields[field.name].default != field.default:
                raise ValueError(f"option {field.name!r} is declared by two methods with different defaults")
            fields.setdefault(field.name, field)
    settings = dataclasses.make_dataclass(
        "MethodSettings",
        [(name, field.type, dataclasses.field(default=field.default)) for name, field in fields.items()],
        bases=(_ComposedSettings,), frozen=True, namespace={"_options": options,
                                                           "__module__": "lmms_eval_models.methods"},
    )
    settings.__doc__ = ("Every method's options; defaults are the paper's Appendix C.1 values. Frozen: read, never "
                        "written. Fields: " + ", ".join(fields))
    return settings
