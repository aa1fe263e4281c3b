"""`least_passing`, the one bisection every budget search uses (--target-macs and --budget-ms
of the filter methods, dpf-filter's and density's --budget-ms)."""

from __future__ import annotations

import pytest

from compress.selection import least_passing


def test_it_finds_the_threshold_to_the_step_size():
    tried = []

    def passes(x: float) -> bool:
        tried.append(x)
        return x >= 0.3

    found = least_passing(passes, 0.0, 1.0, 10)
    assert 0.3 <= found <= 0.3 + 2 ** -10
    assert tried[0] == 1.0 and len(tried) == 11  # the far end first, then one per step


def test_the_far_end_is_returned_unsearched_when_it_fails():
    tried = []
    assert least_passing(lambda x: tried.append(x) or False, 0.0, 0.9, 6) == 0.9
    assert tried == [0.9]


@pytest.mark.parametrize("threshold", [0.0, 0.01, 0.3, 0.5, 0.74, 0.99, 1.0])
def test_density_depth_search_visits_the_scales_of_a_plain_bisection(threshold):
    """Density bisects the largest density scale that meets the budget; it calls
    `least_passing` on the depth ``1 - scale`` with depth 1 (scale 0) taken unmeasured. The
    scales it measures and the one it keeps are those of a bisection on the scale itself."""
    def meets(scale: float) -> bool:
        return scale <= threshold

    low, high, plain = 0.0, 1.0, []
    for _ in range(6):
        middle = (low + high) / 2
        plain.append(middle)
        low, high = (middle, high) if meets(middle) else (low, middle)

    seen = []

    def by_depth(depth: float) -> bool:
        if depth == 1.0:
            return True
        seen.append(1.0 - depth)
        return meets(1.0 - depth)

    assert 1.0 - least_passing(by_depth, 0.0, 1.0, 6) == low
    assert seen == plain
