"""``compress export``: a checkpoint or run directory to one self-contained ONNX file.

Steps: rebuild the pruned model (masks already applied in the checkpoint, no pruning
machinery in it), export with torch's ONNX exporter (its graph optimizer folds BatchNorm
into the preceding conv; zeros stay zeros because folding scales whole output channels),
canonicalise ``-0.0``, pack sparse weights, write metadata, verify, then rename into place.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from compress.checkpoint import (
    Checkpoint,
    load_checkpoint,
    refuse_non_finite,
    resolve_checkpoint_path,
    unfinished_note,
)
from compress.errors import CompressError, causes, first_line, raise_if_interrupted
from compress.fileio import replace_or_explain, temporary_beside, usual_file_mode
from export.integrity import record_integrity
from export.metadata import set_model_metadata, set_tensor_metadata
from export.packing import VALUE_TYPES, PackedStream, decoder, encode, worth_packing
from export.quantize import (
    QUANT_MODES,
    calibration_batches,
    quantize_int8,
    quantized_weights,
    settings,
)
from export.session import open_session
from export.signing import load_private_key, sign_file
from export.verify import VerifyReport, verify_export

PACK_MODES = ("auto", "none", "bitmask")
MIN_OPSET, MAX_OPSET, MAX_IR = 18, 26, 13
INPUT_NAME = "input"


@dataclass
class ExportResult:
    path: str
    file_bytes: int
    packed: list[str] = field(default_factory=list)
    values: str = "fp32"
    exponent_width: int = 0  # > 0: fp32 values stored exactly in 24 + this many bits
    opset: int = 20
    verify: VerifyReport | None = None
    accuracy: dict | None = None
    unfinished: str | None = None  # the source run stopped before its last epoch
    signed_by: str | None = None  # fingerprint of the key that signed the file

    @property
    def value_bits(self) -> int | None:
        """Bits one stored fp32 value takes when exponent-coded (None when not)."""
        return 24 + self.exponent_width if self.exponent_width else None


def _torch_to_onnx(ckpt: Checkpoint, opset: int) -> onnx.ModelProto:
    return module_to_onnx(ckpt.build_model(), tuple(ckpt.data.input_shape), ckpt.model_spec,
                          opset)


def module_to_onnx(model, input_shape: tuple[int, ...], name: str,
                   opset: int = 20) -> onnx.ModelProto:
    """``model`` (in eval mode) as ONNX with a dynamic batch, the exporter's noise hidden.
    The model is left in the mode it came in: a budget search exports the model a training
    run is still training."""
    import torch

    training = model.training
    model = model.eval()
    example = torch.randn(2, *input_shape)
    batch = torch.export.Dim("batch", min=1)
    noise = io.StringIO()
    try:
        with redirect_stdout(noise), redirect_stderr(noise):
            program = torch.onnx.export(model, (example,), dynamo=True, external_data=False,
                                        input_names=[INPUT_NAME], output_names=["logits"],
                                        dynamic_shapes=({0: batch},), opset_version=opset,
                                        verbose=False)
    except Exception as exc:
        raise_if_interrupted(exc)
        raise CompressError(f"torch could not export {name!r} to ONNX"
                            f"{_failing_line(exc)}: {first_line(causes(exc)[-1], 300)}") from None
    finally:
        model.train(training)
    return program.model_proto


def _failing_line(exc: Exception) -> str:
    """' at FILE line N (`code`)' where torch's exporter names the model code it stopped at."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r'call raised this error:\s+File "(.+?)", line (\d+), in \w+\s+(.+)', text)
    return f" at {found[1]} line {found[2]} (`{found[3].strip()}`)" if found else ""


def _strip_exporter_notes(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node stack traces and intermediate shapes: they are most of
    a small model's file, and they name paths on the machine that exported it."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    del model.graph.value_info[:]
    del model.graph.metadata_props[:]  # the exporter's program signature, ~10 KiB
    for value in (*model.graph.input, *model.graph.output):
        del value.metadata_props[:]


# Attributes whose default the ONNX spec states only in words: absent means all zeros
# (pads) or all ones (strides, dilations) along every spatial axis.
_SPATIAL_DEFAULTS = {"pads": 0, "strides": 1, "dilations": 1}
_SPATIAL_OPS = {"Conv", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool"}


def _drop_default_attributes(model: onnx.ModelProto) -> None:
    """Remove attributes that repeat their default: the exporter writes every one of them
    on every node, about 100 bytes per convolution or pooling node."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        return
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, opset)
        except onnx.defs.SchemaError:
            continue
        keep = [a for a in node.attribute if not _is_default(node.op_type, a, schema)]
        if len(keep) < len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(keep)


def _is_default(op_type: str, attribute: onnx.AttributeProto, schema) -> bool:
    if op_type in _SPATIAL_OPS and attribute.name in _SPATIAL_DEFAULTS:
        ints = list(attribute.ints)
        return attribute.type == onnx.AttributeProto.INTS and bool(ints) and \
            all(v == _SPATIAL_DEFAULTS[attribute.name] for v in ints)
    known = schema.attributes.get(attribute.name)
    if known is None or not known.default_value.name:
        return False
    default = known.default_value
    return attribute.type == default.type and \
        onnx.helper.get_attribute_value(attribute) == onnx.helper.get_attribute_value(default)


def _canonical_zeros(model: onnx.ModelProto) -> None:
    for i, tensor in enumerate(model.graph.initializer):
        if tensor.data_type != onnx.TensorProto.FLOAT:
            continue
        array = numpy_helper.to_array(tensor)
        if np.signbit(array[array == 0]).any():
            fixed = numpy_helper.from_array(np.where(array == 0, np.float32(0), array),
                                            tensor.name)
            model.graph.initializer[i].CopyFrom(fixed)


def _pattern(sparsity: float, structured: bool) -> str:
    """How a weight was pruned: channels cut (``structured``), zeros inside (``unstructured``)
    or both; a dense weight of an uncut model is ``unstructured`` at sparsity 0."""
    if structured:
        return "structured+unstructured" if sparsity > 0 else "structured"
    return "unstructured"


def _pack(model: onnx.ModelProto, mode: str, values: str,
          structured: bool = False) -> PackedStream | None:
    """Replace sparse weight initializers by one packed stream and its shared decoder."""
    graph = model.graph
    int8_weights = quantized_weights(model)  # empty unless quantized: then only these pack
    kept, chosen, sparsities = [], [], {}
    for tensor in graph.initializer:
        wanted = tensor.name in int8_weights if int8_weights else \
            tensor.data_type == onnx.TensorProto.FLOAT
        array = numpy_helper.to_array(tensor) if wanted else None
        prunable = array is not None and array.ndim >= 2
        sparsity = 1.0 - np.count_nonzero(array) / array.size if prunable else 0.0
        do_pack = prunable and sparsity > 0 and (
            mode == "bitmask" or (mode == "auto" and worth_packing(array, values)))
        if do_pack:
            chosen.append((tensor.name, array))
            sparsities[tensor.name] = sparsity
            continue
        if prunable:
            set_tensor_metadata(tensor, {"sparsity": round(sparsity, 6),
                                         "pattern": _pattern(sparsity, structured),
                                         "encoding": "dense"})
        kept.append(tensor)
    if not chosen:
        return None
    stream = encode(chosen, values)
    nodes, inits = decoder(stream)
    stored = "qdq-int8" if stream.raw_int8 else values
    set_tensor_metadata(inits[0], {"levels": stream.levels, "values": stored,
                                   "value_coding": stream.value_coding})
    exponents = f"-exponent{stream.exponent_width}" if stream.exponent_width else ""
    for packed, shape_init in zip(stream.tensors, inits[1:], strict=False):
        # where the weight sits in the stream (and its int8 scale) is read from the graph
        set_tensor_metadata(shape_init, {
            "sparsity": round(sparsities[packed.name], 6),
            "pattern": _pattern(sparsities[packed.name], structured),
            "encoding": f"bitmask-tree{stream.levels}-{stored}{exponents}"})
    del graph.initializer[:]
    graph.initializer.extend(kept + inits)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    return stream


def _metadata(ckpt: Checkpoint, source: Path, values: str, packed: list[str],
              quantization: dict | None, unfinished: str | None) -> dict:
    from compress import __version__

    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    masks = ckpt.masks or {}
    total = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    return {
        "tool_version": __version__,
        "method": ckpt.method,
        "model": ckpt.model_spec,
        "target_sparsity": _target_sparsity(ckpt),
        "achieved_sparsity": round(1 - kept / total, 6) if total else 0.0,
        "recipe": _portable_recipe(ckpt.recipe),
        "source_sha256": digest,
        "dataset": ckpt.data.portable(),
        "val_top1": ckpt.metrics.get("val_top1"),
        "input_shape": list(ckpt.data.input_shape),
        "input_mean": ckpt.data.mean,
        "input_std": ckpt.data.std,
        "packed_values": "qdq-int8" if quantization else values,
        "packed_weights": len(packed),
        "training_finished": unfinished is None,
        "pattern": _pattern(1.0 if total and kept < total else 0.0, bool(ckpt.structure)),
        **({"structure": _structure_metadata(ckpt.structure)} if ckpt.structure else {}),
        **({"quantization": quantization} if quantization else {}),
    }


def _portable_recipe(recipe: dict | None) -> dict | None:
    """The recipe without this machine's paths: no data directory, the starting weights
    by file name only."""
    if not isinstance(recipe, dict):
        return recipe
    weights = recipe.get("weights")
    return {**recipe, "data_dir": None,
            "weights": Path(weights).name if isinstance(weights, str) else weights}


def _structure_metadata(structure: dict) -> dict:
    """Original and kept widths of each cut layer, and the original params and MACs."""
    return {"widths": {root: {"original": first, "kept": kept}
                       for root, (first, kept) in structure.get("widths", {}).items()},
            "original": structure.get("original", {})}


def to_ort_format(onnx_path: Path, ort_path: Path) -> None:
    """Convert with onnxruntime itself: basic (hardware-independent) optimizations, which
    fold constants, so packed weights are stored unpacked, as minimal builds need."""
    open_session(onnx_path, basic_only=True, save_to=ort_path, save_as_ort=True)


def _check_ort_file(ort_path: Path, onnx_path: Path, input_shape) -> None:
    x = np.random.default_rng(0).standard_normal((4, *input_shape)).astype(np.float32)
    outputs = []
    for path in (onnx_path, ort_path):
        session = open_session(path)
        outputs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    if not np.allclose(outputs[0], outputs[1], atol=1e-5, rtol=1e-4):
        raise CompressError("the ORT-format file does not reproduce the ONNX outputs")


def _check_target(out: Path, source_path: Path, file_format: str, overwrite: bool) -> None:
    if out.is_dir():
        raise CompressError(f"--onnx {out} is a directory; give a file name")
    if not out.parent.is_dir():
        raise CompressError(f"--onnx: directory {out.parent} does not exist")
    if out.exists() and out.resolve() == source_path.resolve():
        raise CompressError(f"--onnx {out} is the checkpoint being exported; choose another name")
    if out.exists() and not overwrite:
        raise CompressError(f"--onnx {out} already exists; pass --overwrite to replace it")
    # onnxruntime tells the two formats apart by the file name
    if file_format == "ort" and out.suffix.lower() != ".ort":
        raise CompressError(f"--format ort needs a file name ending in .ort, got {out.name}")
    if file_format == "onnx" and out.suffix.lower() == ".ort":
        raise CompressError(f"{out.name} ends in .ort, the ORT format's name; pass --format ort "
                            "or use .onnx")
    if file_format == "onnx" and out.suffix.lower() != ".onnx":
        raise CompressError(f"--onnx {out.name}: give the file a name ending in .onnx (the "
                            "other commands tell files apart by their ending)")


def _check_options(pack: str, values: str, opset: int, file_format: str, quantize: str,
                   calibration_samples: int | None) -> None:
    if calibration_samples is not None and quantize == "none":
        raise CompressError("--calibration-samples calibrates --quantize int8; pass both or "
                            "neither")
    if calibration_samples is not None and calibration_samples < 1:
        raise CompressError(f"--calibration-samples must be at least 1, got "
                            f"{calibration_samples}")
    if quantize not in QUANT_MODES:
        raise CompressError(f"--quantize must be one of {', '.join(QUANT_MODES)}, "
                            f"got {quantize!r}")
    if quantize != "none" and values != "fp32":
        raise CompressError("--values sets the precision of float packed weights; with "
                            "--quantize int8 the weights are int8 already (drop --values)")
    if file_format not in ("onnx", "ort"):
        raise CompressError(f"--format must be onnx or ort, got {file_format!r}")
    if pack not in PACK_MODES:
        raise CompressError(f"--pack must be one of {', '.join(PACK_MODES)}, got {pack!r}")
    if values not in VALUE_TYPES:
        raise CompressError(f"--values must be one of {', '.join(VALUE_TYPES)}, got {values!r}")
    if file_format == "ort" and pack == "bitmask":
        raise CompressError("--format ort stores weights unpacked (minimal builds cannot "
                            "decode them); drop --pack bitmask")
    if values != "fp32" and (pack == "none" or file_format == "ort"):
        raise CompressError("--values sets the precision of packed weights; it needs "
                            "--pack auto or bitmask and the onnx format")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise CompressError(f"--opset must be between {MIN_OPSET} and {MAX_OPSET} "
                            "(packing needs BitwiseAnd, opset 18; onnxruntime 1.31 reads "
                            f"up to {MAX_OPSET}), got {opset}")


def _set_ir_version(model: onnx.ModelProto) -> None:
    """The lowest IR version that carries the model's opsets (ORT 1.31 reads up to 13)."""
    try:
        needed = onnx.helper.find_min_ir_version_for(list(model.opset_import))
    except (ValueError, KeyError):
        needed = model.ir_version
    model.ir_version = min(max(model.ir_version, needed, 10), MAX_IR)


def _clean_model(ckpt: Checkpoint, opset: int, quantize: str,
                 calibration_samples: int | None) -> tuple[onnx.ModelProto, dict | None]:
    """The exported graph, tidied and [int8-quantized], with what the quantization did."""
    model = tidy(_torch_to_onnx(ckpt, opset))
    if quantize != "int8":
        return model, None
    batches = calibration_batches(ckpt, calibration_samples)
    return quantize_int8(model, batches), settings(sum(len(b) for b in batches))


def tidy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The exporter's graph without its notes and repeated defaults, zeros canonical."""
    _set_ir_version(model)
    _strip_exporter_notes(model)
    _drop_default_attributes(model)
    _canonical_zeros(model)
    return model


def export_checkpoint(source: str | Path, out: str | Path, *, pack: str = "auto",
                      values: str = "fp32", opset: int = 20, verify: bool = True,
                      file_format: str = "onnx", overwrite: bool = False,
                      measure_accuracy: bool = False, quantize: str = "none",
                      calibration_samples: int | None = None,
                      data_dir: str | None = None,
                      sign: str | Path | None = None,
                      on_stage: Callable[[str], None] | None = None,
                      allow_constant_output: bool = False) -> ExportResult:
    """Export, [quantize], pack, annotate, verify; the target appears only if every step
    succeeded.

    With ``measure_accuracy`` the validation top-1 of PyTorch and of onnxruntime are
    measured on the file before it is renamed into place. ``data_dir`` replaces the data
    directory the run recorded (for calibration and that accuracy). ``sign`` is a private
    key file: the file is signed before it is renamed into place. ``on_stage(what)`` hears
    of each step as it starts (export takes seconds to minutes: a command line says where
    it is).
    """
    stage = on_stage or (lambda what: None)
    _check_options(pack, values, opset, file_format, quantize, calibration_samples)
    if not str(out).strip():
        raise CompressError("--onnx needs a file name, e.g. --onnx model.onnx")
    out = Path(out)
    source_path = resolve_checkpoint_path(source)
    _check_target(out, source_path, file_format, overwrite)
    # a bad key is refused now, not after minutes of work
    signing_key = load_private_key(sign, "--sign") if sign is not None else None
    tmp = temporary_beside(out, "--onnx")  # an unwritable directory fails now, not minutes on
    ort_tmp = tmp.with_name(tmp.name + ".ort")  # onnxruntime recognises the format by name
    try:
        stage("reading the checkpoint")
        ckpt = load_checkpoint(source_path)
        refuse_non_finite(ckpt.state_dict, str(source_path))
        if data_dir is not None:  # the data set moved since training
            ckpt.data.data_dir = data_dir
        stage("exporting to ONNX" + (" and quantizing to int8" if quantize == "int8" else ""))
        model, quantization = _clean_model(ckpt, opset, quantize, calibration_samples)
        stage("packing the sparse weights")
        stream = _pack(model, pack, values, structured=bool(ckpt.structure))  # "none":
        # it only annotates the tensors
        packed = [t.name for t in stream.tensors] if stream else []
        unfinished = unfinished_note(ckpt)
        set_model_metadata(model, _metadata(ckpt, source_path, values, packed, quantization,
                                            unfinished))
        _check_fits_one_file(model)
        record_integrity(model)  # last: it covers every other entry
        onnx.save(model, str(tmp))
        if verify:
            stage("checking the file against PyTorch in onnxruntime")
        report = verify_export(tmp, ckpt, "int8" if quantize == "int8" else values,
                               allow_constant_output) \
            if verify else None
        final = tmp
        if file_format == "ort":
            to_ort_format(tmp, ort_tmp)
            if verify:
                _check_ort_file(ort_tmp, tmp, ckpt.data.input_shape)
            final = ort_tmp
        if measure_accuracy:
            stage("measuring validation top-1 in PyTorch and onnxruntime")
        accuracy = validation_accuracy(ckpt, final) if measure_accuracy else None
        signed_by = sign_file(final, signing_key) if signing_key is not None else None
        os.chmod(final, usual_file_mode())  # mkstemp makes 0600
        replace_or_explain(final, out, "--onnx")
    finally:
        tmp.unlink(missing_ok=True)
        ort_tmp.unlink(missing_ok=True)
    in_file = file_format == "onnx"
    width = stream.exponent_width if stream and in_file else 0
    return ExportResult(str(out), out.stat().st_size, packed=packed if in_file else [],
                        values=values, exponent_width=width, opset=opset, verify=report,
                        accuracy=accuracy, unfinished=unfinished, signed_by=signed_by)


def _target_sparsity(ckpt: Checkpoint) -> float:
    """The run's sparsity target; a recipe without one used its method's default."""
    from compress.catalog import default_sparsity

    if ckpt.method == "none":
        return 0.0
    value = ckpt.recipe.get("sparsity")
    return float(value) if value is not None else default_sparsity(ckpt.method)


PROTOBUF_LIMIT = 2**31 - 1  # bytes one ONNX protobuf file can hold


def _check_fits_one_file(model: onnx.ModelProto) -> None:
    """Refuse, in one line, a model past protobuf's 2 GB limit (its own error is only
    "Failed to serialize proto")."""
    weights = sum(len(t.raw_data) + 4 * len(t.float_data) for t in model.graph.initializer)
    if weights >= PROTOBUF_LIMIT:
        raise CompressError(f"the model's weights take {weights / 2**30:.2f} GiB, past the "
                            "2 GB limit of one ONNX file; prune it first (compress does not "
                            "write ONNX external-data files)")


def validation_accuracy(ckpt: Checkpoint, path: Path) -> dict:
    """Validation top-1 of the checkpoint in PyTorch and of the exported file in ORT."""
    from compress.data import load_splits
    from compress.training import evaluate as torch_evaluate
    from export.runtime.evaluation import ort_session, split_top1

    try:
        splits = load_splits(ckpt.data)
    except CompressError as exc:
        return {"error": str(exc)}
    torch_top1, _ = torch_evaluate(ckpt.build_model(), splits.val)
    onnx_top1 = split_top1(ort_session(path), splits.val)
    return {"torch_val_top1": torch_top1, "onnx_val_top1": onnx_top1,
            "delta": onnx_top1 - torch_top1, "samples": len(splits.val)}
