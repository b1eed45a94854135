"""The two-sample tests that the timing tests rely on (tests/support/stats.py)."""

from __future__ import annotations

import random

import pytest

from tests.support.stats import _kolmogorov_q, indistinguishable, ks_p, mann_whitney_p


def test_mann_whitney_matches_published_values() -> None:
    # scipy.stats.mannwhitneyu docs: males vs females, method="asymptotic" -> 0.11134688653314041
    males, females = [19, 22, 16, 29, 24], [20, 11, 17, 12]
    assert mann_whitney_p(males, females) == pytest.approx(0.11134688653314041, rel=1e-9)
    # Complete separation of 10 vs 10: U = 0, z = 49.5 / sqrt(175).
    assert mann_whitney_p(range(1, 11), range(11, 21)) == pytest.approx(1.8267e-4, rel=1e-3)
    assert mann_whitney_p([1, 2, 3], [1, 2, 3]) == 1.0
    assert mann_whitney_p([5, 5, 5], [5, 5, 5]) == 1.0  # all tied


def test_kolmogorov_distribution_critical_values() -> None:
    assert _kolmogorov_q(1.0) == pytest.approx(0.27, abs=1e-4)
    assert _kolmogorov_q(1.3581) == pytest.approx(0.05, abs=2e-4)
    assert _kolmogorov_q(1.6276) == pytest.approx(0.01, abs=1e-4)
    assert ks_p([1, 2, 3], [1, 2, 3]) == 1.0
    assert ks_p(range(40), range(100, 140)) < 1e-9


def test_same_distribution_passes_a_shift_or_a_slow_tail_fails() -> None:
    rng = random.Random(7)
    base = [rng.lognormvariate(0, 0.3) for _ in range(200)]
    same = [rng.lognormvariate(0, 0.3) for _ in range(200)]
    assert indistinguishable(base, same).same
    shifted = [v + 0.3 for v in same]  # a round trip more on every request
    assert not indistinguishable(base, shifted).same
    # One request in four takes a three times slower path.
    tail = [v * (3 if i % 4 == 0 else 1) for i, v in enumerate(same)]
    assert not indistinguishable(base, tail).same
