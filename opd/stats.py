"""Statistics shared by eval, report and compare: one interval for an accuracy, everywhere."""

from __future__ import annotations

import math


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sane at p = 0 or 1 and for small n, unlike p ± 1.96·se
    (the Wald interval, which gives [1, 1] at accuracy 1)."""
    if n <= 0:
        return 0.0, 1.0
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    return max(0.0, center - half), min(1.0, center + half)
