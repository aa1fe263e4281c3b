"""Recipes and checkpoints a user hands us, fuzzed: every reader answers in one line with
exit 2 (or works), never a traceback or exit 1."""

from __future__ import annotations

import dataclasses
import io
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compress.errors import CompressError
from compress.recipe import Recipe, load_recipe

sys.path.insert(0, str(Path(__file__).parent))
from corruption import assert_answered, mutate, mutation_lists  # noqa: E402

FIELDS = [f.name for f in dataclasses.fields(Recipe)]
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=8)
FUZZ = settings(max_examples=80, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS + ["unknown_key"]), VALUES, max_size=5))
def test_fuzzed_recipe_fields_are_refused_in_one_line(tmp_path, fields):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(fields))
    try:
        load_recipe(path).validate()
    except CompressError as exc:
        assert "\n" not in str(exc)


@FUZZ
@given(st.binary(max_size=200))
def test_fuzzed_recipe_bytes_are_refused_in_one_line(tmp_path, data):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(data)
    try:
        load_recipe(path).validate()
    except CompressError as exc:
        assert "\n" not in str(exc)


@pytest.fixture(scope="module")
def payload(dpf_run) -> dict:
    return torch.load(dpf_run / "checkpoint.pt", weights_only=True)


READERS = (("inspect",), ("evaluate", "--max-test-samples", "32"))
PARTS = ("model", "data", "state_dict", "masks", "recipe", "metrics", "structure",
         "training_state", "method", "format_version")


@FUZZ
@given(st.sampled_from(PARTS), VALUES)
def test_fuzzed_checkpoint_fields_never_crash_a_reader(payload, tmp_path, cli, part, value):
    """One part of a real checkpoint replaced by any value the unpickler can carry."""
    path = tmp_path / "checkpoint.pt"
    torch.save({**payload, part: value}, path)
    for reader in READERS:
        assert_answered(cli(reader[0], path, *reader[1:]))


@FUZZ
@given(st.sampled_from(("state_dict", "masks")), st.text(max_size=20),
       st.lists(st.integers(0, 5), max_size=3))
def test_fuzzed_checkpoint_tensors_never_crash_a_reader(payload, tmp_path, cli, part, name,
                                                        shape):
    """A weight or mask of another shape, or under another name."""
    entries = dict(payload[part] or {})
    if entries:
        victim = sorted(entries)[len(name) % len(entries)]
        entries[name or victim] = torch.zeros(shape)
    path = tmp_path / "checkpoint.pt"
    torch.save({**payload, part: entries}, path)
    for reader in READERS:
        assert_answered(cli(reader[0], path, *reader[1:]))


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation_lists())
def test_fuzzed_checkpoint_bytes_never_crash_a_reader(dpf_run, tmp_path, cli, mutations):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(mutate((dpf_run / "checkpoint.pt").read_bytes(), mutations))
    for reader in READERS:
        assert_answered(cli(reader[0], path, *reader[1:]))


def _rewritten_archive(source: Path, entry_suffix: str, mutations) -> bytes:
    """``source``'s zip archive written anew with one entry's bytes mutated, so that the
    damage passes the archive's checksums and reaches the reader behind them."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(source) as original, \
            zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as archive:
        for info in original.infolist():
            data = original.read(info.filename)
            if info.filename.endswith(entry_suffix):
                data = mutate(data, mutations)
            archive.writestr(info.filename, data)
    return buffer.getvalue()


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(("data.pkl", "/data/0", "byteorder")), mutation_lists())
def test_fuzzed_checkpoint_archive_entries_never_crash_a_reader(dpf_run, tmp_path, cli, entry,
                                                                mutations):
    """Damage inside the archive's entries (the pickle that names the tensors, a tensor's
    bytes, the byte order) with valid checksums, so the unpickler and tensor reader meet it."""
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(_rewritten_archive(dpf_run / "checkpoint.pt", entry, mutations))
    for reader in READERS:
        assert_answered(cli(reader[0], path, *reader[1:]))
