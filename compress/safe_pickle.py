"""Read CIFAR's pickled batches without letting the file run code.

torchvision's CIFAR layout stores each batch as a pickled dict of a uint8 numpy array and
lists of labels. A plain ``pickle.load`` would call whatever the file names, so a data
directory handed over by someone else could run a shell command. This reader admits only
what those files need — numpy's array reconstruction and plain data types, with no object
arrays — and refuses anything else, naming the file.
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path

import numpy as np

from compress.errors import CompressError
from compress.fileio import regular_file_size

MAX_BATCH_MB = 512  # a CIFAR batch is about 30 MiB; a bigger file is not one


def _reconstruct(subtype, shape, dtype_code):
    """numpy's array reconstruction, for plain arrays only (the state comes afterwards)."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError("only plain numpy arrays are allowed")
    return np.ndarray.__new__(np.ndarray, (0,), dtype=np.uint8)


def _dtype(spec, align=False, copy=False):
    dtype = np.dtype(spec, align=bool(align), copy=bool(copy))
    if dtype.hasobject:
        raise pickle.UnpicklingError("object arrays are not allowed")
    return dtype


def _latin1(text, encoding="latin1"):
    """Python 3's pickles of bytes: ``_codecs.encode(text, 'latin1')`` and nothing else."""
    if not isinstance(text, str) or codecs.lookup(str(encoding)).name != "iso8859-1":
        raise pickle.UnpicklingError("only latin-1 text encoding is allowed")
    return text.encode("latin1")


_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _latin1,
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which a CIFAR batch "
                                         "never holds") from None


def load_cifar_batch(path: Path) -> dict:
    """The dict one CIFAR batch file holds; anything a batch does not hold is refused."""
    size = regular_file_size(path, MAX_BATCH_MB, "a CIFAR batch")
    try:
        with open(path, "rb") as f:
            raw = f.read(size + 1)
        entry = _CifarUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except OSError as exc:
        raise CompressError(f"cannot read {path}: {exc.strerror}") from None
    except pickle.UnpicklingError as exc:
        raise CompressError(f"{path} is not a CIFAR batch: {exc}") from None
    except Exception as exc:  # a damaged pickle fails in many ways
        raise CompressError(f"{path} is not a CIFAR batch ({type(exc).__name__})") from None
    if not isinstance(entry, dict):
        raise CompressError(f"{path} is not a CIFAR batch (it holds no mapping)")
    return entry
