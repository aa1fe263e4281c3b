"""ONNX export of real runs, checked in a real onnxruntime session."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from compress.checkpoint import load_checkpoint, save_checkpoint
from compress.errors import CompressError
from compress.pipeline import prune_oneshot, train_prune
from compress.recipe import Recipe
from export import verify as verify_module
from export.metadata import model_metadata, tensor_metadata
from export.onnx_export import export_checkpoint
from export.onnx_inspect import inspect_onnx
from export.packing import DECODER_OPS, PREFIX, decode, decoder, encode, exponent_width, read_stream

SMALL = dict(model="lenet5", epochs=1, batch_size=64, refresh_every=4,
             max_train_samples=1200, max_test_samples=300)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dpf_run):
    root = tmp_path_factory.mktemp("export-runs")
    out = {"dpf": dpf_run}
    for method in ("none", "gmp"):
        recipe = Recipe(method=method, sparsity=0.9, **SMALL).validate()
        train_prune(recipe, str(root / method), show_progress=False)
        out[method] = root / method
    prune_oneshot(str(root / "none"), str(root / "magnitude"), 0.9, show_progress=False)
    out["magnitude"] = root / "magnitude"
    return out


def optimized_model(path: Path, tmp_path: Path) -> onnx.ModelProto:
    """The graph onnxruntime runs after its basic (constant-folding) optimizations."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx"))


def optimized_ops(path: Path, tmp_path: Path) -> list[str]:
    return [n.op_type for n in optimized_model(path, tmp_path).graph.node]


@pytest.mark.parametrize("method", ["none", "dpf", "gmp", "magnitude"])
def test_round_trip_parity_and_folding(runs, method, tmp_path):
    path = tmp_path / f"{method}.onnx"
    result = export_checkpoint(runs[method], path, pack="bitmask")
    assert result.verify.max_abs_diff_vs_torch <= result.verify.tolerance
    model = onnx.load(str(path))
    assert model.ir_version <= 10 and model.opset_import[0].version == 20
    ops = {n.op_type for n in model.graph.node}
    assert "BatchNormalization" not in ops
    defaults = {"group", "dilations", "auto_pad", "ceil_mode", "storage_order"}
    assert not {a.name for n in model.graph.node for a in n.attribute} & defaults
    if method != "none":
        assert result.packed and ops & DECODER_OPS
    after = optimized_ops(path, tmp_path)
    assert not set(after) & DECODER_OPS
    assert not {"Gather", "CumSum", "Split"} & set(after), "decoder must fold completely"
    dense = tmp_path / f"{method}-dense.onnx"
    export_checkpoint(runs[method], dense, pack="none")
    assert sorted(after) == sorted(optimized_ops(dense, tmp_path))
    if result.packed:  # fp32 values come back bit for bit, exponent-coded or not
        stream = tensor_metadata(next(t for t in model.graph.initializer
                                      if t.name == PREFIX + "top"))
        assert stream["value_coding"].startswith("exponent")  # few exponents after pruning
        folded = {t.name: t for t in optimized_model(path, tmp_path).graph.initializer}
        plain = {t.name: t for t in onnx.load(str(dense)).graph.initializer}
        for name in result.packed:
            assert folded[name].dims == plain[name].dims
            assert onnx.numpy_helper.to_array(folded[name]).tobytes() == \
                onnx.numpy_helper.to_array(plain[name]).tobytes(), name
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((5, 1, 28, 28)).astype(np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (5, 10)


def test_no_negative_zeros_and_metadata(runs, tmp_path):
    path = tmp_path / "m.onnx"
    export_checkpoint(runs["dpf"], path, pack="auto", verify=False)
    model = onnx.load(str(path))
    meta = model_metadata(model)
    assert meta["method"] == "dpf" and meta["model"] == "lenet5"
    assert meta["achieved_sparsity"] == pytest.approx(0.8, abs=1e-4)
    assert meta["target_sparsity"] == 0.8 and meta["recipe"]["sparsity"] == 0.8
    assert len(meta["source_sha256"]) == 64 and meta["dataset"]["name"] == "fashion-mnist"
    assert 0.0 < meta["val_top1"] <= 1.0 and len(meta["input_mean"]) == 1
    annotated = [tensor_metadata(t) for t in model.graph.initializer
                 if not t.name.startswith(PREFIX)]
    stream = tensor_metadata(next(t for t in model.graph.initializer
                                  if t.name == PREFIX + "top"))
    assert stream["levels"] in range(4) and stream["values"] == "fp32"
    assert stream["value_coding"] in ("plain", "exponent1", "exponent2", "exponent4")
    encodings = [m["encoding"] for m in annotated if "encoding" in m]
    assert any(e.startswith("bitmask") for e in encodings)
    assert all({"sparsity", "pattern", "encoding"} <= set(m) for m in annotated if m)
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            array = onnx.numpy_helper.to_array(tensor)
            assert not np.signbit(array[array == 0]).any()


def test_sizes_of_a_90_percent_dpf_lenet5(tmp_path):
    recipe = Recipe(method="dpf", sparsity=0.9, **SMALL).validate()
    train_prune(recipe, str(tmp_path / "run"), show_progress=False)
    sizes = {}
    for name, pack, values in (("none", "none", "fp32"), ("fp32", "bitmask", "fp32"),
                               ("int8", "bitmask", "int8")):
        result = export_checkpoint(tmp_path / "run", tmp_path / f"{name}.onnx", pack=pack,
                                   values=values, verify=False)
        sizes[name] = result.file_bytes
    assert sizes["fp32"] <= 0.25 * sizes["none"]
    assert sizes["int8"] <= 0.10 * sizes["none"]


@pytest.mark.parametrize("values, bound", [("fp16", 0.005), ("int8", 0.02)])
def test_reduced_precision_accuracy_bound(runs, values, bound, tmp_path, cli):
    """fp16 values cost at most 0.5 points of top-1, int8 at most 2 points."""
    path = tmp_path / f"{values}.onnx"
    result = cli("export", runs["dpf"], "--onnx", path, "--values", values, "--json")
    assert result.exit_code == 0, result.output
    accuracy = json.loads(result.stdout)["accuracy"]
    assert abs(accuracy["delta"]) <= bound
    model = onnx.load(str(path))
    values_tensors = [t for t in model.graph.initializer if t.name == PREFIX + "values"]
    expected = {"fp16": onnx.TensorProto.FLOAT16, "int8": onnx.TensorProto.INT8}[values]
    assert len(values_tensors) == 1 and values_tensors[0].data_type == expected


def test_evaluate_onnx_matches_run(runs, tmp_path, cli):
    path = tmp_path / "e.onnx"
    assert cli("export", runs["dpf"], "--onnx", path).exit_code == 0
    from_onnx = json.loads(cli("evaluate", path, "--json").stdout)
    from_run = json.loads(cli("evaluate", runs["dpf"], "--json").stdout)
    assert from_onnx["samples"] == from_run["samples"] == 300
    assert from_onnx["top1"] == pytest.approx(from_run["top1"], abs=1 / 300)


INT8_TOP1_BOUND = 0.02  # int8 QDQ (U8S8) may cost at most 2 points of test top-1 (300 images)


@pytest.mark.parametrize("pack", ["bitmask", "none"])
def test_int8_quantized_export(runs, pack, tmp_path, cli):
    """Static int8 QDQ: accuracy within the bound, zeros stay zero, integer kernels run."""
    path = tmp_path / f"int8-{pack}.onnx"
    result = cli("export", runs["dpf"], "--onnx", path, "--quantize", "int8", "--pack", pack,
                 "--calibration-samples", "128", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert abs(payload["accuracy"]["delta"]) <= INT8_TOP1_BOUND
    from_onnx = json.loads(cli("evaluate", path, "--json").stdout)
    from_run = json.loads(cli("evaluate", runs["dpf"], "--json").stdout)
    assert abs(from_onnx["top1"] - from_run["top1"]) <= INT8_TOP1_BOUND
    model = onnx.load(str(path))
    meta = model_metadata(model)
    assert meta["quantization"]["calibration_samples"] == 128
    assert "DequantizeLinear" in {n.op_type for n in model.graph.node}
    assert bool(payload["packed"]) == (pack == "bitmask")
    inspected = json.loads(cli("inspect", path, "--json").stdout)
    run_layers = {r["name"]: r for r in json.loads(cli("inspect", runs["dpf"], "--json")
                                                   .stdout)["layers"]}
    for layer in inspected["layers"]:
        if layer["name"].endswith("weight_quantized"):
            before = run_layers[layer["name"].removesuffix("_quantized")]
            # pruned weights stay zero; a kept weight may round to zero, rarely
            assert before["nonzero"] * 0.98 <= layer["nonzero"] <= before["nonzero"]
    assert inspected["total"]["params"] == json.loads(
        cli("inspect", runs["dpf"], "--json").stdout)["total"]["params"]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    fused = {n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node}
    assert {"QLinearConv", "QGemm"} <= fused, fused


def test_int8_quantize_rejects_bad_options(runs, tmp_path, cli):
    target = tmp_path / "x.onnx"
    for args, words in ((["--quantize", "int4"], "--quantize"),
                        (["--quantize", "int8", "--values", "fp16"], "int8 already"),
                        (["--quantize", "int8", "--calibration-samples", "0"], "at least 1"),
                        (["--calibration-samples", "64"], "pass both or neither"),
                        (["--quantize", "int8", "--calibration-samples", "99999"],
                         "more than the"),
                        (["--format", "ort", "--pack", "bitmask"], "drop --pack")):
        result = cli("export", runs["dpf"], "--onnx", target, *args)
        assert result.exit_code == 2 and words in result.output, result.output
        assert not target.exists()


def test_inspect_onnx_matches_run(runs, tmp_path, cli):
    path = tmp_path / "i.onnx"
    export_checkpoint(runs["dpf"], path, pack="bitmask", values="int8", verify=False)
    from_onnx = json.loads(cli("inspect", path, "--json").stdout)["total"]
    from_run = json.loads(cli("inspect", runs["dpf"], "--json").stdout)["total"]
    for key in ("params", "nonzero", "prunable_params", "prunable_sparsity", "macs",
                "nonzero_macs"):
        assert from_onnx[key] == pytest.approx(from_run[key]), key


def test_inspect_onnx_without_torch(runs, tmp_path):
    path = tmp_path / "t.onnx"
    export_checkpoint(runs["dpf"], path, pack="bitmask", verify=False)
    code = ("import sys; sys.modules['torch'] = None\n"
            "from cli.app import main\n"
            f"sys.argv = ['compress', 'inspect', {str(path)!r}, '--json']\n"
            "main()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    total = json.loads(proc.stdout)["total"]
    assert total["prunable_sparsity"] == pytest.approx(0.8, abs=1e-4)


@pytest.mark.parametrize("levels", [0, 1, 2, 3])
def test_encode_decode_exact_pattern(levels):
    rng = np.random.default_rng(0)
    shapes = [((7, 13), 0.8), ((30, 5, 3, 3), 0.97), ((3, 3), 0.1), ((2, 5), 0.5)]
    weights = [(f"w{i}", (rng.standard_normal(shape) * (rng.random(shape) > keep))
                .astype(np.float32)) for i, (shape, keep) in enumerate(shapes)]
    weights[0][1][0, 0] = 1e-12  # tiny but non-zero: must stay non-zero at every precision
    for values in ("fp32", "fp16", "int8"):
        back = decode(encode(weights, values, levels))
        for name, w in weights:
            assert np.array_equal(back[name] != 0, w != 0), (values, name)
    back = decode(encode(weights, "fp32", levels))
    assert all(np.array_equal(back[name], w) for name, w in weights)


def _decoder_model(stream) -> onnx.ModelProto:
    """The decoder alone, its weights as the graph's outputs."""
    nodes, inits = decoder(stream)
    outputs = [onnx.helper.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT, t.shape)
               for t in stream.tensors]
    graph = onnx.helper.make_graph(nodes, "decoder", [], outputs, inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 20)],
                                  ir_version=10)


@pytest.mark.parametrize("octaves, width", [(1, 1), (3, 2), (9, 4), (40, 0)])
def test_exponent_coded_values_decode_bit_exact_in_onnxruntime(octaves, width):
    """fp32 values with few exponents are stored in 24 + width bits and come back from
    onnxruntime bit for bit, signs included; too many exponents keep plain fp32."""
    rng = np.random.default_rng(octaves)
    weights = []
    for i, shape in enumerate([(120, 70), (40, 6, 3, 3)]):
        magnitude = np.ldexp(1 + rng.random(shape), rng.integers(-octaves, 0, shape) - 3)
        keep = rng.random(shape) > 0.7
        signed = magnitude * rng.choice([-1, 1], shape)
        weights.append((f"w{i}", np.where(keep, signed, 0).astype(np.float32)))
    stream = encode(weights)
    assert stream.exponent_width == width
    model = _decoder_model(stream)
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    rebuilt = dict(zip([o.name for o in session.get_outputs()], session.run(None, {}),
                       strict=True))
    back = decode(read_stream(model))
    for name, w in weights:
        assert np.array_equal(rebuilt[name].view(np.uint32), w.view(np.uint32)), name
        assert np.array_equal(back[name].view(np.uint32), w.view(np.uint32)), name
    plain = len(_decoder_model(encode(weights, code_exponents=False)).SerializeToString())
    if width:
        assert len(model.SerializeToString()) < plain
        assert encode([(n, w[:2]) for n, w in weights]).exponent_width == 0  # too few to pay


@pytest.mark.parametrize("values", ["fp32", "fp16", "int8"])
def test_weights_pruned_away_entirely_decode_in_onnxruntime(values):
    """A layer with no weight left decodes to zeros, alone in a stream or beside others."""
    rng = np.random.default_rng(3)
    kept = (rng.standard_normal((30, 20)) * (rng.random((30, 20)) > 0.9)).astype(np.float32)
    empty = np.zeros((64, 50), np.float32)
    for weights in ([("empty", empty), ("kept", kept)], [("empty", empty)]):
        stream = encode(weights, values)
        model = _decoder_model(stream)
        onnx.checker.check_model(model, full_check=True)
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        rebuilt = dict(zip([o.name for o in session.get_outputs()], session.run(None, {}),
                           strict=True))
        assert not rebuilt["empty"].any() and rebuilt["empty"].shape == empty.shape
        if "kept" in rebuilt:
            assert np.array_equal(rebuilt["kept"] != 0, kept != 0)


def test_export_packs_a_layer_pruned_away(runs, tmp_path):
    """Global pruning can empty a layer; `--pack auto` must not store its zeros densely."""
    ckpt = load_checkpoint(runs["magnitude"])
    ckpt.state_dict["classifier.1.weight"].zero_()
    ckpt.masks["classifier.1.weight"].zero_()
    save_checkpoint(ckpt, tmp_path / "emptied.pt")
    path = tmp_path / "emptied.onnx"
    with pytest.raises(CompressError, match="does not depend on its input"):
        export_checkpoint(tmp_path / "emptied.pt", path)  # LeNet-5 is dead without it
    assert not path.exists()
    result = export_checkpoint(tmp_path / "emptied.pt", path, verify=False)
    assert "classifier.1.weight" in result.packed
    dense_bytes = 120 * 400 * 4
    assert path.stat().st_size < 0.2 * dense_bytes
    shape_init = next(t for t in onnx.load(str(path)).graph.initializer
                      if t.name == "classifier.1.weight__shape")
    assert tensor_metadata(shape_init)["sparsity"] == 1.0


def test_exponent_width_refuses_what_it_cannot_code_exactly():
    one = np.float32(1.0)
    assert exponent_width(np.array([0.5, -0.75], np.float32)) == 1
    assert exponent_width(np.array([1, 2, 4], np.float32)) == 2
    assert exponent_width(np.array([1, 2, 4, 8, 16], np.float32)) == 4
    assert exponent_width(np.ldexp(one, np.arange(17)).astype(np.float32)) == 0
    for odd in (0.0, 1e-45, np.inf, np.nan):  # zero, subnormal, not finite
        assert exponent_width(np.array([1.0, odd], np.float32)) == 0
    assert exponent_width(np.array([1.0], np.float16)) == 0


def test_mask_tree_depth_follows_sparsity():
    """Deeper occupancy trees pay off as sparsity rises; a half-dense mask stays plain."""
    rng = np.random.default_rng(1)

    def weight(sparsity):
        shape = (256, 512)
        return (rng.standard_normal(shape) * (rng.random(shape) > sparsity)).astype(np.float32)

    plain = -(-256 * 512 // 8)
    assert encode([("w", weight(0.5))]).levels == 0
    at_90 = encode([("w", weight(0.9))])
    assert at_90.levels == 1 and at_90.mask_bytes < 0.62 * plain
    at_98 = encode([("w", weight(0.98))])
    assert at_98.levels >= 2 and at_98.mask_bytes < 0.25 * plain


def test_failed_export_keeps_existing_file(runs, tmp_path, monkeypatch, cli):
    target = tmp_path / "keep.onnx"
    target.write_bytes(b"precious")
    def parity_fails(*args, **kwargs):
        raise CompressError("onnxruntime output differs from PyTorch (forced for this test)")

    monkeypatch.setattr(verify_module, "FP32_TOLERANCE", 0.0)  # force a parity failure,
    monkeypatch.setattr(verify_module, "_rounding_tolerance", parity_fails)  # also in float64
    result = cli("export", runs["dpf"], "--onnx", target, "--overwrite")
    assert result.exit_code == 2 and "differs" in result.output
    assert target.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.onnx"]


def test_unwritable_target_is_one_line_before_any_work(runs, tmp_path, monkeypatch, cli):
    """A directory that takes no new file (read-only, immutable) is found before export."""
    import compress.fileio

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(compress.fileio.tempfile, "mkstemp", refuse)
    result = cli("export", runs["dpf"], "--onnx", tmp_path / "x.onnx")
    assert result.exit_code == 2, result.output
    assert "does not take new files (Read-only file system)" in result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


def test_onnxruntime_reason_survives_in_one_line(tmp_path, cli):
    """onnxruntime's C++ source location is dropped, its reason kept."""
    node = onnx.helper.make_node("Relu", ["x"], ["y"])
    info = [onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [1, 4])
            for n in ("x", "y")]
    graph = onnx.helper.make_graph([node], "g", info[:1], info[1:])
    path = tmp_path / "too-new.onnx"
    onnx.save(onnx.helper.make_model(graph, ir_version=14), str(path))  # ORT 1.31 reads <= 13
    for args in (["bench", path, "--runs", "5"], ["evaluate", path, "--data", "fashion-mnist"]):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert "Unsupported model IR version: 14" in result.output, result.output
        assert "onnxruntime_src" not in result.output


def test_model_torch_cannot_export_is_named_with_its_line(tmp_path, monkeypatch, cli):
    (tmp_path / "branchy.py").write_text(
        "import torch\n\n\n"
        "class Branchy(torch.nn.Module):\n"
        "    def __init__(self, num_classes):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(784, num_classes)\n\n"
        "    def forward(self, x):\n"
        "        if x.sum() > 0:  # data-dependent: torch.export cannot trace it\n"
        "            return self.fc(x.flatten(1))\n"
        "        return -self.fc(x.flatten(1))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    recipe = Recipe(model="branchy:Branchy", data="synthetic", method="none", epochs=1,
                    batch_size=16, max_train_samples=32, max_test_samples=16).validate()
    train_prune(recipe, str(tmp_path / "run"), show_progress=False)
    result = cli("export", tmp_path / "run", "--onnx", tmp_path / "b.onnx")
    assert result.exit_code == 2, result.output
    assert "branchy.py line 10 (`if x.sum() > 0:" in result.output, result.output
    assert "data-dependent" in result.output and not (tmp_path / "b.onnx").exists()


def test_ctrl_c_inside_the_exporter_is_an_interruption(runs, tmp_path, monkeypatch, cli):
    """torch.onnx wraps every error it meets, Ctrl-C included; it must still read as one."""
    import torch

    def interrupted(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("Failed to export the model with torch.export.") from exc

    monkeypatch.setattr(torch.onnx, "export", interrupted)
    result = cli("export", runs["dpf"], "--onnx", tmp_path / "x.onnx")
    assert result.exit_code == 130 and "interrupted" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, fragment", [
    (["--pack", "zip"], "--pack"), (["--values", "int4"], "--values"),
    (["--opset", "11"], "--opset"), (["--onnx", ""], "needs a file name"),
])
def test_bad_export_options(runs, tmp_path, cli, args, fragment):
    result = cli("export", runs["dpf"], "--onnx", tmp_path / "x.onnx", *args)
    assert result.exit_code == 2 and fragment in result.output
    assert not (tmp_path / "x.onnx").exists()


def test_bad_sources_and_onnx_files(runs, tmp_path, cli):
    data = (runs["dpf"] / "checkpoint.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:1000])
    result = cli("export", tmp_path / "cut.pt", "--onnx", tmp_path / "o.onnx")
    assert result.exit_code == 2 and "truncated" in result.output
    good = tmp_path / "good.onnx"
    export_checkpoint(runs["dpf"], good, verify=False)
    (tmp_path / "trunc.onnx").write_bytes(good.read_bytes()[:2000])
    (tmp_path / "noise.onnx").write_bytes(os.urandom(3000))
    (tmp_path / "text.onnx").write_text("not a model")
    for name in ("trunc.onnx", "noise.onnx", "text.onnx", "missing.onnx"):
        for command in ("inspect", "evaluate"):
            result = cli(command, tmp_path / name)
            assert result.exit_code == 2, (name, command, result.output)
            assert "Traceback" not in result.output and "error:" in result.output


def _damaged_copy(good: Path, out: Path, name: str, change) -> Path:
    model = onnx.load(str(good))
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.name == PREFIX + name:
            array = change(onnx.numpy_helper.to_array(tensor))
            model.graph.initializer[i].CopyFrom(onnx.numpy_helper.from_array(array, tensor.name))
    onnx.save(model, str(out))
    return out


def test_damaged_packed_streams_are_refused(runs, tmp_path, cli):
    """Every inconsistency between mask and values is caught before anything is counted
    or evaluated, with one line naming the file: a stream that still runs would give
    wrong figures."""
    good = tmp_path / "good.onnx"
    export_checkpoint(runs["dpf"], good, pack="bitmask", verify=False)
    assert tensor_metadata(next(t for t in onnx.load(str(good)).graph.initializer
                                if t.name == PREFIX + "top"))["value_coding"] != "plain"
    damage = {"powers": lambda a: a[:2], "low": lambda a: a[:-5], "indices": lambda a: a[:-1],
              "level0": np.zeros_like, "top": lambda a: a[:-1]}
    for name, change in damage.items():
        bad = _damaged_copy(good, tmp_path / f"bad-{name}.onnx", name, change)
        for command in ("inspect", "evaluate"):
            result = cli(command, bad)
            assert result.exit_code == 2, (name, command, result.output)
            assert "damaged" in result.output and str(bad) in result.output, result.output
            assert len(result.output.strip().splitlines()) == 1, result.output
    result = cli("bench", tmp_path / "bad-powers.onnx", "--runs", "5", "--warmup", "1")
    assert result.exit_code == 2 and "integrity" in result.output
    result = cli("bench", tmp_path / "bad-powers.onnx", "--runs", "5", "--warmup", "1",
                 "--ignore-digest")
    assert result.exit_code == 2 and "onnxruntime" in result.output
    assert "Traceback" not in result.output and "\x1b[" not in result.output


def test_inspect_onnx_reports_packing_and_stale_metadata(runs, tmp_path, cli):
    path = tmp_path / "p.onnx"
    export_checkpoint(runs["dpf"], path, pack="bitmask", verify=False)
    report = json.loads(cli("inspect", path, "--json").stdout)
    packing = report["packing"]
    assert packing["values"] == "fp32" and packing["value_bits"] == 24 + int(
        packing["value_coding"].removeprefix("exponent"))
    assert packing["values_stored"] == report["total"]["prunable_nonzero"]
    assert report["warnings"] == []
    encodings = {r["encoding"] for r in report["layers"] if r["prunable"]}
    assert all(e.startswith("bitmask-tree") and e.endswith(packing["value_coding"])
               for e in encodings)
    text = cli("inspect", path).output
    assert f"{path.stat().st_size:,} bytes" in text and "exponent-coded" in text
    model = onnx.load(str(path))
    shape = next(t for t in model.graph.initializer if t.name.endswith("__shape"))
    next(p for p in shape.metadata_props if p.key.endswith("sparsity")).value = "0.5"
    onnx.save(model, str(path))
    assert "metadata differ" in cli("inspect", path).output
    result = cli("inspect", path, "--ignore-digest")
    assert result.exit_code == 0 and "warning: " + shape.name.removesuffix("__shape") in \
        result.output and "records sparsity 0.5" in result.output
    dense = tmp_path / "d.onnx"
    export_checkpoint(runs["dpf"], dense, pack="none", verify=False)
    assert json.loads(cli("inspect", dense, "--json").stdout)["packing"] is None
    assert "no weight is packed" in cli("inspect", dense).output


def test_ort_format_for_minimal_builds(runs, tmp_path, cli):
    path = tmp_path / "m.ort"
    result = cli("export", runs["dpf"], "--onnx", path, "--format", "ort", "--json")
    assert result.exit_code == 0, result.output
    assert path.read_bytes()[4:8] == b"ORTM"  # flatbuffer file identifier
    assert [p.name for p in tmp_path.iterdir()] == ["m.ort"]
    reference = tmp_path / "ref.onnx"
    export_checkpoint(runs["dpf"], reference, pack="none", verify=False)
    x = np.random.default_rng(2).standard_normal((6, 1, 28, 28)).astype(np.float32)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.load_model_format", "ORT")
    outputs = []
    for file, opts in ((path, options), (reference, None)):
        session = ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    assert np.allclose(outputs[0], outputs[1], atol=1e-5)
    evaluated = cli("evaluate", path, "--data", "fashion-mnist", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["samples"] == 10000  # no metadata: full test split
    assert "pass --data" in cli("evaluate", path).output


def test_batchnorm_model_exports_folded_and_packed(tmp_path, cli):
    recipe = Recipe(model="resnet20", data="synthetic", input_shape=[3, 16, 16],
                    num_classes=4, method="gmp", sparsity=0.7, epochs=1, batch_size=32,
                    max_train_samples=96, max_test_samples=32).validate()
    train_prune(recipe, str(tmp_path / "run"), show_progress=False)
    path = tmp_path / "r20.onnx"
    result = export_checkpoint(tmp_path / "run", path, pack="bitmask")
    assert result.verify.max_abs_diff_vs_torch <= result.verify.tolerance
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "BatchNormalization" not in ops and "Add" in ops
    assert len(result.packed) >= 20  # every conv of the residual network is packed
    wrong = cli("evaluate", path, "--data", "fashion-mnist")  # 1x28x28 into a 3x16x16 model
    assert wrong.exit_code == 2 and "shape (3, 16, 16)" in wrong.output, wrong.output


def test_export_never_clobbers_by_accident(runs, tmp_path, cli):
    target = tmp_path / "m.onnx"
    target.write_bytes(b"keep")
    assert "--overwrite" in cli("export", runs["dpf"], "--onnx", target).output
    assert target.read_bytes() == b"keep"
    ckpt = runs["dpf"] / "checkpoint.pt"
    before = ckpt.read_bytes()
    result = cli("export", runs["dpf"], "--onnx", ckpt, "--overwrite")
    assert result.exit_code == 2 and "being exported" in result.output
    assert ckpt.read_bytes() == before
    done = cli("export", runs["dpf"], "--onnx", target, "--overwrite", "--no-verify")
    assert done.exit_code == 0 and target.read_bytes() != b"keep"
    assert target.stat().st_mode & 0o777 == 0o666 & ~current_umask()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("args, fragment", [
    (["--onnx", "x.onnx", "--format", "ort"], "ending in .ort"),
    (["--onnx", "x.ort"], "--format ort"),
    (["--onnx", "x.txt"], "ending in .onnx"),
    (["--onnx", "x.onnx", "--pack", "none", "--values", "int8"], "--values"),
    (["--onnx", "x.ort", "--format", "ort", "--values", "fp16"], "--values"),
])
def test_format_and_values_mismatches(runs, tmp_path, cli, args, fragment, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("export", runs["dpf"], *args)
    assert result.exit_code == 2 and fragment in result.output, result.output
    assert not any(tmp_path.iterdir())


def test_evaluate_checks_batch_size_and_input_shape(runs, tmp_path, cli):
    path = tmp_path / "e.onnx"
    export_checkpoint(runs["dpf"], path, verify=False)
    assert "--batch-size" in cli("evaluate", path, "--batch-size", "0").output
    ort_file = tmp_path / "e.ort"
    export_checkpoint(runs["dpf"], ort_file, verify=False, file_format="ort")
    assert "cannot be inspected" in cli("inspect", ort_file).output


@pytest.mark.parametrize("spec, data, sparsity", [
    ("resnet20", dict(), 0.9),  # BatchNorm folded into convs, residual adds, option-B shortcuts
    # depthwise convs, squeeze-excite, hardswish; at 0.7 this barely trained one is dead
    ("torchvision.models:mobilenet_v3_small", dict(data="synthetic", input_shape=[3, 32, 32]),
     0.5),
])
def test_batchnorm_and_torchvision_models_export(spec, data, sparsity, tmp_path, cli):
    dense, pruned, path = tmp_path / "dense", tmp_path / "pruned", tmp_path / "m.onnx"
    recipe = Recipe(model=spec, method="none", epochs=1, batch_size=32, max_train_samples=128,
                    max_test_samples=64, **data).validate()
    train_prune(recipe, str(dense), show_progress=False)
    prune_oneshot(str(dense), str(pruned), sparsity, show_progress=False)
    result = export_checkpoint(pruned, path, pack="bitmask")
    assert result.verify.max_abs_diff_vs_torch <= result.verify.tolerance
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not set(optimized_ops(path, tmp_path)) & DECODER_OPS
    # folding BatchNorm scales whole output channels: the zeros survive it
    from_onnx = inspect_onnx(path)["total"]
    assert from_onnx["prunable_sparsity"] == pytest.approx(sparsity, abs=2e-3)
    int8 = cli("export", pruned, "--onnx", tmp_path / "q.onnx", "--quantize", "int8",
               "--calibration-samples", "32", "--json")
    assert int8.exit_code == 0, int8.output
    assert json.loads(int8.stdout)["packed"]


def test_parity_allows_what_pytorch_s_own_fp32_rounding_explains():
    """A deep network's fp32 output is off the exact (float64) result by more than the
    fixed tolerance: onnxruntime passes when it is no further from the exact result than
    the tolerance plus twice PyTorch's own error, and fails, saying both, when it is."""
    from export.verify import _rounding_tolerance

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    with torch.no_grad():
        exact = model.double()(torch.from_numpy(x).double()).numpy()
    model.float()
    torch_fp32 = exact + 1e-2  # as if PyTorch's fp32 were that far off
    passed = _rounding_tolerance(model, x, exact + 5e-3, torch_fp32, 1.5e-2, 1e-4)
    assert passed == pytest.approx(1e-4 + 2e-2)
    with pytest.raises(CompressError, match="against the float64 result it is off by 5.00e-02"):
        _rounding_tolerance(model, x, exact + 5e-2, torch_fp32, 6e-2, 1e-4)
    assert model.weight.dtype == torch.float32  # put back


@pytest.mark.parametrize(("p50", "top1", "chosen", "why"), [
    ({"fp32": 1.0, "int8": 0.5}, {"fp32": 0.90, "int8": 0.899}, "int8", "2.00x faster"),
    ({"fp32": 1.0, "int8": 1.2}, {"fp32": 0.90, "int8": 0.90}, "fp32", "no faster"),
    ({"fp32": 1.0, "int8": 0.5}, {"fp32": 0.90, "int8": 0.88}, "fp32", "lost 2.00 points"),
    ({"fp32": 1.0, "int8": 0.5}, {"fp32": 0.90, "int8": None}, "fp32", "not trusted"),
])
def test_quantize_auto_keeps_int8_only_when_faster_and_as_accurate(p50, top1, chosen, why):
    from export.precision_choice import decide

    kept, reason = decide(p50, top1, max_drop=0.005)
    assert kept == chosen and why in reason


def test_quantize_auto_writes_the_file_it_chose(runs, tmp_path, cli):
    """Both candidates measured; the file at --onnx is the chosen one, nothing else is left
    beside it, and an existing file stays without --overwrite."""
    out = tmp_path / "auto.onnx"
    result = cli("export", runs["dpf"], "--onnx", out, "--quantize", "auto", "--json")
    assert result.exit_code == 0, result.output
    choice = json.loads(result.stdout)["precision_choice"]
    assert choice["chosen"] in ("fp32", "int8") and choice["reason"]
    assert all(choice["p50_ms"][p] > 0 for p in ("fp32", "int8"))
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ("QuantizeLinear" in ops) == (choice["chosen"] == "int8")
    assert out.stat().st_size == choice["file_bytes"][choice["chosen"]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["auto.onnx"]
    again = cli("export", runs["dpf"], "--onnx", out, "--quantize", "auto")
    assert again.exit_code == 2 and "--overwrite" in again.output
    bad = cli("export", runs["dpf"], "--onnx", tmp_path / "x.onnx", "--quantize", "int4")
    assert bad.exit_code == 2 and "none, int8, auto" in bad.output
