"""Floats on their way to JSON: NaN and infinities become ``null``.

The registry keeps NaN where a loss diverged, but JSON has no NaN, and a chart should show a gap
rather than a made-up number. The response schemas apply :func:`finite` as they validate, so no
code building a response has to remember it.
"""

from __future__ import annotations

import math
from typing import Annotated

from pydantic import BeforeValidator


def finite(value: float | None) -> float | None:
    """``None`` for NaN/inf (and ``None``); the value as a float otherwise."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _finite_or_zero(value: float | None) -> float:
    return finite(value) or 0.0


# A float the registry may hold as NaN; ``null`` in the API.
FiniteOrNull = Annotated[float | None, BeforeValidator(finite)]
# A duration that is never null in the API: a NaN or missing one reads as 0.
FiniteOrZero = Annotated[float, BeforeValidator(_finite_or_zero)]
