"""Two-sample tests for latency distributions (scipy is not installed; these are checked in
tests/test_support_stats.py against values worked out by hand and against scipy's published
results for the same inputs).

- `mann_whitney_p`: two-sided Mann-Whitney U test, normal approximation with tie correction
  and continuity correction (scipy's `mannwhitneyu(method="asymptotic")`). Sensitive to one
  distribution being shifted against the other (a median that moves).
- `ks_p`: two-sample Kolmogorov-Smirnov test, asymptotic Kolmogorov distribution with
  Stephens' small-sample correction (Numerical Recipes `kstwo`). Sensitive to any difference
  in shape, e.g. one request in ten taking a slower path.
- `indistinguishable`: both, each at `alpha`. Under the null hypothesis (one distribution)
  each p-value is uniform on [0, 1], so a check at alpha = 0.001 per test fails spuriously in
  about 0.2 % of runs; a real difference of a store round trip is found with p < 1e-9 at the
  sample sizes the tests use.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Comparison", "indistinguishable", "ks_p", "mann_whitney_p"]


def _normal_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z."""
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def mann_whitney_p(x: Sequence[float], y: Sequence[float]) -> float:
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        raise ValueError("both samples need values")
    pooled = sorted([(v, 0) for v in x] + [(v, 1) for v in y])
    ranks = [0.0] * len(pooled)
    ties = 0.0
    i = 0
    while i < len(pooled):
        j = i
        while j + 1 < len(pooled) and pooled[j + 1][0] == pooled[i][0]:
            j += 1
        rank = (i + j) / 2 + 1  # average rank of the tie group (1-based)
        for k in range(i, j + 1):
            ranks[k] = rank
        t = j - i + 1
        ties += t**3 - t
        i = j + 1
    r1 = sum(rank for rank, (_, group) in zip(ranks, pooled, strict=True) if group == 0)
    u1 = r1 - n * (n + 1) / 2
    mean = n * m / 2
    total = n + m
    variance = n * m / 12 * ((total + 1) - ties / (total * (total - 1)))
    if variance <= 0:
        return 1.0
    z = (abs(u1 - mean) - 0.5) / math.sqrt(variance)
    return min(1.0, 2 * _normal_sf(max(z, 0.0)))


def _kolmogorov_q(lam: float) -> float:
    """Q_KS(lambda) = 2 sum_{k>=1} (-1)^(k-1) exp(-2 k^2 lambda^2)."""
    if lam < 1e-3:
        return 1.0
    total = 0.0
    for k in range(1, 101):
        term = 2 * (-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam)
        total += term
        if abs(term) < 1e-12:
            break
    return max(0.0, min(1.0, total))


def ks_p(x: Sequence[float], y: Sequence[float]) -> float:
    n, m = len(x), len(y)
    if n == 0 or m == 0:
        raise ValueError("both samples need values")
    xs, ys = sorted(x), sorted(y)
    d = 0.0
    for v in sorted({*xs, *ys}):
        fx = bisect.bisect_right(xs, v) / n
        fy = bisect.bisect_right(ys, v) / m
        d = max(d, abs(fx - fy))
    en = math.sqrt(n * m / (n + m))
    return _kolmogorov_q((en + 0.12 + 0.11 / en) * d)


@dataclass(frozen=True)
class Comparison:
    mann_whitney: float
    ks: float
    alpha: float

    @property
    def same(self) -> bool:
        return self.mann_whitney >= self.alpha and self.ks >= self.alpha

    def __str__(self) -> str:
        return f"Mann-Whitney p={self.mann_whitney:.3g}, KS p={self.ks:.3g} (alpha {self.alpha})"


def indistinguishable(x: Sequence[float], y: Sequence[float], alpha: float = 0.001) -> Comparison:
    return Comparison(mann_whitney_p(x, y), ks_p(x, y), alpha)
