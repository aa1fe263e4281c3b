"""Ed25519 signatures of exported files, checked without torch (stdlib and cryptography;
reading whether a file is signed, as ``inspect --json`` does, needs only the stdlib).

A signature covers the file's exact bytes, so one changed byte anywhere is refused. It is
appended to the file as one more field of the ONNX ``ModelProto`` (field 1000, which ONNX
does not use, length-delimited): protobuf readers (onnx, onnxruntime) skip a field they do
not know, so a signed file loads everywhere unchanged; the ORT format (flatbuffers) ignores
bytes after its end. The field's payload has a fixed size::

    MAGIC (16 bytes) | signer's raw Ed25519 public key (32) | signature (64)

and the signature is over ``MAGIC + sha256(every byte before the field)``. Signing a
signed file replaces its signature. Keys are PEM files: the private key PKCS#8,
unencrypted, mode 0600; the public key SubjectPublicKeyInfo. A key is named by its
fingerprint, the first 16 hex digits of the SHA-256 of its raw public key.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from compress.errors import CompressError
from compress.fileio import replace_or_explain, temporary_beside, usual_file_mode

MAGIC = b"io.compress.sig1"
FIELD = 1000  # ModelProto field number; ONNX's own end far below
_KEY_BYTES, _SIG_BYTES = 32, 64
_PAYLOAD = len(MAGIC) + _KEY_BYTES + _SIG_BYTES  # 112, one varint byte
_HEADER = bytes([(FIELD << 3 | 2) & 0x7F | 0x80, (FIELD << 3 | 2) >> 7, _PAYLOAD])
TRAILER_BYTES = len(_HEADER) + _PAYLOAD
SIGNED_SUFFIXES = (".onnx", ".ort")
_CHUNK = 1 << 20
_MAX_KEY_FILE = 1 << 16  # a PEM key takes a few hundred bytes

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
# cryptography itself is imported where a key is used: `bench` and `inspect` without
# --verify-key run where it is not installed


def fingerprint(key: Ed25519PublicKey | bytes) -> str:
    raw = key if isinstance(key, bytes) else _raw(key)
    return hashlib.sha256(raw).hexdigest()[:16]


def _raw(key: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# --- keys -------------------------------------------------------------------------------

def _key_text(path: str | Path, option: str) -> bytes:
    path = Path(path)
    if not path.exists():
        raise CompressError(f"{option} {path}: no such key file")
    if not path.is_file() or path.stat().st_size > _MAX_KEY_FILE:
        raise CompressError(f"{option} {path} is not a key file")
    data = path.read_bytes()
    if b"-----BEGIN " not in data:
        raise CompressError(f"{option} {path} is not a PEM key file (make one with "
                            "`compress keygen --out KEY`)")
    return data


def load_private_key(path: str | Path, option: str = "--key") -> Ed25519PrivateKey:
    """The signing key in ``path``; anything else is one line saying what it is instead."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _key_text(path, option)
    if b"PUBLIC KEY-----" in data and b"PRIVATE KEY-----" not in data:
        raise CompressError(f"{option} {path} is a public key; signing needs the private key "
                            "it was made with")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's answer to an encrypted key without a password
        raise CompressError(f"{option} {path} is encrypted; compress reads unencrypted keys "
                            "(keep the file private instead: mode 0600)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CompressError(f"{option} {path} is not a readable private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CompressError(f"{option} {path} is not an Ed25519 key ({_kind(key)}); compress "
                            "signs with Ed25519 keys (make one with `compress keygen --out KEY`)")
    return key


def load_public_key(path: str | Path, option: str = "--key") -> Ed25519PublicKey:
    """The verifying key in ``path`` (a private key is refused: it does not belong on the
    machines that verify)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _key_text(path, option)
    if b"PRIVATE KEY-----" in data:
        raise CompressError(f"{option} {path} is a private key; verification takes the public "
                            f"key ({Path(path).name}.pub), and the private key belongs only "
                            "where files are signed")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise CompressError(f"{option} {path} is not a readable public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise CompressError(f"{option} {path} is not an Ed25519 key ({_kind(key)}); compress "
                            "verifies Ed25519 signatures (see `compress keygen`)")
    return key


def _kind(key) -> str:
    return type(key).__name__.removeprefix("_").replace("PrivateKey", " key").replace(
        "PublicKey", " key")


def public_key_path(private: str | Path) -> Path:
    return Path(str(private) + ".pub")


def generate_key(out: str | Path) -> tuple[Path, Path, str]:
    """Write a new private key to ``out`` (mode 0600) and its public key to ``out.pub``;
    neither may exist. Returns both paths and the fingerprint."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_path, public_path = Path(out), public_key_path(out)
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise CompressError(f"{path} already exists; a key is never overwritten (choose "
                                "another name, or remove the old key if it is really unused)")
    if not private_path.parent.is_dir():
        raise CompressError(f"--out: directory {private_path.parent} does not exist")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    _write_new(private_path, private_pem, 0o600)
    try:
        _write_new(public_path, public_pem, usual_file_mode())
    except BaseException:
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path, fingerprint(key.public_key())


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to a temporary file, then link it to ``path``, which must not exist:
    the file appears whole or not at all, and an existing one is never replaced."""
    tmp = temporary_beside(path, "--out")  # mode 0600 from the start
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise CompressError(f"{path} already exists; a key is never overwritten") from None
    finally:
        tmp.unlink(missing_ok=True)


# --- signatures -------------------------------------------------------------------------

@dataclass
class Signature:
    """What a file's signature field holds (read, not yet checked)."""

    key: bytes  # raw Ed25519 public key of the signer
    signature: bytes
    body_bytes: int  # the signed bytes: everything before the field

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)


def _trailer(data: bytes) -> Signature | None:
    if len(data) != TRAILER_BYTES or not data.startswith(_HEADER + MAGIC):
        return None
    start = len(_HEADER) + len(MAGIC)
    return Signature(data[start:start + _KEY_BYTES], data[start + _KEY_BYTES:], 0)


def read_signature(path: str | Path) -> Signature | None:
    """The signature field at the end of ``path``, or None when the file has none."""
    path = Path(path)
    if not path.is_file():
        raise CompressError(f"no model file at {path}")
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size <= TRAILER_BYTES:
            return None
        fh.seek(size - TRAILER_BYTES)
        found = _trailer(fh.read(TRAILER_BYTES))
    if found:
        found.body_bytes = size - TRAILER_BYTES
    return found


def signature_info(path: str | Path) -> dict:
    """``{"signed", "key"}`` for the JSON outputs: the field read, nothing verified."""
    found = read_signature(path)
    return {"signed": found is not None, "key": found.fingerprint if found else None}


def _message(digest: bytes) -> bytes:
    return MAGIC + digest  # domain-separated: this signature means nothing elsewhere


def _body_digest(fh, length: int) -> bytes:
    h = hashlib.sha256()
    left = length
    while left:
        chunk = fh.read(min(_CHUNK, left))
        if not chunk:
            raise CompressError(f"{fh.name} changed while it was read")
        h.update(chunk)
        left -= len(chunk)
    return h.digest()


def verify_file(path: str | Path, key: Ed25519PublicKey) -> str:
    """Check that ``path`` is signed by ``key`` and unchanged since; returns the key's
    fingerprint. An unsigned file, one altered after signing, or one signed by another key
    is refused in one line."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    path = Path(path)
    expected = fingerprint(key)
    found = read_signature(path)
    if found is None:
        raise CompressError(f"{path} is not signed (expected a signature by key {expected})")
    with open(path, "rb") as fh:
        digest = _body_digest(fh, found.body_bytes)
    try:
        Ed25519PublicKey.from_public_bytes(found.key).verify(found.signature, _message(digest))
    except (InvalidSignature, ValueError):
        raise CompressError(f"{path} was altered after it was signed: its signature does not "
                            "match its bytes") from None
    if found.key != _raw(key):
        raise CompressError(f"{path} is signed by another key ({found.fingerprint}), not by "
                            f"{expected}")
    return expected


def sign_file(path: str | Path, key: Ed25519PrivateKey) -> str:
    """Sign ``path`` in place (a signature it had is replaced); the file is swapped whole,
    keeping its mode. Returns the key's fingerprint."""
    path = Path(path)
    found = read_signature(path)
    size = path.stat().st_size
    body = found.body_bytes if found else size
    raw = _raw(key.public_key())
    tmp = temporary_beside(path)
    try:
        h = hashlib.sha256()
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            left = body
            while left:
                chunk = src.read(min(_CHUNK, left))
                if not chunk:
                    raise CompressError(f"{path} changed while it was signed")
                h.update(chunk)
                dst.write(chunk)
                left -= len(chunk)
            dst.write(_HEADER + MAGIC + raw + key.sign(_message(h.digest())))
            dst.flush()
            os.fsync(dst.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        verify_file(tmp, key.public_key())  # what was written is what a reader will check
        replace_or_explain(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return fingerprint(key.public_key())


def check_signable(path: str | Path) -> None:
    """Only exported models are signed: the field is harmless there and nowhere else."""
    if not str(path).lower().endswith(SIGNED_SUFFIXES):
        raise CompressError(f"{path}: compress signs exported models (.onnx or .ort files)")
