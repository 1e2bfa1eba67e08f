"""A small digit network: features for FD/KID/precision-recall on MNIST-like
samples, and class logits for "does the model draw the digit it was asked for".

    net = load_digit_net()                 # the weights shipped in diffusekit/assets
    features, logits = net(images)         # images float NCHW in [-1, 1], any size, 1 or 3 channels

The weights are trained by benchmarks/train_digit_net.py on 4,000 of the 5,000
built-in MNIST digits; `heldout_split` names the other 1,000, on which its
accuracy is measured (written to assets/digit_net.json).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffusekit.errors import UserError
from diffusekit.files import read_tensors
from diffusekit.nn.state import load_state_dict_checked

DIGIT_SIZE = 28
FEATURE_DIM = 128
NUM_DIGITS = 10
HELDOUT_SIZE = 1000
HELDOUT_SEED = 0
WEIGHTS_NAME = "digit_net.safetensors"


def digit_net_weights_path() -> Path:
    """The shipped weights: diffusekit/assets/digit_net.safetensors."""
    return Path(str(resources.files("diffusekit") / "assets" / WEIGHTS_NAME))


def heldout_split(n: int = 5000, size: int = HELDOUT_SIZE, seed: int = HELDOUT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices), both sorted, from a fixed seeded permutation of n items.

    The indices are into load_mnist()'s order (the CSV's, sorted by label); the
    shipped weights never saw the held-out digits only as long as that order stays.
    """
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[size:].sort().values, order[:size].sort().values


def to_digit_input(images: torch.Tensor) -> torch.Tensor:
    """Float NCHW in [-1, 1], 1 or 3 channels, any size -> [N, 1, 28, 28] gray in [-1, 1].

    RGB becomes gray as the plain channel mean; other sizes are resized with an
    antialiased bilinear filter.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1 or 3, H, W], got {tuple(images.shape)}")
    x = images.float()
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (DIGIT_SIZE, DIGIT_SIZE):
        x = F.interpolate(x, size=(DIGIT_SIZE, DIGIT_SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitNet(nn.Module):
    """conv32 -> pool -> conv64 -> conv64 -> pool -> conv128 -> global average pool.

    The pooled 128-vector (after ReLU) is the feature vector; one linear layer on
    it gives the 10 class logits. About 0.1 M parameters, ~15 M multiply-adds per image.
    """

    def __init__(self, feature_dim: int = FEATURE_DIM, num_classes: int = NUM_DIGITS, dropout: float = 0.2):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(1, 32),
            nn.MaxPool2d(2),  # 14 x 14
            conv_bn_relu(32, 64),
            conv_bn_relu(64, 64),
            nn.MaxPool2d(2),  # 7 x 7
            conv_bn_relu(64, feature_dim),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images [N, C, H, W] in [-1, 1] -> (features [N, 128], logits [N, 10])."""
        features = self.body(to_digit_input(images))
        return features, self.head(self.dropout(features))


def load_digit_net(path: str | Path | None = None, device: torch.device | str = "cpu") -> DigitNet:
    """The trained digit network in eval mode (the shipped weights unless `path` is given)."""
    path = Path(path) if path is not None else digit_net_weights_path()
    if not path.is_file():
        raise UserError(f"digit network weights {path} not found; reinstall diffusekit or run benchmarks/train_digit_net.py")
    net = DigitNet()
    load_state_dict_checked(net, read_tensors(path), source=str(path))
    return net.to(device).eval()
