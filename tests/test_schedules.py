import pytest

from compress.schedules import CubicSchedule, constant_schedule


def test_cubic_schedule_endpoints_and_shape():
    s = CubicSchedule(final_sparsity=0.9, start_step=100, end_step=1100)
    assert s(0) == 0.0 and s(100) == 0.0
    assert s(1100) == pytest.approx(0.9) and s(5000) == pytest.approx(0.9)
    # halfway: s_f + (s_i - s_f) * 0.5**3
    assert s(600) == pytest.approx(0.9 - 0.9 * 0.125)
    values = [s(t) for t in range(100, 1101, 50)]
    assert values == sorted(values)
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert steps[0] > steps[-1]  # fast at first, slow at the end


def test_cubic_schedule_with_initial_sparsity():
    s = CubicSchedule(0.8, 0, 10, initial_sparsity=0.2)
    assert s(0) == pytest.approx(0.2) and s(10) == pytest.approx(0.8)
    assert s(5) == pytest.approx(0.8 - 0.6 * 0.5**3)


def test_constant_schedule():
    s = constant_schedule(0.7)
    assert s(0) == s(1) == s(10**6) == 0.7


def test_schedule_rejects_reversed_steps():
    with pytest.raises(ValueError):
        CubicSchedule(0.5, 10, 5)
