"""No output of any family changes: every method's outputs on the tiny checkpoints against the recorded ones
(tests/family_outputs.py records them; token ids and lengths exact, logit sums within 1e-5 relative)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import pytest
from family_outputs import VARIANTS, family_outputs, fixture_path
from test_patches_methods import FAMILIES, Case, case  # noqa: F401  (the `case` fixture)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_outputs_are_unchanged(case: Callable[[str], Case], family: str) -> None:  # noqa: F811
    recorded = json.loads(fixture_path().read_text())[family]
    assert sorted(recorded) == sorted(VARIANTS)
    got = family_outputs(case(family))
    for variant, expected in recorded.items():
        for key, value in expected.items():
            if isinstance(value, float):
                assert math.isclose(got[variant][key], value, rel_tol=1e-5, abs_tol=1e-6), (variant, key)
            else:
                assert got[variant][key] == value, (variant, key)
