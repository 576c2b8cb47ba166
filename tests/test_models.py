import numpy as np
import pytest
import torch

from defuse.models import ConvVAE, Generator, build_classifier, elbo_terms
from defuse.models.classifiers import ClassifierModule


@pytest.mark.parametrize("arch", ["small_cnn", "resnet18"])
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32)])
def test_classifiers_map_unit_images_to_logits(arch, channels, size):
    model = build_classifier(arch, channels, 7, [0.5] * channels, [0.25] * channels).eval()
    logits = model(torch.rand(3, channels, size, size))
    assert logits.shape == (3, 7) and torch.isfinite(logits).all()


def test_normalisation_lives_inside_the_model():
    model = build_classifier("small_cnn", 1, 10, [0.3], [0.2])
    assert torch.allclose(model[0](torch.full((1, 1, 2, 2), 0.5)), torch.full((1, 1, 2, 2), 1.0))
    assert {"0.mean", "0.std"} <= set(model.state_dict())


def test_classifier_module_keeps_its_hyperparameters():
    module = ClassifierModule(arch="small_cnn", in_channels=1, num_classes=3, classes=["a", "b", "c"])
    assert module.hparams.num_classes == 3 and list(module.hparams.classes) == ["a", "b", "c"]


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (1, 64), (3, 64)])
def test_vae_shapes_and_range(channels, size):
    vae = ConvVAE(channels, size, latent_dim=5, width=8).eval()
    assert isinstance(vae, Generator)
    mu, logvar = vae.encode(torch.rand(2, channels, size, size))
    assert mu.shape == logvar.shape == (2, 5)
    with torch.no_grad():
        x = vae.decode(torch.randn(4, 5) * 3)
    assert x.shape == (4, channels, size, size) and float(x.min()) >= 0 and float(x.max()) <= 1


def test_vae_rejects_unsupported_sizes():
    with pytest.raises(ValueError, match="`image_size` must be one of 28, 32, 64; got 30 instead."):
        ConvVAE(1, 30)
    with pytest.raises(ValueError, match="`in_channels` must be 1 or 3, got 2 instead."):
        ConvVAE(2, 28)


def test_kl_term_carries_gradient_to_the_encoder():
    torch.manual_seed(0)
    vae = ConvVAE(1, 28, latent_dim=4, width=8)
    _, kl = elbo_terms(vae, torch.rand(6, 1, 28, 28))
    kl.backward()
    assert kl.item() > 0
    for head in (vae.to_mu, vae.to_logvar):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    # The KL alone must not reach the decoder: it depends only on the posterior.
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in vae.decoder_fc.parameters())


def test_kl_matches_the_closed_form_and_vanishes_at_the_prior():
    vae = ConvVAE(1, 28, latent_dim=3, width=8)
    mu = torch.tensor([[1.0, -2.0, 0.5]])
    logvar = torch.tensor([[0.0, 0.5, -1.0]])
    vae.encode = lambda x: (mu, logvar)  # noqa: E731 - pin the posterior
    _, kl = elbo_terms(vae, torch.rand(1, 1, 28, 28))
    expected = 0.5 * float((mu**2 + logvar.exp() - 1 - logvar).sum())
    assert kl.item() == pytest.approx(expected, rel=1e-6)
    vae.encode = lambda x: (torch.zeros(1, 3), torch.zeros(1, 3))  # noqa: E731
    assert elbo_terms(vae, torch.rand(1, 1, 28, 28))[1].item() == pytest.approx(0.0, abs=1e-7)


def test_reconstruction_term_is_the_bernoulli_negative_log_likelihood():
    vae = ConvVAE(1, 28, latent_dim=3, width=8)
    x = torch.rand(2, 1, 28, 28)
    recon, _ = elbo_terms(vae, x, generator=torch.Generator().manual_seed(0))
    assert recon.item() > 0
    # a perfect reconstruction of a binary image costs ~0; the loss is summed over pixels, not averaged
    assert recon.item() > 28 * 28 * 0.1


@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (3, 64)])
def test_the_gan_with_its_inverter_is_a_generator_of_every_size(channels, size):
    from defuse.models.gan import InvertedGAN

    gan = InvertedGAN(channels, size, latent_dim=6, width=8).eval()
    assert isinstance(gan, Generator)
    mu, logvar = gan.encode(torch.rand(2, channels, size, size))
    assert mu.shape == logvar.shape == (2, 6)
    with torch.no_grad():
        z = torch.randn(4, 6) * 3
        x = gan.decode(z)
        assert torch.equal(x, torch.sigmoid(gan.decode_logits(z)))  # images are probabilities of the logits
    assert x.shape == (4, channels, size, size)
    with pytest.raises(ValueError, match="`image_size` must be one of 28, 32, 64; got 30 instead."):
        InvertedGAN(1, 30)


def test_the_gan_trains_its_inverter_measures_its_width_and_round_trips_through_generator_ckpt(tmp_path):
    """generator.kind=gan through the fit-generator code path: the inverter learns (its latent error falls below
    the prior's spread), encode's width is that error, and generator.ckpt loads the same generator back."""
    from conftest import TINY_OVERRIDES

    from defuse.config import load_config
    from defuse.models.gan import InvertedGAN
    from defuse.models.loading import load_generator, save_generator
    from defuse.models.training import train_vae, training_data

    config = load_config(None, [*TINY_OVERRIDES, "generator.kind=gan", "generator.epochs=2", "generator.width=8",
                                "generator.latent_dim=4"])
    data = training_data(config.data, config.seed)
    gan, hparams = train_vae(data, config.generator, config.trainer, str(tmp_path))
    assert isinstance(gan, InvertedGAN) and hparams["kind"] == "gan" and not gan.training
    sigma2 = gan.log_sigma2.exp()
    assert (sigma2 < 1.0).all() and (sigma2 > 0).all()  # below the prior's unit variance: E(G(z)) tracks z
    images = data.split("audit").float_images()[:8]
    mu, logvar = gan.encode(images)
    assert torch.equal(logvar[0], gan.log_sigma2) and torch.isfinite(mu).all()
    save_generator(tmp_path / "generator.ckpt", gan, hparams)
    loaded = load_generator(tmp_path / "generator.ckpt")
    assert isinstance(loaded, InvertedGAN)
    with torch.no_grad():
        assert torch.allclose(loaded.reconstruct(images), gan.reconstruct(images))
    with pytest.raises(ValueError, match="`generator.kind` must be one of vae, gan"):
        load_config(None, ["generator.kind=flow"])


def test_the_perceptual_term_trains_a_frozen_reference_network_kept_out_of_the_generator(tmp_path):
    """generator.perceptual > 0: a reference CNN is trained on the train split, its features stay frozen and in eval
    mode through the VAE's training (Lightning's train() must not reach its batch norms), the VAE's loss carries
    the perceptual term, and generator.ckpt holds the VAE alone."""
    from conftest import TINY_OVERRIDES

    from defuse.config import load_config
    from defuse.models.generators import VAEModule
    from defuse.models.loading import load_generator, save_generator
    from defuse.models.training import (
        make_trainer,
        reference_features,
        train_vae,
        training_data,
    )

    config = load_config(None, [*TINY_OVERRIDES, "generator.perceptual=1", "generator.perceptual_epochs=1",
                                "generator.epochs=1"])
    data = training_data(config.data, config.seed)
    features = reference_features(data, 1, config.trainer, str(tmp_path), config.seed)
    frozen = {k: v.clone() for k, v in features.state_dict().items()}
    module = VAEModule(in_channels=1, image_size=28, latent_dim=4, width=8, perceptual=1.0, features=features)
    make_trainer(config.trainer, 1, str(tmp_path), num_sanity_val_steps=0).fit(module, datamodule=data)
    assert not features.training and all(not p.requires_grad for p in features.parameters())
    assert all(torch.equal(frozen[k], v) for k, v in features.state_dict().items())  # running stats included
    assert module.trainer.callback_metrics["train_perceptual"] > 0
    assert not any(key.startswith("_features") for key in module.state_dict())

    vae, hparams = train_vae(data, config.generator, config.trainer, str(tmp_path), config.seed)
    save_generator(tmp_path / "generator.ckpt", vae, hparams)
    assert set(load_generator(tmp_path / "generator.ckpt").state_dict()) == set(vae.state_dict())
    with pytest.raises(ValueError, match="`generator.perceptual` must be >= 0"):
        load_config(None, ["generator.perceptual=-1"])
    with pytest.raises(ValueError, match="is a term of the VAE's loss"):
        load_config(None, ["generator.perceptual=1", "generator.kind=gan"])


def test_a_conditional_vae_carries_the_given_class_in_fixed_one_hot_latent_dimensions(tmp_path):
    """generator.conditional: encode needs the labels and appends them one-hot with a posterior scale the search
    cannot move; the KL term covers the learned dimensions only; the checkpoint keeps the class count."""
    from defuse.config import load_config
    from defuse.models.generators import (
        CLASS_LOGVAR,
        ConvVAE,
        elbo_terms,
        prior_latents,
    )
    from defuse.models.inference import latent_means, reconstruct
    from defuse.models.loading import load_generator, save_generator

    vae = ConvVAE(3, 32, latent_dim=6, width=8, num_classes=4).eval()
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 1, 1, 2])
    assert vae.latent_dim == 10 and vae.style_dim == 6
    with pytest.raises(ValueError, match="encoding an image needs its label"):
        vae.encode(x)
    mu, logvar = vae.encode(x, labels)
    assert torch.equal(mu[:, 6:], torch.nn.functional.one_hot(labels, 4).float())
    assert (logvar[:, 6:] == CLASS_LOGVAR).all() and (torch.exp(0.5 * logvar[:, 6:]) * 8 < 0.1).all()
    assert torch.allclose(latent_means(vae, x, batch_size=2, labels=labels), mu, atol=1e-6)  # labels sliced alike
    assert reconstruct(vae, x, labels=labels).shape == x.shape
    other = vae.decode(torch.cat([mu[:, :6], torch.nn.functional.one_hot(labels.roll(1), 4).float()], 1))
    assert not torch.allclose(other, vae.decode(mu))  # the decoder reads the class
    _, kl = elbo_terms(vae, x, labels=labels, generator=torch.Generator().manual_seed(1))
    mu6, logvar6 = mu[:, :6], logvar[:, :6]
    assert torch.isclose(kl, -0.5 * torch.sum(1 + logvar6 - mu6.pow(2) - logvar6.exp()) / 5)
    z = prior_latents(vae, 50, torch.Generator().manual_seed(0))
    assert z.shape == (50, 10) and torch.equal(z[:, 6:].sum(1), torch.ones(50)) and len(z[:, 6:].unique()) == 2
    save_generator(tmp_path / "generator.ckpt", vae, {"in_channels": 3, "image_size": 32, "latent_dim": 6,
                                                      "width": 8, "num_classes": 4})
    loaded = load_generator(tmp_path / "generator.ckpt")
    assert loaded.num_classes == 4 and torch.equal(loaded.encode(x, labels)[0], mu)
    assert ConvVAE(3, 32, latent_dim=6, width=8).encode(x)[0].shape == (5, 6)  # unconditional: as before
    with pytest.raises(ValueError, match="has no conditional form"):
        load_config(None, ["generator.conditional=true", "generator.kind=gan"])


def test_recording_training_margins_leaves_the_trained_weights_unchanged_and_measures_every_train_image(tiny_config):
    from defuse.models.training import TrainingMargins, train_classifier, training_data

    config = tiny_config
    weights = []
    for record in (False, True):
        data = training_data(config.data, config.seed)
        train = data.split("train")
        margins = TrainingMargins(train.float_images(), train.labels)
        model, _ = train_classifier(data, config.classifier, config.trainer, seed=config.seed,
                                    callbacks=[margins] if record else None)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    table = margins.table()
    assert table.shape == (config.classifier.epochs, len(train)) and table.dtype == np.float32
    # The last epoch's margins are those of the trained model: given label's logit minus the largest other.
    from defuse.models.inference import predict_logits

    logits = predict_logits(model, train.float_images())
    given = logits[torch.arange(len(train)), train.labels]
    others = logits.clone()
    others[torch.arange(len(train)), train.labels] = -torch.inf
    assert np.allclose(table[-1], (given - others.max(dim=1).values).numpy(), atol=1e-4)
    assert (table[-1] > 0).mean() > 0.5  # most training images are learnt: positive margins
