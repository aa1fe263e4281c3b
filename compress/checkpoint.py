"""The compress checkpoint: weights with masks applied, masks, recipe, data, versions, and
the pruned structure of a model whose channels were cut.

Saved with ``torch.save`` to a temporary file and renamed; loaded with
``weights_only=True`` so that a checkpoint can never run code. Every field is a tensor,
a number, a string, a list or a dict.

Format 2 adds ``structure``: the channel cuts as plain numbers (`Structure`), replayed onto
a freshly built model before its weights load. Format 1 files (no structure) still load.
"""

from __future__ import annotations

import pickle
import platform
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

from compress.catalog import CATALOG
from compress.data import DataConfig
from compress.errors import CompressError, first_line
from compress.fileio import atomic_write, regular_file_size
from compress.masks import canonical_zeros
from compress.model_specs import check_spec_from_file
from compress.models import build_model
from compress.pretrained import fit_classifier, is_named, named_file
from compress.pretrained_timm import is_timm_weights, pretrained_model, weights_file

FORMAT = "compress.checkpoint"
FORMAT_VERSION = 2
CHECKPOINT_NAME = "checkpoint.pt"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("compress", "torch", "torchvision", "numpy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


@dataclass
class Checkpoint:
    model_spec: str
    data: DataConfig
    state_dict: dict[str, torch.Tensor]
    method: str = "none"
    masks: dict[str, torch.Tensor] | None = None
    recipe: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    versions: dict = field(default_factory=library_versions)
    training_state: dict | None = None
    structure: dict | None = None  # `Structure.to_dict()` of a channel-pruned model

    def to_payload(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": {"spec": self.model_spec},
            "data": self.data.to_dict(),
            "method": self.method,
            "state_dict": {k: canonical_zeros(v) if v.is_floating_point() else v
                           for k, v in self.state_dict.items()},
            "masks": self.masks,
            "recipe": self.recipe,
            "metrics": self.metrics,
            "versions": self.versions,
            "training_state": self.training_state,
            "structure": self.structure,
        }

    def build_model(self) -> nn.Module:
        """Rebuild the network and load the (pruned) weights into it."""
        model = self.build_architecture()
        try:
            load_state(model, self.state_dict)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise CompressError(f"checkpoint weights do not fit model {self.model_spec!r}: "
                                f"{first[1].strip() if len(first) > 1 else first[0]}") from None
        return model

    def build_architecture(self) -> nn.Module:
        """The network as the checkpoint holds it (thinner where channels were cut), with
        fresh weights."""
        model = build_model(self.model_spec, self.data.num_classes, self.data.input_shape)
        try:
            return apply_structure(model, self.structure, self.data.input_shape)
        except CompressError:
            raise
        except Exception as exc:  # a damaged record: the engine fails in many ways on it
            raise CompressError(f"the checkpoint's channel structure does not fit model "
                                f"{self.model_spec!r} ({type(exc).__name__}); the file is "
                                "damaged") from None


def apply_structure(model: nn.Module, structure: dict | None,
                    input_shape: tuple[int, ...]) -> nn.Module:
    """Cut ``model``'s channels as ``structure`` records (nothing when it is None)."""
    if not structure:
        return model
    from compress.structured.engine import Structure, rebuild

    return rebuild(model, Structure.from_dict(structure), tuple(input_shape))


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``model.load_state_dict(state)`` with the module versions torch records beside a
    state_dict (a saved checkpoint keeps only tensors): some modules refuse to load without
    them (torchvision's MNASNet)."""
    ordered = OrderedDict(state)
    ordered._metadata = getattr(state, "_metadata", None) or model.state_dict()._metadata
    model.load_state_dict(ordered)


def unfinished_note(ckpt: Checkpoint) -> str | None:
    """A warning for a training run that stopped before its last epoch, else None."""
    done = (ckpt.training_state or {}).get("epoch")
    planned = (ckpt.recipe or {}).get("epochs")
    if done is None or planned is None or "test_top1" in (ckpt.metrics or {}) or \
            done >= planned:
        return None
    if ckpt.method in CATALOG and CATALOG[ckpt.method].when == "one-shot":
        return (f"this prune run stopped after fine-tune epoch {done} of {planned}; run the "
                "same `compress prune` command again: it starts over in the same --out")
    return (f"this run stopped after epoch {done} of {planned}, so its sparsity may be short "
            "of the target; continue it with `compress train-prune --out RUN --resume`")


def save_checkpoint(ckpt: Checkpoint, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(ckpt.to_payload(), tmp))


def _no_checkpoint_hint(path: Path) -> str:
    """A run directory with a recipe but no checkpoint stopped before its first epoch."""
    if not (path.parent / "recipe.yaml").is_file():
        return ""
    return ("; the run stopped before its first epoch ended: continue it with `compress "
            f"train-prune --out {path.parent} --resume` (a prune run: run `compress prune` "
            "again)")


def resolve_checkpoint_path(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.exists():
        raise CompressError(f"no checkpoint at {path}" + _no_checkpoint_hint(path))
    if path.suffix.lower() in (".onnx", ".ort"):
        raise CompressError(f"{path} is an exported model; this command reads a run directory "
                            "or its checkpoint.pt")
    return path


MAX_CHECKPOINT_MB = 8192  # the largest torchvision classifier's checkpoint takes 2.5 GiB


def check_archive(path: Path) -> None:
    """Refuse, before torch reads it, a file that is not regular (a FIFO would hang the
    reader), past ``MAX_CHECKPOINT_MB``, or a zip archive that would expand: ``torch.save``
    stores its entries uncompressed, so a compressed entry (a zip bomb) is refused."""
    size = regular_file_size(path, MAX_CHECKPOINT_MB, "a checkpoint")
    try:
        if not zipfile.is_zipfile(path):
            return  # torch's legacy format, or not a torch file: torch.load says which
        with zipfile.ZipFile(path) as archive:
            entries = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError, EOFError):
        raise CompressError(f"{path} is truncated or corrupted") from None
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED
              or e.file_size != e.compress_size]
    if packed:
        raise CompressError(f"{path} is not a checkpoint torch.save wrote: its entry "
                            f"{packed[0][:80]!r} is compressed")
    if sum(e.file_size for e in entries) > size:
        raise CompressError(f"{path} is corrupted: its entries declare more bytes than the "
                            "file holds")


def read_torch_file(path: Path) -> object:
    """``torch.load(weights_only=True)`` with every failure turned into one line."""
    check_archive(path)
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles; we say it once
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" in str(exc).lower():
            raise CompressError(f"{path} is not a compress checkpoint: it holds Python objects "
                                "other than tensors, which are never loaded (weights_only)") \
                from None
        raise CompressError(f"{path} is not a loadable checkpoint (not a torch file)") from None
    except (RuntimeError, OSError, ValueError, zipfile.BadZipFile) as exc:
        text = str(exc).lower()
        if "zip" in text or "stream" in text or "archive" in text or "central directory" in text:
            raise CompressError(f"{path} is truncated or corrupted") from None
        raise CompressError(f"{path} is not a loadable checkpoint (not a torch file)") from None
    except Exception:  # torch.load fails in many ways on foreign bytes
        raise CompressError(f"{path} is not a loadable checkpoint (empty or not a torch "
                            "file)") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a compress checkpoint (a file, or a run directory holding ``checkpoint.pt``)."""
    path = resolve_checkpoint_path(path)
    payload = read_torch_file(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CompressError(f"{path} is not a compress checkpoint (no {FORMAT!r} header); "
                            "a plain state_dict can be given to train-prune --weights with --model")
    if not isinstance(payload.get("format_version", 0), int):
        raise CompressError(f"{path} is a damaged compress checkpoint: its format version is "
                            f"{payload.get('format_version')!r}")
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CompressError(f"{path} was written by a newer compress (format "
                            f"{payload['format_version']}); upgrade compress to read it")
    _check_payload(payload, path)
    check_spec_from_file(payload["model"]["spec"], str(path))
    recipe_model = (payload.get("recipe") or {}).get("model")
    if recipe_model is not None:
        check_spec_from_file(recipe_model, f"{path} (its recipe)")
    try:
        data = DataConfig.from_dict(payload["data"])
    except CompressError as exc:
        raise CompressError(f"{path} is a damaged compress checkpoint: {exc}") from None
    try:
        return Checkpoint(
            model_spec=payload["model"]["spec"],
            data=data,
            state_dict=payload["state_dict"],
            method=payload.get("method", "none"),
            masks=payload.get("masks"),
            recipe=payload.get("recipe") or {},
            metrics=payload.get("metrics") or {},
            versions=payload.get("versions") or {},
            training_state=payload.get("training_state"),
            structure=payload.get("structure"),
        )
    except (KeyError, TypeError) as exc:
        raise CompressError(f"{path} is a damaged compress checkpoint (missing {exc})") from None


def refuse_non_finite(state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse weights holding NaN or infinity (a diverged run or a damaged file): every
    figure computed from them would be meaningless, and parity checks cannot compare them."""
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise CompressError(f"{where}: {name} holds {bad:,} NaN or infinite value(s); "
                                "such weights cannot be exported (did training diverge?)")


def _tensors(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                           for k, v in value.items())


_PARTS = {  # what each part of a checkpoint must be, and how to say it
    "model": (lambda v: isinstance(v, dict) and isinstance(v.get("spec"), str),
              "a model spec"),
    "data": (lambda v: isinstance(v, dict), "a data set record"),
    "method": (lambda v: isinstance(v, str), "a method name"),
    "state_dict": (_tensors, "tensors by name"),
    "masks": (lambda v: v is None or _tensors(v), "masks by name"),
    "recipe": (lambda v: v is None or isinstance(v, dict), "a recipe"),
    "metrics": (lambda v: v is None or isinstance(v, dict), "metrics"),
    "versions": (lambda v: v is None or isinstance(v, dict), "library versions"),
    "training_state": (lambda v: v is None or isinstance(v, dict), "a training state"),
    "structure": (lambda v: v is None or isinstance(v, dict), "a channel structure"),
    "format_version": (lambda v: isinstance(v, int) and not isinstance(v, bool),
                       "a format version"),
}


def _check_payload(payload: dict, path: Path) -> None:
    """Refuse, in one line, a checkpoint whose parts are not of the kinds this format
    writes (a damaged or hand-made file)."""
    for name, (fits, what) in _PARTS.items():
        if name in payload and not fits(payload[name]):
            raise CompressError(f"{path} is a damaged compress checkpoint: its {name!r} is not "
                                f"{what}")
    if "model" not in payload or "data" not in payload or "state_dict" not in payload:
        raise CompressError(f"{path} is a damaged compress checkpoint (no model, data or "
                            "weights)")


def load_weights_into(model: nn.Module, path: str | Path, model_name: str = "the model",
                      data: tuple[int, tuple[int, int, int]] | None = None
                      ) -> tuple[dict | None, list[str]]:
    """Initialise ``model`` (``model_name``: how the user named it) from a compress
    checkpoint, a plain state_dict file or published weights named ``torchvision:...`` or
    ``timm:...`` (`compress.pretrained`; timm's need ``data``, the class count and input
    shape the model was built for); a channel-pruned checkpoint cuts ``model`` to its
    structure first. Returns that structure and notes for the run (a classifier replaced)."""
    if is_timm_weights(str(path)):
        if data is None:
            raise CompressError(f"{path}: timm's weights are fitted to the data's classes "
                                "and input shape, which were not given")
        file = weights_file(str(path), model_name)
        if file.suffix != ".safetensors":  # safetensors holds tensors only, by its format
            check_archive(file)
        loaded, notes = pretrained_model(str(path), file, *data)
        load_state(model, loaded.state_dict())
        return None, notes
    path = named_file(str(path)) if is_named(str(path)) else resolve_checkpoint_path(path)
    payload = read_torch_file(path)
    state = payload.get("state_dict") if isinstance(payload, dict) and \
        payload.get("format") == FORMAT else payload
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CompressError(f"{path} holds neither a compress checkpoint nor a state_dict")
    structure = payload.get("structure") if state is not payload else None
    saved = payload.get("model", {}).get("spec") if state is not payload and \
        isinstance(payload.get("model"), dict) else None
    source = f"{path} (weights of {saved!r})" if saved else f"the weights in {path}"
    if structure:  # a channel-pruned checkpoint: cut the fresh model the same way first
        input_shape = tuple(payload["data"]["input_shape"])
        try:
            apply_structure(model, structure, input_shape)
        except Exception as exc:  # the engine's one line, or the graph's own error
            if saved is None or saved == model_name:
                raise
            raise CompressError(f"{source} do not fit {model_name!r}: its channel cuts are "
                                f"{saved}'s ({first_line(exc)[:120]})") from None
    state, note = fit_classifier(model, state) if structure is None else (state, None)
    try:
        load_state(model, state)
    except RuntimeError as exc:
        lines = str(exc).strip().splitlines()
        detail = lines[1].strip() if len(lines) > 1 else lines[0]
        raise CompressError(f"{source} do not fit {model_name!r}: "
                            f"{detail.split(':')[0][:200]}") from None
    return structure, [note] if note else []
