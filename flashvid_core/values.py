"""The one parser of option values given as strings (lmms-eval's --model_args, the official scripts: "True",
"0.70", "8"), shared by FlashVIDConfig, the methods' settings and the model classes."""

from __future__ import annotations

from typing import Any

TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")
NONE_WORDS = ("none", "null", "inf", "")


def parse_text(key: str, value: Any, kind: type, optional: bool = False) -> Any:
    """`value` as `kind` (bool, int, float or str) when it is a string; other values pass unchanged (the caller's
    constructor validates them). optional: "none", "null", "inf" or "" mean None. A string that does not parse
    raises ValueError naming the key and the expected type."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if optional and text.lower() in NONE_WORDS:
        return None
    if kind is bool:
        if text.lower() in TRUE_WORDS:
            return True
        if text.lower() in FALSE_WORDS:
            return False
        raise ValueError(f"{key}={value!r} is invalid: expected True or False")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise ValueError(f"{key}={value!r} is invalid: expected {expected}") from None
    return text
