"""Ways a file goes bad, shared by the hostile-input tests and benchmarks/fuzz_readers.py.

A mutation is ``(kind, position, value)``; positions wrap around the data, so any triple of
integers is a valid mutation of any file and a fuzzer can draw them freely.
"""

from __future__ import annotations

import random
from pathlib import Path

KINDS = ("flip", "byte", "truncate", "huge", "zero-run", "duplicate")
Mutation = tuple[str, int, int]


def mutate(data: bytes, mutations: list[Mutation]) -> bytes:
    out = bytearray(data)
    for kind, position, value in mutations:
        if not out:
            break
        at = position % len(out)
        if kind == "flip":
            out[at] ^= 1 << (value % 8)
        elif kind == "byte":
            out[at] = value % 256
        elif kind == "truncate":
            del out[at:]
        elif kind == "huge":  # a length or dimension varint becomes enormous
            out[at:at + 5] = b"\xff\xff\xff\xff\x0f"
        elif kind == "zero-run":
            end = min(len(out), at + 1 + value % 64)
            out[at:end] = bytes(end - at)
        elif kind == "duplicate":
            end = min(len(out), at + 1 + value % 64)
            out[end:end] = out[at:end]
    return bytes(out)


def random_mutations(rng: random.Random, most: int = 3) -> list[Mutation]:
    return [(rng.choice(KINDS), rng.randrange(2**31), rng.randrange(2**16))
            for _ in range(rng.randint(1, most))]


def mutation_lists():
    """The hypothesis strategy for 1 to 3 mutations (hypothesis is imported only here, so
    the fuzzing benchmark runs without it)."""
    from hypothesis import strategies as st

    return st.lists(st.tuples(st.sampled_from(KINDS), st.integers(0, 2**31),
                              st.integers(0, 2**16)), min_size=1, max_size=3)


def assert_answered(result) -> None:
    """A reader given a damaged file either works (exit 0) or says why in one line (2)."""
    assert result.exit_code in (0, 2), result.output
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert len(result.output.strip().splitlines()) == 1, result.output


def assert_refused(result, *fragments: str) -> None:
    """A subprocess refused its input: exit 2, one short line on stderr naming each of
    ``fragments``, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1 and len(lines[0]) < 400, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def files_under(root: Path) -> set[str]:
    """Every file under ``root`` (where a command ran, its HOME and TMPDIR), but for
    matplotlib's font cache, which a command that imports it writes into HOME: a refused
    command must leave this set as it found it."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()
            and not str(p.relative_to(root)).startswith(".cache/matplotlib/")}
