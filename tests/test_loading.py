import os
import re

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from defuse.models import build_classifier, load_classifier, load_generator, safe_load
from defuse.models.generators import ConvVAE
from defuse.models.loading import (
    load_factory,
    load_torchscript,
    save_classifier,
    save_generator,
)


def tiny_factory() -> nn.Module:
    """Used as tests.test_loading:tiny_factory."""
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 3))


def test_classifier_checkpoint_round_trip(tmp_path):
    hparams = {"arch": "small_cnn", "in_channels": 1, "num_classes": 3, "mean": [0.2], "std": [0.3],
               "classes": ("a", "b", "c"), "lr": 1e-3}
    model = build_classifier("small_cnn", 1, 3, [0.2], [0.3]).eval()
    save_classifier(tmp_path / "c.ckpt", model, hparams)
    loaded = load_classifier(tmp_path / "c.ckpt")
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded.model(x), model(x))
    assert loaded.classes == ("a", "b", "c")


def test_generator_checkpoint_round_trip(tmp_path):
    vae = ConvVAE(1, 28, latent_dim=4, width=8).eval()
    save_generator(tmp_path / "g.ckpt", vae, {"in_channels": 1, "image_size": 28, "latent_dim": 4, "width": 8})
    again = load_generator(tmp_path / "g.ckpt")
    z = torch.randn(3, 4)
    assert torch.equal(again.decode(z), vae.decode(z))


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_a_checkpoint_carrying_a_pickled_code_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    _Payload.marker = marker
    path = tmp_path / "evil.ckpt"
    torch.save({"format": "defuse.classifier/1", "state_dict": {}, "payload": _Payload()}, path)
    with pytest.raises(ValueError, match=re.escape(f"Refusing to load {path}: it carries pickled Python objects")):
        load_classifier(path)
    assert not marker.exists()  # the payload never ran


def test_not_a_checkpoint_and_wrong_format(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"hello")
    with pytest.raises(ValueError, match="is not a readable torch checkpoint"):
        safe_load(tmp_path / "junk.ckpt")
    torch.save({"format": "something/else"}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match=re.escape("is not a defuse.classifier/1 checkpoint (found 'something/else')")):
        load_classifier(tmp_path / "other.ckpt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_generator(tmp_path / "missing.ckpt")


def test_torchscript_classifier_loads(tmp_path):
    model = tiny_factory().eval()
    torch.jit.script(model).save(str(tmp_path / "m.pt"))
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(load_torchscript(tmp_path / "m.pt")(x), model(x))
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(ValueError, match="is not a TorchScript file"):
        load_torchscript(tmp_path / "bad.pt")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_factory_with_weights(tmp_path, suffix):
    source = tiny_factory()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    model = load_factory("test_loading:tiny_factory", path)
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(model(x), source(x))


def test_factory_errors(tmp_path):
    with pytest.raises(ValueError, match="Cannot import classifier factory 'nowhere.at_all:f'"):
        load_factory("nowhere.at_all:f", None)
    torch.save({"wrong.weight": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match="does not fit the module built by"):
        load_factory("test_loading:tiny_factory", tmp_path / "w.pt")


def test_a_factory_given_as_a_file_builds_and_one_off_the_path_says_how_to_reach_it(tmp_path):
    (tmp_path / "user_model.py").write_text("from torch import nn\n\n\ndef build():\n    return nn.Linear(2, 3)\n")
    assert isinstance(load_factory(f"{tmp_path / 'user_model.py'}:build", None), nn.Linear)
    with pytest.raises(ValueError, match="add that folder to PYTHONPATH.*path/to/file.py:function"):
        load_factory("user_model:build", None)  # the same module, not importable from here
    with pytest.raises(ValueError, match="Cannot import classifier factory .*missing.py:build"):
        load_factory(f"{tmp_path / 'missing.py'}:build", None)


def test_a_repair_of_a_factory_classifier_is_saved_as_its_factory_and_the_fine_tuned_weights(tmp_path):
    from defuse.models.inference import copy_model
    from defuse.models.loading import save_classifier_pointer

    save_file(tiny_factory().state_dict(), str(tmp_path / "w.safetensors"))
    source = {"factory": "test_loading:tiny_factory", "weights": str(tmp_path / "w.safetensors")}
    save_classifier_pointer(tmp_path / "classifier.ckpt", "factory", source, ("a", "b", "c"))
    brought = load_classifier(tmp_path / "classifier.ckpt")
    fine_tuned = copy_model(brought.model).eval()
    with torch.no_grad():
        fine_tuned[1].bias[2] += 5.0  # reads everything as 2
    save_classifier(tmp_path / "repaired.ckpt", fine_tuned, brought.hparams)
    payload = safe_load(tmp_path / "repaired.ckpt")
    assert payload["kind"] == "factory" and payload["source"] == source and "brought" not in payload["hparams"]
    repaired = load_classifier(tmp_path / "repaired.ckpt")
    x = torch.rand(64, 1, 28, 28)
    assert torch.equal(repaired.model(x), fine_tuned(x))
    assert not torch.equal(repaired.model(x), brought.model(x))  # the fine-tuned weights, not the file's


def test_a_scoped_repair_from_before_its_removal_is_refused_with_how_to_redo_it(tmp_path):
    model = build_classifier("small_cnn", 1, 3, [0.2], [0.3])
    hparams = {"arch": "small_cnn", "in_channels": 1, "num_classes": 3, "mean": [0.2], "std": [0.3],
               "classes": ["a", "b", "c"], "scoped_classes": [2]}
    save_classifier(tmp_path / "repaired.ckpt", model, hparams)  # what the scope wrapper's repairs carried
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "repaired.ckpt")) + " is a scoped repair.*"
                       + re.escape("defuse run --force correct")):
        load_classifier(tmp_path / "repaired.ckpt")
