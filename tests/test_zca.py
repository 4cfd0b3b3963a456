"""utils/zca.py: whitening against the closed form, its inverse, state round trip, in place."""

import torch

from tests.conftest import closed_form_whitened_covariance, covariance
from utils.zca import ZCA


def correlated_images(n: int, seed: int) -> torch.Tensor:
    """[n, 3, 4, 4] in [0, 1] with a strongly non-isotropic covariance."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(48, 48, generator=gen) * torch.linspace(0.01, 1, 48)
    x = torch.rand(n, 48, generator=gen) @ mixing
    x = (x - x.min()) / (x.max() - x.min())
    return x.reshape(n, 3, 4, 4)


def test_zca_inverse_and_whitened_covariance():
    x = correlated_images(300, seed=0)
    zca = ZCA.fit(x)
    z = zca(x)
    assert z.shape == x.shape
    assert (zca.inverse(z) - x).abs().max() < 1e-3
    expected = closed_form_whitened_covariance(x, eps=0.1)
    assert (covariance(z) - expected).abs().max() < 1e-4
    assert expected.diagonal().min() < 0.5  # eps matters here: the check could tell eps apart

    restored = ZCA.from_state_dict(zca.state_dict())
    assert torch.equal(restored(x[:5]), z[:5])
    in_place = x.clone()
    assert zca(in_place, out=in_place) is in_place and torch.allclose(in_place, z, atol=1e-6)
