"""Sample quality: Fréchet distance (FD; FID with Inception features), KID,
precision/recall on k-NN manifolds, and class statistics of generated digits.

    extractor = get_feature_extractor("mnist")            # or "inception", "random"
    real, _ = embed(extractor, real_images)               # images float NCHW in [-1, 1]
    fake, logits = embed(extractor, fake_images)
    scores = compare_features(real, fake)                 # {"fd", "kid_mean", "kid_std", "precision", "recall"}
    histogram = class_histogram(logits.argmax(1), 10)

All metrics take features [N, D] and work on any device; statistics are
computed in float64. FD and KID are distances (lower is better); precision
(fidelity) and recall (diversity) lie in [0, 1] (higher is better).
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffusekit.data import to_uint8
from diffusekit.errors import UserError

INCEPTION_WEIGHTS_ENV = "DIFFUSEKIT_INCEPTION_WEIGHTS"
DISTANCE_BLOCK = 1 << 24  # entries of one block of pairwise distances (64 MB in float32)


def check_features(a: torch.Tensor, b: torch.Tensor, min_count: int, metric: str) -> None:
    """Both sets are [N, D] with the same D and at least `min_count` rows, else a UserError."""
    if a.ndim != 2 or b.ndim != 2:
        raise UserError(f"{metric} needs feature matrices [N, D]; got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise UserError(f"{metric}: the two feature sets have {a.shape[1]} and {b.shape[1]} dimensions; compute both with the same feature extractor")
    if min(len(a), len(b)) < min_count:
        raise UserError(f"{metric} needs at least {min_count} samples per set, got {len(a)} and {len(b)}; evaluate more images")


# ----------------------------------------------------------------------------- Fréchet distance


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], covariance [D, D]) in float64; the covariance is unbiased (divides by N - 1), as in FID."""
    if features.ndim != 2 or len(features) < 2:
        raise UserError(f"feature statistics need at least 2 feature vectors [N, D]; got shape {tuple(features.shape)}")
    x = features.double()
    mu = x.mean(0)
    centered = x - mu
    return mu, centered.T @ centered / (len(x) - 1)


def sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric positive semi-definite matrix: V diag(sqrt(max(w, 0))) V^T."""
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """The Fréchet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982;
    FID: Heusel et al. 2017):

        d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

    S1 S2 is similar to the symmetric PSD matrix M = S1^(1/2) S2 S1^(1/2), so
    tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(M)): two symmetric eigen-decompositions
    in float64, tiny negative eigenvalues (round-off) clamped to 0. This stays
    real and stable for singular covariances (fewer samples than dimensions).
    """
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    root1 = sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return max(distance.item(), 0.0)


def fd_from_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """FD between Gaussians fitted to two feature sets [N, D] and [M, D]."""
    check_features(a, b, 2, "the Fréchet distance")
    return frechet_distance(*feature_stats(a), *feature_stats(b))


# ----------------------------------------------------------------------------- KID


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x.y / d + 1)^3, the cubic kernel of KID (Binkowski et al. 2018)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The unbiased (U-statistic) estimator of MMD^2 (Gretton et al. 2012; used by KID, Binkowski et al. 2018):

        1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j) - 2/(mn) sum_{i, j} k(x_i, y_j)
    """
    m, n = len(x), len(y)
    kxx, kyy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * polynomial_kernel(x, y).mean()


def kid(features_a: torch.Tensor, features_b: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: (mean, std) of the unbiased MMD^2 over `subsets` random subsets.

    Each subset draws min(subset_size, N_a, N_b) rows of each set without
    replacement (seeded). The estimator is unbiased, so two samples of one
    distribution give a mean near 0 (it can be slightly negative). std is the
    population std over subsets (ddof = 0, as torch-fidelity reports it).
    """
    check_features(features_a, features_b, 2, "KID")
    a, b = features_a.double(), features_b.double()
    size = min(subset_size, len(a), len(b))
    generator = torch.Generator().manual_seed(seed)

    def draw(x: torch.Tensor) -> torch.Tensor:
        return x[torch.randperm(len(x), generator=generator)[:size].to(x.device)]

    values = torch.stack([mmd2_unbiased(draw(a), draw(b)) for _ in range(subsets)])
    return values.mean().item(), values.std(correction=0).item()


# ----------------------------------------------------------------------------- precision / recall


def row_blocks(rows: int, columns: int) -> Iterable[slice]:
    """Slices of `rows` such that one block of pairwise distances has at most DISTANCE_BLOCK entries."""
    step = max(1, DISTANCE_BLOCK // max(columns, 1))
    return (slice(start, start + step) for start in range(0, rows, step))


def knn_radii(points: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each point to its k-th nearest other point (the point itself is at distance 0)."""
    return torch.cat([torch.cdist(points[rows], points).kthvalue(k + 1, dim=1).values for rows in row_blocks(len(points), len(points))])


def inside_manifold(queries: torch.Tensor, points: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """f(q) = 1 if |q - p| <= radius(p) for some p: a boolean per query (Kynkäänniemi et al. 2019, eq. 1)."""
    return torch.cat([(torch.cdist(queries[rows], points) <= radii[None, :]).any(dim=1) for rows in row_blocks(len(queries), len(points))])


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eq. 1-2).

    Each set's manifold is the union of balls around its points, each of radius
    the distance to the point's k-th nearest neighbour in the same set.
    precision = fraction of fake samples inside the real manifold (fidelity);
    recall = fraction of real samples inside the fake manifold (diversity).
    Distances are computed in blocks, so 10k x 10k points need ~64 MB at a time.
    """
    check_features(real, fake, k + 1, f"precision/recall with k={k}")
    precision = inside_manifold(fake, real, knn_radii(real, k)).float().mean().item()
    recall = inside_manifold(real, fake, knn_radii(fake, k)).float().mean().item()
    return precision, recall


def compare_features(real: torch.Tensor, fake: torch.Tensor, k: int = 3, kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """FD, KID (mean, std), precision and recall of `fake` against `real` features, as one dict."""
    kid_mean, kid_std = kid(real, fake, kid_subsets, kid_subset_size, seed)
    precision, recall = precision_recall(real, fake, k)
    return {"fd": fd_from_features(real, fake), "kid_mean": kid_mean, "kid_std": kid_std, "precision": precision, "recall": recall}


# ----------------------------------------------------------------------------- reconstruction


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB, for images in [-1, 1] (peak-to-peak 2):
    10 log10(2^2 / MSE)."""
    mse = (images.float() - references.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-12))


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(images: torch.Tensor, references: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004, eq. 13), images in [-1, 1] mapped to [0, 1]:

        SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))

    with local statistics under an 11 x 11 Gaussian window (sigma 1.5), C1 = 0.01^2, C2 = 0.03^2,
    averaged over positions (valid region) and channels.
    """
    x, y = (images.float() + 1) / 2, (references.float() + 1) / 2
    channels = x.shape[1]
    size = min(window, x.shape[-1], x.shape[-2])
    kernel = gaussian_window(size, sigma).to(x.device).expand(channels, 1, size, size)

    def blur(t):
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return value.flatten(1).mean(1)


# ----------------------------------------------------------------------------- class statistics


def class_histogram(predicted_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Fraction of samples per class, [num_classes], summing to 1 (mode collapse shows as empty classes)."""
    labels = predicted_labels.reshape(-1).long()
    if len(labels) == 0:
        raise UserError("a class histogram needs at least one predicted label")
    return torch.bincount(labels.cpu(), minlength=num_classes)[:num_classes].double() / len(labels)


def label_accuracy(predicted_labels: torch.Tensor, wanted_labels: torch.Tensor) -> float:
    """Fraction of samples whose predicted class is the class that was asked for."""
    predicted, wanted = predicted_labels.reshape(-1).cpu(), wanted_labels.reshape(-1).cpu()
    if len(predicted) != len(wanted) or len(predicted) == 0:
        raise UserError(f"label accuracy needs as many wanted labels as predictions (got {len(wanted)} and {len(predicted)})")
    return (predicted == wanted).double().mean().item()


# ----------------------------------------------------------------------------- feature extractors
#
# An extractor is an nn.Module: images float NCHW in [-1, 1] -> (features [N, D], logits [N, C] or None).


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class RandomConvFeatures(nn.Module):
    """A fixed, untrained conv net: the fallback for data without a trained feature network.

    Images go to RGB at 64 x 64, through three stride-2 3x3 convolutions
    (16, 32, 64 channels, ReLU) with He-scaled Gaussian weights drawn from a
    fixed seed, and are average-pooled to 2 x 2: 256 features. Randomly
    initialised embeddings track sample quality surprisingly well off ImageNet
    (Naeem et al. 2020, "Reliable fidelity and diversity metrics").

    Good for: comparing checkpoints, samplers or step counts of one model on one
    dataset; it reacts to noise, blur, colour shifts, layout and missing modes,
    and is the same on every machine. Bad for: numbers comparable with published
    FIDs (those need "inception"), semantics (it cannot tell a plausible cat from
    a texture with cat colours), and comparisons across seeds or datasets.
    """

    SIZE = 64

    def __init__(self, seed: int = 0, channels: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        layers: list[nn.Module] = []
        for cin, cout in zip((3, *channels), channels):
            conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False)
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2 / (cin * 9))
            layers += [conv, nn.ReLU()]
        self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten()).requires_grad_(False).eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        x = F.interpolate(to_rgb(images.float()), size=(self.SIZE, self.SIZE), mode="bilinear", antialias=True, align_corners=False)
        return self.body(x), None


# weights-file suffix -> (module, class) of the packages that run the standard FID Inception-v3 from it, tried in
# order (torchmetrics' class wraps torch-fidelity's), and the package to install when none imports
INCEPTION_BACKENDS = {
    ".pth": [("torch_fidelity.feature_extractor_inceptionv3", "FeatureExtractorInceptionV3"), ("torchmetrics.image.fid", "NoTrainInceptionV3")],
    ".pt": [("cleanfid.inception_torchscript", "InceptionV3W")],
}
INCEPTION_PACKAGES = {".pth": "torch-fidelity", ".pt": "clean-fid"}
INCEPTION_HELP = (
    f"pass weights=PATH or set {INCEPTION_WEIGHTS_ENV}=PATH to a local copy of the standard FID Inception-v3 weights: "
    "pt_inception-2015-12-05-6726825d.pth (used with torch-fidelity or torchmetrics installed) or "
    "inception-2015-12-05.pt (used with clean-fid installed); nothing is downloaded. "
    "Without them, use the 'mnist' features for digits or the 'random' features for other data"
)


def inception_weights_path(weights: str | Path | None) -> Path:
    """The Inception weights file from the argument or the environment, checked to exist."""
    chosen = weights or os.environ.get(INCEPTION_WEIGHTS_ENV)
    if not chosen:
        raise UserError(f"the 'inception' features need a weights file: {INCEPTION_HELP}")
    path = Path(chosen).expanduser()
    if not path.is_file():
        raise UserError(f"Inception weights file '{path}' not found: {INCEPTION_HELP}")
    if path.suffix not in INCEPTION_BACKENDS:
        raise UserError(f"Inception weights file '{path}' should end in .pth (torch-fidelity) or .pt (clean-fid TorchScript): {INCEPTION_HELP}")
    return path


def build_inception(path: Path) -> nn.Module:
    """The network from the first importable package that runs these weights; never downloads."""
    for module_name, class_name in INCEPTION_BACKENDS[path.suffix]:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue
        if path.suffix == ".pt" and path.name != "inception-2015-12-05.pt":  # clean-fid loads <folder>/<that name>
            raise UserError(f"clean-fid expects the TorchScript weights named inception-2015-12-05.pt; rename '{path}'")
        try:
            if path.suffix == ".pt":
                return cls(str(path.parent), download=False, resize_inside=True)
            return cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))
        except Exception as err:  # a damaged or foreign file fails deep inside the package
            raise UserError(f"cannot load the Inception weights '{path}' with {module_name} ({err}); {INCEPTION_HELP}") from None
    package = INCEPTION_PACKAGES[path.suffix]
    raise UserError(f"the Inception weights '{path}' need the {package} package to run them: pip install {package}")


class InceptionFeatures(nn.Module):
    """The 2048-d pool features of the standard FID Inception-v3 (Heusel et al. 2017), run by
    torch-fidelity / torchmetrics (.pth weights) or clean-fid (.pt TorchScript) from a local file.
    Images are quantised to uint8 RGB first, as the reference implementations do, and resized to
    299 x 299 inside the network."""

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        path = inception_weights_path(weights)
        self.torchscript = path.suffix == ".pt"
        self.net = build_inception(path).eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        pixels = to_uint8(to_rgb(images))
        out = self.net(pixels.float() if self.torchscript else pixels)
        return (out[0] if isinstance(out, (tuple, list)) else out).reshape(len(images), -1).float(), None


def digit_features(weights: str | Path | None = None) -> nn.Module:
    """The shipped digit network (diffusekit/nn/digits.py): 128 features and 10 digit logits."""
    from diffusekit.nn.digits import load_digit_net

    return load_digit_net(weights)


FEATURE_EXTRACTORS: dict[str, Callable[[str | Path | None], nn.Module]] = {
    "inception": InceptionFeatures,
    "mnist": digit_features,
    "random": lambda weights=None: RandomConvFeatures(),
}


def get_feature_extractor(name: str, weights: str | Path | None = None, device: torch.device | str = "cpu") -> nn.Module:
    """A feature extractor by name, in eval mode on `device`. `weights`: a local weights file
    ("inception": required unless the environment names one; "mnist": optional, the shipped net by default)."""
    if name not in FEATURE_EXTRACTORS:
        raise UserError(f"unknown feature extractor '{name}'; use one of {', '.join(FEATURE_EXTRACTORS)}")
    return FEATURE_EXTRACTORS[name](weights).to(device).eval()


@torch.no_grad()
def embed(extractor: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features (and logits, where the extractor has them) of images in [-1, 1], on the CPU.

    `images` is one tensor [N, C, H, W] (cut into batches of `batch_size`) or an
    iterable of such batches (to stream samples without holding them all).
    """
    device = next(iter(extractor.parameters()), torch.empty(0)).device
    batches = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    features, logits = [], []
    for batch in batches:
        batch_features, batch_logits = extractor(batch.to(device))
        features.append(batch_features.float().cpu())
        if batch_logits is not None:
            logits.append(batch_logits.float().cpu())
    if not features:
        raise UserError("no images to compute features of")
    return torch.cat(features), (torch.cat(logits) if logits else None)
