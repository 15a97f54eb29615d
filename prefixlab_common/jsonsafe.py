"""Strict JSON of measured numbers: JSON has no NaN or infinity, so a number that is not finite
(a quantity that could not be measured) is written as null."""

from __future__ import annotations

import math


def finite_json(obj):
    """NaN/inf -> None, recursively through dicts, lists and tuples (tuples become lists); a tensor
    or array is first turned into nested lists, so its values stay as they are (ints stay ints)."""
    if hasattr(obj, "tolist") and not isinstance(obj, (float, int)):
        obj = obj.tolist()
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj
