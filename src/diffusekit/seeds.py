"""Randomness that does not depend on how work is batched: a seed per stream, a generator per sample, noise drawn from them."""

from __future__ import annotations

import torch


def derive_seed(seed: int, index: int) -> int:
    """A seed for stream `index` (an epoch, a sample, a rank) of the run seed `seed`, within the 64 bits a
    torch.Generator takes (seeds are below 2^63, so small seeds give the same streams as ever)."""
    return (seed * 1_000_003 + index) % 2**64


def sample_generators(seed: int, count: int, start: int = 0) -> list[torch.Generator]:
    """One CPU generator per sample, so that image i of seed s never depends on the batch size."""
    return [torch.Generator().manual_seed(derive_seed(seed, start + i)) for i in range(count)]


def randn(shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Gaussian noise from None (global RNG), one generator, or a list of per-sample generators.

    Per-sample noise is drawn on the CPU and moved, so it is identical on every device.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        noise = torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype) for g in generator])
        return noise.to(device) if device is not None else noise
    if generator is not None and device is not None and generator.device != torch.device(device):
        return torch.randn(shape, generator=generator, dtype=dtype, device=generator.device).to(device)
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)
