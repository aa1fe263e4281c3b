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
    ("epochs", 0, "--epochs, --batch-size and --refresh-every must be at least 1"),
])
def test_invalid_values(field, value, says):
    with pytest.raises(CompressError) as refused:
        Recipe(**{field: value}).validate()
    assert says in str(refused.value)


@pytest.mark.parametrize(("args", "fragment"), [
    (["--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--method", "dpf-filter", "--sparsity", "1.2"], "--sparsity must be in [0, 1)"),
])
def test_a_bad_training_value_is_refused_before_torch_loads(tmp_path, args, fragment):
    """Importing torch, torch-pruning and torchvision takes seconds: the recipe is checked
    first, with the method catalog, which imports none of them."""
    import subprocess
    import sys
    from pathlib import Path

    argv = ["train-prune", *args, "--out", str(tmp_path / "run")]
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
