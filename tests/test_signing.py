"""Signed exports: a file signed at export verifies with its public key; one changed byte,
another key, or no signature at all is refused in one line; a signed file still loads in
onnx and onnxruntime; verification runs where torch is not installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from export import onnx_export
from export.onnx_export import export_checkpoint, to_ort_format
from export.signing import TRAILER_BYTES, read_signature

sys.path.insert(0, str(Path(__file__).parent))
from isolation import CLI_WITHOUT_TORCH, run_without  # noqa: E402


def _one_line_exit_2(result) -> str:
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2, result.output
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Two key pairs made by `compress keygen`: ``key``/``pub`` and ``other``/``other_pub``."""
    from typer.testing import CliRunner

    from cli.app import app

    folder = tmp_path_factory.mktemp("keys")
    for name in ("key", "other"):
        result = CliRunner().invoke(app, ["keygen", "--out", str(folder / name)])
        assert result.exit_code == 0, result.output
    return {"key": folder / "key", "pub": folder / "key.pub", "other": folder / "other",
            "other_pub": folder / "other.pub"}


@pytest.fixture(scope="module")
def unsigned(dpf_run, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("signing") / "unsigned.onnx"
    export_checkpoint(dpf_run, path, pack="bitmask", verify=False)
    return path


@pytest.fixture(scope="module")
def signed(dpf_run, keys, tmp_path_factory) -> Path:
    """Signed by `compress export --sign`."""
    from typer.testing import CliRunner

    from cli.app import app

    path = tmp_path_factory.mktemp("signing") / "signed.onnx"
    result = CliRunner().invoke(app, ["export", str(dpf_run), "--onnx", str(path), "--pack",
                                      "bitmask", "--no-verify", "--sign", str(keys["key"])])
    assert result.exit_code == 0, result.output
    assert "signed by key" in result.output
    return path


def _fingerprint(cli, pub: Path, path: Path) -> str:
    result = cli("verify", path, "--key", pub, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["key"]


def test_keygen_makes_a_private_and_a_public_key_and_never_overwrites(tmp_path, cli):
    key = tmp_path / "signing"
    result = cli("keygen", "--out", key, "--json")
    assert result.exit_code == 0, result.output
    made = json.loads(result.stdout)
    assert made["public_key"] == f"{key}.pub" and len(made["key"]) == 16
    assert key.stat().st_mode & 0o777 == 0o600
    assert b"PRIVATE KEY" in key.read_bytes() and b"PUBLIC KEY" in Path(f"{key}.pub").read_bytes()
    before = key.read_bytes(), Path(f"{key}.pub").read_bytes()
    assert "already exists" in _one_line_exit_2(cli("keygen", "--out", key))
    assert (key.read_bytes(), Path(f"{key}.pub").read_bytes()) == before
    lone_pub = tmp_path / "lone"
    Path(f"{lone_pub}.pub").write_text("kept\n")
    assert "already exists" in _one_line_exit_2(cli("keygen", "--out", lone_pub))
    assert not lone_pub.exists() and Path(f"{lone_pub}.pub").read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lone.pub", "signing", "signing.pub"]


def test_signed_export_round_trip(signed, unsigned, keys, cli):
    result = cli("verify", signed, "--key", keys["pub"])
    assert result.exit_code == 0, result.output
    fingerprint = _fingerprint(cli, keys["pub"], signed)
    assert result.stdout.strip() == f"{signed}: signed by key {fingerprint}: verified"
    # the signature adds one field at the end and nothing else
    assert signed.stat().st_size == unsigned.stat().st_size + TRAILER_BYTES
    assert read_signature(signed).body_bytes == unsigned.stat().st_size


def test_a_signed_file_loads_everywhere(signed, unsigned, keys, cli):
    model = onnx.load(str(signed))
    onnx.checker.check_model(model)
    onnx.checker.check_model(str(signed), full_check=True)
    x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
    outputs = []
    for path in (signed, unsigned):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {session.get_inputs()[0].name: x})[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    result = cli("inspect", signed, "--json")  # without a key: read, digests checked
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["integrity"]["status"] == "verified"
    fingerprint = _fingerprint(cli, keys["pub"], signed)
    assert report["signature"] == {"signed": True, "key": fingerprint, "verified": False}
    assert f"signed by key {fingerprint}: not verified" in cli("inspect", signed).stdout
    assert json.loads(cli("inspect", unsigned, "--json").stdout)["signature"] == {
        "signed": False, "key": None, "verified": False}


# start, middle, and inside the signature field: its tag, magic, key and signature
FLIPS = {"first byte": 0, "middle": 0.5, "field tag": -TRAILER_BYTES, "magic": -TRAILER_BYTES + 5,
         "signer key": -80, "signature": -30, "last byte": -1}


@pytest.mark.parametrize("where", sorted(FLIPS))
def test_one_flipped_byte_is_refused(signed, keys, tmp_path, cli, where):
    data = bytearray(signed.read_bytes())
    at = FLIPS[where]
    at = int(at * len(data)) if isinstance(at, float) else at
    data[at] ^= 0x01
    bad = tmp_path / "flipped.onnx"
    bad.write_bytes(bytes(data))
    line = _one_line_exit_2(cli("verify", bad, "--key", keys["pub"]))
    assert any(word in line for word in ("altered after it was signed", "is not signed")), line
    assert line == _one_line_exit_2(cli("inspect", bad, "--verify-key", keys["pub"]))


def test_another_key_and_no_signature_are_refused(signed, unsigned, keys, tmp_path, cli):
    theirs = tmp_path / "theirs.onnx"
    shutil.copy(signed, theirs)
    result = cli("sign", theirs, "--key", keys["other"])  # replaces the signature
    assert result.exit_code == 0, result.output
    assert theirs.stat().st_size == signed.stat().st_size
    other = _fingerprint(cli, keys["other_pub"], theirs)
    ours = _fingerprint(cli, keys["pub"], signed)
    line = _one_line_exit_2(cli("verify", theirs, "--key", keys["pub"]))
    assert line == f"error: {theirs} is signed by another key ({other}), not by {ours}"
    line = _one_line_exit_2(cli("verify", unsigned, "--key", keys["pub"]))
    assert line == f"error: {unsigned} is not signed (expected a signature by key {ours})"


def test_readers_check_the_signature_first(signed, unsigned, keys, cli):
    key = ("--verify-key", keys["pub"])
    result = cli("evaluate", signed, "--max-test-samples", "64", "--json", *key)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["signature"]["verified"] is True
    result = cli("bench", signed, "--against", signed, "--runs", "2", "--warmup", "0",
                 "--json", *key)
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["signature"]["verified"] and payload["against"]["signature"]["verified"]
    for reader in (("inspect",), ("evaluate", "--max-test-samples", "64"),
                   ("bench", "--runs", "2", "--warmup", "0")):
        line = _one_line_exit_2(cli(reader[0], unsigned, *reader[1:], *key))
        assert "is not signed" in line
    line = _one_line_exit_2(cli("bench", signed, "--against", unsigned, "--runs", "2", *key))
    assert f"{unsigned} is not signed" in line
    line = _one_line_exit_2(cli("inspect", signed, "--verify-key", keys["other_pub"]))
    assert "signed by another key" in line


def _rsa_key(tmp_path: Path, public: bool) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / ("rsa.pub" if public else "rsa.pem")
    path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo) if public
        else key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()))
    return path


def test_bad_key_files_are_one_line(signed, keys, tmp_path, cli):
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("hello\n")
    cases = [
        (("verify", signed, "--key", keys["key"]), "is a private key"),
        (("inspect", signed, "--verify-key", keys["key"]), "is a private key"),
        (("sign", signed, "--key", keys["pub"]), "is a public key"),
        (("verify", signed, "--key", tmp_path / "missing.pub"), "no such key file"),
        (("verify", signed, "--key", not_pem), "is not a PEM key file"),
        (("verify", signed, "--key", _rsa_key(tmp_path, True)), "is not an Ed25519 key"),
        (("sign", signed, "--key", _rsa_key(tmp_path, False)), "is not an Ed25519 key"),
        (("inspect", keys["pub"], "--verify-key", keys["pub"]), "checks signed exports"),
    ]
    before = signed.read_bytes()
    for args, expected in cases:
        assert expected in _one_line_exit_2(cli(*args)), args
    assert signed.read_bytes() == before


def test_a_bad_key_or_a_failed_signing_leaves_no_file(dpf_run, keys, tmp_path, cli,
                                                      monkeypatch):
    target = tmp_path / "model.onnx"
    line = _one_line_exit_2(cli("export", dpf_run, "--onnx", target, "--no-verify", "--sign",
                                keys["pub"]))
    assert "is a public key" in line and list(tmp_path.iterdir()) == []

    def broken(path, key):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(onnx_export, "sign_file", broken)
    with pytest.raises(OSError):
        export_checkpoint(dpf_run, target, verify=False, sign=keys["key"])
    assert list(tmp_path.iterdir()) == []


def test_ort_format_files_are_signed_too(unsigned, keys, tmp_path, cli):
    path = tmp_path / "model.ort"
    to_ort_format(unsigned, path)
    assert cli("sign", path, "--key", keys["key"]).exit_code == 0
    result = cli("bench", path, "--runs", "2", "--warmup", "0", "--verify-key", keys["pub"])
    assert result.exit_code == 0, result.output


def test_verification_without_torch(signed, unsigned, keys):
    def run(*args) -> subprocess.CompletedProcess:
        body = f"sys.argv[1:] = {[str(a) for a in args]!r}\n" + CLI_WITHOUT_TORCH
        return run_without(("torch", "torchvision"), body)

    proc = run("verify", signed, "--key", keys["pub"])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(": verified")
    proc = run("inspect", signed, "--verify-key", keys["pub"], "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["signature"]["verified"] is True
    proc = run("bench", signed, "--runs", "2", "--warmup", "0", "--verify-key", keys["pub"])
    assert proc.returncode == 0, proc.stderr
    proc = run("verify", unsigned, "--key", keys["pub"])
    assert proc.returncode == 2 and "is not signed" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # without cryptography, only what needs a key asks for it
    blocked = ("torch", "torchvision", "cryptography")
    body = f"sys.argv[1:] = {['inspect', str(signed), '--json']!r}\n" + CLI_WITHOUT_TORCH
    proc = run_without(blocked, body)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["signature"]["signed"] is True
    body = f"sys.argv[1:] = {['verify', str(signed), '--key', str(keys['pub'])]!r}\n"
    proc = run_without(blocked, body + CLI_WITHOUT_TORCH)
    assert proc.returncode == 2 and "pip install cryptography" in proc.stderr, proc.stderr
    # the check itself needs only cryptography: not even onnx, onnxruntime or numpy
    proc = run_without(("torch", "torchvision", "onnx", "onnxruntime", "numpy"), (
        "from export.signing import load_public_key, verify_file\n"
        f"print(verify_file({str(signed)!r}, load_public_key({str(keys['pub'])!r})))\n"
        "assert not {'torch', 'onnx', 'onnxruntime', 'numpy'} & set(sys.modules)\n"))
    assert proc.returncode == 0 and len(proc.stdout.strip()) == 16, proc.stderr
