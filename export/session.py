"""Opening onnxruntime sessions: one place for options, formats and load errors."""

from __future__ import annotations

from pathlib import Path

from compress.errors import CompressError, first_line


def open_session(path: str | Path, *, threads: int | None = None, basic_only: bool = False,
                 save_to: Path | None = None, save_as_ort: bool = False,
                 profile_prefix: str | None = None):
    """A quiet CPU session; ``.ort`` files load as ORT format.

    ``basic_only`` limits graph optimisation to the hardware-independent level (constant
    folding included); ``save_to`` writes the optimised model there, in ORT format when
    ``save_as_ort``; ``profile_prefix`` turns on onnxruntime's profiler, writing there.
    """
    from export.ort import load_onnxruntime

    ort = load_onnxruntime()
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"no model file at {path}")
    options = ort.SessionOptions()
    options.log_severity_level = 4  # its errors reach the user as one line, not as a log
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if path.suffix.lower() == ".ort":
        options.add_session_config_entry("session.load_model_format", "ORT")
    if basic_only:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if save_to is not None:
        options.optimized_model_filepath = str(save_to)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    if save_as_ort:
        options.add_session_config_entry("session.save_model_format", "ORT")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"],
                                       enable_fallback=0)  # see `quiet`
    except Exception as exc:
        raise CompressError(f"onnxruntime cannot load {path}: {first_line(exc)}") from None
    quiet(session)
    return session


def quiet(session) -> None:
    """No retry on another provider, when the session starts (``enable_fallback=0``) or
    runs: it would print a multi-line "EP Error" banner to stdout, and there is no other
    provider to retry on."""
    session.disable_fallback()


def single_input(session, where: str | Path):
    """The model's one input (a classifier takes one image batch); a model with none or
    several is refused in one line naming them, since compress cannot feed it sensibly."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        names = ", ".join(repr(spec.name[:60]) for spec in inputs[:8])
        raise CompressError(f"{where} takes {len(inputs)} inputs{f' ({names})' if names else ''}"
                            "; compress feeds classifiers with one input (an image batch)")
    return inputs[0]
