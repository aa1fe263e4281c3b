import pytest

from compress.errors import CompressError
from compress.recipe import Recipe, dump_recipe, load_recipe, resolve_recipe


def test_recipe_round_trip(tmp_path):
    recipe = Recipe(model="resnet20", data="synthetic", sparsity=0.95, freeze_at=0.9,
                    input_shape=[3, 16, 16], skip_classifier=True).validate()
    path = tmp_path / "r.yaml"
    path.write_text(dump_recipe(recipe))
    assert load_recipe(path) == recipe


def test_flags_override_recipe_and_dashes_are_accepted(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: lenet300\nsparsity: 0.8\nrefresh-every: 32\nepochs: 3\n")
    resolved = resolve_recipe(str(path), {"sparsity": 0.5, "epochs": None})
    assert (resolved.model, resolved.sparsity, resolved.refresh_every, resolved.epochs) == \
        ("lenet300", 0.5, 32, 3)


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: lenet5\nsparsty: 0.9\n")
    with pytest.raises(CompressError, match="unknown recipe key 'sparsty'"):
        load_recipe(path)


@pytest.mark.parametrize("text, message", [
    ("epochs: many\n", "'epochs' must be int"),
    ("- a\n- b\n", "must be a mapping"),
    ("model: [unclosed\n", "not valid YAML"),
])
def test_bad_recipes(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(CompressError, match=message):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(CompressError, match="cannot read recipe"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("field", "value", "says"), [
    ("sparsity", 1.0, "--sparsity must be in [0, 1), got 1.0"),
    ("sparsity", -0.1, "--sparsity must be in [0, 1), got -0.1"),
    ("method", "snip", "unknown method 'snip' for train-prune"),
    ("freeze_at", 0.5, "--freeze-at must lie between --prune-end and 1"),
    ("epochs", 0, "--epochs must be at least 1, got 0"),
    ("batch_size", 0, "--batch-size must be at least 1, got 0"),
    ("lr", 0.0, "--lr must be a positive number, got 0.0"),
    ("weight_decay", -1e-4, "--weight-decay must be >= 0, got -0.0001"),
    ("target_macs", 0.0, "--target-macs must be in (0, 1], got 0.0"),
    ("lr_schedule", "linear", "--lr-schedule must be cosine, step or constant, got 'linear'"),
    ("budget_ms", float("inf"), "--budget-ms must be a positive number, got inf"),
])
def test_invalid_values(field, value, says):
    with pytest.raises(CompressError) as refused:
        Recipe(**{field: value}).validate()
    assert says in str(refused.value)


@pytest.mark.parametrize(("args", "fragment"), [
    (["train-prune", "--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
    (["train-prune", "--method", "nope"], "unknown method 'nope'"),
    (["train-prune", "--method", "dpf-filter", "--sparsity", "1.2"],
     "--sparsity must be in [0, 1)"),
    (["prune", "run", "--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
    (["prune", "run", "--method", "cbs", "--rho", "0"], "--rho must be at least 1, got 0"),
    (["prune", "run", "--update", "sgd"], "--update must be cbs, woodfisher or none"),
    (["prune", "run", "--method", "l1-filter", "--sparsity", "0.3,0.5"],
     "a --sparsity list sweeps weight pruning"),
    (["prune", "run", "--method", "magnitude", "--target-macs", "0.5"],
     "--target-macs sets a channel budget; method magnitude removes weights"),
    (["prune", "run", "--round-to", "0"], "--round-to must be at least 1, got 0"),
])
def test_a_bad_value_is_refused_before_torch_loads(tmp_path, args, fragment):
    """Importing torch, torch-pruning and torchvision takes seconds: the options are checked
    first, against their declarations and the method catalog, which import none of them."""
    import subprocess
    import sys
    from pathlib import Path

    argv = [*args, "--out", str(tmp_path / "run")]
    script = f"""
import atexit, sys
atexit.register(lambda: print("torch loaded:", "torch" in sys.modules, file=sys.stderr))
sys.argv[1:] = {argv!r}
from cli.app import main
main()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parent.parent, timeout=120, check=False)
    assert done.returncode == 2
    assert fragment in done.stderr and "torch loaded: False" in done.stderr
    assert not (tmp_path / "run").exists()


def test_every_option_is_declared_once_with_help_and_a_panel():
    """The command line's flags come from the declarations: each field of the recipe and of
    the one-shot settings has a help and a panel, and is a flag of its command."""
    import dataclasses

    from cli.commands import PRUNE_SHARED, prune, train_prune
    from compress.options import declarations
    from compress.prune_options import PruneOptions

    for cls, command, fields in ((Recipe, train_prune, None), (PruneOptions, prune, None),
                                 (Recipe, prune, PRUNE_SHARED)):
        declared = declarations(cls)
        assert set(declared) == {f.name for f in dataclasses.fields(cls)}
        flags = set(__import__("inspect").signature(command).parameters)
        for name in fields or declared:
            assert declared[name][1].help and declared[name][1].panel, name
            assert name in flags, (command.__name__, name)


def test_declared_bounds_read_as_one_line():
    from compress.options import Declared, bound_error

    assert bound_error("rho", 0, Declared("", "", low=1)) == "--rho must be at least 1, got 0"
    assert bound_error("x", 1.0, Declared("", "", low=0.0, high=1.0, high_open=True)) == \
        "--x must be in [0, 1), got 1.0"
    assert bound_error("x", float("nan"), Declared("", "", low=0.0)) == \
        "--x must be >= 0, got nan"
    assert bound_error("x", None, Declared("", "", low=1)) is None
    assert bound_error("x", 0.5, Declared("", "", low=0.0, high=1.0, low_open=True)) is None
