"""Every ONNX reader bounds what it allocates before it allocates.

Each hostile file is generated here with onnx.helper (a few hundred bytes to a few KB), run
through the real console script under an address-space cap and a timeout (`run_capped`),
and must end with exit 2 and one short line, leaving nothing behind in the directory the
command ran in (its working directory and HOME).
"""

from __future__ import annotations

import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper as oh
from onnx import numpy_helper

from compress.errors import CompressError
from compress.jsontext import MAX_JSON_DEPTH, MAX_JSON_INT_DIGITS, NotJson, read_json
from export.integrity import INTEGRITY_KEY
from export.metadata import PREFIX
from export.packing import PREFIX as STREAM
from export.packing import PackedStream, PackedTensor, decoder, encode

sys.path.insert(0, str(Path(__file__).parent))
from corruption import assert_refused, files_under  # noqa: E402

LIMIT = ("--max-tensor-mb", "16")
READERS = {"inspect": (), "bench": ("--runs", "2", "--warmup", "0"),
           "evaluate": ("--data", "synthetic", "--max-test-samples", "8")}


def _tensor(name: str, value) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value), name)


def _model(nodes, initializers=(), *, inputs=None, sparse=(), metadata=None,
           opset: int = 20) -> onnx.ModelProto:
    """A graph on a float input ``x`` of shape (batch, 4) with output ``y``."""
    if inputs is None:
        inputs = [oh.make_tensor_value_info("x", T.FLOAT, ["batch", 4])]
    graph = oh.make_graph(nodes, "hostile", inputs, [oh.make_tensor_value_info("y", T.FLOAT,
                                                                               None)],
                          initializer=list(initializers), sparse_initializer=list(sparse))
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=10)
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    return model


def _into_output(name: str) -> list[onnx.NodeProto]:
    """y = x + sum(name): makes ``name`` part of what the model computes."""
    return [oh.make_node("ReduceSum", [name], ["total"], keepdims=0),
            oh.make_node("Add", ["x", "total"], ["y"])]


def _int64(name: str, values) -> onnx.TensorProto:
    return _tensor(name, np.array(values, np.int64))


SQUARE = [16384, 16384]  # 1 GiB of float32: the size the probe found through an Identity
HUGE = [1 << 20, 1 << 20]


def _loop_body(carried: bool) -> onnx.GraphProto:
    """A Loop body that keeps its condition and either doubles a carried vector or emits one
    1024-float slice per iteration."""
    inputs = [oh.make_tensor_value_info("i", T.INT64, []),
              oh.make_tensor_value_info("go_in", T.BOOL, [])]
    nodes = [oh.make_node("Identity", ["go_in"], ["go_out"])]
    outputs = [oh.make_tensor_value_info("go_out", T.BOOL, [])]
    if carried:
        inputs.append(oh.make_tensor_value_info("v_in", T.FLOAT, [None]))
        nodes.append(oh.make_node("Concat", ["v_in", "v_in"], ["v_out"], axis=0))
        outputs.append(oh.make_tensor_value_info("v_out", T.FLOAT, [None]))
    else:
        nodes.append(oh.make_node("Identity", ["slice"], ["scan"]))
        outputs.append(oh.make_tensor_value_info("scan", T.FLOAT, [1024]))
    return oh.make_graph(nodes, "body", inputs, outputs)


def _sparse(dims, name: str = "sp") -> onnx.SparseTensorProto:
    sparse = onnx.SparseTensorProto(dims=dims)
    sparse.values.CopyFrom(_tensor(name, np.ones(1, np.float32)))
    sparse.indices.CopyFrom(_int64(name + "_at", [0]))
    return sparse


def _runtime_scalar() -> list[onnx.NodeProto]:
    """``m``: an int64 scalar computed from the input's values (known only at run time)."""
    return [oh.make_node("ReduceMax", ["x"], ["peak"], keepdims=0),
            oh.make_node("Cast", ["peak"], ["m"], to=T.INT64)]


def _packed_levels(levels: int) -> onnx.ModelProto:
    """A packed weight whose decoder walks ``levels`` mask levels of 3 KB each: every level
    multiplies what onnxruntime decodes by 4."""
    stream = PackedStream([PackedTensor("w", (4, 4), 0)], np.ones(1, np.float32),
                          np.full(3072, 0xFF, np.uint8),
                          [np.full(3072, 0xFF, np.uint8)] * levels)
    nodes, initializers = decoder(stream)
    return _model([*nodes, oh.make_node("MatMul", ["x", "w"], ["y"])], initializers)


def _extra_levels() -> onnx.ModelProto:
    """A real packed stream whose file holds 14 further mask levels the graph never reads:
    the stream's reader must not decode them."""
    stream = encode([("w", np.eye(4, dtype=np.float32))], levels=1)
    nodes, initializers = decoder(stream)
    initializers += [_tensor(f"{STREAM}level{n}", np.full(3072, 0xFF, np.uint8))
                     for n in range(1, 15)]
    return _model([*nodes, oh.make_node("MatMul", ["x", "w"], ["y"])], initializers)


def _disagreeing_sparse() -> onnx.SparseTensorProto:
    sparse = _sparse([2, 2])
    sparse.indices.CopyFrom(_int64("sp_at", [[0, 0, 0]]))  # rank-3 indices, a 2-D tensor
    return sparse


def _custom_op() -> onnx.ModelProto:
    model = _model([oh.make_node("Allocate", ["x"], ["y"], domain="com.example")])
    model.opset_import.append(oh.make_opsetid("com.example", 1))
    return model


HOSTILE = {  # name: (the file, what the one line must say)
    "identity-shape": (lambda: _model(
        [oh.make_node("Identity", ["s"], ["s2"]), oh.make_node("ConstantOfShape", ["s2"], ["c"]),
         *_into_output("c")], [_int64("s", SQUARE)]), "--max-tensor-mb"),
    "abs-shape": (lambda: _model(
        [oh.make_node("Abs", ["s"], ["s2"]), oh.make_node("ConstantOfShape", ["s2"], ["c"]),
         *_into_output("c")], [_int64("s", [-d for d in HUGE])]), "--max-tensor-mb"),
    "cast-concat-expand": (lambda: _model(
        [oh.make_node("Cast", ["f"], ["fi"], to=T.INT64),
         oh.make_node("Concat", ["fi", "four"], ["s"], axis=0),
         oh.make_node("Expand", ["x", "s"], ["c"]), *_into_output("c")],
        [_tensor("f", np.array([65536, 65536], np.float32)), _int64("four", [4])]),
        "--max-tensor-mb"),
    "tile": (lambda: _model([oh.make_node("Neg", ["r"], ["r2"]),
                             oh.make_node("Tile", ["x", "r2"], ["c"]), *_into_output("c")],
                            [_int64("r", [-32768, -32768])]), "--max-tensor-mb"),
    "range": (lambda: _model([oh.make_node("Range", ["a", "b", "d"], ["c"]),
                              oh.make_node("Cast", ["c"], ["cf"], to=T.FLOAT),
                              *_into_output("cf")],
                             [_int64("a", 0), _int64("b", 1 << 40), _int64("d", 1)]),
              "--max-tensor-mb"),
    "resize-scales": (lambda: _model([oh.make_node("Resize", ["x", "", "k"], ["c"]),
                                      *_into_output("c")],
                                     [_tensor("k", np.array([1, 1 << 30], np.float32))]),
                      "--max-tensor-mb"),
    "pad": (lambda: _model([oh.make_node("Pad", ["x", "p"], ["c"]), *_into_output("c")],
                           [_int64("p", [0, 0, 1 << 20, 1 << 20])]), "--max-tensor-mb"),
    "onehot-depth": (lambda: _model(
        [oh.make_node("Cast", ["x"], ["xi"], to=T.INT64),
         oh.make_node("OneHot", ["xi", "depth", "v"], ["c"]), *_into_output("c")],
        [_int64("depth", 1 << 31), _tensor("v", np.array([0, 1], np.float32))]),
        "--max-tensor-mb"),
    "random-normal": (lambda: _model([oh.make_node("RandomNormal", [], ["c"], shape=HUGE),
                                      *_into_output("c")]), "--max-tensor-mb"),
    "reshape-to-runtime-shape": (lambda: _model(
        [*_runtime_scalar(), oh.make_node("Reshape", ["m", "one"], ["s"]),
         oh.make_node("ConstantOfShape", ["s"], ["c"]), *_into_output("c")],
        [_int64("one", [1])]), "before it runs"),
    "onehot-runtime-depth": (lambda: _model(
        [*_runtime_scalar(), oh.make_node("Cast", ["x"], ["xi"], to=T.INT64),
         oh.make_node("OneHot", ["xi", "m", "v"], ["c"]), *_into_output("c")],
        [_tensor("v", np.array([0, 1], np.float32))]), "before it runs"),
    "nonzero": (lambda: _model([oh.make_node("NonZero", ["x"], ["c"]),
                                oh.make_node("Cast", ["c"], ["cf"], to=T.FLOAT),
                                *_into_output("cf")]), "before it runs"),
    "loop-scan-runtime-trips": (lambda: _model(
        [*_runtime_scalar(), oh.make_node("Loop", ["m", "go"], ["c"], body=_loop_body(False)),
         *_into_output("c")],
        [_tensor("go", np.array(True)), _tensor("slice", np.zeros(1024, np.float32))]),
        "how often it loops"),
    "loop-scan-constant-trips": (lambda: _model(
        [oh.make_node("Loop", ["trips", "go"], ["c"], body=_loop_body(False)),
         *_into_output("c")],
        [_int64("trips", 1 << 30), _tensor("go", np.array(True)),
         _tensor("slice", np.zeros(1024, np.float32))]), "--max-tensor-mb"),
    "loop-carried-doubling": (lambda: _model(
        [oh.make_node("Loop", ["trips", "go", "v0"], ["c"], body=_loop_body(True)),
         *_into_output("c")],
        [_int64("trips", 40), _tensor("go", np.array(True)),
         _tensor("v0", np.ones(1, np.float32))]), "changes the shape"),
    "batch-squared": (lambda: _model(  # (batch, 1) * (1, batch), twice: batch**4 elements
        [oh.make_node("ReduceSum", ["x", "axis1"], ["column"], keepdims=1),
         oh.make_node("Transpose", ["column"], ["row"]),
         oh.make_node("Mul", ["column", "row"], ["square"]),
         oh.make_node("Reshape", ["square", "flat"], ["v"]),
         oh.make_node("Unsqueeze", ["v", "axis1"], ["vc"]),
         oh.make_node("Transpose", ["vc"], ["vr"]), oh.make_node("Mul", ["vc", "vr"], ["c"]),
         *_into_output("c")], [_int64("axis1", [1]), _int64("flat", [-1])]), "at batch 512"),
    "custom-op": (_custom_op, "no operator"),
    "sparse-initializer": (lambda: _model(_into_output("sp"), sparse=[_sparse(SQUARE)]),
                           "once dense"),
    "sparse-constant": (lambda: _model([oh.make_node("Constant", [], ["c"],
                                                     sparse_value=_sparse(SQUARE)),
                                        *_into_output("c")]), "once dense"),
    "sparse-indices-disagree": (lambda: _model(_into_output("sp"),
                                               sparse=[_disagreeing_sparse()]), "indices"),
    "packed-14-levels": (lambda: _packed_levels(14), "--max-tensor-mb"),
    "packed-extra-levels": (_extra_levels, "more than 3 levels"),
}


def _refused_everywhere(path: Path, run_capped, fragment: str, commands, *extra: str) -> None:
    before = files_under(path.parent)
    for command in commands:
        result = run_capped(command, path, *READERS[command], *extra, timeout=120)
        assert_refused(result, fragment)
    assert files_under(path.parent) == before  # nothing written beside it, nor in HOME


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_graph_is_refused_before_it_allocates(tmp_path, run_capped, kind):
    build, fragment = HOSTILE[kind]
    path = tmp_path / f"{kind}.onnx"
    onnx.save(build(), path)
    assert path.stat().st_size < 64_000  # 3 KB per mask level at most
    commands = {"identity-shape": ("inspect", "bench", "evaluate"),
                "sparse-initializer": ("inspect", "bench", "evaluate"),
                "packed-14-levels": ("inspect", "bench", "evaluate"),
                # only the readers of the stream (bench runs the graph, which ignores it)
                "packed-extra-levels": ("inspect", "evaluate")}.get(kind, ("inspect", "bench"))
    _refused_everywhere(path, run_capped, fragment, commands, *LIMIT)


def test_the_probe_found_file_is_refused_at_the_default_limit_too(tmp_path, run_capped):
    """The same trick at a size past any limit: refused with the defaults."""
    path = tmp_path / "abs.onnx"
    onnx.save(HOSTILE["abs-shape"][0](), path)
    _refused_everywhere(path, run_capped, "--max-tensor-mb", ("inspect", "bench"))


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


JSON_CASES = {  # metadata key: (value, what the line says)
    "recipe": (_deep(100_000), "deep"),
    "val_top1": ("9" * 100_000, "digits"),
    "dataset": ('{"input_shape": NaN}', "NaN"),
    "method": ("1e999", "too large"),
}


@pytest.mark.parametrize("key", sorted(JSON_CASES))
def test_hostile_metadata_json_is_one_line(tmp_path, run_capped, key):
    value, fragment = JSON_CASES[key]
    path = tmp_path / "meta.onnx"
    onnx.save(_model([oh.make_node("Identity", ["x"], ["y"])],
                     metadata={PREFIX + key: value}), path)
    _refused_everywhere(path, run_capped, fragment, ("inspect", "evaluate"),
                        "--ignore-digest")


@pytest.mark.parametrize("record", [_deep(100_000), '{"version": ' + "7" * 100_000 + "}"])
def test_hostile_integrity_record_is_one_line(tmp_path, run_capped, record):
    path = tmp_path / "record.onnx"
    onnx.save(_model([oh.make_node("Identity", ["x"], ["y"])],
                     metadata={INTEGRITY_KEY: record}), path)
    _refused_everywhere(path, run_capped, "integrity record is unreadable",
                        ("inspect", "bench"))


@pytest.mark.parametrize("inputs", [0, 2])
def test_bench_names_the_inputs_it_cannot_feed(tmp_path, run_capped, inputs):
    declared = [oh.make_tensor_value_info(name, T.FLOAT, ["batch", 4])
                for name in ("image", "mask")[:inputs]]
    nodes = [oh.make_node("Constant", [], ["y"], value=_tensor("c", np.ones(4, np.float32)))] \
        if not inputs else [oh.make_node("Add", ["image", "mask"], ["y"])]
    path = tmp_path / "inputs.onnx"
    onnx.save(_model(nodes, inputs=declared), path)
    fragment = f"takes {inputs} inputs" + (" ('image', 'mask')" if inputs else "")
    _refused_everywhere(path, run_capped, fragment, ("bench", "evaluate"))


def test_bench_draws_its_input_in_float32_only():
    """The input `bench` sizes against --max-input-mb is the only one it allocates: drawn in
    float32, not drawn in float64 and then converted."""
    from export.runtime.latency import _feed

    class Declared:  # what onnxruntime says of the input; no session needed
        name, type, shape = "x", "tensor(float)", ["batch", 1 << 22]

    class Session:
        get_inputs = staticmethod(lambda: [Declared])

    tracemalloc.start()
    try:
        feed, _ = _feed(Session, 1, max_input_mb=16)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert feed["x"].dtype == np.float32 and feed["x"].nbytes == 16 * 2**20
    assert peak < 1.1 * 16 * 2**20, peak


def test_json_reader_limits():
    assert read_json('{"a": [1, 2.5, "[[["]}', "x") == {"a": [1, 2.5, "[[["]}
    assert read_json(_deep(MAX_JSON_DEPTH), "x") is not None
    assert read_json("9" * MAX_JSON_INT_DIGITS, "x") == int("9" * MAX_JSON_INT_DIGITS)
    with pytest.raises(NotJson):
        read_json("bitmask-tree1-fp32", "x")  # plain text: metadata keeps it as text
    for digest in ("1678e438c41ae9aa93b92b738fd967f80f8615356661a5fb1167a515840ef65a", "12e999x"):
        with pytest.raises(NotJson):  # starts like a number past the bounds, yet is text
            read_json(digest, "x")
    for text in (_deep(MAX_JSON_DEPTH + 1), "9" * (MAX_JSON_INT_DIGITS + 1), "[Infinity]", "1e999",
                 '"\\ud800"', '"' + "\\\\" * 2**20 + '"'):
        with pytest.raises(CompressError) as caught:
            read_json(text, "x")
        assert not isinstance(caught.value, NotJson) and "\n" not in str(caught.value)


@pytest.fixture(scope="module")
def small_export(tmp_path_factory) -> Path:
    """A real packed export (untrained LeNet-5, magnitude-pruned on synthetic data)."""
    from compress.pipeline import prune_oneshot
    from export.onnx_export import export_checkpoint

    out = tmp_path_factory.mktemp("bounds")
    prune_oneshot(None, str(out / "run"), 0.9, method="magnitude", model="lenet5",
                  data_overrides={"data": "synthetic", "max_train_samples": 64,
                                  "max_test_samples": 16}, show_progress=False)
    export_checkpoint(out / "run", out / "lenet5.onnx", pack="bitmask", verify=False)
    return out / "lenet5.onnx"


def test_a_real_export_reads_under_the_same_cap(small_export, tmp_path, run_capped):
    """The checks refuse none of our own files: the packed decoder's Reshape, Gather,
    CumSum and Concat on constants all size, at a tight --max-tensor-mb too."""
    path = tmp_path / small_export.name
    path.write_bytes(small_export.read_bytes())
    before = files_under(tmp_path)
    for command in READERS:
        result = run_capped(command, path, *READERS[command], "--max-tensor-mb", "2",
                            "--json")
        assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(run_capped("inspect", path, "--json").stdout)
    assert report["integrity"]["status"] == "verified" and report["packing"]["weights"] == 5
    assert files_under(tmp_path) == before


def test_shapes_computed_from_the_batch_are_bounded_not_refused(tmp_path, run_capped):
    """A dynamic-batch graph that reshapes and expands with shapes it computes from
    Shape(x) (as torch exports of ViTs do) is read: its sizes are computed, not guessed."""
    nodes = [oh.make_node("Shape", ["x"], ["shape"]),
             oh.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
             oh.make_node("Unsqueeze", ["n", "axis0"], ["n1"]),
             oh.make_node("Concat", ["n1", "minus1", "two"], ["target"], axis=0),
             oh.make_node("Reshape", ["x", "target"], ["r"]),
             oh.make_node("Concat", ["n1", "two", "two"], ["wide"], axis=0),
             oh.make_node("Expand", ["r", "wide"], ["e"]),
             oh.make_node("ReduceSum", ["e", "axis12"], ["y"], keepdims=0)]
    path = tmp_path / "dynamic.onnx"
    onnx.save(_model(nodes, [_int64("zero", 0), _int64("axis0", [0]), _int64("minus1", [-1]),
                             _int64("two", [2]), _int64("axis12", [1, 2])]), path)
    result = run_capped("bench", path, "--runs", "2", "--warmup", "0", "--batch", "3")
    assert result.returncode == 0, result.stderr[-2000:]
