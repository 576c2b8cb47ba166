import re
from pathlib import Path

import pytest
import yaml

from defuse.config import RunConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_digits_yaml_equals_the_built_in_defaults():
    assert load_config(CONFIGS / "digits.yaml").to_dict() == RunConfig().to_dict()


def test_mnist_test_split_config_is_the_fixed_8k_2k_split():
    config = load_config(CONFIGS / "mnist-test-split.yaml")
    assert config.name == "mnist-test-split"
    assert (config.data.source, config.data.test_size, config.data.shuffle) == ("idx", 2000, False)


def test_overrides_parse_values_as_yaml():
    config = load_config(None, ["classifier.epochs=3", "data.shuffle=false", "generator.beta=0.5", "seed=7"])
    assert (config.classifier.epochs, config.data.shuffle, config.generator.beta, config.seed) == (3, False, 0.5, 7)


def test_exponent_without_a_dot_is_a_float_not_a_string():
    # YAML 1.1 reads 1e-2 as the string "1e-2"; a float key must still take it, and words must still be refused.
    assert load_config(None, ["correct.lr=1e-2", "generator.lr=3E-4"]).correct.lr == 0.01
    with pytest.raises(ValueError, match=re.escape("`correct.lr` in the defaults or the overrides (correct.lr=e-2) must be a float, got 'e-2'")):
        load_config(None, ["correct.lr=e-2"])


def test_unknown_key_suggests_the_closest_one(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"sorce": "digits"}}))
    with pytest.raises(ValueError, match=re.escape(f"Unknown config key 'data.sorce' in {path}. Did you mean 'data.source'?")):
        load_config(path)


def test_a_retired_key_says_why_it_went_and_to_delete_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"correct": {"average": True}}))
    with pytest.raises(ValueError, match=re.escape(f"Config key 'correct.average' in {path} is retired: each epoch's")) \
            as raised:
        load_config(path)
    assert str(raised.value).endswith("Delete it.")
    path.write_text(yaml.safe_dump({"correct": {"scoped": False}}))
    with pytest.raises(ValueError, match=re.escape("Config key 'correct.scoped' in") + ".*the fine-tuned model as it is"):
        load_config(path)


def test_wrong_type_names_key_value_and_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("classifier:\n  epochs: many\n")
    with pytest.raises(ValueError, match=re.escape(f"`classifier.epochs` in {path} must be a int, got 'many' instead.")):
        load_config(path)


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.source=mnsit", "`data.source` must be one of digits, signs, mnist, fashion-mnist, kmnist, svhn, cifar10, gtsrb, "
                              "idx, folder, npz; got 'mnsit' instead. Did you mean 'mnist'?"),
        ("classifier.epochs=0", "`classifier.epochs` must be an int in the range [1, 10000], got 0 instead."),
        ("data.image_size=30", "`data.image_size` must be one of (28, 32, 64) for the VAE, got 30 instead."),
        ("seed=-1", "`seed` must be >= 0, got -1 instead."),
        ("data.source=npz", "`data.root` must name the npz source's .npz file, got nothing instead."),
        ("classifier.weights=w.pt", "`classifier.weights` needs `classifier.factory`"),
        ("epochs", "An override must look like key.path=value (e.g. seed=3), got 'epochs' instead."),
        ("identify.split=test", "`identify.split` must be one of train, val, audit; got 'test' instead. The test split "
                                "only grades the repair: searching it or fitting on it would grade the repair on data "
                                "that shaped it. Use 'audit' (the default; its size is data.audit_size)."),
        ("identify.validity_split=test", "`identify.validity_split` must be one of train, val, audit; got 'test'"),
        ("identify.split=aduit", "`identify.split` must be one of train, val, audit; got 'aduit' instead. "
                                 "Did you mean 'audit'?"),
        ("data.audit_size=-1", "`data.audit_size` must be >= 0, got -1.0 instead."),
        ("label.auto_min_real_misread=0", "`label.auto_min_real_misread` must be an int in the range [1, 1048576], "
                                          "got 0 instead."),
    ],
)
def test_invalid_values_are_refused_with_the_fix(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [override])


def test_missing_config_lists_the_available_ones(monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)
    with pytest.raises(FileNotFoundError, match="Config file 'nope' does not exist. Configs in ./configs: digits"):
        load_config("nope")
    assert load_config("mnist-test-split").name == "mnist-test-split"


def test_config_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match=re.escape(f"{path} must hold a mapping of config keys, got a list instead.")):
        load_config(path)


def test_presentation_keys_stay_out_of_fingerprinted_sections():
    on, off = load_config(None, ["trainer.progress_bar=true"]), load_config(None, ["trainer.progress_bar=false"])
    assert on.section("trainer") == off.section("trainer")
    assert "progress_bar" not in on.section("trainer")["trainer"] and "deterministic" in on.section("trainer")["trainer"]
    assert on.to_dict()["trainer"]["progress_bar"] is True  # the manifest still records it


def test_a_factory_given_as_a_file_is_fingerprinted_by_that_file(tmp_path):
    from defuse.config import path_fields

    config = load_config(None, [f"classifier.factory={tmp_path / 'model.py'}:build"])
    assert path_fields(config.classifier) == {"factory": str(tmp_path / "model.py")}
    assert path_fields(load_config(None, ["classifier.factory=pkg.models:build"]).classifier) == {}


def test_a_run_without_a_name_is_named_after_its_data_not_digits(tmp_path):
    """The report's title and the default run directory (runs/<name>) come from the name."""
    assert load_config(None, []).name == "digits"
    assert load_config(None, ["data.source=npz", f"data.root={tmp_path / 'traffic.npz'}"]).name == "traffic"
    (tmp_path / "photos").mkdir()
    assert load_config(None, ["data.source=folder", f"data.root={tmp_path / 'photos'}"]).name == "photos"
    assert load_config(None, ["data.source=cifar10"]).name == "cifar10"
    assert load_config(None, ["name=mine", "data.source=npz", f"data.root={tmp_path / 'x.npz'}"]).name == "mine"
