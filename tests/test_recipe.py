import pytest

from compress.errors import CompressError
from compress.pipeline import resolve_recipe
from compress.recipe import Recipe, dump_recipe, load_recipe


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


@pytest.mark.parametrize("field, value", [("sparsity", 1.0), ("sparsity", -0.1),
                                          ("method", "snip"), ("freeze_at", 0.5),
                                          ("epochs", 0)])
def test_invalid_values(field, value):
    with pytest.raises(CompressError):
        Recipe(**{field: value}).validate()
