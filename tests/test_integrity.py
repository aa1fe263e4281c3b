"""Exported files prove they are intact, and no file a user hands us makes a command fall
over: one line and exit 2, never a traceback, exit 1, or an allocation the file asks for."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, numpy_helper

from compress.errors import CompressError
from export import integrity
from export.integrity import INTEGRITY_KEY, digests, recorded_digests
from export.onnx_export import export_checkpoint
from export.packing import PREFIX

sys.path.insert(0, str(Path(__file__).parent))
from corruption import assert_answered, mutate, mutation_lists  # noqa: E402


@pytest.fixture(scope="module")
def packed(dpf_run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("integrity") / "packed.onnx"
    export_checkpoint(dpf_run, path, pack="bitmask", verify=False)
    return path


@pytest.fixture(scope="module")
def unpacked(dpf_run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("integrity") / "unpacked.onnx"
    export_checkpoint(dpf_run, path, pack="none", verify=False)
    return path


def _variant(good: Path, out: Path, change) -> Path:
    model = onnx.load(str(good))
    change(model)
    onnx.save(model, str(out))
    return out


def _init(model: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _replace(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    _init(model, name).CopyFrom(numpy_helper.from_array(array, name))


def _one_line_exit_2(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


READERS = (("inspect",), ("evaluate", "--max-test-samples", "64"),
           ("bench", "--runs", "2", "--warmup", "0"))


def _decoded_digest(model: onnx.ModelProto) -> str:
    """Version 1's weights digest: over the weights onnxruntime decodes."""
    return integrity._decoded_weights_digest(integrity.computed_weights(model, "the model"))


def test_export_records_digests_that_match(packed, unpacked, cli):
    model, twin = onnx.load(str(packed)), onnx.load(str(unpacked))
    recorded = recorded_digests(model)
    assert recorded == {"version": 2, **digests(model)}
    # the weights digest is over the bytes stored: the packed file and its unpacked twin
    # compute with the same weights (what version 1 hashed) but store different bytes
    assert _decoded_digest(model) == _decoded_digest(twin)
    assert recorded["weights"] != recorded_digests(twin)["weights"]
    report = json.loads(cli("evaluate", packed, "--max-test-samples", "32", "--json").stdout)
    assert report["integrity"] == {"status": "verified", "differs": []}


def _set_byte(name: str):
    def change(model):
        tensor = _init(model, name)
        data = bytearray(tensor.raw_data)
        data[len(data) // 2] ^= 0x10
        tensor.raw_data = bytes(data)
    return change


@pytest.mark.parametrize("name", [PREFIX + "low", PREFIX + "top", PREFIX + "field1",
                                  "features.0.bias"])
def test_the_digest_check_decodes_nothing(packed, tmp_path, cli, monkeypatch, name):
    """A changed byte of the packed stream, of a decoder constant or of a dense initializer
    is refused from the stored bytes alone: the check runs with decoding made impossible."""
    def no_decoding(*args, **kwargs):
        raise AssertionError("the digest check decoded the weights")

    monkeypatch.setattr(integrity, "computed_weights", no_decoding)
    assert integrity.check_integrity(onnx.load(str(packed)), "good").status == "verified"
    bad = _variant(packed, tmp_path / "byte.onnx", _set_byte(name))
    with pytest.raises(CompressError, match="its weights differ from what was exported"):
        integrity.check_integrity(onnx.load(str(bad)), "bad")
    monkeypatch.undo()
    for reader in READERS:
        assert "its weights differ" in _one_line_exit_2(cli(reader[0], bad, *reader[1:]))


def test_a_verified_file_is_read_without_decoding(packed, cli, monkeypatch):
    """inspect checks and counts a verified file without onnxruntime, and bench opens no
    session on it but its timing one; bench reports its peak memory and its session's start."""
    import onnxruntime

    opened = []

    class Counted(onnxruntime.InferenceSession):
        def __init__(self, path_or_bytes, *args, **kwargs):
            opened.append(str(path_or_bytes)[:200])
            super().__init__(path_or_bytes, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Counted)
    report = json.loads(cli("inspect", packed, "--json").stdout)
    assert report["integrity"]["status"] == "verified" and report["packing"] and opened == []
    payload = json.loads(cli("bench", packed, "--runs", "2", "--warmup", "0", "--json").stdout)
    # besides the file's timing session, only the peak's probe layers (export.runtime.peak)
    assert [p for p in opened if "compress-peak-" not in p] == [str(packed)]
    assert len(opened) == 5
    assert payload["peak_rss_mb"] > 0 and payload["session_start_ms"] > 0


def _graph_and_stream_damaged(model):
    """A node's text changed (the graph digest fails, the computation does not change) and
    the stream made undecodable: every top-level block marked occupied, so the decoder
    gathers past the nibbles stored and onnxruntime refuses to run it."""
    model.graph.node[0].doc_string = "edited"
    top = _init(model, PREFIX + "top")
    top.raw_data = b"\xff" * len(top.raw_data)


def _version_1(model):
    """The record an earlier compress wrote: the weights digest over decoded weights."""
    record = {"version": 1, **digests(model), "weights": _decoded_digest(model)}
    for prop in model.metadata_props:
        if prop.key == INTEGRITY_KEY:
            prop.value = json.dumps(record)


def test_version_1_records_still_verify(packed, tmp_path, cli):
    old = _variant(packed, tmp_path / "v1.onnx", _version_1)
    for reader in READERS:
        report = json.loads(cli(reader[0], old, *reader[1:], "--json").stdout)
        assert report["integrity"] == {"status": "verified", "differs": []}
    assert json.loads(cli("inspect", old, "--json").stdout)["layers"] == \
        json.loads(cli("inspect", packed, "--json").stdout)["layers"]
    bad = _variant(old, tmp_path / "v1-bad.onnx", _set_byte(PREFIX + "low"))
    assert "its weights differ" in _one_line_exit_2(cli("inspect", bad))


def test_nothing_is_decoded_after_the_graph_digest_failed(packed, tmp_path, cli):
    """Version 1 decodes to check the weights, but not once the graph failed: its one line
    names the graph alone, never the stream that onnxruntime could not decode."""
    old = _variant(packed, tmp_path / "v1.onnx", _version_1)
    bad = _variant(old, tmp_path / "v1-graph.onnx", _graph_and_stream_damaged)
    for reader in READERS:
        line = _one_line_exit_2(cli(reader[0], bad, *reader[1:]))
        assert "its graph differ from what was exported" in line, line
    # version 2 names both from the stored bytes, without decoding either
    bad = _variant(packed, tmp_path / "v2-graph.onnx", _graph_and_stream_damaged)
    for reader in READERS:
        line = _one_line_exit_2(cli(reader[0], bad, *reader[1:]))
        assert "its graph and weights differ from what was exported" in line, line


def test_exported_metadata_holds_no_machine_path(packed, dpf_run):
    text = json.dumps({p.key: p.value for p in onnx.load(str(packed)).metadata_props})
    assert str(Path(dpf_run).parent) not in text and "/usr/share" not in text
    meta = {p.key: json.loads(p.value) for p in onnx.load(str(packed)).metadata_props
            if p.key.endswith(("dataset", "recipe"))}
    assert all(entry["data_dir"] is None for entry in meta.values())


@pytest.mark.parametrize("seed", range(6))
def test_a_flipped_bit_anywhere_in_the_weights_is_caught(packed, unpacked, tmp_path, cli,
                                                         seed):
    """One bit of one stored tensor, drawn at random over all of them, packed or not."""
    rng = np.random.default_rng(seed)
    good = packed if seed % 2 else unpacked
    model = onnx.load(str(good))
    stored = [t for t in model.graph.initializer if t.raw_data]
    sizes = np.array([len(t.raw_data) for t in stored], dtype=float)
    tensor = stored[rng.choice(len(stored), p=sizes / sizes.sum())]
    data = bytearray(tensor.raw_data)
    data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
    tensor.raw_data = bytes(data)
    bad = tmp_path / "flipped.onnx"
    onnx.save(model, str(bad))
    for reader in READERS:
        line = _one_line_exit_2(cli(reader[0], bad, *reader[1:]))
        assert "integrity" in line or "damaged" in line, line


def test_altered_decoder_constant_inspect_agrees_with_onnxruntime(packed, tmp_path, cli):
    """A changed decoder constant is refused; looked at anyway, inspect counts the non-zeros
    onnxruntime runs with (its own decoder), not what the stream alone would give."""
    def halve_the_mask(model):  # the 1-bit unpack then reads only the even bits
        _replace(model, PREFIX + "field1", np.array(0, dtype=np.uint8))

    bad = _variant(packed, tmp_path / "decoder.onnx", halve_the_mask)
    assert "weights" in _one_line_exit_2(cli("inspect", bad))
    result = cli("inspect", bad, "--ignore-digest", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["integrity"]["status"] == "damaged"
    folded = tmp_path / "folded.onnx"
    from export.session import open_session

    open_session(bad, basic_only=True, save_to=folded)
    runtime = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(folded)).graph.initializer}
    for layer in report["layers"]:
        if layer["encoding"] != "dense":
            assert layer["nonzero"] == int(np.count_nonzero(runtime[layer["name"]]))
    assert report["total"]["prunable_sparsity"] > 0.9


def _nan_in_powers(model):
    powers = numpy_helper.to_array(_init(model, PREFIX + "powers")).copy()
    powers.flat[1] = np.nan
    _replace(model, PREFIX + "powers", powers)


CORRUPTIONS = {
    "nan-in-decoder-constant": _nan_in_powers,
    "huge-shape-constant": lambda m: _replace(m, "features.0.weight__shape",
                                              np.array([10**6, 10**6, 5, 5], np.int64)),
    "huge-initializer-dims": lambda m: _init(m, "features.0.bias").dims.__setitem__(0, 10**10),
    "stream-stored-as-int32": lambda m: setattr(_init(m, PREFIX + "top"), "data_type",
                                                TensorProto.INT32),
    "metadata-edited": lambda m: [setattr(p, "value", "0.99") for p in m.metadata_props
                                  if p.key.endswith("val_top1")],
    "integrity-record-removed": lambda m: [m.metadata_props.remove(p) for p in
                                           list(m.metadata_props) if p.key == INTEGRITY_KEY],
    "integrity-record-garbled": lambda m: [setattr(p, "value", "{") for p in m.metadata_props
                                           if p.key == INTEGRITY_KEY],
    "dataset-record-garbled": lambda m: [setattr(p, "value", '{"input_shape": "x"}')
                                         for p in m.metadata_props if p.key.endswith("dataset")],
    "huge-declared-input": lambda m: [setattr(d, "dim_value", 20000) for d in
                                      m.graph.input[0].type.tensor_type.shape.dim[2:]],
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_each_corruption_kind_is_one_line_and_exit_2(packed, tmp_path, cli, kind):
    bad = _variant(packed, tmp_path / f"{kind}.onnx", CORRUPTIONS[kind])
    for reader in READERS:
        _one_line_exit_2(cli(reader[0], bad, *reader[1:]))
        assert_answered(cli(reader[0], bad, *reader[1:], "--ignore-digest"))


def test_invalid_utf8_in_metadata_is_one_line(packed, tmp_path, cli):
    data = bytearray(packed.read_bytes())
    at = data.find(b"io.compress.method")
    data[at + 3] = 0xFF
    bad = tmp_path / "utf8.onnx"
    bad.write_bytes(bytes(data))
    for reader in READERS:
        assert "UTF-8" in _one_line_exit_2(cli(reader[0], bad, *reader[1:]))


def test_bench_checks_the_declared_input_before_allocating(packed, tmp_path, cli):
    wide = tmp_path / "wide.onnx"  # a graph that fits its 20000 x 20000 input (1.5 GiB)
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("ReduceMean", ["x"], ["y"], keepdims=0)], "wide",
        [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 20000, 20000])],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)],
                                     ir_version=10), wide)
    line = _one_line_exit_2(cli("bench", wide, "--max-tensor-mb", "1e6"))
    assert "--max-input-mb" in line
    line = _one_line_exit_2(cli("bench", packed, "--max-input-mb", "0.001"))
    assert "--max-input-mb" in line


def test_foreign_onnx_without_a_record_still_loads(unpacked, tmp_path, cli):
    def foreign(model):
        del model.metadata_props[:]

    path = _variant(unpacked, tmp_path / "foreign.onnx", foreign)
    report = json.loads(cli("inspect", path, "--json").stdout)
    assert report["integrity"]["status"] == "not-recorded"


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation_lists())
def test_fuzzed_protobuf_bytes_never_crash_a_reader(packed, tmp_path, cli, mutations):
    """Random damage to the file's bytes, read with the digest check on and off."""
    bad = tmp_path / "fuzzed.onnx"
    bad.write_bytes(mutate(packed.read_bytes(), mutations))
    for reader in READERS:
        for extra in ((), ("--ignore-digest",)):
            assert_answered(cli(reader[0], bad, *reader[1:], *extra))


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(["values", "low", "high", "indices", "level0", "level1", "top",
                        "split", "powers"]),
       st.lists(st.integers(0, 255), min_size=0, max_size=40), st.booleans())
def test_fuzzed_packed_stream_never_crashes_a_reader(packed, tmp_path, cli, name, data,
                                                     as_uint8):
    """A stream tensor replaced by other bytes, of another length and maybe another type."""
    def change(model):
        matches = [t for t in model.graph.initializer if t.name == PREFIX + name]
        if matches:
            array = np.array(data, dtype=np.uint8 if as_uint8 else np.int64)
            matches[0].CopyFrom(numpy_helper.from_array(array, PREFIX + name))

    bad = _variant(packed, tmp_path / "stream.onnx", change)
    for reader in READERS[:2]:
        assert_answered(cli(reader[0], bad, *reader[1:], "--ignore-digest"))


def test_sessions_never_retry_with_a_banner(packed):
    """onnxruntime's provider fallback prints a multi-line "EP Error" banner to stdout when a
    session fails to start; every session compress opens has it switched off."""
    from export.session import open_session

    assert open_session(packed)._enable_fallback is False
