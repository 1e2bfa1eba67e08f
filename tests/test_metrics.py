"""Sample-quality metrics: FD against scipy, KID unbiasedness, precision/recall on
constructed clouds, and the shipped digit network on real MNIST digits."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

from diffusekit import metrics
from diffusekit.data import to_float
from diffusekit.data.mnist import load_mnist
from diffusekit.errors import UserError
from diffusekit.metrics import (
    class_histogram,
    compare_features,
    embed,
    fd_from_features,
    feature_stats,
    frechet_distance,
    get_feature_extractor,
    kid,
    label_accuracy,
    mmd2_unbiased,
    precision_recall,
)
from diffusekit.nn.digits import digit_net_weights_path, heldout_split, load_digit_net, to_digit_input


def gaussian(n: int, dim: int, seed: int, shift: float = 0.0, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)) * scale + shift


def scipy_fd(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook computation (pytorch-fid): scipy.linalg.sqrtm of S1 S2."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- Fréchet distance


@pytest.mark.parametrize("dim, n, shift, seed", [(1, 50, 0.5, 0), (4, 200, 0.0, 1), (16, 300, 1.0, 2), (64, 500, 0.2, 3)])
def test_fd_matches_scipy(dim, n, shift, seed):
    a = gaussian(n, dim, seed)
    mixing = gaussian(dim, dim, seed + 100) / dim**0.5 + torch.eye(dim)  # correlated, anisotropic
    b = gaussian(n, dim, seed + 200, shift) @ mixing
    expected = scipy_fd(a.double().numpy(), b.double().numpy())
    assert fd_from_features(a, b) == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_fd_closed_form_for_diagonal_gaussians():
    """For commuting covariances, d^2 = |mu1 - mu2|^2 + sum (sqrt(s1_i) - sqrt(s2_i))^2."""
    mu1, mu2 = torch.tensor([0.0, 1.0, 2.0]), torch.tensor([1.0, 1.0, 0.0])
    var1, var2 = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    expected = (mu1 - mu2).square().sum() + (var1.sqrt() - var2.sqrt()).square().sum()
    assert frechet_distance(mu1, var1.diag(), mu2, var2.diag()) == pytest.approx(expected.item(), rel=1e-12)


def test_fd_of_a_set_with_itself_is_zero_even_when_singular():
    wide = gaussian(20, 64, 0)  # fewer samples than dimensions: a rank-19 covariance
    assert fd_from_features(wide, wide) == pytest.approx(0.0, abs=1e-9)
    mu, sigma = feature_stats(gaussian(1000, 8, 1))
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_feature_mismatch_and_too_few_samples_are_user_errors():
    with pytest.raises(UserError, match="same feature extractor"):
        fd_from_features(gaussian(10, 4, 0), gaussian(10, 5, 0))
    with pytest.raises(UserError, match="at least 2 samples"):
        fd_from_features(gaussian(1, 4, 0), gaussian(10, 4, 0))


# ----------------------------------------------------------------------------- KID


def test_mmd2_unbiased_matches_the_double_sum():
    x, y = gaussian(6, 3, 0).double(), gaussian(5, 3, 1, shift=0.5).double()
    k = lambda u, v: (u @ v / 3 + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / (6 * 5)
    yy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / (5 * 4)
    xy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / (6 * 5)
    assert mmd2_unbiased(x, y).item() == pytest.approx((xx + yy - 2 * xy).item(), rel=1e-9)


def test_kid_is_unbiased_on_equal_distributions_and_positive_on_different_ones():
    a, b = gaussian(4000, 16, 0), gaussian(4000, 16, 1)
    subsets = 200
    mean, std = kid(a, b, subsets=subsets, subset_size=50, seed=0)
    assert abs(mean) < 3 * std / subsets**0.5  # zero within three standard errors of the mean
    shifted_mean, _ = kid(a, gaussian(4000, 16, 2, shift=0.5), subsets=subsets, subset_size=50, seed=0)
    assert shifted_mean > 20 * std / subsets**0.5
    assert kid(a, b, subsets=5, subset_size=50, seed=3) == kid(a, b, subsets=5, subset_size=50, seed=3)


# ----------------------------------------------------------------------------- precision / recall


def mixture(modes: torch.Tensor, per_mode: int, seed: int) -> torch.Tensor:
    noise = gaussian(len(modes) * per_mode, modes.shape[1], seed)
    return modes.repeat_interleave(per_mode, dim=0) + noise


def test_precision_recall_on_constructed_clouds():
    cloud = gaussian(500, 8, 0)
    assert precision_recall(cloud, cloud) == (1.0, 1.0)
    assert precision_recall(cloud, cloud + 100.0) == (0.0, 0.0)

    modes = gaussian(10, 2, 1, scale=30.0)
    real = mixture(modes, 200, seed=2)
    half = mixture(modes[:5], 400, seed=3)  # as many samples, only half the modes
    precision, recall = precision_recall(real, half, k=3)
    assert precision > 0.95
    assert 0.45 < recall <= 0.5


def test_precision_recall_do_not_depend_on_the_block_size(monkeypatch):
    real, fake = gaussian(300, 4, 0), gaussian(250, 4, 1, shift=0.7)
    whole = precision_recall(real, fake, k=5)
    monkeypatch.setattr(metrics, "DISTANCE_BLOCK", 1000)  # 3-4 rows per block
    assert precision_recall(real, fake, k=5) == whole
    assert 0.2 < whole[0] < 0.95 and 0.2 < whole[1] < 0.95


# ----------------------------------------------------------------------------- class statistics


def test_class_histogram_and_label_accuracy():
    predicted = torch.tensor([0, 0, 1, 3])
    assert class_histogram(predicted, 4).tolist() == [0.5, 0.25, 0.0, 0.25]
    assert label_accuracy(predicted, torch.tensor([0, 1, 1, 3])) == 0.75
    with pytest.raises(UserError, match="as many wanted labels"):
        label_accuracy(predicted, torch.tensor([0, 1]))


# ----------------------------------------------------------------------------- real digits through the digit net


@pytest.fixture(scope="module")
def digits():
    """(held-out images [1000, 1, 28, 28] in [-1, 1], their labels, 1000 random training images as the reference set).

    The digits are stored sorted by class, so the reference set is a random subset, not the first 1000.
    """
    images, labels = load_mnist()
    train_idx, heldout_idx = heldout_split(len(images))
    reference_idx = train_idx[torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(1))[:1000]]
    return to_float(images[heldout_idx]), labels[heldout_idx], to_float(images[reference_idx])


@pytest.fixture(scope="module")
def digit_net():
    torch.manual_seed(0)
    return get_feature_extractor("mnist")


def blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = int(3 * sigma)
    taps = torch.exp(-torch.arange(-radius, radius + 1).float().square() / (2 * sigma**2))
    taps = taps / taps.sum()
    padded = F.pad(images, (radius,) * 4, mode="replicate")
    return F.conv2d(F.conv2d(padded, taps.view(1, 1, 1, -1)), taps.view(1, 1, -1, 1))


def test_shipped_digit_net_is_accurate_on_the_heldout_digits(digits, digit_net):
    heldout, labels, _ = digits
    _, logits = embed(digit_net, heldout)
    accuracy = label_accuracy(logits.argmax(1), labels)
    assert accuracy > 0.97
    report = json.loads(digit_net_weights_path().with_suffix(".json").read_text())
    assert accuracy == pytest.approx(report["heldout_accuracy"], abs=2e-3)
    assert digit_net_weights_path().stat().st_size < 2_000_000


def test_fd_on_digits_grows_with_noise_and_with_blur(digits, digit_net):
    heldout, _, reference = digits
    real, _ = embed(digit_net, reference)
    noise = torch.randn(heldout.shape, generator=torch.Generator().manual_seed(0))

    def fd(images: torch.Tensor) -> float:
        return fd_from_features(real, embed(digit_net, images)[0])

    clean = fd(heldout)
    noisy = [fd((heldout + level * noise).clamp(-1, 1)) for level in (0.2, 0.5)]
    blurred = [fd(blur(heldout, sigma)) for sigma in (0.7, 1.5)]
    assert fd_from_features(real, real) == pytest.approx(0.0, abs=1e-6)
    assert clean < noisy[0] < noisy[1]
    assert clean < blurred[0] < blurred[1]
    assert clean < 0.2 * noisy[1] and clean < 0.2 * blurred[1]


def test_digit_net_takes_rgb_and_other_sizes():
    rgb = torch.rand(2, 3, 32, 32) * 2 - 1
    assert to_digit_input(rgb).shape == (2, 1, 28, 28)
    features, logits = load_digit_net().eval()(rgb)
    assert features.shape == (2, 128) and logits.shape == (2, 10)


# ----------------------------------------------------------------------------- extractors


def test_random_features_are_fixed_and_react_to_noise(digits):
    heldout, _, reference = digits
    extractor = get_feature_extractor("random")
    real, logits = embed(extractor, reference[:300], batch_size=128)
    assert logits is None and real.shape == (300, 256)
    assert torch.equal(real, embed(get_feature_extractor("random"), reference[:300])[0])
    clean = fd_from_features(real, embed(extractor, heldout[:300])[0])
    noisy = fd_from_features(real, embed(extractor, (heldout[:300] + 0.5 * torch.randn(300, 1, 28, 28)).clamp(-1, 1))[0])
    assert clean < 0.5 * noisy
    scores = compare_features(real, real, kid_subsets=3, kid_subset_size=100)
    assert scores["precision"] == scores["recall"] == 1.0 and scores["fd"] == pytest.approx(0.0, abs=1e-6)


def test_inception_needs_a_local_weights_file(monkeypatch, tmp_path):
    monkeypatch.delenv(metrics.INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(UserError, match=metrics.INCEPTION_WEIGHTS_ENV):
        get_feature_extractor("inception")
    missing = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    with pytest.raises(UserError, match="not found.*nothing is downloaded"):
        get_feature_extractor("inception", weights=missing)
    monkeypatch.setenv(metrics.INCEPTION_WEIGHTS_ENV, str(missing))
    with pytest.raises(UserError, match="not found"):
        get_feature_extractor("inception")


def test_inception_without_a_package_to_run_it_names_the_package(monkeypatch, tmp_path):
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"not really weights")
    monkeypatch.setitem(metrics.INCEPTION_BACKENDS, ".pth", [("diffusekit_no_such_module", "Nothing")])
    with pytest.raises(UserError, match="pip install torch-fidelity"):
        get_feature_extractor("inception", weights=weights)


class FakeTorchFidelityInception(torch.nn.Module):
    """Stands in for torch-fidelity's FeatureExtractorInceptionV3: records its arguments, wants uint8 RGB."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None):
        super().__init__()
        if Path(feature_extractor_weights_path).read_bytes() != b"weights":
            raise RuntimeError("invalid load key")
        self.args = (name, features_list, feature_extractor_weights_path)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        return (x.float().mean(dim=(2, 3)).repeat(1, 4) * self.scale,)


def test_inception_runs_the_local_weights_through_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "fake_fidelity", types.SimpleNamespace(Inception=FakeTorchFidelityInception))
    monkeypatch.setitem(metrics.INCEPTION_BACKENDS, ".pth", [("fake_fidelity", "Inception")])
    weights = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"weights")
    extractor = get_feature_extractor("inception", weights=weights)
    assert extractor.net.args == ("inception-v3-compat", ["2048"], str(weights))
    features, logits = embed(extractor, torch.ones(5, 1, 8, 8))
    assert logits is None and features.shape == (5, 12) and torch.all(features == 255)
    weights.write_bytes(b"damaged")
    with pytest.raises(UserError, match="cannot load the Inception weights.*invalid load key"):
        get_feature_extractor("inception", weights=weights)


def test_unknown_extractor_is_a_user_error():
    with pytest.raises(UserError, match="inception, mnist, random"):
        get_feature_extractor("vgg")


def test_real_data_floor_scores_held_out_real_digits(monkeypatch, tmp_path):
    from diffusekit.evaluate import real_data_floor

    monkeypatch.setenv("DIFFUSEKIT_CACHE", str(tmp_path))
    floor = real_data_floor(500, size=28, channels=1, repeats=2)
    assert floor["n"] == 500 and len(floor["fd"]) == 2 and floor["fd"][0] != floor["fd"][1]
    assert all(0 < fd < 0.5 for fd in floor["fd"])  # real against real: small, but not 0 at n = 500
    assert all(p > 0.8 for p in floor["precision"]) and all(r > 0.8 for r in floor["recall"])
    with pytest.raises(UserError, match="more than n reference images"):
        real_data_floor(5000, size=28, channels=1)
