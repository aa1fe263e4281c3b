import pickle

import pytest
import torch

from compress.checkpoint import (
    Checkpoint,
    load_checkpoint,
    load_weights_into,
    save_checkpoint,
)
from compress.data import DataConfig
from compress.errors import CompressError
from compress.models import build_model


def make_ckpt():
    torch.manual_seed(0)
    model = build_model("lenet5", 10, (1, 28, 28))
    masks = {"features.3.weight": torch.rand(16, 6, 5, 5) > 0.5}
    state = model.state_dict()
    state["features.3.weight"] = state["features.3.weight"] * masks["features.3.weight"]
    return Checkpoint("lenet5", DataConfig(), state, method="dpf", masks=masks,
                      recipe={"model": "lenet5"}, metrics={"val_top1": 0.5})


def test_round_trip(tmp_path):
    ckpt = make_ckpt()
    save_checkpoint(ckpt, tmp_path / "c.pt")
    back = load_checkpoint(tmp_path / "c.pt")
    assert back.model_spec == "lenet5" and back.method == "dpf"
    assert back.metrics == {"val_top1": 0.5}
    model = back.build_model()
    for k, v in ckpt.state_dict.items():
        assert torch.equal(model.state_dict()[k], v)
    assert torch.equal(back.masks["features.3.weight"], ckpt.masks["features.3.weight"])
    w = back.state_dict["features.3.weight"]
    assert not torch.signbit(w[w == 0]).any(), "negative zeros must be canonicalised"
    assert "torch" in back.versions


def test_run_directory_resolves_to_its_checkpoint(tmp_path):
    save_checkpoint(make_ckpt(), tmp_path / "checkpoint.pt")
    assert load_checkpoint(tmp_path).model_spec == "lenet5"


def test_truncated_checkpoint(tmp_path):
    save_checkpoint(make_ckpt(), tmp_path / "c.pt")
    data = (tmp_path / "c.pt").read_bytes()
    (tmp_path / "t.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CompressError, match="truncated|not a loadable"):
        load_checkpoint(tmp_path / "t.pt")


def test_foreign_checkpoints(tmp_path):
    torch.save(build_model("lenet5", 10, (1, 28, 28)).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CompressError, match="not a compress checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CompressError):
        load_checkpoint(tmp_path / "text.pt")
    with pytest.raises(CompressError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


class Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_code_in_a_pickle_is_refused(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "compress.checkpoint", "x": Evil()}, f)
    with pytest.raises(CompressError):
        load_checkpoint(tmp_path / "evil.pt")
    assert "must never run" not in capsys.readouterr().out


def test_plain_state_dict_as_initial_weights(tmp_path):
    source = build_model("lenet5", 10, (1, 28, 28))
    torch.save(source.state_dict(), tmp_path / "plain.pt")
    target = build_model("lenet5", 10, (1, 28, 28))
    load_weights_into(target, tmp_path / "plain.pt")
    assert torch.equal(target.features[0].weight, source.features[0].weight)
    other = build_model("lenet300", 10, (1, 28, 28))
    with pytest.raises(CompressError, match="do not fit"):
        load_weights_into(other, tmp_path / "plain.pt")


def test_failed_save_keeps_previous_file(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(make_ckpt(), path)
    before = path.read_bytes()
    bad = make_ckpt()
    bad.metrics = {"oops": lambda: 0}  # cannot be pickled by torch.save
    with pytest.raises(Exception):  # noqa: B017
        save_checkpoint(bad, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_a_module_that_needs_its_version_metadata_loads(tmp_path):
    """torchvision's MNASNet refuses a state_dict without torch's per-module versions,
    which a saved checkpoint (tensors only) does not keep."""
    model = build_model("torchvision.models:mnasnet0_5", 10, (3, 32, 32))
    config = DataConfig(name="synthetic", input_shape=(3, 32, 32))
    save_checkpoint(Checkpoint("torchvision.models:mnasnet0_5", config, model.state_dict()),
                    tmp_path / "m.pt")
    back = load_checkpoint(tmp_path / "m.pt").build_model()
    for key, value in model.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    fresh = build_model("torchvision.models:mnasnet0_5", 10, (3, 32, 32))
    load_weights_into(fresh, tmp_path / "m.pt")
