"""The patch discriminator of the autoencoder's adversarial loss (PatchGAN: Isola et al. 2017,
as used by Esser et al. 2021 and Rombach et al. 2022).

It scores overlapping patches of an image as real or reconstructed, so it judges
local texture and sharpness, which an L1/L2 loss alone leaves blurry. GroupNorm
stands in for BatchNorm, which is unreliable at the small batches of a CPU.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDiscriminator(nn.Module):
    """conv4x4/2 -> [conv4x4/2 -> norm -> LeakyReLU] x (layers - 1) -> conv4x4/1 -> norm -> LeakyReLU -> conv4x4/1 -> 1 logit per patch."""

    def __init__(self, image_channels: int = 3, channels: int = 32, layers: int = 2, groups: int = 8):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(image_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            blocks += [nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False), nn.GroupNorm(min(groups, out), out), nn.LeakyReLU(0.2)]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Lim & Ye 2017): E[relu(1 - D(x))] + E[relu(1 + D(x_rec))], halved."""
    return 0.5 * (torch.relu(1 - logits_real).mean() + torch.relu(1 + logits_fake).mean())


def adaptive_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """Esser et al. 2021, eq. 7: lambda = ||grad_L[rec]|| / (||grad_L[gan]|| + 1e-4) at the decoder's last layer L,
    so that the adversarial term never swamps the reconstruction term."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0, max_weight).detach()
