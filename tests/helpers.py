"""Helpers several test modules share (the fixtures are in conftest.py)."""

from __future__ import annotations


def assert_clean_failure(result, *fragments: str) -> None:
    """A command line refusal: exit 2, one ``error:`` line, no traceback, each fragment said."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "error:" in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


def stop_after_first(result) -> None:
    """An on_epoch callback that interrupts a run after its first epoch, as Ctrl-C would."""
    if result.epoch == 1:
        raise KeyboardInterrupt
