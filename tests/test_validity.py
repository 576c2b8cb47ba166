import numpy as np
import torch

from defuse.validity import ValidityModel


def test_the_torch_judge_gives_the_validity_models_numbers():
    rng = np.random.default_rng(0)
    latents = rng.normal(size=(600, 4)) + np.repeat(np.eye(3, 4) * 3, 200, axis=0)
    labels = np.repeat(np.arange(3), 200)
    model = ValidityModel.fit(latents, labels, num_classes=4)  # class 3 never seen: validity 0
    probe = rng.normal(size=(50, 4)) * 3
    which = rng.integers(0, 4, size=50)
    judged = model.judge()(torch.from_numpy(probe).float(), torch.from_numpy(which)).numpy()
    np.testing.assert_allclose(judged, model.validity(probe, which), atol=1e-5)
    assert (judged[which == 3] == 0).all() and (judged[which != 3] > 0).any()
